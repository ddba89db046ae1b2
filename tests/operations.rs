//! What an operator does with a running station and agent: scrape
//! `/metrics` and `/status` (exact numbers after a known transfer), reload
//! the station's config with SIGHUP while a device keeps working, and stop
//! both with SIGTERM, letting open streams finish.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    echo_round_trip, send_pattern, start_agent, start_station, station_toml, Keys, Received,
    Server, TempDir, LOG_WAIT,
};
use common::{status_addr, status_get as get, with_status};
use postern::keys::PrivateKey;

fn agent_toml(station: SocketAddr, station_key: &PrivateKey, key: &PrivateKey) -> String {
    common::agent_toml(station, &station_key.public_key(), key, "stream", &["echo"])
}

/// Starts an agent with a key the station does not know and waits until
/// the station refused it; it keeps trying until dropped.
fn start_intruder(
    dir: &TempDir,
    station: &common::Proc,
    station_addr: SocketAddr,
    station_key: &PrivateKey,
) -> common::Proc {
    let stranger = PrivateKey::generate();
    let toml = agent_toml(station_addr, station_key, &stranger);
    let (intruder, _) = start_agent(dir, "intruder", &toml, &["echo"]);
    station.wait_log(&["unknown device key", &stranger.public_key().fingerprint()]);
    intruder
}

