//! Several stations sharing a session registry (issue 17): three stations
//! with `[cluster]` on one real redis-server, behind haproxy balancing
//! round-robin with no stickiness, so that consecutive carrier requests of
//! one session reach different stations. Every transfer is checked
//! byte-exact by hash; every station's expose port must reach the device,
//! wherever its session lives; a dead station's device and reverse
//! service move to the others; a dead store leaves stand-alone stations
//! that recover when it returns; a forged station-to-station request is
//! refused.

mod common;
mod middleboxes;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    addr_after, connect, echo_round_trip, echo_within, start_agent, start_station, station_toml,
    status_addr, status_get, with_status, Keys, Proc, Received, Server, TempDir,
};
use middleboxes::Middlebox;

const DEVICE: &str = "test-device";

/// Bytes each way per checked transfer: many poll bodies, many chunks.
const TRANSFER: u64 = 4 << 20;

/// Registry records live this long in these tests (seconds): renewed every second.
const RECORD_TTL: u64 = 3;

/// Longest a device may take to be reachable again after its station died.
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);

struct Station {
    proc: Proc,
    carrier: SocketAddr,
    peer: SocketAddr,
    expose: SocketAddr,
    status: SocketAddr,
}

impl Station {
    /// The value of the unlabelled metric `name`.
    fn metric(&self, name: &str) -> u64 {
        let (_, text) = status_get(self.status, "/metrics");
        let prefix = format!("{name} ");
        let line = text.lines().find(|l| l.starts_with(&prefix));
        let value = line.and_then(|l| l[prefix.len()..].parse().ok());
        value.unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    fn handshakes(&self) -> usize {
        self.proc.stderr.count(&format!("device {DEVICE} handshake from"))
    }
}

struct Cluster {
    stations: Vec<Option<Station>>,
    redis: Option<Middlebox>,
    redis_port: u16,
    balancer: Middlebox,
    agent: Proc,
    forward: SocketAddr,
    _echo: Server,
    _dir: TempDir,
}

impl Cluster {
    /// Three stations, the store, the balancer, and an agent on `carrier`
    /// through the balancer with a forward to, and a service of, an echo.
    fn start(label: &str, carrier: &str) -> Cluster {
        let dir = TempDir::new(label);
        let keys = Keys::new();
        let echo = Server::echo();
        let redis = Middlebox::redis();
        let redis_port = redis.addr.port();
        let mut toml = with_status(&station_toml(
            &keys.station,
            &[("echo", echo.target())],
            &[(DEVICE, keys.device.public_key(), &["echo"])],
        ));
        toml.push_str(&format!(
            "[devices.expose]\n\"127.0.0.1:0\" = \"echo\"\n\n[cluster]\n\
             store = \"redis://127.0.0.1:{redis_port}\"\npeer = \"127.0.0.1:0\"\n\
             record_ttl = {RECORD_TTL}\n"
        ));
        let stations: Vec<Station> = (0..3)
            .map(|i| {
                let sub = TempDir::new(&format!("{label}-station{i}"));
                let (proc, carrier) = start_station(&sub, &toml);
                let marker = "other stations reach this one at ";
                let line = proc.wait_log(&[marker]);
                let peer = addr_after(&line, marker).expect("peer address");
                let marker = format!("exposing service \"echo\" of device {DEVICE} on ");
                let line = proc.wait_log(&[&marker]);
                let expose = addr_after(&line, &marker).expect("expose address");
                let status = status_addr(&proc);
                Station { proc, carrier, peer, expose, status }
            })
            .collect();
        let carriers: Vec<SocketAddr> = stations.iter().map(|s| s.carrier).collect();
        let balancer = Middlebox::haproxy_round_robin(&carriers, 30);
        let agent_toml = format!(
            "station = \"http://{}/\"\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n\
             carrier = \"{carrier}\"\n\n[[forward]]\nlisten = \"127.0.0.1:0\"\ntarget = \"echo\"\n\n\
             [services]\necho = \"{}\"\n",
            balancer.addr,
            keys.station.public_key().to_base64(),
            keys.device.to_base64(),
            echo.addr
        );
        let (agent, forwards) = start_agent(&dir, "agent", &agent_toml, &["echo"]);
        agent.wait_log(&["connected to the station"]);
        Cluster {
            stations: stations.into_iter().map(Some).collect(),
            redis: Some(redis),
            redis_port,
            balancer,
            agent,
            forward: forwards["echo"],
            _echo: echo,
            _dir: dir,
        }
    }

