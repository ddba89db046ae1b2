//! The agent's reload on SIGHUP, with the real binary: forwards and
//! services added, removed and re-targeted while a connection of a kept
//! forward carries on byte-exact; settings that need a restart are named;
//! a config that cannot load, or a forward that cannot listen, leaves
//! everything as it was. A forward moved to another address of its port
//! keeps its connections; one whose new address another process holds is
//! refused and listens where it did.

mod common;

use std::io::{Read as _, Write as _};
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

/// A connection open across a reload: half its bytes echo before, the
/// other half after.
struct Across {
    socket: std::net::TcpStream,
    data: Vec<u8>,
    back: Vec<u8>,
}

impl Across {
    fn open(addr: SocketAddr, seed: u8) -> Across {
        let data = every_byte_value(2 * HALF, seed);
        let mut socket = connect(addr);
        socket.write_all(&data[..HALF]).expect("write the first half");
        let back = read_n(&mut socket, HALF);
        Across { socket, data, back }
    }

    /// Sends the second half; where the echo first differs, if it does.
    fn finish(&mut self) -> Option<usize> {
        self.socket.write_all(&self.data[HALF..]).expect("write the second half");
        self.back.extend(read_n(&mut self.socket, HALF));
        first_difference(&self.back, &self.data)
    }
}

/// A station with `targets` and a connected agent forwarding `listen` to
/// the first; returns the agent's config without its forwards too.
fn start_forwarding(
    dir: &TempDir,
    targets: &[(&str, String)],
    listen: &str,
) -> (Proc, Proc, String) {
    let keys = Keys::new();
    let names: Vec<&str> = targets.iter().map(|(name, _)| *name).collect();
    let (station, station_addr) = start_station(dir, &keys.station_toml(targets, DEVICE, &names));
    let head = keys.agent_toml(station_addr, &[], "");
    let config = head.clone() + &forward(listen, targets[0].0);
    let (agent, _) = start_agent_session(dir, &station, DEVICE, &config, &[]);
    (station, agent, head)
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
    let mut kept = Across::open(b, 7);

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

    assert_eq!(kept.finish(), None, "the kept connection lost bytes");
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

#[test]
fn a_forward_moves_to_another_address_of_its_port_with_its_connections() {
    let (echo_a, echo_b) = (Server::echo(), Server::echo());
    let dir = TempDir::new("agent-reload-move");
    let targets = [("a", echo_a.target()), ("b", echo_b.target())];
    let (_station, agent, head) = start_forwarding(&dir, &targets, "0.0.0.0:0");
    let port = forward_on(&agent, "0.0.0.0", "a").port();
    let (any, local, other) = (
        SocketAddr::from(([0, 0, 0, 0], port)),
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from(([127, 0, 0, 2], port)),
    );

    // 0.0.0.0:P -> 127.0.0.1:P, same target: a move, and a connection
    // open across it carries on.
    let mut kept = Across::open(local, 11);
    dir.write("agent.toml", &(head.clone() + &forward(&local.to_string(), "a")));
    agent.signal("HUP");
    agent.wait_log(&[&format!(
        "reloaded: forward {any} to \"a\" moved to {local}; its open connections stay"
    )]);
    assert_eq!(kept.finish(), None, "the moved forward's connection lost bytes");
    assert_eq!(echo_round_trip(local, 12, 1 << 20), Received::expected(12, 1 << 20), "{local}");
    assert!(std::net::TcpStream::connect(other).is_err(), "{other} still listens after the move");

    // 127.0.0.1:P -> 0.0.0.0:P with another target: removed and added, and
    // the removed forward's connection is closed.
    dir.write("agent.toml", &(head + &forward(&any.to_string(), "b")));
    agent.signal("HUP");
    agent.wait_log(&[&format!(
        "reloaded: forward {local} to \"a\" removed; its connections are closed"
    )]);
    agent.wait_log(&[&format!("reloaded: forward {any} to \"b\" added")]);
    let closed = kept.socket.read(&mut [0u8; 1]);
    assert!(
        matches!(&closed, Ok(0))
            || closed.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the removed forward's connection: {closed:?}"
    );
    assert_eq!(echo_round_trip(other, 13, 1 << 20), Received::expected(13, 1 << 20), "{other}");
    assert_eq!(agent.stderr.count("reload refused"), 0, "{}", agent.describe());
}

#[test]
fn a_reload_to_an_address_another_process_holds_is_refused_and_the_forward_stays() {
    let echo = Server::echo();
    let dir = TempDir::new("agent-reload-taken");
    let (_station, agent, head) = start_forwarding(&dir, &[("a", echo.target())], "127.0.0.21:0");
    let old = forward_on(&agent, "127.0.0.21", "a");
    // Another process on the port, at another address: 0.0.0.0 cannot have
    // it even once the agent's own listener there is closed.
    let _taken = std::net::TcpListener::bind(("127.0.0.22", old.port())).expect("take the port");
    let any = SocketAddr::from(([0, 0, 0, 0], old.port()));
    let in_use = std::net::TcpListener::bind(any).expect_err("the port is held").to_string();

    let mut kept = Across::open(old, 21);
    dir.write("agent.toml", &(head + &forward(&any.to_string(), "a")));
    agent.signal("HUP");
    agent.wait_log(&[&format!(
        "reload refused, the running config stays: forward to a: cannot listen on {any}: {in_use}"
    )]);
    // Refused once its listener was closed, not at the first bind.
    agent.wait_log(&[&format!("forward {old} listens again: the reload is refused")]);
    assert_eq!(kept.finish(), None, "the connection open across the refusal lost bytes");
    assert_eq!(echo_round_trip(old, 22, 1 << 20), Received::expected(22, 1 << 20), "{old}");
    assert_eq!(agent.stderr.count("reloaded: "), 0, "{}", agent.describe());
}
