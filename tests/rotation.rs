//! Key rotation without downtime (README, "Rotating keys"): a device key
//! and then the station key are replaced while one stream carries bytes
//! through every step, by reloading the station and the agent with SIGHUP.
//!
//! ```text
//!  device key:  station lists [old, new] ─▶ agent takes new (session renews) ─▶ station lists [new]
//!  station key: station adds next ─▶ agent pins [next, old] (session renews) ─▶ station's key = next
//! ```

mod common;

use std::io::Write as _;
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{
    receive_all, start_agent, start_station, Digest, Keys, Pattern, Proc, Received, Server,
    TempDir, LOG_WAIT,
};
use postern::keys::{PrivateKey, PublicKey};

/// Bytes sent between two rotation steps.
const PART: usize = 1 << 20;

/// How many parts: one before the first step and one after each of the six.
const PARTS: u64 = 7;

fn station_toml(
    key: &PrivateKey,
    next: Option<&PrivateKey>,
    device: &[PublicKey],
    echo: &str,
) -> String {
    let next =
        next.map(|k| format!("next_private_key = \"{}\"\n", k.to_base64())).unwrap_or_default();
    let keys: Vec<String> = device.iter().map(|k| format!("\"{}\"", k.to_base64())).collect();
    format!(
        "listen = \"127.0.0.1:0\"\nprivate_key = \"{}\"\n{next}\n[targets]\necho = \"{echo}\"\n\n\
         [[devices]]\nname = \"pump-17\"\npublic_key = [{}]\nallow = [\"echo\"]\n",
        key.to_base64(),
        keys.join(", ")
    )
}

fn agent_toml(station: std::net::SocketAddr, pinned: &[PublicKey], key: &PrivateKey) -> String {
    let pinned: Vec<String> = pinned.iter().map(|k| format!("\"{}\"", k.to_base64())).collect();
    format!(
        "station = \"http://{station}/\"\nstation_public_key = [{}]\nprivate_key = \"{}\"\n\
         carrier = \"auto\"\n\n[[forward]]\nlisten = \"127.0.0.1:0\"\ntarget = \"echo\"\n",
        pinned.join(", "),
        key.to_base64()
    )
}