    fn live(&self) -> impl Iterator<Item = &Station> {
        self.stations.iter().flatten()
    }

    fn describe(&self) -> String {
        let mut text = self.agent.describe();
        for station in self.live() {
            text.push('\n');
            text.push_str(&station.proc.describe());
        }
        text.push('\n');
        text.push_str(&self.balancer.logs());
        text
    }

    /// The index of the station the registry names as the device's holder.
    fn holder(&self) -> usize {
        let record = self.registry_get(&format!("postern:device:{DEVICE}"));
        let record =
            record.unwrap_or_else(|| panic!("no record of the device\n{}", self.describe()));
        let addr: SocketAddr =
            record.split(' ').next().and_then(|a| a.parse().ok()).expect("an address");
        self.stations
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.peer == addr))
            .unwrap_or_else(|| {
                panic!("the record {record:?} names no live station\n{}", self.describe())
            })
    }

    /// `GET key` on the store, spoken by hand.
    fn registry_get(&self, key: &str) -> Option<String> {
        let mut socket = connect(SocketAddr::from(([127, 0, 0, 1], self.redis_port)));
        let command = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
        socket.write_all(command.as_bytes()).expect("write to redis");
        let mut reply = Vec::new();
        let mut byte = [0];
        // "$-1\r\n", or "$N\r\n" and N bytes and "\r\n".
        while !reply.ends_with(b"\r\n") {
            socket.read_exact(&mut byte).expect("read from redis");
            reply.push(byte[0]);
        }
        let len: i64 = std::str::from_utf8(&reply[1..reply.len() - 2]).ok()?.parse().ok()?;
        let len = usize::try_from(len).ok()?;
        let mut value = vec![0; len + 2];
        socket.read_exact(&mut value).expect("read the value");
        value.truncate(len);
        String::from_utf8(value).ok()
    }

    /// `len` bytes there and back through the agent's forward, byte-exact.
    fn round_trip(&self, seed: u64, len: u64) {
        let got = echo_round_trip(self.forward, seed, len);
        assert_eq!(got, Received::expected(seed, len), "{}", self.describe());
    }

    /// A reverse client on every live station's expose port reaches the
    /// device's echo service, byte-exact.
    fn reverse_through_every_station(&self, seed: u64) {
        for (i, station) in self.live().enumerate() {
            let got =
                echo_within(station.expose, seed + i as u64, 256 * 1024, Duration::from_secs(20));
            assert_eq!(
                got,
                Received::expected(seed + i as u64, 256 * 1024),
                "reverse client via station {i} ({})\n{}",
                station.expose,
                self.describe()
            );
        }
    }
}

/// Both carriers through a balancer that spreads one session's requests
/// over three stations: each request that reaches a stranger is passed to
/// the holder, so the session never restarts; and a reverse client on any
/// station reaches the device.
#[test]
fn a_round_robin_balancer_carries_both_carriers_and_every_station_reaches_the_device() {
    for carrier in ["stream", "poll"] {
        let cluster = Cluster::start(&format!("cluster-{carrier}"), carrier);
        cluster.round_trip(1, TRANSFER);
        cluster.round_trip(2, 1024);
        cluster.reverse_through_every_station(10);
        let handshakes: Vec<usize> = cluster.live().map(Station::handshakes).collect();
        assert_eq!(
            handshakes.iter().sum::<usize>(),
            1,
            "{carrier}: {handshakes:?}\n{}",
            cluster.describe()
        );
        // The strangers passed requests on: round-robin gave them some.
        let forwarded: u64 =
            cluster.live().map(|s| s.metric("postern_cluster_forwarded_requests_total")).sum();
        assert!(forwarded > 0, "{carrier}: nothing forwarded\n{}", cluster.describe());
        // Polls and pushes reuse kept connections to the holder; each
        // stream lane has its own.
        let opened: u64 =
            cluster.live().map(|s| s.metric("postern_cluster_peer_connections_total")).sum();
        if carrier == "poll" {
            assert!(
                opened * 4 < forwarded,
                "{opened} connections for {forwarded} forwarded polls and pushes"
            );
        }
        let relayed: u64 =
            cluster.live().map(|s| s.metric("postern_cluster_relayed_clients_total")).sum();
        assert_eq!(relayed, 2, "two reverse clients relayed\n{}", cluster.describe());
        for station in cluster.live() {
            assert_eq!(station.metric("postern_cluster_store_up"), 1);
        }
        assert_eq!(
            cluster.agent.stderr.count("connected to the station"),
            1,
            "{}",
            cluster.describe()
        );
    }
}

