//! Forward serial lines through a real station and agent, on socat
//! pseudo-terminals: byte-exact round trips of every byte value, the line
//! vanishing and coming back, the backlog bound, and the termios the
//! agent applies.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use common::pty::PtyPair;
use common::*;
use postern::config::{FlowControl, Parity, SerialConfig};
use postern::endpoint::serial::{configure, SerialPort};
use rustix::termios::{ControlModes, InputModes, LocalModes, OutputModes};

/// Mirrors the agent's backlog bound (src/agent/serial.rs LINE_BACKLOG).
const LINE_BACKLOG: usize = 64 * 1024;

/// The device the agent is, as the station names it.
const DEVICE: &str = "pump-17";

fn serial_forward(path: &std::path::Path, target: &str) -> String {
    format!("[[forward]]\nserial = \"{}\"\nbaud = 115200\ntarget = \"{target}\"\n", path.display())
}

#[test]
fn forward_serial_round_trip_every_byte_value() {
    let dir = TempDir::new("serial-round-trip");
    let echo = Server::echo();
    let keys = Keys::new();
    let (station, station_addr) =
        start_station(&dir, &keys.station_toml(&[("echo", echo.target())], DEVICE, &["echo"]));
    let pty = PtyPair::start(dir.path(), "line");
    let (agent, _) = start_agent_session(
        &dir,
        &station,
        DEVICE,
        &keys.agent_toml(station_addr, &[], &serial_forward(&pty.agent_end, "echo")),
        &[],
    );
    agent.wait_log(&[&format!("serial {} open (115200 8N1)", pty.agent_end.display())]);
    let mut tty = pty.open_test_end();

    // 300 KiB; every 256-byte block holds every value, so 0x00, XON 0x11,
    // XOFF 0x13, 0x7F, 0xFF and CR/LF all pass many times.
    let data = every_byte_value(300 * 1024, 0x5a);
    for value in 0..=255u8 {
        assert!(data.contains(&value));
    }
    let mut writer = tty.writer();
    let sent = data.clone();
    let feeder = thread::spawn(move || writer.write_all(&sent).expect("write to pty"));
    let back = tty.read_exact(data.len());
    feeder.join().expect("feeder");
    assert_eq!(
        first_difference(&back, &data),
        None,
        "echo differs (digest {:x} vs {:x})",
        fnv1a(&back),
        fnv1a(&data)
    );
    assert_eq!(fnv1a(&back), fnv1a(&data));
    // One long stream carried it all, and nothing more comes back.
    assert_eq!(echo.accepts(), 1);
    assert_eq!(echo.echoed(), data.len() as u64);
    assert!(tty.read_for(Duration::from_millis(200)).is_empty());
}

#[test]
fn forward_serial_opens_a_new_stream_after_the_target_closes() {
    // A target that answers one line per connection, then closes it.
    let target = TcpListener::bind("127.0.0.1:0").expect("bind");
    let target_addr = target.local_addr().expect("bound");
    let served = thread::spawn(move || {
        let mut lines = Vec::new();
        for _ in 0..3 {
            let (socket, _) = target.accept().expect("accept");
            socket.set_read_timeout(Some(LOG_WAIT)).expect("timeout");
            let mut reader = std::io::BufReader::new(socket.try_clone().expect("dup"));
            let mut line = Vec::new();
            std::io::BufRead::read_until(&mut reader, b'\n', &mut line).expect("a request");
            let mut reply = b"reply:".to_vec();
            reply.extend_from_slice(&line);
            (&socket).write_all(&reply).expect("reply");
            lines.push(line);
        }
        lines
    });
    let dir = TempDir::new("serial-reopen");
    let keys = Keys::new();
    let targets = [("oneshot", target_addr.to_string())];
    let (station, station_addr) =
        start_station(&dir, &keys.station_toml(&targets, DEVICE, &["oneshot"]));
    let pty = PtyPair::start(dir.path(), "line");
    // -v: the end of each stream is a debug line, and the test waits for
    // it before the next request. Bytes the line sends before the agent
    // learns of the close would still go to the old stream.
    let config = dir.write(
        "agent.toml",
        &keys.agent_toml(station_addr, &[], &serial_forward(&pty.agent_end, "oneshot")),
    );
    let mut agent = Proc::spawn("agent", &["agent", "-c", config.to_str().expect("utf-8"), "-v"]);
    station.wait_log(&[&format!("device {DEVICE} handshake from")]);
    agent.wait_log(&[&format!("serial {} open", pty.agent_end.display())]);
    let mut tty = pty.open_test_end();
    for (n, request) in [&b"first\n"[..], b"\x00\xff\n", b"third\n"].into_iter().enumerate() {
        tty.write_all(request);
        let mut expected = b"reply:".to_vec();
        expected.extend_from_slice(request);
        assert_eq!(tty.read_exact(expected.len()), expected);
        agent.wait_log_nth(&[" ended ("], n + 1, LOG_WAIT);
    }
    // Three connections, each with exactly its own request.
    let lines = served.join().expect("target");
    assert_eq!(lines, [&b"first\n"[..], b"\x00\xff\n", b"third\n"]);
    assert!(agent.is_running());
}

