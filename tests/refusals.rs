//! What the station refuses, through a real station and agent on loopback:
//! a target that refuses the connection, a target the device may not open,
//! and a device whose key the station does not know.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use postern::keys::PrivateKey;

const MIB: u64 = 1 << 20;

/// How soon a refused stream's device-side connection must close. The
/// promise is one second (loopback takes about a millisecond); the bound
/// allows two for a busy shared machine, and still tells "at once" from the
/// 10 s connect and session timeouts.
const CLOSE_BOUND: Duration = Duration::from_secs(2);

/// Connects to `forward` as a device process would, sends a request, and
/// asserts the connection closes within [`CLOSE_BOUND`] with no byte back.
fn assert_closed_promptly(forward: SocketAddr, what: &str, tunnel: &Tunnel) {
    let started = Instant::now();
    let mut socket = TcpStream::connect(forward).expect("connect to forward");
    socket.set_read_timeout(Some(CLOSE_BOUND)).expect("set a read timeout");
    // The agent may close before or after it reads this; either is fine.
    let _ = socket.write_all(b"request\n");
    let mut buf = [0u8; 64];
    let result = socket.read(&mut buf);
    let elapsed = started.elapsed();
    match result {
        Ok(0) => {}
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
        Ok(n) => panic!("{what}: got {n} bytes from a refused target\n{}", tunnel.describe()),
        Err(e) => panic!(
            "{what}: device-side connection still open after {elapsed:?} ({e})\n{}",
            tunnel.describe()
        ),
    }
    assert!(elapsed < CLOSE_BOUND, "{what}: closed only after {elapsed:?}");
}

/// A refused, a forbidden and a nonexistent target on one session; each
/// closes the device's connection promptly with a log line on both sides,
/// and the session carries bytes exactly afterwards.
fn refusals(carrier: &str) {
    let echo = Server::echo();
    let secret = Server::recorder();
    let closed = refused_addr();
    let targets =
        [("echo", echo.target()), ("closed", closed.to_string()), ("secret", secret.target())];
    let tunnel = Tunnel::start(
        carrier,
        &targets,
        &["echo", "closed"],
        &["echo", "closed", "secret", "nowhere"],
    );
    assert_eq!(
        echo_round_trip(tunnel.forward("echo"), 1, MIB),
        Received::expected(1, MIB),
        "echo before the refusals\n{}",
        tunnel.describe()
    );

    // Allowed, but nothing listens there.
    assert_closed_promptly(tunnel.forward("closed"), "refused target", &tunnel);
    let closed_at = format!("target closed ({closed})");
    tunnel.station.wait_log(&["device test-device", &closed_at, "Connection refused"]);
    tunnel.agent.wait_log(&["reset by peer", "target closed", "Connection refused"]);

    // In [targets], not in this device's allow list.
    assert_closed_promptly(tunnel.forward("secret"), "forbidden target", &tunnel);
    tunnel.station.wait_log(&["device test-device", "target \"secret\" refused", "allow list"]);
    tunnel.agent.wait_log(&["reset by peer", "target \"secret\" is not allowed"]);

    // Not a target at all.
    assert_closed_promptly(tunnel.forward("nowhere"), "unknown target", &tunnel);
    tunnel.station.wait_log(&["device test-device", "target \"nowhere\" refused", "allow list"]);
    tunnel.agent.wait_log(&["reset by peer", "target \"nowhere\" is not allowed"]);

    assert_eq!(secret.accepts(), 0, "a forbidden target was connected to");

    // The same session still carries bytes exactly.
    assert_eq!(
        echo_round_trip(tunnel.forward("echo"), 2, 4 * MIB),
        Received::expected(2, 4 * MIB),
        "echo after the refusals\n{}",
        tunnel.describe()
    );
    assert_eq!(echo.accepts(), 2, "both echo streams reached the target");
    assert_eq!(tunnel.agent.stderr.count("connected to the station"), 1, "agent reconnected");
    assert_eq!(tunnel.station.stderr.count("handshake from"), 1, "a second session started");
}

#[test]
fn refused_and_forbidden_targets_stream() {
    refusals("stream");
}

#[test]
fn refused_and_forbidden_targets_poll() {
    refusals("poll");
}

/// Refused handshakes the agent must have retried before the log is
/// counted: the station has seen the key this many times.
const ATTEMPTS: usize = 4;

#[test]
fn unknown_device_key_reaches_nothing() {
    let collector = Server::recorder();
    let echo = Server::echo();
    let dir = TempDir::new("unknown-key");
    let keys = Keys::new();
    let stranger = PrivateKey::generate();
    let targets = [("collector", collector.target()), ("echo", echo.target())];
    let devices = [("test-device", keys.device.public_key(), &["collector", "echo"][..])];
    let (station, station_addr) =
        start_station(&dir, &station_toml(&keys.station, &targets, &devices));

    let toml =
        agent_toml(station_addr, &keys.station.public_key(), &stranger, "stream", &["collector"]);
    let (intruder, forwards) = start_agent(&dir, "stranger", &toml, &["collector"]);

    // A device process tries to use the forward while the agent is refused:
    // it gets nothing and is closed once the agent gives up waiting.
    let forward = forwards["collector"];
    let device = thread::spawn(move || {
        let mut socket = TcpStream::connect(forward).expect("connect to forward");
        let _ = socket.write_all(b"request\n");
        receive_all(&mut socket)
    });

    intruder.wait_log_nth(&["cannot start a session", "refused our key"], ATTEMPTS, LOG_WAIT);
    let got = device.join().expect("device thread does not panic");
    assert_eq!(got.len, 0, "a device behind an unknown key received bytes");
    assert_ne!(got.error, Some(ErrorKind::WouldBlock), "connection was never closed");

    let fingerprint = stranger.public_key().fingerprint();
    let logged = station.stderr.matching(&["unknown device key"]);
    assert_eq!(
        logged.len(),
        1,
        "the unknown key is logged once for {ATTEMPTS}+ attempts:\n{}",
        station.stderr.text()
    );
    assert!(
        logged[0].contains(&format!("unknown device key {fingerprint} refused")),
        "the log line names the key by its fingerprint {fingerprint}: {}",
        logged[0]
    );
    let full = stranger.public_key().to_base64();
    assert!(logged[0].contains(&full), "the log line gives the key to configure: {}", logged[0]);
    assert_eq!(station.stderr.count("handshake from"), 0, "a session started for an unknown key");

    // A known device on the same station is unaffected.
    let toml =
        agent_toml(station_addr, &keys.station.public_key(), &keys.device, "stream", &["echo"]);
    let (known, forwards) = start_agent(&dir, "known", &toml, &["echo"]);
    known.wait_log(&["connected to the station"]);
    assert_eq!(
        echo_round_trip(forwards["echo"], 3, MIB),
        Received::expected(3, MIB),
        "known device beside an unknown one\n{}",
        station.describe()
    );
    assert_eq!(collector.accepts(), 0, "an unknown key opened a target connection");
}