#[test]
fn metrics_and_status_count_a_known_transfer() {
    let echo = Server::echo();
    let dir = TempDir::new("metrics");
    let keys = Keys::new();
    let devices = [("pump-17", keys.device.public_key(), &["echo"][..])];
    let toml = with_status(&station_toml(&keys.station, &[("echo", echo.target())], &devices));
    let (station, station_addr) = start_station(&dir, &toml);
    let status = status_addr(&station);
    let (agent, forwards) = start_agent(
        &dir,
        "agent",
        &agent_toml(station_addr, &keys.station, &keys.device),
        &["echo"],
    );
    agent.wait_log(&["connected to the station"]);

    let len = (3 << 20) + 17;
    assert_eq!(echo_round_trip(forwards["echo"], 5, len), Received::expected(5, len));
    // A stranger's garbage and an unknown key, to be counted too.
    let mut garbage = TcpStream::connect(station_addr).expect("connect");
    garbage.write_all(b"\x00garbage\r\n\r\n").expect("write");
    let _ = garbage.read_to_end(&mut Vec::new());
    let _intruder = start_intruder(&dir, &station, station_addr, &keys.station);

    let (line, metrics) = get(status, "/metrics");
    assert_eq!(line, "HTTP/1.1 200 OK", "{metrics}");
    for expected in [
        format!("postern_device_bytes_total{{device=\"pump-17\",direction=\"up\"}} {len}"),
        format!("postern_device_bytes_total{{device=\"pump-17\",direction=\"down\"}} {len}"),
        "postern_devices_configured 1".to_owned(),
        "postern_devices_connected 1".to_owned(),
        "postern_device_connected{device=\"pump-17\"} 1".to_owned(),
        "postern_device_carrier{device=\"pump-17\",kind=\"stream\"} 1".to_owned(),
        "postern_device_sessions_total{device=\"pump-17\"} 1".to_owned(),
        "postern_handshakes_total 1".to_owned(),
        "postern_rejected_requests_total{reason=\"malformed\"} 1".to_owned(),
    ] {
        assert!(metrics.lines().any(|l| l == expected), "no {expected:?} in\n{metrics}");
    }
    let unknown = metrics
        .lines()
        .find_map(|l| l.strip_prefix("postern_auth_failures_total{kind=\"unknown_key\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(unknown >= 1, "{metrics}");

    let (line, json) = get(status, "/status");
    assert_eq!(line, "HTTP/1.1 200 OK");
    assert!(json.starts_with("{\"devices\":[{\"name\":\"pump-17\",\"connected\":true,"), "{json}");
    assert!(json.contains(&format!("\"bytes_up\":{len},\"bytes_down\":{len}")), "{json}");
    assert!(json.contains("\"carrier\":\"stream\""), "{json}");
    assert_eq!(get(status, "/other").0, "HTTP/1.1 404 Not Found");
}

#[test]
fn reload_adds_and_removes_a_device_while_another_keeps_working() {
    let echo = Server::echo();
    let dir = TempDir::new("reload");
    let keys = Keys::new();
    let second = PrivateKey::generate();
    let targets = [("echo", echo.target())];
    let one = station_toml(
        &keys.station,
        &targets,
        &[("first", keys.device.public_key(), &["echo"][..])],
    );
    let both = station_toml(
        &keys.station,
        &targets,
        &[
            ("first", keys.device.public_key(), &["echo"][..]),
            ("second", second.public_key(), &["echo"][..]),
        ],
    );
    let (station, station_addr) = start_station(&dir, &one);
    let config = dir.path().join("station.toml");
    let (first, first_forwards) = start_agent(
        &dir,
        "first",
        &agent_toml(station_addr, &keys.station, &keys.device),
        &["echo"],
    );
    first.wait_log(&["connected to the station"]);

    // The first device sends 24 MiB slowly, across every reload below.
    let forward = first_forwards["echo"];
    let transfer = thread::spawn(move || {
        let mut socket = TcpStream::connect(forward).expect("connect");
        let mut reader = socket.try_clone().expect("clone");
        let receiver = thread::spawn(move || common::receive_all(&mut reader));
        let written = AtomicU64::new(0);
        for part in 0..24u64 {
            send_pattern(&mut socket, 100 + part, 1 << 20, &written).expect("send");
            thread::sleep(Duration::from_millis(150));
        }
        let _ = socket.shutdown(Shutdown::Write);
        receiver.join().expect("receiver")
    });

    std::fs::write(&config, &both).expect("write the new config");
    station.signal("HUP");
    station.wait_log(&["reloaded: device second added"]);
    let (second_agent, second_forwards) =
        start_agent(&dir, "second", &agent_toml(station_addr, &keys.station, &second), &["echo"]);
    second_agent.wait_log(&["connected to the station"]);
    assert_eq!(
        echo_round_trip(second_forwards["echo"], 9, 1 << 20),
        Received::expected(9, 1 << 20)
    );

    // A broken config is refused and changes nothing.
    std::fs::write(&config, one.replace("127.0.0.1:0", "nowhere")).expect("write a bad config");
    station.signal("HUP");
    station.wait_log(&["reload refused, the running config stays", "listen: unparseable address"]);

    std::fs::write(&config, &one).expect("write the config without the second device");
    station.signal("HUP");
    station.wait_log(&["reloaded: device second removed; its session ends"]);
    second_agent.wait_log(&["session", "ended"]);
    station.wait_log(&["unknown device key", &second.public_key().fingerprint()]);

    // The first device's transfer went on through all of it, byte-exact.
    let got = transfer.join().expect("transfer");
    let mut digest = common::Digest::default();
    for part in 0..24u64 {
        let mut pattern = common::Pattern::new(100 + part);
        let mut buf = vec![0u8; 1 << 20];
        pattern.fill(&mut buf);
        digest.update(&buf);
    }
    assert_eq!(got, Received { len: 24 << 20, hash: digest.finish(), error: None });
    assert_eq!(station.stderr.count("device first handshake"), 1, "{}", station.describe());
    assert_eq!(station.stderr.matching(&["device first session", "ended"]).len(), 0);
}

/// The families alerts are written on, with real values: every counter
/// at zero before anything happened; a stream refused by its reason and
/// one opened; when the device was last heard, kept after its agent
/// stopped; a reload applied, then one refused (a broken config), each
/// counted with its time; and the build's version.
#[test]
fn metrics_count_streams_reloads_and_when_a_device_was_heard() {
    let echo = Server::echo();
    let dir = TempDir::new("alerting");
    let keys = Keys::new();
    let targets = [
        ("echo", echo.target()),
        ("dead", common::refused_addr().to_string()),
        ("billing", echo.target()),
    ];
    let devices = [("pump-17", keys.device.public_key(), &["echo", "dead"][..])];
    let toml = with_status(&station_toml(&keys.station, &targets, &devices));
    let (station, station_addr) = start_station(&dir, &toml);
    let config = dir.path().join("station.toml");
    let status = status_addr(&station);
    let scrape = || get(status, "/metrics").1;
    let value = |metrics: &str, series: &str| {
        common::metric(metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };

    let before = scrape();
    for series in [
        "postern_streams_opened_total",
        "postern_streams_refused_total{reason=\"connect_failed\"}",
        "postern_streams_refused_total{reason=\"not_allowed\"}",
        "postern_streams_refused_total{reason=\"too_many_streams\"}",
        "postern_handshake_refusals_total{reason=\"busy\"}",
        "postern_handshake_refusals_total{reason=\"unknown_key\"}",
        "postern_handshake_refusals_total{reason=\"duplicate_key\"}",
        "postern_rejected_requests_total{reason=\"overload\"}",
        "postern_reloads_total{result=\"success\"}",
        "postern_reloads_total{result=\"failure\"}",
        "postern_last_reload_seconds{result=\"success\"}",
        "postern_last_reload_seconds{result=\"failure\"}",
        "postern_device_last_heard_seconds{device=\"pump-17\"}",
    ] {
        assert_eq!(value(&before, series), 0.0, "{series}");
    }
    let build = format!(
        "postern_build_info{{version=\"{}\",commit=\"{}\",features=\"{}\"}}",
        env!("CARGO_PKG_VERSION"),
        postern::COMMIT,
        postern::FEATURES.join(",")
    );
    assert_eq!(value(&before, &build), 1.0);
    let now = || SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs_f64();
    let started = value(&before, "process_start_time_seconds");
    assert!(started > now() - 60.0 && started <= now(), "{started}");

    let forwards_to = ["echo", "dead", "billing"];
    let (mut agent, forwards) = start_agent(
        &dir,
        "agent",
        &common::agent_toml(
            station_addr,
            &keys.station.public_key(),
            &keys.device,
            "stream",
            &forwards_to,
        ),
        &forwards_to,
    );
    agent.wait_log(&["connected to the station"]);
    assert_eq!(echo_round_trip(forwards["echo"], 3, 1000), Received::expected(3, 1000));
    for refused in ["dead", "billing"] {
        let mut socket = TcpStream::connect(forwards[refused]).expect("connect to the forward");
        socket.set_read_timeout(Some(LOG_WAIT)).expect("timeout");
        let _ = socket.read_to_end(&mut Vec::new());
    }
    station.wait_log(&["target \"billing\" refused: not in its allow list"]);
    station.wait_log(&["target dead"]);
    let after = scrape();
    assert_eq!(value(&after, "postern_streams_opened_total"), 1.0, "{after}");
    assert_eq!(value(&after, "postern_streams_refused_total{reason=\"connect_failed\"}"), 1.0);
    assert_eq!(value(&after, "postern_streams_refused_total{reason=\"not_allowed\"}"), 1.0);
    assert_eq!(value(&after, "postern_streams_refused_total{reason=\"unknown_target\"}"), 0.0);
    assert_eq!(value(&after, "postern_device_carrier{device=\"pump-17\",kind=\"stream\"}"), 1.0);

    // Heard from, and still known after the agent stopped.
    agent.signal("TERM");
    agent.wait_exit(Duration::from_secs(15));
    common::wait_until("the device to be offline", LOG_WAIT, || {
        common::metric(&scrape(), "postern_devices_connected") == Some(0.0)
    });
    let offline = scrape();
    let heard = value(&offline, "postern_device_last_heard_seconds{device=\"pump-17\"}");
    assert!(heard >= started && heard <= now(), "{heard} in\n{offline}");
    assert!(common::metric(&offline, "postern_device_carrier{device=\"pump-17\",kind=\"stream\"}")
        .is_none());

    // A stranger's key is a handshake refusal.
    let _intruder = start_intruder(&dir, &station, station_addr, &keys.station);
    assert!(value(&scrape(), "postern_handshake_refusals_total{reason=\"unknown_key\"}") >= 1.0);

    // A reload applied, then one refused: each counted, with its time.
    let reloaded_at = now();
    station.signal("HUP");
    station.wait_log(&["reloaded: nothing changed"]);
    let applied = scrape();
    assert_eq!(value(&applied, "postern_reloads_total{result=\"success\"}"), 1.0);
    assert_eq!(value(&applied, "postern_reloads_total{result=\"failure\"}"), 0.0);
    let success = value(&applied, "postern_last_reload_seconds{result=\"success\"}");
    assert!(success >= reloaded_at - 1.0 && success <= now(), "{success}");
    assert_eq!(value(&applied, "postern_last_reload_seconds{result=\"failure\"}"), 0.0);

    std::fs::write(&config, toml.replace("127.0.0.1:0", "nowhere")).expect("write a bad config");
    station.signal("HUP");
    station.wait_log(&["reload refused, the running config stays"]);
    let refused = scrape();
    assert_eq!(value(&refused, "postern_reloads_total{result=\"success\"}"), 1.0);
    assert_eq!(value(&refused, "postern_reloads_total{result=\"failure\"}"), 1.0);
    let failure = value(&refused, "postern_last_reload_seconds{result=\"failure\"}");
    assert!(failure >= success && failure <= now(), "{failure} after {success}");
    assert_eq!(value(&refused, "postern_last_reload_seconds{result=\"success\"}"), success);
}

#[test]
fn sigterm_lets_open_streams_finish_then_stops() {
    let echo = Server::echo();
    let dir = TempDir::new("sigterm");
    let keys = Keys::new();
    let devices = [("dev", keys.device.public_key(), &["echo"][..])];
    let (mut station, station_addr) =
        start_station(&dir, &station_toml(&keys.station, &[("echo", echo.target())], &devices));
    let (mut agent, forwards) = start_agent(
        &dir,
        "agent",
        &agent_toml(station_addr, &keys.station, &keys.device),
        &["echo"],
    );
    agent.wait_log(&["connected to the station"]);

    // A stream is open when the stop begins; it finishes its exchange.
    let mut socket = TcpStream::connect(forwards["echo"]).expect("connect");
    socket.write_all(b"first half ").expect("write");
    let mut got = [0u8; 11];
    socket.read_exact(&mut got).expect("echo");
    let started = Instant::now();
    station.signal("TERM");
    station.wait_log(&["stopping: waiting up to 10 s for 1 streams to end"]);
    // New streams are refused while it drains.
    let refused = echo_round_trip(forwards["echo"], 1, 10);
    assert_eq!(refused.len, 0, "a new stream got through a draining station");
    socket.write_all(b"second half").expect("write");
    socket.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    socket.read_to_end(&mut rest).expect("the rest");
    assert_eq!(rest, b"second half");
    let status = station.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "station exit: {status:?}\n{}", station.describe());
    assert!(started.elapsed() < Duration::from_secs(12));
    agent.wait_log(&["session", "ended", "the station is stopping"]);

    // The agent stops too, at once when nothing is open.
    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "agent exit: {status:?}\n{}", agent.describe());
}

/// A clean stop of the agent closes its session and opens none: the
/// station shows the device offline at once, not after session_timeout.
#[test]
fn a_stopped_agent_is_offline_at_the_station_at_once() {
    let echo = Server::echo();
    let dir = TempDir::new("offline");
    let keys = Keys::new();
    let devices = [("pump-17", keys.device.public_key(), &["echo"][..])];
    let toml = with_status(&station_toml(&keys.station, &[("echo", echo.target())], &devices));
    let (station, station_addr) = start_station(&dir, &toml);
    let status = status_addr(&station);
    let (mut agent, _) = start_agent(
        &dir,
        "agent",
        &agent_toml(station_addr, &keys.station, &keys.device),
        &["echo"],
    );
    agent.wait_log(&["connected to the station"]);
    station.wait_log(&["device pump-17 handshake from"]);
    let connected = |n: u32| {
        get(status, "/metrics").1.lines().any(|l| l == format!("postern_devices_connected {n}"))
    };
    assert!(connected(1), "{}", get(status, "/metrics").1);

    agent.signal("TERM");
    let exit = agent.wait_exit(Duration::from_secs(15));
    assert!(exit.success(), "agent exit: {exit:?}\n{}", agent.describe());
    common::wait_until("the station to show the device offline", Duration::from_secs(2), || {
        connected(0)
    });
    assert_eq!(station.stderr.count("device pump-17 handshake from"), 1, "{}", station.describe());
    assert_eq!(agent.stderr.count("connected to the station"), 1, "{}", agent.describe());
    assert_eq!(agent.stderr.matching(&["WARN"]).len(), 0, "{}", agent.describe());
}

/// What an agent says when it is pointed at the wrong station key or at
/// the station's status listener: the cause, not a bare status code.
#[test]
fn a_wrong_station_key_and_the_status_port_are_named_as_such() {
    let echo = Server::echo();
    let dir = TempDir::new("misleading");
    let keys = Keys::new();
    let devices = [("pump-17", keys.device.public_key(), &["echo"][..])];
    let toml = with_status(&station_toml(&keys.station, &[("echo", echo.target())], &devices));
    let (station, station_addr) = start_station(&dir, &toml);
    let status = status_addr(&station);

    let other_station = PrivateKey::generate();
    let (wrong_key, _) = start_agent(
        &dir,
        "wrong-key",
        &agent_toml(station_addr, &other_station, &keys.device),
        &["echo"],
    );
    wrong_key.wait_log(&[
        "the station could not decrypt our handshake (400)",
        &other_station.public_key().fingerprint(),
        "probably not this station's key",
    ]);

    let (status_port, _) = start_agent(
        &dir,
        "status-port",
        &agent_toml(status, &keys.station, &keys.device),
        &["echo"],
    );
    status_port
        .wait_log(&["something in front of the station (not the station itself) answered 404"]);
    assert_eq!(status_port.stderr.count("the station answered"), 0, "{}", status_port.describe());
}

/// Two agents with one device key (a cloned image): the station says so
/// with both sources, refuses the newcomer's handshakes for a while, the
/// refused agent says why and backs off for tens of seconds, and another
/// device is not disturbed. (Before: thousands of sessions in 20 s.)
#[test]
fn two_agents_with_one_key_are_named_and_calmed() {
    let echo = Server::echo();
    let dir = TempDir::new("clones");
    let keys = Keys::new();
    let other = PrivateKey::generate();
    let devices = [
        ("pump-17", keys.device.public_key(), &["echo"][..]),
        ("pump-18", other.public_key(), &["echo"][..]),
    ];
    let toml = with_status(&station_toml(&keys.station, &[("echo", echo.target())], &devices));
    let (station, station_addr) = start_station(&dir, &toml);
    let status = status_addr(&station);
    let clone_toml = agent_toml(station_addr, &keys.station, &keys.device);
    let (first, _) = start_agent(&dir, "first", &clone_toml, &["echo"]);
    first.wait_log(&["connected to the station"]);
    let (second, _) = start_agent(&dir, "second", &clone_toml, &["echo"]);

    station.wait_log(&["device pump-17: two agents use its key"]);
    let mut refused = String::new();
    common::wait_until("an agent to say another uses its key", LOG_WAIT, || {
        let said = [&first, &second].iter().find_map(|agent| {
            agent.stderr.matching(&["another agent uses this device's key"]).pop()
        });
        refused = said.unwrap_or_default();
        !refused.is_empty()
    });
    let delay: f64 = refused
        .rsplit("retrying in ")
        .next()
        .and_then(|rest| rest.split(' ').next())
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("no delay in {refused:?}"));
    assert!(delay >= 20.0, "backs off for tens of seconds: {refused}");

    // Another device connects and carries bytes as usual meanwhile.
    let (neighbour, forwards) =
        start_agent(&dir, "neighbour", &agent_toml(station_addr, &keys.station, &other), &["echo"]);
    neighbour.wait_log(&["connected to the station"]);
    assert_eq!(echo_round_trip(forwards["echo"], 18, 1 << 20), Received::expected(18, 1 << 20));

    // A handful of sessions, not thousands; the refusals are counted.
    let sessions = station.stderr.count("device pump-17 handshake from");
    assert!(sessions <= 6, "{sessions} sessions\n{}", station.describe());
    let metrics = get(status, "/metrics").1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("postern_auth_failures_total{kind=\"duplicate_key\"} ")
                && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert_eq!(station.stderr.count("overload"), 0, "{}", station.describe());
}

