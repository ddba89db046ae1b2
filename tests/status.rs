//! The agent's status listener and `postern status`: what an operator asks
//! a running agent or station, as the real binaries answer it.

mod common;

use std::time::Duration;

use common::*;

/// Longest `postern status` may take: one request on loopback.
const QUICK: Duration = Duration::from_secs(30);

const BYTES: u64 = 1 << 20;

/// `status = "127.0.0.1:PORT"` with a port free a moment ago: `postern
/// status` reads the address from the config, so it cannot be port 0.
fn fixed_status(toml: &str) -> String {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    let port = probe.local_addr().expect("an address").port();
    toml.replacen('\n', &format!("\nstatus = \"127.0.0.1:{port}\"\n"), 1)
}

#[test]
fn agent_and_station_tell_their_state() {
    let echo = Server::echo();
    let dir = TempDir::new("status");
    let keys = Keys::new();
    let station_toml =
        fixed_status(&keys.station_toml(&[("echo", echo.target())], "pump-17", &["echo"]));
    let (mut station, station_addr) = start_station(&dir, &station_toml);
    let agent_toml = fixed_status(&agent_toml(
        station_addr,
        &keys.station.public_key(),
        &keys.device,
        "stream",
        &["echo"],
    ));
    let (agent, forwards) = start_agent(&dir, "agent", &agent_toml, &["echo"]);
    agent.wait_log(&["connected to the station"]);
    let agent_status = status_addr(&agent);
    assert_eq!(echo_round_trip(forwards["echo"], 5, BYTES), Received::expected(5, BYTES));

    let (head, metrics) = status_get(agent_status, "/metrics");
    assert_eq!(head, "HTTP/1.1 200 OK");
    for (series, value) in [
        ("postern_agent_connected", 1.0),
        ("postern_agent_carrier{kind=\"stream\"}", 1.0),
        ("postern_agent_carrier{kind=\"poll\"}", 0.0),
        ("postern_agent_stream_bytes_total{direction=\"up\"}", BYTES as f64),
        ("postern_agent_stream_bytes_total{direction=\"down\"}", BYTES as f64),
        ("postern_agent_sessions_total", 1.0),
        ("postern_agent_last_error_seconds", 0.0),
    ] {
        assert_eq!(metric(&metrics, series), Some(value), "{series} in\n{metrics}");
    }
    // The agent has no JSON page: its metrics and text say it all.
    for path in ["/status", "/nothing"] {
        assert_eq!(status_get(agent_status, path).0, "HTTP/1.1 404 Not Found", "{path}");
    }

    let agent_config = dir.path().join("agent.toml");
    let out = run(&["status", "-c", agent_config.to_str().expect("utf-8")], None, QUICK);
    assert!(out.status.success(), "postern status: {}", out.stderr);
    let text = &out.stdout;
    let first = format!("agent: connected via station {station_addr}, session ");
    assert!(text.starts_with(&first), "{text}");
    for line in [
        "carrier: stream, lanes up + down\n",
        &format!("streams: 0 open; {BYTES} bytes up, {BYTES} down, 0 packets resent since"),
        "sessions: 1; carrier reconnects: 0\n",
        "last error: none\n",
    ] {
        assert!(text.contains(line), "{line:?} not in\n{text}");
    }

    let station_config = dir.path().join("station.toml");
    let out = run(&["status", "-c", station_config.to_str().expect("utf-8")], None, QUICK);
    assert!(out.status.success(), "postern status: {}", out.stderr);
    assert!(out.stdout.starts_with("station: 1 of 1 devices connected"), "{}", out.stdout);
    assert!(out.stdout.contains("\n  pump-17: connected (stream), heard "), "{}", out.stdout);

    // The station goes away: the agent's status names what went wrong.
    station.signal("KILL");
    station.wait_exit(LOG_WAIT);
    let mut text = String::new();
    wait_until("the agent's last error", LOG_WAIT, || {
        text = status_get(agent_status, "/status.txt").1;
        text.contains("last error, ")
    });
    assert!(text.contains("lane: ") || text.contains("stream lanes: "), "{text}");
    let metrics = status_get(agent_status, "/metrics").1;
    assert!(metric(&metrics, "postern_agent_last_error_seconds").is_some_and(|at| at > 0.0));
}

#[test]
fn status_without_a_listener_says_what_to_add() {
    let dir = TempDir::new("status-none");
    let keys = Keys::new();
    let path = dir.write(
        "agent.toml",
        &agent_toml(refused_addr(), &keys.station.public_key(), &keys.device, "poll", &["echo"]),
    );
    let arg = path.to_str().expect("utf-8");
    let out = run(&["status", "-c", arg], None, QUICK);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        out.stderr,
        format!(
            "postern: {arg} names no status listener; add status = \"127.0.0.1:9091\" and restart the program to ask it\n"
        )
    );
    let path =
        dir.write("ephemeral.toml", &with_status(&std::fs::read_to_string(&path).expect("read")));
    let out = run(&["status", "-c", path.to_str().expect("utf-8")], None, QUICK);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        out.stderr,
        format!(
            "postern: {}: status = \"127.0.0.1:0\" takes a port the system picks at start; name \
             a fixed port to ask the program with postern status\n",
            path.display()
        )
    );
    // A listener named but nobody there: the reason, not a hang.
    let refused = refused_addr();
    let path = dir.write(
        "down.toml",
        &(format!("status = \"{refused}\"\n")
            + &agent_toml(
                refused_addr(),
                &keys.station.public_key(),
                &keys.device,
                "poll",
                &["echo"],
            )),
    );
    let out = run(&["status", "-c", path.to_str().expect("utf-8")], None, QUICK);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr
            .starts_with(&format!("postern: cannot reach the status listener at {refused}: ")),
        "{}",
        out.stderr
    );
}
