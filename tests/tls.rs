//! The tunnel over TLS and through the egress of sites that allow only
//! HTTPS out, against real software on loopback with a test CA made by
//! openssl: the station terminating TLS itself, nginx terminating it in
//! front of the station, squid allowing only CONNECT to the TLS port,
//! squid requiring NTLM, and certificates refused with the reason. Every
//! transfer is checked byte-exact by hash.

mod common;
mod middleboxes;

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use common::{
    echo_round_trip, refused_addr, start_agent, start_station, Keys, Proc, Received, Server,
    TempDir,
};
use middleboxes::pki::{Cert, Pki};
use middleboxes::{Middlebox, SHORT_TIMEOUT_SECS};

/// Bytes each way per checked transfer: several poll bodies and TLS records.
const TRANSFER: u64 = 2 << 20;

/// A station (TLS with `station_tls` if given) with an echo target.
struct Station {
    proc: Proc,
    addr: SocketAddr,
    keys: Keys,
    _echo: Server,
    _dir: TempDir,
}

impl Station {
    fn start(label: &str, station_tls: Option<&Cert>) -> Station {
        let dir = TempDir::new(label);
        let keys = Keys::new();
        let echo = Server::echo();
        let mut toml = keys.station_toml(&[("echo", echo.target())], "test-device", &["echo"]);
        if let Some(files) = station_tls {
            let lines = format!(
                "tls_cert_file = {:?}\ntls_key_file = {:?}\n\n[targets]",
                files.cert.display().to_string(),
                files.key.display().to_string()
            );
            toml = toml.replacen("\n[targets]", &format!("\n{lines}"), 1);
        }
        let (proc, addr) = start_station(&dir, &toml);
        if station_tls.is_some() {
            proc.wait_log(&["(HTTP carrier) over TLS"]);
        }
        Station { proc, addr, keys, _echo: echo, _dir: dir }
    }

    /// An agent of this station's device at `url`, with `extra` lines
    /// (proxy, ca_file) in its config; returns it and its forward.
    fn agent(
        &self,
        dir: &TempDir,
        name: &str,
        url: &str,
        carrier: &str,
        extra: &str,
    ) -> (Proc, SocketAddr) {
        let toml = format!(
            "station = \"{url}\"\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n\
             carrier = \"{carrier}\"\n{extra}\n[[forward]]\nlisten = \"127.0.0.1:0\"\ntarget = \"echo\"\n",
            self.keys.station.public_key().to_base64(),
            self.keys.device.to_base64()
        );
        let (agent, forwards) = start_agent(dir, name, &toml, &["echo"]);
        (agent, forwards["echo"])
    }
}

fn ca_line(pki: &Pki) -> String {
    format!("ca_file = {:?}\n", pki.ca.cert.display().to_string())
}

/// `len` bytes there and back through `forward`, byte-exact.
fn round_trip(forward: SocketAddr, seed: u64, len: u64, context: &dyn Fn() -> String) {
    let got = echo_round_trip(forward, seed, len);
    assert_eq!(got, Received::expected(seed, len), "{}", context());
}

#[test]
fn station_terminates_tls_for_both_carriers_and_auto() {
    let pki = Pki::new("postern test CA");
    let leaf = pki.leaf("station", "IP:127.0.0.1", 1);
    let station = Station::start("tls-station", Some(&leaf));
    let dir = TempDir::new("tls-station-agents");
    let url = format!("https://{}/", station.addr);
    for (seed, carrier) in [(1, "stream"), (2, "poll"), (3, "auto")] {
        let (agent, forward) = station.agent(&dir, carrier, &url, carrier, &ca_line(&pki));
        agent.wait_log(&["connected to the station"]);
        let context = || format!("{}\n{}", agent.describe(), station.proc.describe());
        round_trip(forward, seed, TRANSFER, &context);
        round_trip(forward, seed + 10, 1000, &context);
    }
}