#[test]
fn forward_serial_line_comes_back_after_vanishing() {
    let dir = TempDir::new("serial-vanish");
    let echo = Server::echo();
    let keys = Keys::new();
    let (station, station_addr) =
        start_station(&dir, &keys.station_toml(&[("echo", echo.target())], DEVICE, &["echo"]));
    let mut pty = PtyPair::start(dir.path(), "usb");
    let toml = keys.agent_toml(station_addr, &["echo"], &serial_forward(&pty.agent_end, "echo"));
    let (mut agent, forwards) = start_agent_session(&dir, &station, DEVICE, &toml, &["echo"]);
    let tcp_forward = forwards["echo"];
    let opened = format!("serial {} open", pty.agent_end.display());
    agent.wait_log(&[&opened]);

    let mut tty = pty.open_test_end();
    tty.write_all(b"before\x00\xff");
    assert_eq!(tty.read_exact(8), b"before\x00\xff");
    drop(tty);

    // Unplugged: the agent logs it once and stays up.
    pty.stop();
    agent.wait_log(&["line vanished"]);
    assert!(agent.is_running(), "the agent must outlive its serial line");

    // Other forwards keep working while the line is missing.
    let mut socket = connect(tcp_forward);
    let data = every_byte_value(64 * 1024, 7);
    socket.write_all(&data).expect("write");
    assert_eq!(read_n(&mut socket, data.len()), data);
    drop(socket);

    // Plugged back in at the same path: the line works again.
    pty.restart();
    agent.wait_log(&[&format!("serial {} is back", pty.agent_end.display())]);
    let mut tty = pty.open_test_end();
    tty.write_all(b"after\x11\x13");
    assert_eq!(tty.read_exact(7), b"after\x11\x13");

    assert!(agent.is_running());
    assert_eq!(agent.stderr.count("line vanished"), 1, "the vanishing is logged once");
    assert_eq!(agent.stderr.count(&opened), 1);
    // Two serial streams (before and after) and one TCP connection.
    assert_eq!(echo.accepts(), 3);
}

#[test]
fn forward_serial_keeps_a_bounded_backlog_while_the_station_is_away() {
    let dir = TempDir::new("serial-backlog");
    let echo = Server::echo();
    let keys = Keys::new();
    // The station starts later at a fixed address: take a free port now.
    // Another process could take it meanwhile; the station would then
    // fail to bind and the test would say so.
    let station_addr = refused_addr();
    let pty = PtyPair::start(dir.path(), "line");
    let (agent, _) = start_agent(
        &dir,
        "agent",
        &keys.agent_toml(station_addr, &[], &serial_forward(&pty.agent_end, "echo")),
        &[],
    );
    agent.wait_log(&["cannot start a session"]);
    agent.wait_log(&[&format!("serial {} open", pty.agent_end.display())]);

    // More than the backlog holds, while no stream can take it.
    let data = every_byte_value(LINE_BACKLOG + 40 * 1024, 0x33);
    let mut tty = pty.open_test_end();
    tty.write_all(&data);
    agent.wait_log(&["dropping what the line sends"]);

    let toml = keys.station_toml(&[("echo", echo.target())], DEVICE, &["echo"]);
    let toml =
        toml.replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"{station_addr}\""), 1);
    let (_station, _) = start_station(&dir, &toml);
    // The count is final when a stream attaches: from then on the reader
    // waits instead of dropping.
    let line = agent.wait_log(&["while no stream took them"]);
    let dropped: usize = line
        .split("dropped ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a byte count in {line:?}"));
    assert!(dropped > 0 && dropped <= data.len() - LINE_BACKLOG, "dropped {dropped}");

    // The target got the oldest LINE_BACKLOG bytes, then whatever was still
    // on its way when the stream attached, and nothing twice.
    let carried = data.len() - dropped;
    let back = tty.read_exact(carried);
    assert_eq!(first_difference(&back[..LINE_BACKLOG], &data[..LINE_BACKLOG]), None);
    assert_eq!(
        first_difference(&back[LINE_BACKLOG..], &data[data.len() - (carried - LINE_BACKLOG)..]),
        None
    );
    wait_until("the echo target to receive what was carried", LOG_WAIT, || {
        echo.echoed() >= carried as u64
    });
    assert_eq!(echo.echoed(), carried as u64);
    assert!(tty.read_for(Duration::from_millis(200)).is_empty());
}

