//! Fleet simulator (issue 17): thousands of agent sessions, each the
//! library's own `Agent` (not a mock), in a few shard processes, against a
//! real station process. It reports what the station pays per idle device
//! (memory and CPU), how fast devices handshake, and how long the whole
//! fleet takes to come back after the station is killed and restarted.
//! With `--traffic SECS` each device also polls an echo target on the
//! station's side, after the idle figures are read: what the station then
//! pays per device, the round trips' times, and any that failed.
//! A benchmark, not a test: nothing here asserts a figure.
//!
//! ```text
//!  fleet (this process) ─ writes N device keys and station.toml ─▶ postern station (process)
//!    ├ shard 0: agents 0..S   ┐  each Agent::run on one smol executor,
//!    ├ shard 1: agents S..2S  ├─ carrier `--carrier`, no forwards, idle
//!    └ ...                    ┘  (--traffic: one forward each, polled)
//!  reads /metrics (postern_devices_connected) and /proc/PID (VmRSS, CPU time) of the station
//!
//!  --traffic: poller ─▶ agent's forward ═ tunnel ═▶ station ─▶ echo (this process)
//! ```
//!
//! Shards are this same program started again with POSTERN_FLEET_SHARD
//! set, so that no process needs more file descriptors than the machine's
//! limit gives one.
//!
//! ```text
//! cargo bench --bench fleet -- --devices 10000 --carrier poll --idle 60
//! ```

// The integration tests' redis and haproxy recipes; that module takes
// `TempDir` and `refused_addr` from the tests' `common`.
#[path = "../tests/middleboxes/mod.rs"]
mod middleboxes;
mod support;
mod common {
    pub(crate) use super::support::{refused_addr, TempDir};
}

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use middleboxes::Middlebox;
use postern::agent::Agent;
use postern::config::AgentConfig;
use postern::keys::PrivateKey;
use support::{free_port, metric, parse_addr, wait_for_lines, Proc, Side, TempDir};

const USAGE: &str = "\
usage: fleet [--devices N] [--carrier poll|stream] [--idle SECS] [--shard N] [--no-restart]
             [--traffic SECS | --light] [--stations N]
       fleet --forwarding [--repeat N]
  --devices N    agent sessions (default 1000)
  --carrier C    their carrier (default poll)
  --idle SECS    idle time over which the station's CPU is measured (default 30)
  --traffic SECS after the idle figures, each device sends 64 to 256 bytes through
                 a forward to an echo every SECS (±25 %) and checks the echo; the
                 station is measured again over the same --idle time
  --light        --traffic 10 (a monitoring poll)
  --shard N      agents per shard process (default 4000)
  --no-restart   skip killing and restarting the station
  --stations N   N stations of a cluster (one redis-server) behind haproxy
                 balancing round-robin with no stickiness; the figures are the
                 stations' sums, and the restart is a failover: the first
                 station is killed and the others take its devices (default 1)
  --forwarding   instead: a cluster's forwarding cost, rate and latency of one
                 device whose requests all reach the station not holding its
                 session, beside the same path with no forwarding
  --repeat N     measurements of each forwarding row, median reported (default 3)";

/// The environment variable that makes this program a shard.
const SHARD: &str = "POSTERN_FLEET_SHARD";

/// Longest the fleet may take to connect, at start or after a restart.
const CONNECT_LIMIT: Duration = Duration::from_secs(900);

/// How long the station sits after a change before its memory is read.
const SETTLE: Duration = Duration::from_secs(5);

/// `--light`: seconds between one device's messages, as a monitoring
/// system polls (Modbus, SNMP): 100 messages/s at the station per 1,000.
const LIGHT: Duration = Duration::from_secs(10);

/// Longest one message may take to come back before it counts as failed.
const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(10);

struct Options {
    devices: usize,
    carrier: String,
    idle: Duration,
    shard: usize,
    restart: bool,
    /// Stations; more than one: a cluster behind a balancer.
    stations: usize,
    /// Seconds between one device's messages; `None`: idle only.
    traffic: Option<Duration>,
    forwarding: bool,
    repeat: usize,
}

