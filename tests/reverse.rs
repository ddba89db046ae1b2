//! Reverse services through a real station and agent: monitoring clients
//! at the station reach a device's TCP service and its serial console.
//!
//! `[devices.expose]` listeners bind port 0 here and the test reads the
//! chosen port from the station's log line ("exposing service ... on
//! ADDR"). TOML keys are unique, so each listener gets its own loopback
//! address (127.0.0.2, .3, ...), all of which Linux routes to lo.

mod serial_common;

use std::io::Write;
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use serial_common::*;

/// The station's log line naming where a service is exposed.
fn exposed(station: &Postern, service: &str) -> SocketAddr {
    let line = station.wait_line(&format!("exposing service {service:?} of device pump-17 on "));
    addr_after(&line, " on ")
}

#[test]
fn reverse_tcp_many_concurrent_streams_byte_exact() {
    let dir = TempDir::new("reverse-tcp");
    let service = Echo::start();
    let keys = Keys::new();
    let (station, station_addr) = start_station(
        &dir,
        &keys.station_toml(
            "127.0.0.1:0",
            "",
            "",
            "[devices.expose]\n\"127.0.0.2:0\" = \"modbus\"\n",
        ),
    );
    let modbus = exposed(&station, "modbus");
    let services = format!("[services]\nmodbus = \"{}\"\n", service.addr);
    let _agent = start_agent(&dir, &keys.agent_toml(station_addr, &services), &station);

    const CLIENTS: usize = 8;
    const BYTES: usize = 192 * 1024;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            thread::spawn(move || {
                let data = pattern(BYTES, i as u8 * 29 + 1);
                let mut socket = connect(modbus);
                let mut writer = socket.try_clone().expect("dup");
                let sent = data.clone();
                let feeder = thread::spawn(move || writer.write_all(&sent).expect("write"));
                let back = read_n(&mut socket, BYTES);
                feeder.join().expect("feeder");
                assert_eq!(first_difference(&back, &data), None, "client {i}");
                digest(&back)
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a client failed");
    }
    assert_eq!(service.connections.load(std::sync::atomic::Ordering::SeqCst), CLIENTS);
    assert_eq!(service.bytes.load(std::sync::atomic::Ordering::SeqCst), (CLIENTS * BYTES) as u64);
}

#[test]
fn reverse_serial_console_has_one_holder_at_a_time() {
    let dir = TempDir::new("reverse-console");
    let keys = Keys::new();
    let (station, station_addr) = start_station(
        &dir,
        &keys.station_toml(
            "127.0.0.1:0",
            "",
            "",
            "[devices.expose]\n\"127.0.0.3:0\" = \"console\"\n",
        ),
    );
    let console = exposed(&station, "console");
    let pty = PtyPair::start(dir.path(), "console");
    let services = format!(
        "[services]\nconsole = {{ serial = \"{}\", baud = 115200 }}\n",
        pty.agent_end.display()
    );
    let agent = start_agent(&dir, &keys.agent_toml(station_addr, &services), &station);
    let mut device = pty.open_test_end();

    // The first client holds the console: both directions, every byte value.
    let mut first = connect(console);
    let first_addr = first.local_addr().expect("bound");
    agent.wait_line(&format!("station client {first_addr}"));
    agent.wait_line("holds serial");
    device.write_all(b"login: \x00\xff\x11\x13");
    assert_eq!(read_n(&mut first, 11), b"login: \x00\xff\x11\x13");
    let typed = pattern(4096, 0x42);
    first.write_all(&typed).expect("write");
    assert_eq!(device.read_exact(typed.len()), typed);

    // A second client is refused while the first holds it; both logs say who.
    let mut second = connect(console);
    assert_closed_within(&mut second, WAIT);
    let refusal = agent.wait_line("refused, service \"console\" is in use by");
    assert!(refusal.contains(&format!("station client {first_addr}")), "{refusal}");
    let relayed = station.wait_line("reset by peer: service \"console\" is in use by");
    assert!(relayed.contains(&first_addr.to_string()), "{relayed}");

    // The first client still works.
    device.write_all(b"$ ");
    assert_eq!(read_n(&mut first, 2), b"$ ");

    // Once it leaves, the console is free for the next client.
    drop(first);
    agent.wait_line("released serial");
    let mut third = connect(console);
    agent.wait_nth("holds serial", 2);
    third.write_all(b"reboot\r").expect("write");
    assert_eq!(device.read_exact(7), b"reboot\r");
    device.write_all(b"ok");
    assert_eq!(read_n(&mut third, 2), b"ok");
}

#[test]
fn reverse_unknown_service_is_refused_on_both_sides() {
    let dir = TempDir::new("reverse-unknown");
    let service = Echo::start();
    let keys = Keys::new();
    let expose = "[devices.expose]\n\"127.0.0.4:0\" = \"nope\"\n\"127.0.0.5:0\" = \"modbus\"\n";
    let (station, station_addr) =
        start_station(&dir, &keys.station_toml("127.0.0.1:0", "", "", expose));
    let nope = exposed(&station, "nope");
    let modbus = exposed(&station, "modbus");
    let services = format!("[services]\nmodbus = \"{}\"\n", service.addr);
    let agent = start_agent(&dir, &keys.agent_toml(station_addr, &services), &station);

    let mut client = connect(nope);
    assert_closed_within(&mut client, WAIT);
    agent.wait_line("asked for unknown service \"nope\"; refused");
    station.wait_line("reset by peer: the device has no service named \"nope\"");
    assert_eq!(service.connections.load(std::sync::atomic::Ordering::SeqCst), 0);

    // The session is unharmed: a known service still works.
    let mut client = connect(modbus);
    client.write_all(b"ping").expect("write");
    assert_eq!(read_n(&mut client, 4), b"ping");
}

#[test]
fn reverse_client_of_an_offline_device_is_closed_at_once() {
    let dir = TempDir::new("reverse-offline");
    let service = Echo::start();
    let keys = Keys::new();
    let (station, station_addr) = start_station(
        &dir,
        &keys.station_toml(
            "127.0.0.1:0",
            "",
            "",
            "[devices.expose]\n\"127.0.0.6:0\" = \"modbus\"\n",
        ),
    );
    let modbus = exposed(&station, "modbus");

    // No agent yet: closed at once, not left hanging.
    let mut client = connect(modbus);
    assert_closed_within(&mut client, Duration::from_secs(2));
    station.wait_line("device pump-17 is offline");

    // As soon as the device is back, the same listener works.
    let services = format!("[services]\nmodbus = \"{}\"\n", service.addr);
    let _agent = start_agent(&dir, &keys.agent_toml(station_addr, &services), &station);
    let mut client = connect(modbus);
    client.write_all(b"hello").expect("write");
    assert_eq!(read_n(&mut client, 5), b"hello");
}
