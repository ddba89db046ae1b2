//! Bytes through a real station and agent on loopback: byte-exact round
//! trips on every carrier, half-close, many concurrent streams, and a slow
//! reader that must not stall the others.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// The round trip: 16 MiB out through the tunnel and back.
const ROUND_TRIP: u64 = 16 * MIB;

fn round_trip(carrier: &str) {
    let echo = Server::echo();
    let tunnel = Tunnel::start(carrier, &[("echo", echo.target())], &["echo"], &["echo"]);
    let got = echo_round_trip(tunnel.forward("echo"), 0x16, ROUND_TRIP);
    assert_eq!(
        got,
        Received::expected(0x16, ROUND_TRIP),
        "16 MiB echoed through the {carrier} carrier\n{}",
        tunnel.describe()
    );
    assert_eq!(echo.accepts(), 1, "one stream, one target connection");
}

/// The agent says which carrier it runs; a test of one carrier that ran
/// another would prove nothing.
fn assert_carrier(tunnel: &Tunnel, shape: &str) {
    let line = tunnel.agent.wait_log(&["connected to the station"]);
    assert!(
        line.to_ascii_lowercase().contains(&format!("carrier {shape}")),
        "agent did not report carrier {shape}: {line}"
    );
}

#[test]
fn round_trip_16_mib_stream() {
    round_trip("stream");
}

#[test]
fn round_trip_16_mib_poll() {
    round_trip("poll");
}

#[test]
fn round_trip_16_mib_auto() {
    round_trip("auto");
}

/// The poll carrier carries a bulk transfer on several requests in flight,
/// each on its own connection, and an agent gone idle keeps only its held
/// poll and one push connection.
#[test]
fn poll_pipelines_while_busy_and_keeps_two_connections_idle() {
    let echo = Server::echo();
    let dir = TempDir::new("pipeline");
    let keys = Keys::new();
    let toml =
        with_status(&keys.station_toml(&[("echo", echo.target())], "test-device", &["echo"]));
    let (station, station_addr) = start_station(&dir, &toml);
    let status = status_addr(&station);
    let toml =
        agent_toml(station_addr, &keys.station.public_key(), &keys.device, "poll", &["echo"]);
    let (agent, forwards) = start_agent_session(&dir, &station, "test-device", &toml, &["echo"]);
    let connections = move || {
        let (_, body) = status_get(status, "/metrics");
        metric(&body, "postern_connections{kind=\"device\"}").expect("the gauge is there")
    };
    let done = Arc::new(AtomicU64::new(0));
    let sampler = {
        let done = done.clone();
        thread::spawn(move || {
            let mut most = 0f64;
            while done.load(Ordering::Relaxed) == 0 {
                most = most.max(connections());
                thread::sleep(Duration::from_millis(10));
            }
            most
        })
    };
    let got = echo_round_trip(forwards["echo"], 0x17, ROUND_TRIP);
    done.store(1, Ordering::Relaxed);
    let most = sampler.join().expect("sampler");
    let logs = format!("{}\n{}", agent.describe(), station.describe());
    assert_eq!(got, Received::expected(0x17, ROUND_TRIP), "16 MiB echoed over poll\n{logs}");
    assert!(most > 2.0, "at most {most} device connections during the transfer\n{logs}");
    wait_until("the idle agent's connections fall back to a poll and a push", LOG_WAIT, || {
        connections() <= 2.0
    });
}

#[test]
fn configured_carrier_is_the_one_used() {
    let echo = Server::echo();
    for shape in ["stream", "poll"] {
        let tunnel = Tunnel::start(shape, &[("echo", echo.target())], &["echo"], &["echo"]);
        assert_carrier(&tunnel, shape);
    }
}

// ---------------------------------------------------------------------------
// Half-close.

/// What a half-close target saw from the device: the bytes, and whether the
/// stream ended with a clean FIN.
type Seen = Received;

