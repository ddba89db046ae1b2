//! Memory figures taken after the rounds: each tunnel's processes holding
//! one idle stream, and the station's memory per connected idle device.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use postern::keys::PrivateKey;

use crate::args::Options;
use crate::peers::{start_httptunnel, start_rathole, start_wstunnel};
use crate::postern::Postern;
use crate::routes::Via;
use crate::support::{metric, parse_addr, wait_for_lines, Proc, Side, TempDir};
use crate::targets::Targets;
use crate::transfer::{connect, MESSAGE};
use crate::{MIB, WARM_UP_LIMIT};

/// How long a process sits idle before its resident memory is read: long
/// enough for buffers of the set-up to be freed and the figure to settle.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);

/// Longest the idle devices of the station memory test may take to connect.
const CONNECT_LIMIT: Duration = Duration::from_secs(90);

/// The tunnels whose idle memory is measured.
enum IdleTunnel<'a> {
    /// A postern agent binary, and its carrier; the station is the release build.
    Postern(&'a Path, &'static str),
    Httptunnel,
    /// rathole, with the Noise transport or plain TCP.
    Rathole(bool),
    Wstunnel,
}

/// Resident memory of a tunnel's two ends with one open, idle stream.
pub(crate) struct Idle {
    pub(crate) label: String,
    /// Of the device side: VmRSS and RssAnon (its own pages, without the
    /// shared libraries' and the binary's file pages); VmRSS of the central
    /// side; or why not.
    pub(crate) rss: Result<[u64; 3], String>,
}

/// Starts a fresh instance of each tunnel, opens one stream to the echo
/// target through it, exchanges a few messages, waits for the processes to
/// settle and reads their VmRSS: what the device-side process costs a
/// board while a connection is open and quiet.
pub(crate) fn idle_memory(targets: &Targets, options: &Options) -> Vec<Idle> {
    let echo = [("echo", targets.echo)];
    let mut tunnels: Vec<(String, IdleTunnel)> = Vec::new();
    for (label, agent) in &options.device_agents {
        tunnels.push((format!("postern agent, {label}"), IdleTunnel::Postern(agent, "stream")));
    }
    tunnels.push((
        "postern agent, release build (agent and station, glibc, dynamic)".to_owned(),
        IdleTunnel::Postern(&options.postern, "stream"),
    ));
    tunnels.push(("GNU httptunnel htc".to_owned(), IdleTunnel::Httptunnel));
    for noise in [false, true] {
        let transport = if noise { "noise" } else { "tcp" };
        tunnels
            .push((format!("rathole client, transport {transport}"), IdleTunnel::Rathole(noise)));
    }
    tunnels.push(("wstunnel client".to_owned(), IdleTunnel::Wstunnel));
    let start = |tunnel: &IdleTunnel| match *tunnel {
        IdleTunnel::Postern(agent, carrier) => {
            Postern { station: &options.postern, agent, carrier, via: Via::Direct, delay: None }
                .start(&echo)
        }
        IdleTunnel::Httptunnel => start_httptunnel(&echo, None, None),
        IdleTunnel::Rathole(noise) => start_rathole(&echo, options.rathole()?, noise, None),
        IdleTunnel::Wstunnel => start_wstunnel(&echo, options.wstunnel()?, "ws"),
    };
    tunnels
        .into_iter()
        .map(|(label, tunnel)| {
            let rss = start(&tunnel).and_then(|route| {
                let echo = route.entries.echo.ok_or("no echo entry")?;
                let socket = connect(echo, WARM_UP_LIMIT)?;
                // A few messages through the open stream, then quiet.
                let mut socket = socket;
                for _ in 0..10 {
                    socket.write_all(&[7u8; MESSAGE]).map_err(|e| format!("write: {e}"))?;
                    socket.read_exact(&mut [0u8; MESSAGE]).map_err(|e| format!("read: {e}"))?;
                }
                thread::sleep(SETTLE);
                let [device, central] = route.rss(Proc::rss);
                let [anon, _] = route.rss(|p| p.status_bytes("RssAnon"));
                drop(socket);
                Ok([device, anon, central])
            });
            match &rss {
                Ok([device, anon, central]) => eprintln!(
                    "idle, one stream: {label}: {:.2} MiB, {:.2} MiB anonymous (other end {:.2} MiB)",
                    *device as f64 / MIB as f64,
                    *anon as f64 / MIB as f64,
                    *central as f64 / MIB as f64
                ),
                Err(e) => eprintln!("idle, one stream: {label}: {e}"),
            }
            (label, rss)
        })
        .map(|(label, rss)| Idle { label, rss })
        .collect()
}