impl Options {
    /// The carrier, and the stations when more than one, for the tables.
    fn label(&self) -> String {
        match self.stations {
            1 => self.carrier.clone(),
            n => format!("{}, {n} stations", self.carrier),
        }
    }
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        devices: 1000,
        carrier: "poll".to_owned(),
        idle: Duration::from_secs(30),
        shard: 4000,
        restart: true,
        stations: 1,
        traffic: None,
        forwarding: false,
        repeat: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let number = |text: String| text.parse::<usize>().map_err(|e| format!("{text}: {e}"));
        match arg.as_str() {
            "--devices" => options.devices = number(value("--devices")?)?.max(1),
            "--carrier" => options.carrier = value("--carrier")?,
            "--idle" => options.idle = Duration::from_secs(number(value("--idle")?)? as u64),
            "--shard" => options.shard = number(value("--shard")?)?.max(1),
            "--no-restart" => options.restart = false,
            "--stations" => options.stations = number(value("--stations")?)?.max(1),
            "--traffic" => {
                let secs = number(value("--traffic")?)?.max(1);
                options.traffic = Some(Duration::from_secs(secs as u64));
            }
            "--light" => options.traffic = Some(LIGHT),
            "--forwarding" => options.forwarding = true,
            "--repeat" => options.repeat = number(value("--repeat")?)?.max(1),
            // cargo bench passes --bench.
            "--bench" => {}
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(options)
}

fn main() {
    if let Ok(spec) = std::env::var(SHARD) {
        run_shard(&spec);
        return;
    }
    let result = options().and_then(|options| {
        if options.forwarding {
            forwarding(&options)
        } else {
            simulate(&options)
        }
    });
    if let Err(e) = result {
        eprintln!("fleet: {e}");
        std::process::exit(1);
    }
}

/// A shard: `spec` is "station URL|station key|carrier|keys file|from|to|
/// traffic", where traffic is "-" (idle) or "ms between messages,seconds
/// to wait for the go file,go file". Runs its agents until killed.
fn run_shard(spec: &str) {
    let parts: Vec<&str> = spec.splitn(7, '|').collect();
    let [url, station_key, carrier, keys, from, to, traffic] = parts[..] else {
        panic!("{SHARD}: expected seven fields, got {spec:?}");
    };
    let traffic = ShardTraffic::parse(traffic);
    let keys = std::fs::read_to_string(keys).expect("read the keys file");
    let (from, to): (usize, usize) = (from.parse().expect("from"), to.parse().expect("to"));
    // With traffic, one forward to the station's echo target each.
    let forward = if traffic.is_some() {
        "\n[[forward]]\nlisten = \"127.0.0.1:0\"\ntarget = \"echo\"\n"
    } else {
        ""
    };
    let configs: Vec<AgentConfig> = keys
        .lines()
        .skip(from)
        .take(to - from)
        .map(|key| {
            let text = format!(
                "station = \"{url}\"\nstation_public_key = \"{station_key}\"\n\
                 private_key = \"{key}\"\ncarrier = \"{carrier}\"\n{forward}"
            );
            AgentConfig::parse(&text, "fleet").expect("a valid agent config")
        })
        .collect();
    smol::block_on(async {
        let mut running = Vec::with_capacity(configs.len());
        let mut forwards = Vec::new();
        for config in configs {
            let agent = Agent::bind(config).await.expect("bind an agent");
            forwards.extend(agent.forward_addrs());
            running.push(postern::task::spawn(agent.run()));
        }
        if let Some(traffic) = traffic {
            traffic.run(&forwards, from).await;
        }
        futures_lite::future::pending::<()>().await;
    });
}

/// A shard's side of `--traffic`: its devices' pollers, started once the
/// fleet creates the go file (after it has read the idle figures).
struct ShardTraffic {
    every: Duration,
    wait: Duration,
    go: PathBuf,
}

impl ShardTraffic {
    fn parse(field: &str) -> Option<ShardTraffic> {
        if field == "-" {
            return None;
        }
        let mut parts = field.splitn(3, ',');
        let mut number = || -> u64 {
            let text = parts.next().unwrap_or_default();
            text.parse().unwrap_or_else(|e| panic!("{SHARD}: traffic {field:?}: {e}"))
        };
        let (every, wait) = (Duration::from_millis(number()), Duration::from_secs(number()));
        let go = PathBuf::from(parts.next().unwrap_or_else(|| panic!("{SHARD}: no go file")));
        Some(ShardTraffic { every, wait, go })
    }

