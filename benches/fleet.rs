//! Fleet simulator (issue 17): thousands of agent sessions, each the
//! library's own `Agent` (not a mock), in a few shard processes, against a
//! real station process. It reports what the station pays per idle device
//! (memory and CPU), how fast devices handshake, and how long the whole
//! fleet takes to come back after the station is killed and restarted.
//! A benchmark, not a test: nothing here asserts a figure.
//!
//! ```text
//!  fleet (this process) ─ writes N device keys and station.toml ─▶ postern station (process)
//!    ├ shard 0: agents 0..S   ┐  each Agent::run on one smol executor,
//!    ├ shard 1: agents S..2S  ├─ carrier `--carrier`, no forwards, idle
//!    └ ...                    ┘
//!  reads /metrics (postern_devices_connected) and /proc/PID (VmRSS, CPU time) of the station
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
       fleet --forwarding [--repeat N]
  --devices N    agent sessions (default 1000)
  --carrier C    their carrier (default poll)
  --idle SECS    idle time over which the station's CPU is measured (default 30)
  --shard N      agents per shard process (default 4000)
  --no-restart   skip killing and restarting the station
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

struct Options {
    devices: usize,
    carrier: String,
    idle: Duration,
    shard: usize,
    restart: bool,
    forwarding: bool,
    repeat: usize,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        devices: 1000,
        carrier: "poll".to_owned(),
        idle: Duration::from_secs(30),
        shard: 4000,
        restart: true,
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

/// A shard: `spec` is "station URL|station key|carrier|keys file|from|to".
/// Runs its agents until killed.
fn run_shard(spec: &str) {
    let parts: Vec<&str> = spec.split('|').collect();
    let [url, station_key, carrier, keys, from, to] = parts[..] else {
        panic!("{SHARD}: expected six fields, got {spec:?}");
    };
    let keys = std::fs::read_to_string(keys).expect("read the keys file");
    let (from, to): (usize, usize) = (from.parse().expect("from"), to.parse().expect("to"));
    let configs: Vec<AgentConfig> = keys
        .lines()
        .skip(from)
        .take(to - from)
        .map(|key| {
            let text = format!(
                "station = \"{url}\"\nstation_public_key = \"{station_key}\"\n\
                 private_key = \"{key}\"\ncarrier = \"{carrier}\"\n"
            );
            AgentConfig::parse(&text, "fleet").expect("a valid agent config")
        })
        .collect();
    smol::block_on(async {
        let mut running = Vec::with_capacity(configs.len());
        for config in configs {
            let agent = Agent::bind(config).await.expect("bind an agent");
            running.push(postern::task::spawn(agent.run()));
        }
        futures_lite::future::pending::<()>().await;
    });
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

/// Waits until `n` devices are connected; returns how long that took
/// since `since`.
fn wait_connected(station: &Station, n: usize, since: Instant) -> Result<Duration, String> {
    let mut last_print = Instant::now();
    let mut connected = 0;
    loop {
        // A /metrics of thousands of devices is large: a read that times
        // out under load keeps the last count rather than taking it for none.
        if let Some(now) = metric(station.status, "postern_devices_connected") {
            connected = now as usize;
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
    eprintln!("fleet: {n} devices, carrier {}", options.carrier);
    let keys: Vec<PrivateKey> = (0..n).map(|_| PrivateKey::generate()).collect();
    let keys_text: String = keys.iter().map(|k| k.to_base64() + "\n").collect();
    let keys_path = dir.write("keys", &keys_text);
    let (listen, status) = (free_port()?, free_port()?);
    // Two carrier connections a device, and room for reconnects.
    let max_connections = (2 * n + 1024).max(8192);
    let mut toml = format!(
        "listen = \"127.0.0.1:{listen}\"\nprivate_key = \"{}\"\nstatus = \"127.0.0.1:{status}\"\n\
         max_connections = {max_connections}\n\n[targets]\n",
        station_key.to_base64()
    );
    for (i, key) in keys.iter().enumerate() {
        let _ = write!(
            toml,
            "\n[[devices]]\nname = \"device-{i}\"\npublic_key = \"{}\"\n",
            key.public_key().to_base64()
        );
    }
    let config = dir.write("station.toml", &toml);
    let status = std::net::SocketAddr::from(([127, 0, 0, 1], status));
    let station = start_station(&postern, &config, status)?;
    thread::sleep(SETTLE);
    let baseline = station.proc.rss();

    let cpu_at_start = station.proc.cpu_seconds();
    let url = format!("http://127.0.0.1:{listen}/");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut shards = Vec::new();
    for from in (0..n).step_by(options.shard) {
        let to = (from + options.shard).min(n);
        let spec = format!(
            "{url}|{}|{}|{}|{from}|{to}",
            station_key.public_key().to_base64(),
            options.carrier,
            keys_path.display()
        );
        let (tx, _) = mpsc::channel();
        let mut command = Command::new(&exe);
        command.env(SHARD, spec);
        shards.push(Proc::spawn(&format!("shard {from}"), Side::Device, &mut command, tx)?);
    }
    let first = wait_connected(&station, n, started)?;
    let per_handshake = (station.proc.cpu_seconds() - cpu_at_start) / n as f64;
    thread::sleep(SETTLE);
    let cpu_before = station.proc.cpu_seconds();
    let idle_started = Instant::now();
    thread::sleep(options.idle);
    let cpu = station.proc.cpu_seconds() - cpu_before;
    let idle = idle_started.elapsed().as_secs_f64();
    let connected = metric(station.status, "postern_devices_connected").unwrap_or(0.0);
    let rss = station.proc.rss();
    let per_device = rss.saturating_sub(baseline) as f64 / 1024.0 / n as f64;
    let mut report = String::new();
    let _ = writeln!(
        report,
        "| {n} | {} | {:.1} | {:.1} | {per_device:.1} | {:.2} | {:.0} | {:.0} |",
        options.carrier,
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
    let mut back = String::from("-");
    if options.restart {
        drop(station);
        let killed = Instant::now();
        let station = start_station(&postern, &config, status)?;
        let returned = wait_connected(&station, n, killed)?;
        back = format!("{:.1}", returned.as_secs_f64());
        let connected = metric(station.status, "postern_devices_connected").unwrap_or(0.0);
        eprintln!(
            "restart: {connected} of {n} devices back {:.1} s after the station was killed",
            returned.as_secs_f64()
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
    Ok(())
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
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
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