#[test]
fn nginx_terminates_tls_in_front_of_the_station() {
    let pki = Pki::new("postern test CA");
    let leaf = pki.leaf("nginx", "IP:127.0.0.1", 1);
    let station = Station::start("tls-nginx", None);
    // Unbuffered, so the stream carrier passes too (auto finds its way either way).
    let unbuffered = "proxy_http_version 1.1; proxy_request_buffering off; proxy_buffering off;";
    let nginx =
        Middlebox::nginx_tls(station.addr, "/tunnel/", unbuffered, &leaf, Some(SHORT_TIMEOUT_SECS));
    let dir = TempDir::new("tls-nginx-agents");
    let url = format!("https://{}/tunnel/", nginx.addr);
    for (seed, carrier) in [(1, "stream"), (2, "poll"), (3, "auto")] {
        let (agent, forward) = station.agent(&dir, carrier, &url, carrier, &ca_line(&pki));
        agent.wait_log(&["connected to the station"]);
        let context =
            || format!("{}\n{}\n{}", agent.describe(), station.proc.describe(), nginx.logs());
        round_trip(forward, seed, TRANSFER, &context);
        if carrier == "auto" {
            // Idle past nginx's timeouts: the carrier may be cut, the session is not.
            thread::sleep(Duration::from_secs(2 * SHORT_TIMEOUT_SECS + 1));
            round_trip(forward, seed + 10, TRANSFER, &context);
        }
    }
}

#[test]
fn certificates_are_refused_with_the_reason() {
    let pki = Pki::new("postern test CA");
    let cases = [
        (pki.leaf("expired", "IP:127.0.0.1", -1), true, "certificate has expired"),
        (pki.leaf("other", "DNS:other.example", 1), true, "is not for 127.0.0.1"),
        (pki.self_signed("self", "IP:127.0.0.1"), true, "is self-signed"),
        (pki.self_signed("self-system", "IP:127.0.0.1"), false, "is self-signed"),
        // A CA's own certificate serving as the station's.
        (Cert { cert: pki.ca.cert.clone(), key: pki.ca.key.clone() }, false, "is self-signed"),
        // Signed by our CA, but the agent trusts only the system's CAs.
        (pki.leaf("unknown", "IP:127.0.0.1", 1), false, "not signed by a CA this agent trusts"),
    ];
    let dir = TempDir::new("tls-refused-agents");
    for (i, (cert, with_ca, reason)) in cases.iter().enumerate() {
        let station = Station::start("tls-refused", Some(cert));
        let url = format!("https://{}/", station.addr);
        let extra = if *with_ca { ca_line(&pki) } else { String::new() };
        let (agent, _) = station.agent(&dir, &format!("agent{i}"), &url, "auto", &extra);
        let line = agent.wait_log(&[reason]);
        assert!(line.contains("TLS with the station"), "{line}");
        assert_eq!(agent.stderr.count("connected to the station"), 0, "{}", agent.describe());
        assert_eq!(station.proc.stderr.count("handshake from"), 0, "{}", station.proc.describe());
    }
}

#[test]
fn squid_lets_only_connect_to_the_tls_port_through() {
    let pki = Pki::new("postern test CA");
    let leaf = pki.leaf("station", "IP:127.0.0.1", 1);
    let station = Station::start("tls-squid", Some(&leaf));
    let squid = Middlebox::squid_connect_only(station.addr.port());
    let proxy = format!("proxy = \"http://{}\"\n", squid.addr);
    let dir = TempDir::new("tls-squid-agents");

    let url = format!("https://{}/", station.addr);
    let extra = format!("{proxy}{}", ca_line(&pki));
    let (agent, forward) = station.agent(&dir, "https", &url, "auto", &extra);
    agent.wait_log(&["connected to the station"]);
    let context = || format!("{}\n{}\n{}", agent.describe(), station.proc.describe(), squid.logs());
    round_trip(forward, 1, TRANSFER, &context);
    // Idle past squid's timeouts: the tunnel may be cut, the session is not.
    thread::sleep(Duration::from_secs(2 * SHORT_TIMEOUT_SECS + 1));
    round_trip(forward, 2, TRANSFER, &context);

    // Plain HTTP (absolute form) is refused by the proxy, and said so.
    let plain = format!("http://{}/", station.addr);
    let (refused, _) = station.agent(&dir, "plain", &plain, "poll", &proxy);
    refused.wait_log(&["the proxy (not the station) answered 403"]);

    // CONNECT to another port is the proxy's refusal, not the station's.
    let elsewhere = format!("https://{}/", refused_addr());
    let (elsewhere, _) = station.agent(&dir, "elsewhere", &elsewhere, "poll", &extra);
    let line = elsewhere.wait_log(&["refused CONNECT to 127.0.0.1:", "403"]);
    assert!(line.contains(&format!("the proxy {}", squid.addr)), "{line}");
}

