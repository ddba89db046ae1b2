//! Reverse services through a real station and agent: monitoring clients
//! at the station reach a device's TCP service and its serial console.
//!
//! `[devices.expose]` listeners bind port 0 here and the test reads the
//! chosen port from the station's log line ("exposing service ... on
//! ADDR"). TOML keys are unique, so each listener gets its own loopback
//! address (127.0.0.2, .3, ...), all of which Linux routes to lo.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use common::pty::PtyPair;
use common::*;

/// The device the agent is, as the station names it.
const DEVICE: &str = "pump-17";

/// Starts a station for the device, with `expose` appended to its table.
fn start_exposing(dir: &TempDir, keys: &Keys, expose: &str) -> (Proc, SocketAddr) {
    start_station(dir, &(keys.station_toml(&[], DEVICE, &[]) + expose))
}

/// The station's log line naming where a service is exposed.
fn exposed(station: &Proc, service: &str) -> SocketAddr {
    let marker = format!("exposing service {service:?} of device {DEVICE} on ");
    let line = station.wait_log(&[&marker]);
    addr_after(&line, &marker).unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// Starts the agent with `services` and waits until it has its session.
fn start_device(
    dir: &TempDir,
    station: &Proc,
    addr: SocketAddr,
    keys: &Keys,
    services: &str,
) -> Proc {
    start_agent_session(dir, station, DEVICE, &keys.agent_toml(addr, &[], services), &[]).0
}

#[test]
fn reverse_tcp_many_concurrent_streams_byte_exact() {
    let dir = TempDir::new("reverse-tcp");
    let service = Server::echo();
    let keys = Keys::new();
    let (station, station_addr) =
        start_exposing(&dir, &keys, "[devices.expose]\n\"127.0.0.2:0\" = \"modbus\"\n");
    let modbus = exposed(&station, "modbus");
    let services = format!("[services]\nmodbus = \"{}\"\n", service.addr);
    let _agent = start_device(&dir, &station, station_addr, &keys, &services);

    const CLIENTS: usize = 8;
    const BYTES: usize = 192 * 1024;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            thread::spawn(move || {
                let data = every_byte_value(BYTES, i as u8 * 29 + 1);
                let mut socket = connect(modbus);
                let mut writer = socket.try_clone().expect("dup");
                let sent = data.clone();
                let feeder = thread::spawn(move || writer.write_all(&sent).expect("write"));
                let back = read_n(&mut socket, BYTES);
                feeder.join().expect("feeder");
                assert_eq!(first_difference(&back, &data), None, "client {i}");
                fnv1a(&back)
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a client failed");
    }
    assert_eq!(service.accepts(), CLIENTS);
    assert_eq!(service.echoed(), (CLIENTS * BYTES) as u64);
}

#[test]
fn reverse_serial_console_has_one_holder_at_a_time() {
    let dir = TempDir::new("reverse-console");
    let keys = Keys::new();
    let (station, station_addr) =
        start_exposing(&dir, &keys, "[devices.expose]\n\"127.0.0.3:0\" = \"console\"\n");
    let console = exposed(&station, "console");
    let pty = PtyPair::start(dir.path(), "console");
    let services = format!(
        "[services]\nconsole = {{ serial = \"{}\", baud = 115200 }}\n",
        pty.agent_end.display()
    );
    let agent = start_device(&dir, &station, station_addr, &keys, &services);
    let mut device = pty.open_test_end();

    // The first client holds the console: both directions, every byte value.
    let mut first = connect(console);
    let first_addr = first.local_addr().expect("bound");
    agent.wait_log(&[&format!("station client {first_addr}")]);
    agent.wait_log(&["holds serial"]);
    device.write_all(b"login: \x00\xff\x11\x13");
    assert_eq!(read_n(&mut first, 11), b"login: \x00\xff\x11\x13");
    let typed = every_byte_value(4096, 0x42);
    first.write_all(&typed).expect("write");
    assert_eq!(device.read_exact(typed.len()), typed);

    // A second client is refused while the first holds it; both logs say who.
    let mut second = connect(console);
    assert_closed_within(&mut second, LOG_WAIT);
    let refusal = agent.wait_log(&["refused, service \"console\" is in use by"]);
    assert!(refusal.contains(&format!("station client {first_addr}")), "{refusal}");
    let relayed = station.wait_log(&["reset by peer: service \"console\" is in use by"]);
    assert!(relayed.contains(&first_addr.to_string()), "{relayed}");

    // The first client still works.
    device.write_all(b"$ ");
    assert_eq!(read_n(&mut first, 2), b"$ ");

    // Once it leaves, the console is free for the next client.
    drop(first);
    agent.wait_log(&["released serial"]);
    let mut third = connect(console);
    agent.wait_log_nth(&["holds serial"], 2, LOG_WAIT);
    third.write_all(b"reboot\r").expect("write");
    assert_eq!(device.read_exact(7), b"reboot\r");
    device.write_all(b"ok");
    assert_eq!(read_n(&mut third, 2), b"ok");
}

/// A client that sends a command and half-closes, as `printf 'status\r' |
/// nc -N` does, still gets the answer: the console keeps reading the line
/// to it until the line is quiet for CONSOLE_LINGER, then ends cleanly.
#[test]
fn reverse_serial_console_answers_a_client_that_half_closed() {
    let dir = TempDir::new("reverse-half-close");
    let keys = Keys::new();
    let (station, station_addr) =
        start_exposing(&dir, &keys, "[devices.expose]\n\"127.0.0.5:0\" = \"console\"\n");
    let console = exposed(&station, "console");
    let pty = PtyPair::start(dir.path(), "half-close");
    let services = format!(
        "[services]\nconsole = {{ serial = \"{}\", baud = 115200 }}\n",
        pty.agent_end.display()
    );
    let agent = start_device(&dir, &station, station_addr, &keys, &services);
    let mut device = pty.open_test_end();

    let mut client = connect(console);
    client.write_all(b"status\r").expect("write");
    client.shutdown(std::net::Shutdown::Write).expect("half-close");
    assert_eq!(device.read_exact(7), b"status\r");
    // The answer comes after the client finished sending, in two parts.
    thread::sleep(Duration::from_millis(300));
    device.write_all(b"pump 17: running\r\n");
    thread::sleep(Duration::from_millis(300));
    device.write_all(b"pressure 4.2 bar\r\n");
    let got = receive_all(&mut client);
    let answer = b"pump 17: running\r\npressure 4.2 bar\r\n";
    let mut digest = Digest::default();
    digest.update(answer);
    let expected = Received { len: answer.len() as u64, hash: digest.finish(), error: None };
    assert_eq!(got, expected, "the whole answer, then a clean end\n{}", agent.describe());
    agent.wait_log(&["released serial"]);
}

#[test]
fn reverse_unknown_service_is_refused_on_both_sides() {
    let dir = TempDir::new("reverse-unknown");
    let service = Server::echo();
    let keys = Keys::new();
    let expose = "[devices.expose]\n\"127.0.0.4:0\" = \"nope\"\n\"127.0.0.5:0\" = \"modbus\"\n";
    let (station, station_addr) = start_exposing(&dir, &keys, expose);
    let nope = exposed(&station, "nope");
    let modbus = exposed(&station, "modbus");
    let services = format!("[services]\nmodbus = \"{}\"\n", service.addr);
    let agent = start_device(&dir, &station, station_addr, &keys, &services);

    let mut client = connect(nope);
    assert_closed_within(&mut client, LOG_WAIT);
    agent.wait_log(&["asked for unknown service \"nope\"; refused"]);
    station.wait_log(&["reset by peer: the device has no service named \"nope\""]);
    assert_eq!(service.accepts(), 0);

    // The session is unharmed: a known service still works.
    let mut client = connect(modbus);
    client.write_all(b"ping").expect("write");
    assert_eq!(read_n(&mut client, 4), b"ping");
}

#[test]
fn reverse_client_of_an_offline_device_is_closed_at_once() {
    let dir = TempDir::new("reverse-offline");
    let service = Server::echo();
    let keys = Keys::new();
    let (station, station_addr) =
        start_exposing(&dir, &keys, "[devices.expose]\n\"127.0.0.6:0\" = \"modbus\"\n");
    let modbus = exposed(&station, "modbus");

    // No agent yet: closed at once, not left hanging.
    let mut client = connect(modbus);
    assert_closed_within(&mut client, Duration::from_secs(2));
    station.wait_log(&[&format!("device {DEVICE} is offline")]);

    // As soon as the device is back, the same listener works.
    let services = format!("[services]\nmodbus = \"{}\"\n", service.addr);
    let _agent = start_device(&dir, &station, station_addr, &keys, &services);
    let mut client = connect(modbus);
    client.write_all(b"hello").expect("write");
    assert_eq!(read_n(&mut client, 5), b"hello");
}

/// A client of a device whose agent died (SIGKILL: its session lives on at
/// the station until session_timeout) is closed once the device fails to
/// answer within DEVICE_ANSWER_LIMIT (10 s), with a log line saying so,
/// instead of waiting in silence.
#[test]
fn reverse_client_of_a_dead_agent_is_closed_after_a_bound() {
    let dir = TempDir::new("reverse-dead");
    let service = Server::echo();
    let keys = Keys::new();
    let (station, station_addr) =
        start_exposing(&dir, &keys, "[devices.expose]\n\"127.0.0.7:0\" = \"modbus\"\n");
    let modbus = exposed(&station, "modbus");
    let services = format!("[services]\nmodbus = \"{}\"\n", service.addr);
    let agent = start_device(&dir, &station, station_addr, &keys, &services);
    let mut alive = connect(modbus);
    alive.write_all(b"ping").expect("write");
    assert_eq!(read_n(&mut alive, 4), b"ping");

    agent.signal("KILL");
    let mut client = connect(modbus);
    client.write_all(b"anyone?").expect("write");
    assert_closed_within(&mut client, Duration::from_secs(20));
    station
        .wait_log(&[&format!("device {DEVICE} did not answer within 10 s (is its agent down?)")]);
}

/// A reload that moves an expose address between `127.0.0.1:P` and
/// `0.0.0.0:P` binds the new one in place of the old (both at once is
/// refused by the system), and each way the service answers byte-exact;
/// an address another program holds is refused and the old one serves
/// on. The one test that binds the wildcard address, for a moment: the
/// defect it guards needs it.
#[test]
fn an_expose_moved_between_loopback_and_every_address_of_its_port_is_bound_in_place() {
    let dir = TempDir::new("reverse-move");
    let service = Server::echo();
    let keys = Keys::new();
    let port = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        free.local_addr().expect("an address").port()
    };
    let table = |addr: &str| format!("[devices.expose]\n\"{addr}\" = \"modbus\"\n");
    let loopback = format!("127.0.0.1:{port}");
    let every = format!("0.0.0.0:{port}");
    let (station, station_addr) = start_exposing(&dir, &keys, &table(&loopback));
    assert_eq!(exposed(&station, "modbus").port(), port);
    let services = format!("[services]\nmodbus = \"{}\"\n", service.addr);
    let _agent = start_device(&dir, &station, station_addr, &keys, &services);
    let client: SocketAddr = loopback.parse().expect("an address");
    assert_eq!(echo_round_trip(client, 1, 1 << 20), Received::expected(1, 1 << 20));

    let reload = |expose: &str| {
        dir.write("station.toml", &(keys.station_toml(&[], DEVICE, &[]) + &table(expose)));
        station.signal("HUP");
    };
    for (seed, (from, to)) in [(&loopback, &every), (&every, &loopback)].into_iter().enumerate() {
        // The listener on `to` serves once this line is new: the first
        // time back on loopback it is already in the log.
        let serving = format!("exposing service \"modbus\" of device {DEVICE} on {to}");
        let nth = station.stderr.count(&serving) + 1;
        reload(to);
        station.wait_log(&[&format!("no longer exposing {from}: {to} takes its port")]);
        station.wait_log_nth(&[&serving], nth, Duration::from_secs(30));
        let len = 1 << 20;
        let seed = seed as u64 + 2;
        assert_eq!(echo_round_trip(client, seed, len), Received::expected(seed, len), "on {to}");
    }
    assert_eq!(station.stderr.count("reload refused"), 0);

    let busy = std::net::TcpListener::bind("127.0.0.3:0").expect("bind a port to take");
    let taken = busy.local_addr().expect("an address").to_string();
    reload(&taken);
    station.wait_log(&[
        "reload refused, the running config stays: ",
        &format!("cannot expose service \"modbus\" on {taken}: "),
    ]);
    assert_eq!(echo_round_trip(client, 9, 1 << 20), Received::expected(9, 1 << 20), "kept");
}
