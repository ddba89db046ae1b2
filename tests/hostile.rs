//! Hostile input against real station and agent processes: malformed and
//! oversized requests, slowloris, hundreds of strangers while a device
//! works, a middlebox that flips bytes, captured requests replayed, and a
//! local client flooding one forward. Each asserts the exact outcome: the
//! status line, the log line, byte-exact data still flowing, a memory bound.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{echo_round_trip, wait_until, Received, Server, Tunnel, LOG_WAIT};

/// Sends `request` on a fresh connection and returns everything the
/// station answered before it closed the connection.
fn answer_to(station: SocketAddr, request: &[u8]) -> String {
    let mut socket = TcpStream::connect(station).expect("connect to the station");
    socket.set_read_timeout(Some(LOG_WAIT)).expect("set a read timeout");
    // The station may answer and close before it read everything: a reset
    // on a late write is part of the outcome, not a test failure.
    let _ = socket.write_all(request);
    let _ = socket.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("")
}

const SID: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn malformed_and_oversized_requests_get_exact_statuses() {
    let echo = Server::echo();
    let tunnel = Tunnel::start("stream", &[("echo", echo.target())], &["echo"], &["echo"]);
    let station = tunnel.station_addr;
    let hello = format!("/p1/{SID}/hello");
    let long_head = format!("POST {hello} HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "p".repeat(9000));
    let many_fields: String = (0..40).map(|i| format!("X-{i}: v\r\n")).collect();
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        ("garbage".into(), b"\x16\x03\x01\x02\x00garbage\r\n\r\n".to_vec(), "HTTP/1.1 400 "),
        ("head over 8 KiB".into(), long_head.into_bytes(), "HTTP/1.1 431 "),
        (
            "40 header fields".into(),
            format!("POST {hello} HTTP/1.1\r\n{many_fields}\r\n").into_bytes(),
            "HTTP/1.1 431 ",
        ),
        (
            "two Content-Length".into(),
            format!("POST {hello} HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc")
                .into_bytes(),
            "HTTP/1.1 400 ",
        ),
        (
            "negative Content-Length".into(),
            format!("POST {hello} HTTP/1.1\r\nContent-Length: -1\r\n\r\n").into_bytes(),
            "HTTP/1.1 400 ",
        ),
        (
            "Content-Length and Transfer-Encoding".into(),
            format!(
                "POST {hello} HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            .into_bytes(),
            "HTTP/1.1 400 ",
        ),
        (
            "gzip, chunked".into(),
            format!("POST {hello} HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
                .into_bytes(),
            "HTTP/1.1 400 ",
        ),
        (
            "bad chunk size".into(),
            format!("POST {hello} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
                .into_bytes(),
            "HTTP/1.1 400 ",
        ),
        (
            "hello body too large".into(),
            format!("POST {hello} HTTP/1.1\r\nContent-Length: 100000\r\n\r\n").into_bytes(),
            "HTTP/1.1 413 ",
        ),
        (
            "not a postern handshake".into(),
            format!("POST {hello} HTTP/1.1\r\nContent-Length: 112\r\n\r\n{}", "x".repeat(112))
                .into_bytes(),
            "HTTP/1.1 400 ",
        ),
        (
            "GET on a carrier path".into(),
            format!("GET {hello} HTTP/1.1\r\n\r\n").into_bytes(),
            "HTTP/1.1 405 ",
        ),
        (
            "not a carrier path".into(),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "HTTP/1.1 404 ",
        ),
        (
            "unknown session".into(),
            format!("POST /p1/{SID}/poll HTTP/1.1\r\nContent-Length: 0\r\n\r\n").into_bytes(),
            "HTTP/1.1 410 ",
        ),
    ];
    for (what, request, expected) in &cases {
        let answer = answer_to(station, request);
        assert!(
            status_line(&answer).starts_with(expected),
            "{what}: expected {expected:?}, got {answer:?}\n{}",
            tunnel.describe()
        );
        assert!(answer.contains("\r\nX-Postern: station\r\n"), "{what}: {answer:?}");
    }
    // Each refusal has its line in the station's log (the budget is 20 a minute).
    tunnel.station.wait_log_nth(&["refused with"], cases.len(), LOG_WAIT);
    tunnel.station.wait_log(&["refused with 405: GET /p1/"]);
    tunnel.station.wait_log(&["refused with 400: POST /p1/", "not a postern handshake"]);
    // The device never noticed.
    assert_eq!(echo_round_trip(tunnel.forward("echo"), 7, 1 << 20), Received::expected(7, 1 << 20));
}

#[test]
fn slowloris_gets_408_at_the_head_deadline() {
    let echo = Server::echo();
    let tunnel = Tunnel::start("stream", &[("echo", echo.target())], &["echo"], &["echo"]);
    let mut socket = TcpStream::connect(tunnel.station_addr).expect("connect");
    socket.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let started = Instant::now();
    let head = format!("POST /p1/{SID}/hello HTTP/1.1\r\nX-Slow: ");
    let mut trickle = head.into_bytes().into_iter().chain(std::iter::repeat(b'a'));
    let mut answer = Vec::new();
    // A byte every half second, never finishing the head: the station must
    // answer 408 and close at its head deadline (10 s); 30 s is the bound.
    loop {
        assert!(started.elapsed() < Duration::from_secs(30), "no answer to a slow head");
        if let Some(byte) = trickle.next() {
            // Fails once the station closed; the answer is then read below.
            let _ = socket.write_all(&[byte]);
        }
        let mut buf = [0u8; 1024];
        match socket.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(status_line(&answer).starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(started.elapsed() >= Duration::from_secs(9), "cut before the deadline");
    tunnel.station.wait_log(&["refused with 408", "timed out"]);
}

/// Opens a connection that trickles a partial head, or sends nothing.
fn stranger(station: SocketAddr, trickle: bool) -> Option<TcpStream> {
    let mut socket = TcpStream::connect(station).ok()?;
    if trickle {
        let _ = socket.write_all(b"POST /p1/");
    }
    Some(socket)
}

#[test]
fn hundreds_of_strangers_cost_nothing_lasting_while_a_device_works() {
    let echo = Server::echo();
    let tunnel = Tunnel::start("stream", &[("echo", echo.target())], &["echo"], &["echo"]);
    let forward = tunnel.forward("echo");
    // Warm up with the transfer measured below, so the baseline includes
    // what a working tunnel holds (its windows grow with a transfer, and
    // the allocator keeps some of what the rings gave back).
    assert_eq!(echo_round_trip(forward, 1, 16 << 20), Received::expected(1, 16 << 20));
    let baseline = tunnel.station.memory().now_kib;

    let strangers: Vec<TcpStream> =
        (0..400).filter_map(|i| stranger(tunnel.station_addr, i % 2 == 0)).collect();
    // Past the bound on strangers (256) the station answers 503 at once.
    tunnel.station.wait_log(&["refused with 503", "have not authenticated yet"]);
    let transfer = thread::spawn(move || echo_round_trip(forward, 2, 16 << 20));
    // Garbage keeps coming while the device transfers.
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect(tunnel.station_addr) {
            let _ = s.write_all(b"\x00\xffnot http at all\r\n\r\n");
        }
    }
    let during = tunnel.station.memory().now_kib;
    assert_eq!(transfer.join().expect("transfer thread"), Received::expected(2, 16 << 20));
    drop(strangers);

    // Once the strangers are gone, a device can open new connections again
    // and memory is back near where it was (slack for the allocator).
    assert_eq!(echo_round_trip(forward, 3, 1 << 20), Received::expected(3, 1 << 20));
    let mut after = 0;
    wait_until("station memory back near its baseline", Duration::from_secs(20), || {
        after = tunnel.station.memory().now_kib;
        after <= baseline + 8 * 1024
    });
    eprintln!("station RSS: baseline {baseline} KiB, under attack {during} KiB, after {after} KiB");
}

/// A relay that flips one byte in some of what it forwards, both ways.
struct TamperingRelay {
    addr: SocketAddr,
    flips: Arc<AtomicUsize>,
}

impl TamperingRelay {
    fn start(upstream: SocketAddr, one_in: u64) -> TamperingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let flips = Arc::new(AtomicUsize::new(0));
        let counted = flips.clone();
        let rng = Arc::new(Mutex::new(0x7a3b_91c5_u64));
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                for (from, to) in
                    [(client.try_clone(), server.try_clone()), (Ok(server), Ok(client))]
                {
                    let (Ok(mut from), Ok(mut to)) = (from, to) else { continue };
                    let (flips, rng) = (counted.clone(), rng.clone());
                    thread::spawn(move || {
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut seen = 0u64;
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let roll = {
                                let mut x = rng.lock().unwrap_or_else(|p| p.into_inner());
                                *x ^= *x << 13;
                                *x ^= *x >> 7;
                                *x ^= *x << 17;
                                *x
                            };
                            // Leave heads alone (the first bytes of a
                            // connection): the bodies are what is under test.
                            if seen > 1024 && roll % one_in == 0 {
                                buf[(roll >> 20) as usize % n] ^= 0x20;
                                flips.fetch_add(1, Ordering::AcqRel);
                            }
                            seen += n as u64;
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        TamperingRelay { addr, flips }
    }
}

fn tampered_transfer(carrier: &str) {
    let echo = Server::echo();
    let dir = common::TempDir::new(&format!("tamper-{carrier}"));
    let keys = common::Keys::new();
    let devices = [("test-device", keys.device.public_key(), &["echo"][..])];
    let (station, station_addr) = common::start_station(
        &dir,
        &common::station_toml(&keys.station, &[("echo", echo.target())], &devices),
    );
    let relay = TamperingRelay::start(station_addr, 40);
    let toml = common::agent_toml(
        relay.addr,
        &keys.station.public_key(),
        &keys.device,
        carrier,
        &["echo"],
    );
    let (agent, forwards) = common::start_agent(&dir, "agent", &toml, &["echo"]);
    agent.wait_log(&["connected to the station"]);
    let len = 8 << 20;
    let got = echo_round_trip(forwards["echo"], 11, len);
    let logs = format!("{}\n{}", agent.describe(), station.describe());
    assert_eq!(got, Received::expected(11, len), "{logs}");
    assert!(relay.flips.load(Ordering::Acquire) >= 5, "the relay must tamper\n{logs}");
    // Someone noticed: a packet that failed authentication, or framing that broke.
    let noticed = agent.stderr.count("failed authentication")
        + station.stderr.count("failed authentication")
        + agent.stderr.count("bad chunked body")
        + station.stderr.count("bad chunked body")
        + station.stderr.count("refused with");
    assert!(noticed > 0, "{logs}");
}

#[test]
fn tampered_stream_carrier_delivers_only_true_bytes() {
    tampered_transfer("stream");
}

#[test]
fn tampered_poll_carrier_delivers_only_true_bytes() {
    tampered_transfer("poll");
}

/// A relay that keeps a copy of every byte the agent sent.
struct CapturingRelay {
    addr: SocketAddr,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl CapturingRelay {
    fn start(upstream: SocketAddr) -> CapturingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let sent: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let all = sent.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let Ok(mut server) = TcpStream::connect(upstream) else { continue };
                let (Ok(mut back_from), Ok(mut back_to)) = (server.try_clone(), client.try_clone())
                else {
                    continue;
                };
                thread::spawn(move || {
                    let _ = std::io::copy(&mut back_from, &mut back_to);
                    let _ = back_to.shutdown(Shutdown::Write);
                });
                let all = all.clone();
                thread::spawn(move || {
                    let index = {
                        let mut all = all.lock().unwrap_or_else(|p| p.into_inner());
                        all.push(Vec::new());
                        all.len() - 1
                    };
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = client.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        all.lock().unwrap_or_else(|p| p.into_inner())[index]
                            .extend_from_slice(&buf[..n]);
                        if server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = server.shutdown(Shutdown::Write);
                });
            }
        });
        CapturingRelay { addr, sent }
    }

    /// Every complete request with `verb` in its path, as sent.
    fn requests(&self, verb: &str) -> Vec<Vec<u8>> {
        let streams = self.sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut found = Vec::new();
        for stream in streams {
            let mut rest = &stream[..];
            while let Ok(Some((head, len))) = postern::carrier::http::parse_request(rest) {
                let body = match head.body {
                    postern::carrier::http::BodyKind::Length(n) => n as usize,
                    _ => 0,
                };
                if rest.len() < len + body {
                    break;
                }
                if head.target.ends_with(&format!("/{verb}")) {
                    found.push(rest[..len + body].to_vec());
                }
                rest = &rest[len + body..];
            }
        }
        found
    }
}

#[test]
fn replayed_requests_deliver_nothing_twice() {
    // The target records everything it receives on every connection.
    let received: Arc<Mutex<Vec<u8>>> = Arc::default();
    let sink = received.clone();
    let target = Server::start(move |mut socket| {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&buf[..n]);
        }
    });
    let dir = common::TempDir::new("replay");
    let keys = common::Keys::new();
    let devices = [("test-device", keys.device.public_key(), &["rec"][..])];
    let (station, station_addr) = common::start_station(
        &dir,
        &common::station_toml(&keys.station, &[("rec", target.target())], &devices),
    );
    let relay = CapturingRelay::start(station_addr);
    let toml =
        common::agent_toml(relay.addr, &keys.station.public_key(), &keys.device, "poll", &["rec"]);
    let (agent, forwards) = common::start_agent(&dir, "agent", &toml, &["rec"]);
    agent.wait_log(&["connected to the station"]);

    let message = b"pay 100 to account 42\n";
    let mut local = TcpStream::connect(forwards["rec"]).expect("connect to the forward");
    local.write_all(message).expect("write");
    let got = || received.lock().unwrap_or_else(|p| p.into_inner()).clone();
    wait_until("the message at the target", LOG_WAIT, || got() == message);

    let pushes = relay.requests("push");
    assert!(!pushes.is_empty(), "no push request was captured");
    for (round, when) in [(0, Duration::ZERO), (1, Duration::from_secs(2))] {
        thread::sleep(when);
        for push in &pushes {
            let answer = answer_to(station_addr, push);
            assert!(
                status_line(&answer).starts_with("HTTP/1.1 403 "),
                "round {round}: replayed push answered {answer:?}"
            );
        }
    }
    // A replay of the handshake does not start a second session either.
    for hello in relay.requests("hello") {
        let answer = answer_to(station_addr, &hello);
        assert!(status_line(&answer).starts_with("HTTP/1.1 400 "), "replayed hello: {answer:?}");
    }
    // The session goes on, and the target got the message exactly once.
    local.write_all(b"end\n").expect("write");
    wait_until("the second message at the target", LOG_WAIT, || got().ends_with(b"end\n"));
    assert_eq!(got(), [&message[..], b"end\n"].concat(), "{}", station.describe());
    station.wait_log(&["replays"]);
}

#[test]
fn a_local_flood_cannot_stall_other_forwards() {
    let echo = Server::echo();
    // A target that accepts and never reads: whatever is sent to it backs up.
    let stuck = Server::start(|socket| {
        thread::sleep(Duration::from_secs(120));
        drop(socket);
    });
    let tunnel = Tunnel::start(
        "stream",
        &[("echo", echo.target()), ("stuck", stuck.target())],
        &["echo", "stuck"],
        &["echo", "stuck"],
    );
    let stuck_forward = tunnel.forward("stuck");
    let mut flood = Vec::new();
    for _ in 0..100 {
        if let Ok(socket) = TcpStream::connect(stuck_forward) {
            flood.push(socket);
        }
    }
    tunnel.agent.wait_log(&["forward to stuck: 64 connections open already"]);
    // One of them pushes megabytes the target will never read.
    let mut writer = flood[0].try_clone().expect("clone");
    writer.set_write_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let pusher = thread::spawn(move || {
        let chunk = vec![0x55u8; 64 * 1024];
        while writer.write_all(&chunk).is_ok() {}
    });
    let len = 8 << 20;
    let got = echo_round_trip(tunnel.forward("echo"), 21, len);
    assert_eq!(got, Received::expected(21, len), "{}", tunnel.describe());
    drop(flood);
    let _ = pusher.join();
}