/// Each direction's FIN on its own, and a full close from either end, on
/// one tunnel. Every case is byte-exact and ends in a clean end of file,
/// never a reset.
fn half_close(carrier: &str) {
    const UP: u64 = MIB + 17;
    const DOWN: u64 = MIB + 29;

    // Reads the device's bytes to FIN, reports them, then answers: the
    // answer can only arrive if the other direction stayed open.
    let (tx, answer_after_fin) = report::<Seen>();
    let tx = Mutex::new(tx);
    let answer_after = Server::start(move |mut socket| {
        let seen = receive_all(&mut socket);
        let _ = tx.lock().expect("report lock").send(seen);
        let written = AtomicU64::new(0);
        let _ = send_pattern(&mut socket, 2, DOWN, &written);
        let _ = socket.shutdown(Shutdown::Write);
    });

    // Sends its bytes and FIN first, then reads the device's bytes to FIN.
    let (tx, fin_first) = report::<Seen>();
    let tx = Mutex::new(tx);
    let fin_then_read = Server::start(move |mut socket| {
        let written = AtomicU64::new(0);
        let _ = send_pattern(&mut socket, 3, DOWN, &written);
        let _ = socket.shutdown(Shutdown::Write);
        let seen = receive_all(&mut socket);
        let _ = tx.lock().expect("report lock").send(seen);
    });

    // Only reads, to FIN, and reports.
    let (tx, sunk) = report::<Seen>();
    let tx = Mutex::new(tx);
    let sink = Server::start(move |mut socket| {
        let seen = receive_all(&mut socket);
        let _ = tx.lock().expect("report lock").send(seen);
    });

    // Only writes, then closes the socket entirely (no shutdown first).
    let source = Server::start(move |mut socket| {
        let written = AtomicU64::new(0);
        let _ = send_pattern(&mut socket, 4, DOWN, &written);
        drop(socket);
    });

    let targets = [
        ("answer", answer_after.target()),
        ("finfirst", fin_then_read.target()),
        ("sink", sink.target()),
        ("source", source.target()),
    ];
    let names = ["answer", "finfirst", "sink", "source"];
    let tunnel = Tunnel::start(carrier, &targets, &names, &names);
    let logs = || tunnel.describe();

    // Device FIN first: the target sees exactly our bytes and FIN, and its
    // answer still comes back to us, ending in FIN.
    let mut socket = TcpStream::connect(tunnel.forward("answer")).expect("connect to forward");
    let written = AtomicU64::new(0);
    send_pattern(&mut socket, 1, UP, &written).expect("send before half-close");
    socket.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(
        answer_after_fin.next("the device's bytes at the target"),
        Received::expected(1, UP),
        "device -> target before the device's FIN\n{}",
        logs()
    );
    assert_eq!(
        receive_all(&mut socket),
        Received::expected(2, DOWN),
        "target -> device after the device's FIN\n{}",
        logs()
    );

    // Target FIN first: we read its bytes to FIN before sending anything,
    // then our bytes still reach it.
    let mut socket = TcpStream::connect(tunnel.forward("finfirst")).expect("connect to forward");
    assert_eq!(
        receive_all(&mut socket),
        Received::expected(3, DOWN),
        "target -> device ending in the target's FIN\n{}",
        logs()
    );
    send_pattern(&mut socket, 5, UP, &written).expect("send after the target's FIN");
    socket.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(
        fin_first.next("the device's bytes after the target's FIN"),
        Received::expected(5, UP),
        "device -> target after the target's FIN\n{}",
        logs()
    );
    let mut rest = [0u8; 1];
    assert_eq!(socket.read(&mut rest).ok(), Some(0), "nothing follows the target's FIN");

    // The device closes its socket outright: the target sees every byte
    // and a clean end of file.
    let mut socket = TcpStream::connect(tunnel.forward("sink")).expect("connect to forward");
    send_pattern(&mut socket, 6, UP, &written).expect("send before close");
    drop(socket);
    assert_eq!(
        sunk.next("the bytes of a device that closed"),
        Received::expected(6, UP),
        "device closed its socket\n{}",
        logs()
    );

    // The target closes its socket outright: the device sees every byte
    // and a clean end of file.
    let mut socket = TcpStream::connect(tunnel.forward("source")).expect("connect to forward");
    assert_eq!(
        receive_all(&mut socket),
        Received::expected(4, DOWN),
        "target closed its socket\n{}",
        logs()
    );
    drop(socket);

    // None of these ends was a reset, on either side.
    for (who, proc) in [("agent", &tunnel.agent), ("station", &tunnel.station)] {
        let resets = proc.stderr.matching(&["reset"]);
        assert!(resets.is_empty(), "{who} logged resets for clean closes: {resets:#?}\n{}", logs());
    }
}

#[test]
fn half_close_each_way_stream() {
    half_close("stream");
}

#[test]
fn half_close_each_way_poll() {
    half_close("poll");
}

// ---------------------------------------------------------------------------
// Aborts.

/// How soon an abort at one end must reach the other. Loopback takes
/// milliseconds; the bound is for a busy shared machine.
const ABORT_BOUND: Duration = Duration::from_secs(5);