#[test]
fn squid_with_ntlm_authenticates_and_refuses_a_wrong_user_once() {
    through_an_authenticating_squid(&Middlebox::squid_ntlm("alice"), "NTLM");
}

#[test]
fn squid_offering_only_negotiate_gets_ntlm_inside_it() {
    through_an_authenticating_squid(&Middlebox::squid_negotiate("alice"), "Negotiate");
}

/// Through `squid`, which lets in only alice with `scheme`: http:// and
/// https:// stations, again after idling past squid's timeouts, and a
/// refused user.
fn through_an_authenticating_squid(squid: &Middlebox, scheme: &str) {
    let pki = Pki::new("postern test CA");
    let leaf = pki.leaf("station", "IP:127.0.0.1", 1);
    let plain_station = Station::start("auth-plain", None);
    let tls_station = Station::start("auth-tls", Some(&leaf));
    let dir = TempDir::new("auth-agents");
    let proxy = |user: &str| format!("proxy = \"http://CORP%5C{user}:secret@{}\"\n", squid.addr);

    // http:// station: absolute-form requests on an authenticated connection.
    let url = format!("http://{}/", plain_station.addr);
    let (plain, plain_forward) = plain_station.agent(&dir, "plain", &url, "auto", &proxy("alice"));
    plain.wait_log(&["connected to the station"]);
    let plain_context = || format!("{}\n{}", plain.describe(), squid.logs());
    round_trip(plain_forward, 1, TRANSFER, &plain_context);
    // Squid let the requests through as alice (it logs whom it authenticated).
    assert!(squid.log_count(" alice HIER_DIRECT/") > 0, "{}", squid.logs());

    // https:// station: authentication on the CONNECT, TLS inside.
    let url = format!("https://{}/", tls_station.addr);
    let extra = format!("{}{}", proxy("alice"), ca_line(&pki));
    let (tls, tls_forward) = tls_station.agent(&dir, "tls", &url, "auto", &extra);
    tls.wait_log(&["connected to the station"]);
    let tls_context = || format!("{}\n{}", tls.describe(), squid.logs());
    round_trip(tls_forward, 2, TRANSFER, &tls_context);

    // Idle past squid's timeouts: the authenticated connections are gone,
    // and new ones authenticate again (each handshake starts with a 407).
    let challenges = squid.log_count("TCP_DENIED/407");
    thread::sleep(Duration::from_secs(2 * SHORT_TIMEOUT_SECS + 1));
    round_trip(plain_forward, 3, TRANSFER, &plain_context);
    round_trip(tls_forward, 4, TRANSFER, &tls_context);
    assert!(squid.log_count("TCP_DENIED/407") > challenges, "{}", squid.logs());

    // A user the proxy refuses: a clear 407 in the log, then backoff, not a storm.
    let extra = format!("{}{}", proxy("mallory"), ca_line(&pki));
    let (refused, _) = tls_station.agent(&dir, "mallory", &url, "poll", &extra);
    let refusal = format!("refused our {scheme} credentials (407)");
    let line = refused.wait_log(&[&refusal]);
    assert!(!line.contains("secret"), "{line}");
    thread::sleep(Duration::from_secs(5));
    assert!(!refused.stderr.text().contains("secret"), "{}", refused.describe());
    let attempts = refused.stderr.count(&refusal);
    assert!((1..=8).contains(&attempts), "{attempts} attempts in 5 s:\n{}", refused.describe());
}