/// Under a Type=notify unit: READY=1 once listening, WATCHDOG=1 at half
/// of WATCHDOG_USEC, RELOADING=1 then READY=1 around SIGHUP, STOPPING=1 at
/// SIGTERM, as datagrams to the socket NOTIFY_SOCKET names (the test's).
#[test]
fn the_station_speaks_systemds_notify_protocol() {
    use std::os::unix::net::UnixDatagram;
    let echo = Server::echo();
    let dir = TempDir::new("notify");
    let keys = Keys::new();
    let devices = [("pump-17", keys.device.public_key(), &["echo"][..])];
    let config = dir
        .write("station.toml", &station_toml(&keys.station, &[("echo", echo.target())], &devices));
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket.set_read_timeout(Some(LOG_WAIT)).expect("timeout");
    let mut station = std::process::Command::new(common::BIN)
        .args(["station", "-c", config.to_str().expect("utf-8 path")])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the station");
    let next = |skip_watchdog: bool| loop {
        let mut buf = [0u8; 128];
        let n = socket.recv(&mut buf).expect("a notification");
        let state = String::from_utf8_lossy(&buf[..n]).into_owned();
        if !(skip_watchdog && state == "WATCHDOG=1") {
            return state;
        }
    };
    assert_eq!(next(false), "READY=1");
    // 100 ms apart: a few within a second.
    assert_eq!(next(false), "WATCHDOG=1");
    assert_eq!(next(false), "WATCHDOG=1");
    let pid = station.id().to_string();
    let kill = |sig: &str| {
        let status = Command::new("kill").args([sig, &pid]).status().expect("kill");
        assert!(status.success());
    };
    kill("-HUP");
    assert_eq!(next(true), "RELOADING=1");
    assert_eq!(next(true), "READY=1");
    kill("-TERM");
    assert_eq!(next(true), "STOPPING=1");
    let status = station.wait().expect("the station exits");
    assert!(status.success(), "{status:?}");
}