    fn spec(every: Duration, wait: Duration, go: &std::path::Path) -> String {
        format!("{},{},{}", every.as_millis(), wait.as_secs(), go.display())
    }

    /// Starts a poller for each of `forwards` (device `first` onwards) once
    /// the go file is there; they run until the shard is killed.
    async fn run(self, forwards: &[SocketAddr], first: usize) {
        let deadline = Instant::now() + self.wait;
        // A file looked for ten times a second: one stat, nothing the
        // station sees.
        while !self.go.exists() {
            if Instant::now() > deadline {
                eprintln!("traffic failed: no go from the fleet within {:?}", self.wait);
                return;
            }
            async_io::Timer::after(Duration::from_millis(100)).await;
        }
        for (i, &forward) in forwards.iter().enumerate() {
            postern::task::spawn(poll_echo(forward, (first + i) as u64, self.every)).detach();
        }
    }
}

/// One device's light traffic: a message of 64 to 256 bytes through its
/// forward every `every` (±25 %, the first at a random moment within it,
/// so that the fleet does not send in step), on one kept connection as a
/// monitoring poller keeps it. Each round trip goes to stderr, which the
/// fleet reads: `traffic ok MICROSECONDS` or `traffic failed WHY`. A
/// failure drops the connection; the next message opens a new one.
async fn poll_echo(forward: SocketAddr, device: u64, every: Duration) {
    let mut random = Random::new(device);
    async_io::Timer::after(every.mul_f64(random.unit())).await;
    let mut socket = None;
    // Until the shard is killed, as its agents; each round trip is bounded.
    for sequence in 0u64.. {
        let started = Instant::now();
        let message = random.message(device, sequence);
        let timed_out = || std::io::Error::other(format!("no echo within {ROUND_TRIP_LIMIT:?}"));
        let result = postern::task::within(
            ROUND_TRIP_LIMIT,
            timed_out,
            round_trip(&mut socket, forward, &message),
        )
        .await;
        match result {
            Ok(()) => eprintln!("traffic ok {}", started.elapsed().as_micros()),
            Err(e) => {
                socket = None;
                eprintln!("traffic failed: device {device}, message {sequence}: {e}");
            }
        }
        async_io::Timer::at(started + every.mul_f64(0.75 + 0.5 * random.unit())).await;
    }
}

/// Sends `message` on `socket` (opened to `forward` first if it is not)
/// and reads the echo, which must be the same bytes.
async fn round_trip(
    socket: &mut Option<smol::net::TcpStream>,
    forward: SocketAddr,
    message: &[u8],
) -> std::io::Result<()> {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    let socket = match socket {
        Some(socket) => socket,
        None => {
            let opened = smol::net::TcpStream::connect(forward).await?;
            opened.set_nodelay(true)?;
            socket.insert(opened)
        }
    };
    socket.write_all(message).await?;
    let mut back = vec![0u8; message.len()];
    socket.read_exact(&mut back).await?;
    if back != message {
        return Err(std::io::Error::other("the echo came back changed"));
    }
    Ok(())
}

/// splitmix64: jitter and message bytes, with no dependency for them.
struct Random(u64);

impl Random {
    fn new(seed: u64) -> Random {
        Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// 64 to 256 bytes: the device and the message's number first, so that
    /// an echo from another device's stream or an old message shows, then
    /// random bytes.
    fn message(&mut self, device: u64, sequence: u64) -> Vec<u8> {
        let len = 64 + (self.next() % 193) as usize;
        let mut message = Vec::with_capacity(len);
        message.extend_from_slice(&device.to_le_bytes());
        message.extend_from_slice(&sequence.to_le_bytes());
        while message.len() < len {
            message.extend_from_slice(&self.next().to_le_bytes());
        }
        message.truncate(len);
        message
    }
}

/// The station process, its config and where it serves.
struct Station {
    proc: Proc,
    status: std::net::SocketAddr,
}

fn start_station(
    postern: &PathBuf,
    config: &PathBuf,
    status: std::net::SocketAddr,
) -> Result<Station, String> {
    let (tx, _) = mpsc::channel();
    let mut command = Command::new(postern);
    // Warnings only: a fleet's handshakes would flood the info level.
    command.arg("station").arg("-c").arg(config).env("POSTERN_LOG", "warn");
    let station =
        Station { proc: Proc::spawn("postern station", Side::Central, &mut command, tx)?, status };
    let deadline = Instant::now() + Duration::from_secs(20);
    // Up once /metrics answers.
    while metric(station.status, "postern_devices_connected").is_none() {
        if Instant::now() > deadline || !station.proc.is_running() {
            return Err(format!("the station did not start: {}", station.proc.recent_log()));
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(station)
}

/// The station processes of a run: one, or a cluster's; figures are
/// their sums.
struct Stations(Vec<Station>);

impl Stations {
    fn cpu_seconds(&self) -> f64 {
        self.0.iter().map(|s| s.proc.cpu_seconds()).sum()
    }

    fn rss(&self) -> u64 {
        self.0.iter().map(|s| s.proc.rss()).sum()
    }

    /// Devices connected, or `None` if a station's /metrics did not answer.
    fn connected(&self) -> Option<usize> {
        self.0
            .iter()
            .map(|s| metric(s.status, "postern_devices_connected").map(|n| n as usize))
            .sum()
    }
}

/// Waits until `n` devices are connected; returns how long that took
/// since `since`.
fn wait_connected(stations: &Stations, n: usize, since: Instant) -> Result<Duration, String> {
    let mut last_print = Instant::now();
    let mut connected = 0;
    loop {
        // A /metrics of thousands of devices is large: a read that times
        // out under load keeps the last count rather than taking it for none.
        if let Some(now) = stations.connected() {
            connected = now;
        }
        if connected >= n {
            return Ok(since.elapsed());
        }
        if since.elapsed() > CONNECT_LIMIT {
            return Err(format!("{connected} of {n} devices connected within {CONNECT_LIMIT:?}"));
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            eprintln!("  {:>5.0} s: {connected} of {n} connected", since.elapsed().as_secs_f64());
            last_print = Instant::now();
        }
        thread::sleep(Duration::from_millis(250));
    }
}

fn simulate(options: &Options) -> Result<(), String> {
    let postern = PathBuf::from(env!("CARGO_BIN_EXE_postern"));
    let n = options.devices;
    let dir = TempDir::new("fleet");
    let station_key = PrivateKey::generate();
    eprintln!("fleet: {n} devices, carrier {}", options.label());
    let keys: Vec<PrivateKey> = (0..n).map(|_| PrivateKey::generate()).collect();
    let keys_text: String = keys.iter().map(|k| k.to_base64() + "\n").collect();
    let keys_path = dir.write("keys", &keys_text);
    // Two carrier connections a device, and room for reconnects.
    let max_connections = (2 * n + 1024).max(8192);
    // With traffic, every device may reach the echo; without, the config
    // is as it always was, so that idle figures stay comparable.
    let (target, allow) = match options.traffic {
        Some(_) => (format!("echo = \"{}\"\n", echo_server()?), "allow = [\"echo\"]\n"),
        None => (String::new(), ""),
    };
    let mut devices = String::new();
    for (i, key) in keys.iter().enumerate() {
        let _ = write!(
            devices,
            "\n[[devices]]\nname = \"device-{i}\"\npublic_key = \"{}\"\n{allow}",
            key.public_key().to_base64()
        );
    }
    // A cluster's stations share one store and their key.
    let redis = (options.stations > 1).then(Middlebox::redis);
    let cluster = redis.as_ref().map_or(String::new(), |redis| {
        format!("\n[cluster]\nstore = \"{}\"\npeer = \"127.0.0.1:0\"\n", redis.addr)
    });
    let mut configs = Vec::new();
    let mut listens = Vec::new();
    for i in 0..options.stations {
        let (listen, status) = (free_port()?, free_port()?);
        let toml = format!(
            "listen = \"127.0.0.1:{listen}\"\nprivate_key = \"{}\"\nstatus = \"127.0.0.1:{status}\"\n\
             max_connections = {max_connections}\n\n[targets]\n{target}{devices}{cluster}",
            station_key.to_base64()
        );
        let status = std::net::SocketAddr::from(([127, 0, 0, 1], status));
        configs.push((dir.write(&format!("station-{i}.toml"), &toml), status));
        listens.push(std::net::SocketAddr::from(([127, 0, 0, 1], listen)));
    }
    let mut stations = Stations(Vec::new());
    for (config, status) in &configs {
        stations.0.push(start_station(&postern, config, *status)?);
    }
    // As README.md sets haproxy before stations (http-no-delay), with
    // room for every device's two connections and timeouts past a poll's
    // hold; each takes haproxy two descriptors, of the 20,000 it may have
    // here.
    let balancer = (options.stations > 1).then(|| {
        let room = (2 * n + 1024).min(9000);
        Middlebox::haproxy_round_robin_for(&listens, 120, room, "  option http-no-delay\n")
    });
    thread::sleep(SETTLE);
    let baseline = stations.rss();

    let cpu_at_start = stations.cpu_seconds();
    let url = format!("http://{}/", balancer.as_ref().map_or(listens[0], |b| b.addr));
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // The shards' traffic starts when this file appears; they wait for it
    // as long as the fleet may take to get there.
    let go = dir.path().join("go");
    let traffic_spec = match options.traffic {
        Some(every) => ShardTraffic::spec(every, CONNECT_LIMIT + 2 * SETTLE + options.idle, &go),
        None => "-".to_owned(),
    };
    let started = Instant::now();
    let mut shards = Vec::new();
    // Every shard's stderr: with traffic, a line a round trip.
    let (tx, shard_lines) = mpsc::channel();
    for from in (0..n).step_by(options.shard) {
        let to = (from + options.shard).min(n);
        let spec = format!(
            "{url}|{}|{}|{}|{from}|{to}|{traffic_spec}",
            station_key.public_key().to_base64(),
            options.carrier,
            keys_path.display()
        );
        let mut command = Command::new(&exe);
        command.env(SHARD, spec);
        let name = format!("shard {from}");
        shards.push(Proc::spawn(&name, Side::Device, &mut command, tx.clone())?);
    }
    let first = wait_connected(&stations, n, started)?;
    let per_handshake = (stations.cpu_seconds() - cpu_at_start) / n as f64;
    thread::sleep(SETTLE);
    let cpu_before = stations.cpu_seconds();
    let idle_started = Instant::now();
    thread::sleep(options.idle);
    let cpu = stations.cpu_seconds() - cpu_before;
    let idle = idle_started.elapsed().as_secs_f64();
    let connected = stations.connected().unwrap_or(0);
    let rss = stations.rss();
    let per_device = rss.saturating_sub(baseline) as f64 / 1024.0 / n as f64;
    let mut report = String::new();
    let _ = writeln!(
        report,
        "| {n} | {} | {:.1} | {:.1} | {per_device:.1} | {:.2} | {:.0} | {:.0} |",
        options.label(),
        baseline as f64 / 1048576.0,
        rss as f64 / 1048576.0,
        cpu / idle * 100.0,
        first.as_secs_f64(),
        n as f64 / first.as_secs_f64(),
    );
    eprintln!(
        "connecting: {:.0} µs of station CPU per device (handshake, lanes, and the refusals \
         of those told to wait)",
        per_handshake * 1e6
    );
    eprintln!(
        "station: {:.1} MiB configured, {:.1} MiB with {connected} of {n} idle: {per_device:.1} KiB \
         per device; {:.2}% of a core idle ({:.1} µs/device/s); all connected in {:.1} s",
        baseline as f64 / 1048576.0,
        rss as f64 / 1048576.0,
        cpu / idle * 100.0,
        cpu / idle / n as f64 * 1e6,
        first.as_secs_f64(),
    );
    let traffic = match options.traffic {
        Some(every) => {
            let figures = measure_traffic(&stations, &shard_lines, &go, every, options.idle)?;
            figures.row(options, baseline, cpu / idle)
        }
        None => String::new(),
    };
    let mut back = String::from("-");
    if options.restart {
        // Alone, the station is killed and started again; in a cluster the
        // first is killed for good and the others take its devices.
        drop(stations.0.remove(0));
        let killed = Instant::now();
        if stations.0.is_empty() {
            let (config, status) = &configs[0];
            stations.0.push(start_station(&postern, config, *status)?);
        }
        let returned = wait_connected(&stations, n, killed)?;
        back = format!("{:.1}", returned.as_secs_f64());
        let connected = stations.connected().unwrap_or(0);
        eprintln!(
            "restart: {connected} of {n} devices back {:.1} s after a station was killed \
             ({} left)",
            returned.as_secs_f64(),
            stations.0.len()
        );
    }
    drop(shards);
    println!(
        "| devices | carrier | station MiB, configured | MiB, all idle | KiB per idle device | \
         % of a core, idle | s to connect all | handshakes/s | s back after restart |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    print!("{}", report.trim_end().trim_end_matches('|'));
    println!("| {back} |");
    if !traffic.is_empty() {
        println!(
            "\n| devices | carrier | s between messages | messages/s | ms round trip, p50 | p99 | \
             failed or changed | MiB, with traffic | KiB per device | % of a core | \
             µs of station CPU per message |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        println!("{traffic}");
    }
    Ok(())
}

/// What the station carried and paid under `--traffic`, over the window.
struct TrafficFigures {
    every: Duration,
    window: f64,
    /// Station CPU seconds over the window.
    cpu: f64,
    rss: u64,
    trips: RoundTrips,
    /// Failures since the traffic began (the window's and the warm-up's),
    /// and all the round trips tried since.
    failed: usize,
    tried: usize,
}

/// Starts the shards' traffic (creates `go`), lets every device open its
/// connection and send once, then measures the station over `window` as
/// the idle figures were measured.
fn measure_traffic(
    stations: &Stations,
    lines: &mpsc::Receiver<String>,
    go: &std::path::Path,
    every: Duration,
    window: Duration,
) -> Result<TrafficFigures, String> {
    std::fs::write(go, "").map_err(|e| format!("cannot write {}: {e}", go.display()))?;
    eprintln!("traffic: a message every {every:?} a device; measuring after {:?}", every + SETTLE);
    // Each device's first message goes within `every`.
    thread::sleep(every + SETTLE);
    let warm_up = RoundTrips::take(lines);
    let cpu_before = stations.cpu_seconds();
    let started = Instant::now();
    thread::sleep(window);
    let cpu = stations.cpu_seconds() - cpu_before;
    let window = started.elapsed().as_secs_f64();
    let rss = stations.rss();
    let trips = RoundTrips::take(lines);
    let failed = warm_up.failed + trips.failed;
    let tried = warm_up.tried() + trips.tried();
    if let Some(line) = warm_up.first_failure.as_ref().or(trips.first_failure.as_ref()) {
        eprintln!("traffic: {failed} of {tried} failed; the first: {line}");
    }
    Ok(TrafficFigures { every, window, cpu, rss, trips, failed, tried })
}

impl TrafficFigures {
    /// The table row, beside `idle_cpu` (cores) and the station's memory
    /// before any device came (`baseline`).
    fn row(mut self, options: &Options, baseline: u64, idle_cpu: f64) -> String {
        let n = options.devices as f64;
        let rate = self.trips.millis.len() as f64 / self.window;
        let share = self.cpu / self.window;
        let per_device = self.rss.saturating_sub(baseline) as f64 / 1024.0 / n;
        // What a message adds to what the idle fleet costs anyway.
        let per_message = (share - idle_cpu) / rate.max(f64::MIN_POSITIVE) * 1e6;
        let (p50, p99) =
            (percentile(&mut self.trips.millis, 0.50), percentile(&mut self.trips.millis, 0.99));
        eprintln!(
            "traffic: {rate:.1} messages/s over {:.0} s, round trip {p50:.2} ms p50, \
             {p99:.2} ms p99; {} of {} failed or changed; station {:.1} MiB, {per_device:.1} \
             KiB per device, {:.2}% of a core ({per_message:.0} µs per message above idle)",
            self.window,
            self.failed,
            self.tried,
            self.rss as f64 / 1048576.0,
            share * 100.0
        );
        format!(
            "| {} | {} | {} | {rate:.1} | {p50:.2} | {p99:.2} | {} of {} | {:.1} | \
             {per_device:.1} | {:.2} | {per_message:.0} |",
            options.devices,
            options.label(),
            self.every.as_secs_f64(),
            self.failed,
            self.tried,
            self.rss as f64 / 1048576.0,
            share * 100.0
        )
    }
}

/// The round trips the shards reported (`traffic ok` and `traffic failed`
/// lines, written by [`poll_echo`]).
#[derive(Default)]
struct RoundTrips {
    millis: Vec<f64>,
    failed: usize,
    first_failure: Option<String>,
}

impl RoundTrips {
    /// Those reported since the last call; the shards' other lines are
    /// left to their logs.
    fn take(lines: &mpsc::Receiver<String>) -> RoundTrips {
        let mut trips = RoundTrips::default();
        for line in lines.try_iter() {
            if let Some(micros) = line.strip_prefix("traffic ok ") {
                trips.millis.push(micros.parse::<f64>().unwrap_or(f64::NAN) / 1000.0);
            } else if line.starts_with("traffic failed") {
                trips.failed += 1;
                trips.first_failure.get_or_insert(line);
            }
        }
        trips
    }

    fn tried(&self) -> usize {
        self.millis.len() + self.failed
    }
}

/// Bytes each way of a forwarding rate measurement.
const TRANSFER: usize = 64 << 20;

/// Round trips of 64 bytes per latency measurement.
const PINGS: usize = 200;

/// Two stations of a cluster on one redis-server behind haproxy, which
/// sends each hello to the first and every other request to `rest`: the
/// first station when `forwarded` is false (a direct hit), the second
/// (which forwards each to the first) when it is true. An agent process on
/// `carrier` forwards to an echo target.
struct ClusterPath {
    forward: SocketAddr,
    _agent: Proc,
    _balancer: Middlebox,
    _stations: Vec<Proc>,
    _redis: Middlebox,
    _dir: TempDir,
}

fn cluster_path(carrier: &str, forwarded: bool, echo: SocketAddr) -> Result<ClusterPath, String> {
    let postern = PathBuf::from(env!("CARGO_BIN_EXE_postern"));
    let dir = TempDir::new("forwarding");
    let redis = Middlebox::redis();
    let (station_key, device_key) = (PrivateKey::generate(), PrivateKey::generate());
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nprivate_key = \"{}\"\n\n[targets]\necho = \"{echo}\"\n\n\
         [[devices]]\nname = \"bench\"\npublic_key = \"{}\"\nallow = [\"echo\"]\n\n\
         [cluster]\nstore = \"{}\"\npeer = \"127.0.0.1:0\"\n",
        station_key.to_base64(),
        device_key.public_key().to_base64(),
        redis.addr
    );
    let config = dir.write("station.toml", &toml);
    let mut stations = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..2 {
        let (tx, lines) = mpsc::channel();
        let mut command = Command::new(&postern);
        command.arg("station").arg("-c").arg(&config);
        let station = Proc::spawn(&format!("station {i}"), Side::Central, &mut command, tx)?;
        let found = wait_for_lines(&lines, &["station listening on "], &station)?;
        addrs.push(parse_addr(&found[0]).ok_or(format!("no address in {:?}", found[0]))?);
        stations.push(station);
    }
    let rest = if forwarded { addrs[1] } else { addrs[0] };
    let balancer = Middlebox::haproxy_split(addrs[0], rest);
    let agent_toml = format!(
        "station = \"http://{}/\"\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n\
         carrier = \"{carrier}\"\n\n[[forward]]\nlisten = \"127.0.0.1:0\"\ntarget = \"echo\"\n",
        balancer.addr,
        station_key.public_key().to_base64(),
        device_key.to_base64()
    );
    let agent_config = dir.write("agent.toml", &agent_toml);
    let (tx, lines) = mpsc::channel();
    let mut command = Command::new(&postern);
    command.arg("agent").arg("-c").arg(&agent_config);
    let agent = Proc::spawn("agent", Side::Device, &mut command, tx)?;
    let found = wait_for_lines(&lines, &["forwarding ", "connected to the station"], &agent)?;
    let forward = parse_addr(&found[0]).ok_or(format!("no address in {:?}", found[0]))?;
    Ok(ClusterPath {
        forward,
        _agent: agent,
        _balancer: balancer,
        _stations: stations,
        _redis: redis,
        _dir: dir,
    })
}

/// An echo server on loopback, one thread per connection.
fn echo_server() -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    thread::spawn(move || {
        for socket in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = socket.set_nodelay(true);
                let (mut reader, mut writer) = (&socket, &socket);
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = socket.shutdown(Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

/// MB/s of [`TRANSFER`] bytes sent and echoed back at once, checked.
fn rate(forward: SocketAddr) -> Result<f64, String> {
    let socket = TcpStream::connect(forward).map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    let _ = socket.set_nodelay(true);
    let mut writer = socket.try_clone().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let sender = thread::spawn(move || {
        let block: Vec<u8> = (0..128 * 1024).map(|i| (i * 7 + i / 251) as u8).collect();
        for _ in 0..TRANSFER / block.len() {
            if writer.write_all(&block).is_err() {
                break;
            }
        }
        let _ = writer.shutdown(Shutdown::Write);
        block
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 128 * 1024];
    let mut reader = &socket;
    let mut mismatch = false;
    while got < TRANSFER {
        let n = reader.read(&mut buf).map_err(|e| format!("after {got} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        mismatch |= buf[..n].iter().enumerate().any(|(i, b)| {
            let at = (got + i) % (128 * 1024);
            *b != (at * 7 + at / 251) as u8
        });
        got += n;
    }
    let elapsed = started.elapsed();
    let _ = sender.join();
    if got != TRANSFER || mismatch {
        return Err(format!("{got} of {TRANSFER} bytes came back (changed: {mismatch})"));
    }
    Ok(TRANSFER as f64 / elapsed.as_secs_f64() / 1e6)
}

/// Median milliseconds of [`PINGS`] 64-byte round trips.
fn latency(forward: SocketAddr) -> Result<f64, String> {
    let mut socket = TcpStream::connect(forward).map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    let _ = socket.set_nodelay(true);
    let mut times = Vec::with_capacity(PINGS);
    let mut message = [0u8; 64];
    for i in 0..PINGS + 10 {
        message[0] = i as u8;
        let started = Instant::now();
        socket.write_all(&message).map_err(|e| e.to_string())?;
        let mut back = [0u8; 64];
        socket.read_exact(&mut back).map_err(|e| e.to_string())?;
        if back != message {
            return Err("a ping came back changed".to_owned());
        }
        // The first few set the path up.
        if i >= 10 {
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(median(&mut times))
}

fn median(values: &mut [f64]) -> f64 {
    percentile(values, 0.5)
}

/// The value `share` of the way up `values` (sorted here); NaN if empty.
fn percentile(values: &mut [f64], share: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let at = ((values.len() as f64 * share) as usize).min(values.len().saturating_sub(1));
    values.get(at).copied().unwrap_or(f64::NAN)
}

fn forwarding(options: &Options) -> Result<(), String> {
    let echo = echo_server()?;
    println!("| carrier | path | MB/s each way | ms per 64-byte round trip |");
    println!("|---|---|---:|---:|");
    for carrier in ["stream", "poll"] {
        let mut rows = Vec::new();
        for forwarded in [false, true] {
            let path = cluster_path(carrier, forwarded, echo)?;
            // A warm-up: windows open, connections pooled.
            rate(path.forward)?;
            let mut rates = Vec::new();
            let mut pings = Vec::new();
            for _ in 0..options.repeat {
                rates.push(rate(path.forward)?);
                pings.push(latency(path.forward)?);
            }
            let (r, l) = (median(&mut rates), median(&mut pings));
            let label =
                if forwarded { "forwarded by the other station" } else { "direct to the holder" };
            println!("| {carrier} | {label} | {r:.1} | {l:.2} |");
            rows.push((r, l));
        }
        println!(
            "| {carrier} | forwarded / direct | {:.2}× | {:.2}× |",
            rows[1].0 / rows[0].0,
            rows[1].1 / rows[0].1
        );
    }
    Ok(())
}