#[test]
fn serial_settings_map_to_termios() {
    let dir = TempDir::new("serial-termios");
    let pty = PtyPair::start(dir.path(), "tty");
    let seven_e_two = SerialConfig {
        path: pty.agent_end.display().to_string(),
        baud: 9600,
        data_bits: 7,
        parity: Parity::Even,
        stop_bits: 2,
        flow_control: FlowControl::Hardware,
    };
    let eight_o_one = SerialConfig {
        baud: 250_000,
        data_bits: 8,
        parity: Parity::Odd,
        stop_bits: 1,
        flow_control: FlowControl::Software,
        ..seven_e_two.clone()
    };
    let file = std::fs::File::open(&pty.agent_end).expect("open the pty");
    let start = rustix::termios::tcgetattr(&file).expect("a terminal");

    // The mapping itself, on the value: a pty would not keep all of it.
    let mut settings = start.clone();
    configure(&mut settings, &seven_e_two).expect("9600 is a speed");
    let cflag = settings.control_modes;
    assert_eq!(cflag & ControlModes::CSIZE, ControlModes::CS7);
    assert!(cflag.contains(ControlModes::PARENB | ControlModes::CSTOPB | ControlModes::CRTSCTS));
    assert!(cflag.contains(ControlModes::CREAD | ControlModes::CLOCAL));
    assert!(!cflag.contains(ControlModes::PARODD));
    assert!(settings.input_modes.contains(InputModes::INPCK));
    assert_raw(&settings);
    assert!(!settings.input_modes.intersects(InputModes::IXON | InputModes::IXOFF));
    assert_eq!(settings.output_speed(), 9600);

    let mut settings = start.clone();
    configure(&mut settings, &eight_o_one).expect("250000 is a speed");
    let cflag = settings.control_modes;
    assert_eq!(cflag & ControlModes::CSIZE, ControlModes::CS8);
    assert!(cflag.contains(ControlModes::PARENB | ControlModes::PARODD));
    assert!(!cflag.intersects(ControlModes::CSTOPB | ControlModes::CRTSCTS));
    assert!(settings.input_modes.contains(InputModes::IXON | InputModes::IXOFF));
    assert_raw(&settings);
    assert_eq!(settings.output_speed(), 250_000);
    drop(file);

    // What the kernel holds after open. Linux ptys force CS8 and clear
    // PARENB whatever is asked (drivers/tty/pty.c, pty_set_termios), so
    // only the rest is checked here; a real UART keeps it all.
    let port = SerialPort::open(&seven_e_two).expect("open the pty");
    let settings = port.settings().expect("tcgetattr");
    assert!(settings.control_modes.contains(ControlModes::CSTOPB | ControlModes::CRTSCTS));
    assert!(settings.input_modes.contains(InputModes::INPCK));
    assert_raw(&settings);
    assert_eq!(settings.output_speed(), 9600);
    drop(port);
    // A speed outside the B* table goes through termios2.
    let port = SerialPort::open(&eight_o_one).expect("open the pty");
    let settings = port.settings().expect("tcgetattr");
    assert!(settings.control_modes.contains(ControlModes::PARODD));
    assert!(settings.input_modes.contains(InputModes::IXON | InputModes::IXOFF));
    assert_raw(&settings);
    assert_eq!(settings.output_speed(), 250_000);
    drop(port);

    // A missing node is an error, not a panic.
    let missing =
        SerialConfig { path: dir.path().join("nope").display().to_string(), ..eight_o_one };
    assert_eq!(
        SerialPort::open(&missing).err().map(|e| e.kind()),
        Some(std::io::ErrorKind::NotFound)
    );
}

/// No echo, no line editing, no signals, no translation either way.
fn assert_raw(settings: &rustix::termios::Termios) {
    assert!(!settings
        .local_modes
        .intersects(LocalModes::ECHO | LocalModes::ICANON | LocalModes::ISIG | LocalModes::IEXTEN));
    assert!(!settings.input_modes.intersects(
        InputModes::ICRNL | InputModes::INLCR | InputModes::IGNCR | InputModes::ISTRIP
    ));
    assert!(!settings.output_modes.contains(OutputModes::OPOST));
}