/// A socket closed with unread data sends a reset; the tunnel carries it as
/// a stream reset, and the far end's socket fails instead of hanging.
#[test]
fn abort_at_either_end_resets_the_other() {
    // The target floods the device, which reads a little and aborts.
    let (tx, flood_ended) = report::<(Instant, Option<ErrorKind>)>();
    let tx = Mutex::new(tx);
    let flood = Server::start(move |mut socket| {
        let written = AtomicU64::new(0);
        let _ = socket.set_write_timeout(Some(IO_STALL));
        let result = send_pattern(&mut socket, 1, 1 << 30, &written);
        let _ =
            tx.lock().expect("report lock").send((Instant::now(), result.err().map(|e| e.kind())));
    });
    // The target reads a little and aborts while the device floods it.
    let sink = Server::start(|mut socket| {
        let mut some = vec![0u8; 100_000];
        let _ = socket.read_exact(&mut some);
    });
    let targets = [("flood", flood.target()), ("sink", sink.target())];
    let tunnel = Tunnel::start("stream", &targets, &["flood", "sink"], &["flood", "sink"]);

    let mut socket = TcpStream::connect(tunnel.forward("flood")).expect("connect to forward");
    let mut some = vec![0u8; 100_000];
    socket.read_exact(&mut some).expect("the flood reaches the device");
    let aborted = Instant::now();
    drop(socket);
    let (ended, error) = flood_ended.within("the flood to fail", ABORT_BOUND);
    assert!(
        matches!(error, Some(ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)),
        "the target's writes end in a reset after the device aborted, not {error:?}\n{}",
        tunnel.describe()
    );
    assert!(
        ended - aborted < ABORT_BOUND,
        "target learnt of the abort after {:?}",
        ended - aborted
    );
    // The agent saw the abort reading or writing the device socket.
    tunnel.station.wait_log(&["reset by peer: local ", "Connection reset"]);

    let mut socket = TcpStream::connect(tunnel.forward("sink")).expect("connect to forward");
    socket.set_write_timeout(Some(ABORT_BOUND)).expect("set a write timeout");
    let written = AtomicU64::new(0);
    let result = send_pattern(&mut socket, 2, 1 << 30, &written);
    let error = result.err().map(|e| e.kind());
    assert!(
        matches!(error, Some(ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)),
        "the device's writes end in a reset after the target aborted, not {error:?} \
         ({} bytes written)\n{}",
        written.load(Ordering::Acquire),
        tunnel.describe()
    );
    tunnel.agent.wait_log(&["reset by peer: local ", "Connection reset"]);
}

// ---------------------------------------------------------------------------
// Stream lifetimes.

/// More connections one after another than a session may have open at
/// once: closed streams must be freed, or connection MAX_STREAMS + 1 fails.
#[test]
fn closed_streams_are_freed() {
    let connections = 2 * postern::core::streams::MAX_STREAMS as u64 + 10;
    let echo = Server::echo();
    let tunnel = Tunnel::start("stream", &[("echo", echo.target())], &["echo"], &["echo"]);
    for i in 0..connections {
        assert_eq!(
            echo_round_trip(tunnel.forward("echo"), i, 1000),
            Received::expected(i, 1000),
            "connection {i} of {connections} one after another\n{}",
            tunnel.describe()
        );
    }
    assert_eq!(echo.accepts() as u64, connections);
}

// ---------------------------------------------------------------------------
// Many streams at once.

const CONCURRENT: usize = 32;