#[test]
fn station_reloads_its_certificate_on_sighup() {
    let (old_ca, new_ca) = (Pki::new("old test CA"), Pki::new("new test CA"));
    let (old, new) = (old_ca.leaf("old", "IP:127.0.0.1", 1), new_ca.leaf("new", "IP:127.0.0.1", 1));
    let dir = TempDir::new("tls-reload");
    let live = Cert { cert: dir.path().join("cert.pem"), key: dir.path().join("key.pem") };
    let install = |from: &Cert| {
        std::fs::copy(&from.cert, &live.cert).expect("copy certificate");
        std::fs::copy(&from.key, &live.key).expect("copy key");
    };
    install(&old);
    let station = Station::start("tls-reload-station", Some(&live));
    let url = format!("https://{}/", station.addr);

    let (before, forward) = station.agent(&dir, "before", &url, "poll", &ca_line(&old_ca));
    before.wait_log(&["connected to the station"]);
    round_trip(forward, 1, 100_000, &|| before.describe());

    // Renewal: new files in place, SIGHUP, and new connections get them.
    install(&new);
    station.proc.signal("HUP");
    station.proc.wait_log(&["TLS certificate read again from"]);
    let (after, forward) = station.agent(&dir, "after", &url, "poll", &ca_line(&new_ca));
    after.wait_log(&["connected to the station"]);
    round_trip(forward, 2, TRANSFER, &|| {
        format!("{}\n{}", after.describe(), station.proc.describe())
    });
    // The old CA no longer verifies the station.
    let (stale, _) = station.agent(&dir, "stale", &url, "poll", &ca_line(&old_ca));
    stale.wait_log(&["not signed by a CA this agent trusts"]);
}

/// Where scripts/test unpacks Debian's squid-openssl (the `squid` package
/// is built with GnuTLS and cannot bump TLS; squid-openssl conflicts with
/// it, so it is unpacked beside it rather than installed).
const SQUID_OPENSSL: &str = "POSTERN_SQUID_OPENSSL";

#[test]
fn squid_bumping_tls_needs_its_ca_in_ca_file() {
    let Some(root) = std::env::var_os(SQUID_OPENSSL) else {
        eprintln!("skipped: {SQUID_OPENSSL} is not set (scripts/test sets it)");
        return;
    };
    let root = std::path::PathBuf::from(root);
    assert!(
        root.join("usr/sbin/squid").exists(),
        "{SQUID_OPENSSL}={} has no squid",
        root.display()
    );
    let pki = Pki::new("station CA");
    // A name, not an address: squid puts the name (the SNI) in the
    // certificates it makes, and an agent sends no SNI for an address.
    let leaf = pki.leaf("station", "DNS:localhost", 1);
    let company = Pki::new("company inspection CA");
    // Squid's workers run as the proxy user and read the bump CA.
    for dir in [pki.dir.path(), company.dir.path()] {
        let _ = std::process::Command::new("chmod").arg("-R").arg("a+rX").arg(dir).status();
    }
    let station = Station::start("tls-bump", Some(&leaf));
    let squid = Middlebox::squid_bump(&root, &company.ca, &pki.ca.cert);
    let proxy = format!("proxy = \"http://{}\"\n", squid.addr);
    let url = format!("https://localhost:{}/", station.addr.port());
    let dir = TempDir::new("tls-bump-agents");

    // Trusting only the station's CA: the proxy's certificate is refused, and said so.
    let (refused, _) =
        station.agent(&dir, "refused", &url, "auto", &format!("{proxy}{}", ca_line(&pki)));
    refused.wait_log(&["the proxy on the way may have replaced it (TLS inspection)"]);

    // With the company's CA: through the inspecting proxy, Noise inside untouched.
    let extra = format!("{proxy}{}", ca_line(&company));
    let (agent, forward) = station.agent(&dir, "company", &url, "auto", &extra);
    agent.wait_log(&["connected to the station"]);
    let context = || format!("{}\n{}\n{}", agent.describe(), station.proc.describe(), squid.logs());
    round_trip(forward, 1, TRANSFER, &context);
    // Idle past squid's timeouts: new connections are bumped again.
    thread::sleep(Duration::from_secs(2 * SHORT_TIMEOUT_SECS + 1));
    round_trip(forward, 2, TRANSFER, &context);
    round_trip(forward, 3, 1000, &context);
}