#[test]
fn device_and_station_keys_rotate_under_a_running_stream() {
    let echo = Server::echo();
    let dir = TempDir::new("rotation");
    let Keys { station: old_station, device: old_device } = Keys::new();
    let (new_station, new_device) = (PrivateKey::generate(), PrivateKey::generate());
    let target = echo.target();
    let station_file = dir.path().join("station.toml");
    let agent_file = dir.path().join("agent.toml");

    let (station, station_addr) =
        start_station(&dir, &station_toml(&old_station, None, &[old_device.public_key()], &target));
    let (agent, forwards) = start_agent(
        &dir,
        "agent",
        &agent_toml(station_addr, &[old_station.public_key()], &old_device),
        &["echo"],
    );
    agent.wait_log(&["connected to the station"]);

    // One stream, written part by part: part k goes out once step k is done.
    let socket = TcpStream::connect(forwards["echo"]).expect("connect");
    let mut reader = socket.try_clone().expect("clone");
    let receiver = thread::spawn(move || receive_all(&mut reader));
    let (step_done, next_part) = mpsc::channel::<()>();
    let sender = thread::spawn(move || {
        let mut socket = socket;
        let mut pattern = Pattern::new(0x4b);
        let mut buf = vec![0u8; PART];
        for part in 0..PARTS {
            if part > 0 {
                next_part.recv_timeout(LOG_WAIT * 4).expect("the next rotation step");
            }
            pattern.fill(&mut buf);
            socket.write_all(&buf).expect("send a part");
        }
        let _ = socket.shutdown(Shutdown::Write);
    });
    let step = |proc: &Proc, file: &std::path::Path, text: String, wait_for: &[&str], n: usize| {
        std::fs::write(file, text).expect("write the config");
        proc.signal("HUP");
        proc.wait_log_nth(wait_for, n, LOG_WAIT);
        step_done.send(()).expect("the sender waits");
        thread::sleep(Duration::from_millis(100));
    };

    // The device key: the station accepts both, the agent moves, the old goes.
    let both = [old_device.public_key(), new_device.public_key()];
    step(
        &station,
        &station_file,
        station_toml(&old_station, None, &both, &target),
        &["reloaded: device pump-17: keys now"],
        1,
    );
    step(
        &agent,
        &agent_file,
        agent_toml(station_addr, &[old_station.public_key()], &new_device),
        &["reloaded: session", "renewed its keys"],
        1,
    );
    station.wait_log(&[
        "device pump-17 renewed the keys of session",
        &new_device.public_key().fingerprint(),
    ]);
    let only_new = [new_device.public_key()];
    step(
        &station,
        &station_file,
        station_toml(&old_station, None, &only_new, &target),
        &["reloaded: device pump-17: keys now"],
        2,
    );

    // The station key: the next key beside the old, the agent pins both
    // (the new first), then the next key becomes the station's key.
    step(
        &station,
        &station_file,
        station_toml(&old_station, Some(&new_station), &only_new, &target),
        &["reloaded: next key", "accepted beside the current one"],
        1,
    );
    step(
        &agent,
        &agent_file,
        agent_toml(
            station_addr,
            &[new_station.public_key(), old_station.public_key()],
            &new_device,
        ),
        &["renewed its keys (station key", &new_station.public_key().fingerprint()],
        1,
    );
    step(
        &station,
        &station_file,
        station_toml(&new_station, None, &only_new, &target),
        &["reloaded: the station's key is now", &new_station.public_key().fingerprint()],
        1,
    );

    sender.join().expect("sender");
    let got = receiver.join().expect("receiver");
    let mut digest = Digest::default();
    let mut pattern = Pattern::new(0x4b);
    let mut buf = vec![0u8; PART];
    for _ in 0..PARTS {
        pattern.fill(&mut buf);
        digest.update(&buf);
    }
    assert_eq!(
        got,
        Received { len: PARTS * PART as u64, hash: digest.finish(), error: None },
        "{}\n{}",
        agent.describe(),
        station.describe()
    );
    assert_eq!(echo.accepts(), 1, "one stream carried it all");
    assert_eq!(station.stderr.count("device pump-17 handshake from"), 1, "{}", station.describe());
    assert_eq!(station.stderr.count("ends:"), 0, "{}", station.describe());

    // A device still on the old key is now a stranger.
    let (_stale, _) = start_agent(
        &dir,
        "stale",
        &agent_toml(station_addr, &[new_station.public_key()], &old_device),
        &["echo"],
    );
    station.wait_log(&["unknown device key", &old_device.public_key().fingerprint()]);
}

/// Removing the key a running session was made with ends that session: a
/// key taken away is revoked, not merely retired.
#[test]
fn removing_the_key_of_a_session_ends_it() {
    let echo = Server::echo();
    let dir = TempDir::new("revoke");
    let keys = Keys::new();
    let other = PrivateKey::generate();
    let target = echo.target();
    let (station, station_addr) = start_station(
        &dir,
        &station_toml(
            &keys.station,
            None,
            &[keys.device.public_key(), other.public_key()],
            &target,
        ),
    );
    let (agent, _) = start_agent(
        &dir,
        "agent",
        &agent_toml(station_addr, &[keys.station.public_key()], &keys.device),
        &["echo"],
    );
    agent.wait_log(&["connected to the station"]);
    station.wait_log(&["device pump-17 handshake from"]);
    std::fs::write(
        dir.path().join("station.toml"),
        station_toml(&keys.station, None, &[other.public_key()], &target),
    )
    .expect("write");
    station.signal("HUP");
    station.wait_log(&["device pump-17: session", "ends: the key of its session was removed"]);
    agent.wait_log(&["session", "ended"]);
}
