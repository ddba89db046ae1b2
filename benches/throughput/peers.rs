//! The tools postern is measured beside, started as routes: GNU httptunnel
//! (hts/htc), rathole and wstunnel.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use postern::keys::PrivateKey;

use crate::routes::{entries_of, Running};
use crate::support::path::{DelayedHop, Hop};
use crate::support::{free_port, Proc, Side, TempDir, START_LIMIT};

/// Whether something listens on TCP `port`, from /proc/net/tcp, without
/// connecting (htc would take a connection as the one it carries).
fn listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = fields.get(1).and_then(|a| a.rsplit(':').next());
        local_port.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
            && fields.get(3) == Some(&"0A")
    })
}

fn wait_listening(port: u16, proc: &Proc) -> Result<(), String> {
    let deadline = Instant::now() + START_LIMIT;
    while !listening(port) {
        if !proc.is_running() || Instant::now() > deadline {
            return Err(format!("{} is not listening on {port}: {}", proc.name, proc.recent_log()));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// One hts/htc pair per target: httptunnel carries one connection at a
/// time to one fixed destination. htc goes through `proxy` if given.
pub(crate) fn start_httptunnel(
    targets: &[(&str, SocketAddr)],
    delay: Option<Hop>,
    proxy: Option<SocketAddr>,
) -> Result<Running, String> {
    let mut procs = Vec::new();
    let mut proxies = Vec::new();
    let mut entries = BTreeMap::new();
    for &(name, target) in targets {
        let hts_port = free_port()?;
        let (tx, _) = mpsc::channel();
        let hts = Proc::spawn(
            "hts",
            Side::Central,
            Command::new("hts").args([
                "-w",
                "-F",
                &target.to_string(),
                &format!("127.0.0.1:{hts_port}"),
            ]),
            tx,
        )?;
        wait_listening(hts_port, &hts)?;
        let mut hts_addr = SocketAddr::from(([127, 0, 0, 1], hts_port));
        if let Some(delay) = delay {
            let proxy = DelayedHop::start(hts_addr, delay)?;
            hts_addr = proxy.addr;
            proxies.push(proxy);
        }
        let htc_port = free_port()?;
        let mut htc = Command::new("htc");
        htc.args(["-w", "-F", &htc_port.to_string()]);
        if let Some(proxy) = proxy {
            htc.args(["-P", &proxy.to_string()]);
        }
        let (tx, _) = mpsc::channel();
        let htc = Proc::spawn("htc", Side::Device, htc.arg(hts_addr.to_string()), tx)?;
        wait_listening(htc_port, &htc)?;
        procs.extend([hts, htc]);
        entries.insert(name.to_owned(), SocketAddr::from(([127, 0, 0, 1], htc_port)));
    }
    Ok(Running { entries: entries_of(&entries), procs, _keep: vec![Box::new(proxies)] })
}

/// rathole with one service per target. rathole only forwards connections
/// that arrive at its server (the central side) to its client (the
/// device side), so here the client connects at the server and the
/// rathole client connects to the target: for "up" the bytes go server to
/// client. Noise uses rathole's default pattern, Noise_NK_25519_ChaChaPoly_BLAKE2s.
pub(crate) fn start_rathole(
    targets: &[(&str, SocketAddr)],
    rathole: &Path,
    noise: bool,
    delay: Option<Hop>,
) -> Result<Running, String> {
    let transport = if noise { "noise" } else { "tcp" };
    let dir = TempDir::new(&format!("rathole-{transport}"));
    let control = free_port()?;
    // The client reaches the server's control port, and opens its data
    // channels, through the relay when the route has one.
    let relay = delay
        .map(|hop| DelayedHop::start(SocketAddr::from(([127, 0, 0, 1], control)), hop))
        .transpose()?;
    let remote = relay.as_ref().map_or(SocketAddr::from(([127, 0, 0, 1], control)), |r| r.addr);
    let key = PrivateKey::generate();
    let (server_transport, client_transport) = if noise {
        (
            format!(
                "[server.transport]\ntype = \"noise\"\n[server.transport.noise]\n\
                 local_private_key = \"{}\"\n",
                key.to_base64()
            ),
            format!(
                "[client.transport]\ntype = \"noise\"\n[client.transport.noise]\n\
                 remote_public_key = \"{}\"\n",
                key.public_key().to_base64()
            ),
        )
    } else {
        (
            "[server.transport]\ntype = \"tcp\"\n".to_owned(),
            "[client.transport]\ntype = \"tcp\"\n".to_owned(),
        )
    };
    let mut server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"postern-bench\"\n\
         {server_transport}"
    );
    let mut client = format!(
        "[client]\nremote_addr = \"{remote}\"\ndefault_token = \"postern-bench\"\n\
         {client_transport}"
    );
    let mut entries = BTreeMap::new();
    for &(name, target) in targets {
        let port = free_port()?;
        let _ = write!(server, "[server.services.{name}]\nbind_addr = \"127.0.0.1:{port}\"\n");
        let _ = write!(client, "[client.services.{name}]\nlocal_addr = \"{target}\"\n");
        entries.insert(name.to_owned(), SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let server_path = dir.write("server.toml", &server);
    let client_path = dir.write("client.toml", &client);
    let spawn = |name: &str, side, config: &Path| {
        let (tx, _) = mpsc::channel();
        Proc::spawn(
            &format!("rathole {name} ({transport})"),
            side,
            Command::new(rathole).arg(config).env("RUST_LOG", "warn"),
            tx,
        )
    };
    let server = spawn("server", Side::Central, &server_path)?;
    wait_listening(control, &server)?;
    let client = spawn("client", Side::Device, &client_path)?;
    // The server binds a service's port once the client has registered it.
    for addr in entries.values() {
        wait_listening(addr.port(), &server)?;
    }
    Ok(Running {
        entries: entries_of(&entries),
        procs: vec![client, server],
        _keep: vec![Box::new(dir), Box::new(relay)],
    })
}

/// wstunnel (the Rust one, v7 and later): a client listening per target,
/// tunnelling over one ws:// server.
pub(crate) fn start_wstunnel(
    targets: &[(&str, SocketAddr)],
    wstunnel: &Path,
    scheme: &str,
) -> Result<Running, String> {
    let server_port = free_port()?;
    let (tx, _) = mpsc::channel();
    let server = Proc::spawn(
        "wstunnel server",
        Side::Central,
        Command::new(wstunnel).args(["server", &format!("{scheme}://127.0.0.1:{server_port}")]),
        tx,
    )?;
    wait_listening(server_port, &server)?;
    let mut command = Command::new(wstunnel);
    command.arg("client");
    let mut entries = BTreeMap::new();
    for &(name, target) in targets {
        let port = free_port()?;
        command.args(["-L", &format!("tcp://127.0.0.1:{port}:{target}")]);
        entries.insert(name.to_owned(), SocketAddr::from(([127, 0, 0, 1], port)));
    }
    command.arg(format!("{scheme}://127.0.0.1:{server_port}"));
    let (tx, _) = mpsc::channel();
    let client = Proc::spawn("wstunnel client", Side::Device, &mut command, tx)?;
    for addr in entries.values() {
        wait_listening(addr.port(), &client)?;
    }
    Ok(Running { entries: entries_of(&entries), procs: vec![client, server], _keep: Vec::new() })
}