/// Killing the station that holds the device: the agent's next requests
/// reach the others, which cannot reach the holder and answer 410; the
/// agent starts a session on one of them, the registry moves the device
/// there, and reverse clients on every station reach it again.
#[test]
fn killing_the_holding_station_moves_the_device_and_its_reverse_service() {
    let mut cluster = Cluster::start("cluster-failover", "stream");
    cluster.round_trip(1, 1024);
    let dead = cluster.holder();
    let killed = Instant::now();
    cluster.stations[dead] = None;
    let moved = || {
        let holder = cluster.registry_get(&format!("postern:device:{DEVICE}"))?;
        let addr: SocketAddr = holder.split(' ').next()?.parse().ok()?;
        cluster.live().any(|s| s.peer == addr).then_some(())
    };
    while moved().is_none() {
        assert!(
            killed.elapsed() < FAILOVER_LIMIT,
            "the device did not move\n{}",
            cluster.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let moved_after = killed.elapsed();
    cluster.round_trip(2, TRANSFER);
    cluster.reverse_through_every_station(20);
    println!("device moved {:.1} s after its station died", moved_after.as_secs_f64());
}

/// The store dies: each station says once, clearly, that it serves alone;
/// when the store returns they say so, write their records again, and
/// reverse clients on every station reach the device once more.
#[test]
fn a_dead_store_leaves_stand_alone_stations_that_recover_when_it_returns() {
    let mut cluster = Cluster::start("cluster-store", "stream");
    cluster.round_trip(1, 1024);
    cluster.redis = None;
    for station in cluster.live() {
        let line = station.proc.wait_log(&["cluster store", "unreachable"]);
        assert!(line.contains("serving as a stand-alone station"), "{line}");
    }
    cluster.redis = Some(Middlebox::redis_on(cluster.redis_port));
    for station in cluster.live() {
        station.proc.wait_log(&["cluster store", "reachable again"]);
    }
    for station in cluster.live() {
        assert_eq!(
            station.proc.stderr.count("unreachable ("),
            1,
            "logged once\n{}",
            cluster.describe()
        );
    }
    // The holder put the device back: wait for its record, then every
    // station reaches the device again.
    let deadline = Instant::now() + FAILOVER_LIMIT;
    while cluster.registry_get(&format!("postern:device:{DEVICE}")).is_none() {
        assert!(
            Instant::now() < deadline,
            "the device's record was not written again\n{}",
            cluster.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.round_trip(2, TRANSFER);
    cluster.reverse_through_every_station(30);
}

/// A request on a station's peer listener without a valid MAC from a
/// station of the cluster is refused with 403 and logged, whatever it
/// asks for.
#[test]
fn a_forged_station_to_station_request_is_refused() {
    let cluster = Cluster::start("cluster-forged", "stream");
    let station = cluster.live().next().expect("a station");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let session = "00".repeat(16);
    let cases = [
        (format!("/postern/{session}/poll"), None, "no X-Postern-Peer field"),
        (
            format!("/postern/{session}/poll"),
            Some(format!("{now} {}", "ab".repeat(32))),
            "no key of this station made",
        ),
        (
            format!("/postern/{session}/poll"),
            Some(format!("{} {}", now - 3600, "ab".repeat(32))),
            "more than 60 s off",
        ),
        ("/.postern/expose".to_owned(), Some(format!("{now} 00")), "no key of this station made"),
    ];
    for (n, (path, vouch, reason)) in cases.iter().enumerate() {
        let mut socket = connect(station.peer);
        let mut request = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n");
        if let Some(vouch) = vouch {
            request.push_str(&format!("X-Postern-Peer: {vouch}\r\nX-Postern-Device: {DEVICE}\r\nX-Postern-Service: echo\r\n"));
        }
        request.push_str("\r\n");
        socket.write_all(request.as_bytes()).expect("send");
        let mut answer = String::new();
        socket.read_to_string(&mut answer).expect("read the answer");
        assert!(answer.starts_with("HTTP/1.1 403 "), "case {n}: {answer}");
        station.proc.wait_log_nth(
            &["a forged station-to-station request", reason],
            1,
            Duration::from_secs(10),
        );
    }
    // Nothing was carried: the device still has its one session.
    assert_eq!(cluster.live().map(Station::handshakes).sum::<usize>(), 1);
}
