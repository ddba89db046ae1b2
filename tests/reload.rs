//! The agent's reload on SIGHUP, with the real binary: forwards and
//! services added, removed and re-targeted while a connection of a kept
//! forward carries on byte-exact; settings that need a restart are named;
//! a config that cannot load, or a forward that cannot listen, leaves
//! everything as it was.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;

use common::*;

const DEVICE: &str = "pump-17";

/// Bytes each half of the long-lived connection sends.
const HALF: usize = 64 * 1024;

fn forward(listen: &str, target: &str) -> String {
    format!("\n[[forward]]\nlisten = \"{listen}\"\ntarget = \"{target}\"\n")
}

/// The address a forward on `ip` listens on, from the agent's log.
fn forward_on(agent: &Proc, ip: &str, target: &str) -> SocketAddr {
    let marker = format!("forwarding {ip}:");
    let line = agent.wait_log(&[&marker, &format!("to station target \"{target}\"")]);
    addr_after(&line, "forwarding ").unwrap_or_else(|| panic!("no address in {line:?}"))
}

#[test]
fn forwards_and_services_change_on_sighup_without_touching_other_streams() {
    let echo_one = Server::echo();
    let echo_two = Server::echo();
    let dir = TempDir::new("agent-reload");
    let keys = Keys::new();
    let targets = [("a", echo_one.target()), ("b", echo_two.target()), ("c", echo_one.target())];
    let station_toml = keys.station_toml(&targets, DEVICE, &["a", "b", "c"])
        + "[devices.expose]\n\"127.0.0.9:0\" = \"s2\"\n";
    let (station, station_addr) = start_station(&dir, &station_toml);
    let exposed = {
        let marker = format!("exposing service \"s2\" of device {DEVICE} on ");
        let line = station.wait_log(&[&marker]);
        addr_after(&line, &marker).expect("an address")
    };
    let head = with_status(&keys.agent_toml(station_addr, &[], ""));
    let first = format!(
        "{head}{}{}\n[services]\ns1 = \"{}\"\n",
        forward("127.0.0.11:0", "a"),
        forward("127.0.0.12:0", "b"),
        echo_two.addr
    );
    let (agent, _) = start_agent_session(&dir, &station, DEVICE, &first, &[]);
    let status = status_addr(&agent);
    let a = forward_on(&agent, "127.0.0.11", "a");
    let b = forward_on(&agent, "127.0.0.12", "b");

    // A connection of forward b, open across the reload.
    let data = every_byte_value(2 * HALF, 7);
    let mut kept = connect(b);
    kept.write_all(&data[..HALF]).expect("write the first half");
    let mut back = read_n(&mut kept, HALF);

    let second = format!(
        "{}keepalive = 10\n{}{}\n[services]\ns2 = \"{}\"\n",
        head,
        forward("127.0.0.12:0", "b"),
        forward("127.0.0.13:0", "c"),
        echo_one.addr
    );
    dir.write("agent.toml", &second);
    agent.signal("HUP");
    for line in [
        format!("reloaded: forward {a} to \"a\" removed; its connections are closed"),
        "reloaded: forward 127.0.0.13:".to_owned(),
        format!("reloaded: service s2 ({}) added", echo_one.addr),
        format!("reloaded: service s1 ({}) removed; open streams stay", echo_two.addr),
        "reloaded: keepalive changed: it applies when the agent restarts".to_owned(),
    ] {
        agent.wait_log(&[&line]);
    }
    let c = forward_on(&agent, "127.0.0.13", "c");
    assert_eq!(agent.stderr.count("reloaded: forward 127.0.0.12:"), 0, "b was untouched");

    kept.write_all(&data[HALF..]).expect("write the second half");
    back.extend(read_n(&mut kept, HALF));
    assert_eq!(first_difference(&back, &data), None, "the kept connection lost bytes");
    assert!(std::net::TcpStream::connect(a).is_err(), "removed forward {a} still listens");
    assert_eq!(echo_round_trip(c, 3, 1 << 20), Received::expected(3, 1 << 20), "added forward");
    assert_eq!(echo_round_trip(exposed, 4, 1 << 20), Received::expected(4, 1 << 20), "service s2");

    // Refused reloads change nothing.
    dir.write("agent.toml", &second.replace("target =", "targte ="));
    agent.signal("HUP");
    agent.wait_log(&["reload refused, the running config stays: ", "unknown field `targte`"]);
    let busy = std::net::TcpListener::bind("127.0.0.14:0").expect("bind a port to take");
    let taken = busy.local_addr().expect("an address");
    dir.write("agent.toml", &(second.clone() + &forward(&taken.to_string(), "a")));
    agent.signal("HUP");
    agent.wait_log(&[
        "reload refused, the running config stays: ",
        &format!("forward to a: cannot listen on {taken}: "),
    ]);
    assert_eq!(echo_round_trip(c, 5, 1 << 16), Received::expected(5, 1 << 16), "c after refusals");
    assert_eq!(echo_round_trip(b, 6, 1 << 16), Received::expected(6, 1 << 16), "b after refusals");
    assert_eq!(agent.stderr.count("reloaded: forward"), 2, "{}", agent.describe());
    let metrics = status_get(status, "/metrics").1;
    for (series, value) in [
        ("postern_agent_reloads_total{result=\"success\"}", 1.0),
        ("postern_agent_reloads_total{result=\"failure\"}", 2.0),
    ] {
        assert_eq!(metric(&metrics, series), Some(value), "{series} in\n{metrics}");
    }
    for result in ["success", "failure"] {
        let series = format!("postern_agent_last_reload_seconds{{result=\"{result}\"}}");
        assert!(metric(&metrics, &series).is_some_and(|at| at > 0.0), "{series} in\n{metrics}");
    }
}