/// The station's memory with `--devices` idle agents connected.
pub(crate) struct DeviceMemory {
    pub(crate) devices: usize,
    /// Station VmRSS with every device configured and none connected.
    pub(crate) before: u64,
    /// Station VmRSS with every device connected, settled.
    pub(crate) after: u64,
    /// Median VmRSS of the idle agents.
    pub(crate) agent: u64,
}

/// Starts a station with `--devices` devices, reads its memory, starts an
/// agent process for each (no streams, just the session held open on the
/// carrier), waits until the station's /metrics counts them all
/// connected, and reads its memory again.
pub(crate) fn station_per_device(
    targets: &Targets,
    options: &Options,
    carrier: &str,
) -> Result<DeviceMemory, String> {
    let n = options.devices;
    let dir = TempDir::new(&format!("devices-{carrier}"));
    let station_key = PrivateKey::generate();
    let keys: Vec<PrivateKey> = (0..n).map(|_| PrivateKey::generate()).collect();
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\nprivate_key = \"{}\"\nstatus = \"127.0.0.1:0\"\n\n\
         [targets]\necho = \"{}\"\n",
        station_key.to_base64(),
        targets.echo
    );
    for (i, key) in keys.iter().enumerate() {
        let _ = write!(
            toml,
            "\n[[devices]]\nname = \"device-{i}\"\npublic_key = \"{}\"\nallow = [\"echo\"]\n",
            key.public_key().to_base64()
        );
    }
    let station_path = dir.write("station.toml", &toml);
    let (tx, lines) = mpsc::channel();
    let station = Proc::spawn(
        "postern station",
        Side::Central,
        Command::new(&options.postern).arg("station").arg("-c").arg(&station_path),
        tx,
    )?;
    let found = wait_for_lines(&lines, &["station listening on ", "status on http://"], &station)?;
    let listen = parse_addr(&found[0]).ok_or(format!("no address in {:?}", found[0]))?;
    let status = parse_addr(&found[1]).ok_or(format!("no address in {:?}", found[1]))?;
    thread::sleep(SETTLE);
    let before = station.rss();

    let mut agents = Vec::with_capacity(n);
    for (i, key) in keys.iter().enumerate() {
        let path = dir.write(
            &format!("agent-{i}.toml"),
            &format!(
                "station = \"http://{listen}/\"\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n\
                 carrier = \"{carrier}\"\n\n[services]\necho = \"{}\"\n",
                station_key.public_key().to_base64(),
                key.to_base64(),
                targets.echo
            ),
        );
        let (tx, _) = mpsc::channel();
        agents.push(Proc::spawn(
            &format!("agent {i}"),
            Side::Device,
            Command::new(&options.postern)
                .arg("agent")
                .arg("-q")
                .arg("-c")
                .arg(&path)
                .env_remove("HTTP_PROXY")
                .env_remove("http_proxy"),
            tx,
        )?);
    }
    let deadline = Instant::now() + CONNECT_LIMIT;
    loop {
        let connected = metric(status, "postern_devices_connected").unwrap_or(0.0) as usize;
        if connected >= n {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{connected} of {n} devices connected within {CONNECT_LIMIT:?}"));
        }
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(SETTLE);
    let after = station.rss();
    let mut agent_rss: Vec<u64> = agents.iter().map(Proc::rss).collect();
    agent_rss.sort_unstable();
    eprintln!(
        "station memory, carrier {carrier}: {:.1} MiB with {n} devices configured, {:.1} MiB with \
         them connected: {:.1} KiB per device",
        before as f64 / MIB as f64,
        after as f64 / MIB as f64,
        after.saturating_sub(before) as f64 / 1024.0 / n as f64
    );
    Ok(DeviceMemory { devices: n, before, after, agent: agent_rss[n / 2] })
}