/// `CONCURRENT` connections, all open at once, each sending a different
/// pattern of a different length; each must get exactly its own back.
fn concurrent(carrier: &str, base_len: u64) {
    let echo = Server::echo();
    let tunnel = Tunnel::start(carrier, &[("echo", echo.target())], &["echo"], &["echo"]);
    let forward = tunnel.forward("echo");
    let start = Arc::new(Barrier::new(CONCURRENT));
    let clients: Vec<_> = (0..CONCURRENT as u64)
        .map(|i| {
            let start = start.clone();
            thread::spawn(move || {
                let socket = TcpStream::connect(forward).expect("connect to forward");
                // Every connection is open before any sends.
                start.wait();
                let (seed, len) = (1000 + i, base_len + i * 4099);
                (echo_on(socket, seed, len), Received::expected(seed, len))
            })
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let (got, expected) = client.join().expect("client thread does not panic");
        assert_eq!(got, expected, "connection {i} of {CONCURRENT}\n{}", tunnel.describe());
    }
    assert_eq!(echo.accepts(), CONCURRENT, "one target connection per stream");
}

#[test]
fn concurrent_32_stream() {
    concurrent("stream", 512 * 1024);
}

#[test]
fn concurrent_32_poll() {
    concurrent("poll", 128 * 1024);
}

// ---------------------------------------------------------------------------
// Flow control: a stuck stream holds its window, nothing more.

/// Bytes each stuck stream tries to move: more than every socket buffer
/// on the way can hold (loopback autotuning may grow one to 32 MiB of
/// tcp_rmem; with send buffers, well under 100 MiB in all), so the writer
/// cannot finish unless the tunnel itself buffers without bound.
const STUCK: u64 = 128 * MIB;

/// What the fast stream moves while the others are stuck.
const FAST: u64 = 32 * MIB;

/// Resident memory each process may reach. A stuck stream costs at most its
/// window and send buffer (under 1 MiB); a tunnel that buffered the stuck
/// streams would pass this long before their writers got near `STUCK`.
const RSS_BOUND_KIB: u64 = 64 * 1024;

/// One stream whose target never reads, one whose device never reads, and
/// a fast stream beside them that must finish byte-exact while both stay
/// stuck; then the stuck ones are released and must deliver every byte.
fn slow_reader(carrier: &str) {
    let echo = Server::echo();

    // Accepts and holds the socket without reading until released.
    let (release_tx, release) = std::sync::mpsc::channel::<()>();
    let release = Mutex::new(release);
    let (tx, held) = report::<Seen>();
    let tx = Mutex::new(tx);
    let hold = Server::start(move |mut socket| {
        let _ = release.lock().expect("release lock").recv();
        let seen = receive_all(&mut socket);
        let _ = tx.lock().expect("report lock").send(seen);
    });

    // Writes STUCK bytes at a device that does not read.
    let flooded = Arc::new(AtomicU64::new(0));
    let flood_count = flooded.clone();
    let flood = Server::start(move |mut socket| {
        let _ = socket.set_write_timeout(Some(IO_STALL * 2));
        let _ = send_pattern(&mut socket, 8, STUCK, &flood_count);
        let _ = socket.shutdown(Shutdown::Write);
    });

    let targets = [("echo", echo.target()), ("hold", hold.target()), ("flood", flood.target())];
    let names = ["echo", "hold", "flood"];
    let tunnel = Tunnel::start(carrier, &targets, &names, &names);

    // Device -> target stuck: the writer blocks once the path is full.
    let mut up = TcpStream::connect(tunnel.forward("hold")).expect("connect to forward");
    let pushed = Arc::new(AtomicU64::new(0));
    let push_count = pushed.clone();
    let mut writer = up.try_clone().expect("clone a socket");
    let _ = writer.set_write_timeout(Some(IO_STALL * 2));
    let pusher = thread::spawn(move || {
        let result = send_pattern(&mut writer, 7, STUCK, &push_count);
        let _ = writer.shutdown(Shutdown::Write);
        result.map_err(|e| e.kind())
    });

    // Target -> device stuck: we hold `down` without reading.
    let mut down = TcpStream::connect(tunnel.forward("flood")).expect("connect to forward");

    // Both stuck streams are carrying bytes before the fast one starts.
    wait_until("bytes on both stuck streams", LOG_WAIT, || {
        pushed.load(Ordering::Acquire) >= MIB && flooded.load(Ordering::Acquire) >= MIB
    });

    let got = echo_round_trip(tunnel.forward("echo"), 9, FAST);
    assert_eq!(
        got,
        Received::expected(9, FAST),
        "fast stream beside two stuck ones ({carrier})\n{}",
        tunnel.describe()
    );

    let (up_then, down_then) = (pushed.load(Ordering::Acquire), flooded.load(Ordering::Acquire));
    assert!(
        up_then < STUCK && down_then < STUCK,
        "stuck streams were not held back by flow control: device wrote {up_then} of {STUCK} \
         bytes to a target that never read, target wrote {down_then} of {STUCK} to a device \
         that never read"
    );
    assert_memory_bounded(&tunnel, "with two streams stuck");

    // Released, the stuck streams deliver every byte, in order.
    release_tx.send(()).expect("hold target waits for release");
    assert_eq!(
        held.next("the bytes of the formerly stuck upload"),
        Received::expected(7, STUCK),
        "device -> target after the target started reading\n{}",
        tunnel.describe()
    );
    assert_eq!(pusher.join().expect("pusher does not panic"), Ok(()), "device wrote everything");
    assert_eq!(
        receive_all(&mut down),
        Received::expected(8, STUCK),
        "target -> device after the device started reading\n{}",
        tunnel.describe()
    );
    assert_eq!(
        receive_all(&mut up),
        Received::expected(0, 0),
        "the hold target's close reaches the device as a clean end of file"
    );
    assert_memory_bounded(&tunnel, "after the stuck streams drained");
}

fn assert_memory_bounded(tunnel: &Tunnel, when: &str) {
    for (who, proc) in [("agent", &tunnel.agent), ("station", &tunnel.station)] {
        let memory = proc.memory();
        assert!(
            memory.peak_kib < RSS_BOUND_KIB,
            "{who} peak RSS {} KiB {when}, bound {RSS_BOUND_KIB} KiB",
            memory.peak_kib
        );
    }
}

#[test]
fn slow_reader_does_not_stall_others_stream() {
    slow_reader("stream");
}

#[test]
fn slow_reader_does_not_stall_others_poll() {
    slow_reader("poll");
}
