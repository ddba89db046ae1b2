//! What operators see of a running station: `GET /metrics` in the
//! Prometheus text format and `GET /status` as JSON, on the `status`
//! address (off unless configured; meant for loopback or a private network).
//!
//! ```text
//!  counters (atomics, bumped on the hot paths) ─┐
//!  live sessions (Tunnel::stats)               ─┼─▶ Snapshot ─▶ render_metrics / render_status
//!  totals of ended sessions, per device        ─┘
//! ```
//!
//! Byte counts are stream bytes (what the device's and the server's
//! processes wrote), not carrier bytes, so they match what was sent.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use smol::net::{TcpListener, TcpStream};

use super::{live_sessions, lock, Shared};
use crate::carrier::conn::{HttpConn, MIN_READ_BUF_BYTES};
use crate::carrier::http::{self, BodyKind};
use crate::task::Scope;

/// Time a status client has to send its request.
const STATUS_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Status requests served at once; scrapers need one or two.
const MAX_STATUS_CLIENTS: usize = 16;

/// Station-wide counters, bumped where things happen.
#[derive(Default)]
pub(super) struct Counters {
    pub handshakes: AtomicU64,
    pub unknown_keys: AtomicU64,
    pub bad_handshakes: AtomicU64,
    /// Handshakes refused because two agents use one device key.
    pub duplicate_keys: AtomicU64,
    /// Refused requests by reason label (a small fixed set, see [`reason`]).
    pub rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// What sessions that ended carried, per device name.
    pub ended: Mutex<HashMap<String, Totals>>,
    /// Carrier requests passed to the station holding their session.
    pub forwarded: AtomicU64,
    /// Reverse clients relayed to the station holding their device.
    pub relayed_clients: AtomicU64,
}

impl Counters {
    pub(super) fn refused(&self, status: u16) {
        *lock(&self.rejected).entry(reason(status)).or_default() += 1;
    }
}

/// The label a refusal's status is counted under.
fn reason(status: u16) -> &'static str {
    match status {
        400 => "malformed",
        403 => "not_authentic",
        404 => "not_found",
        405 => "method",
        409 => "duplicate_key",
        410 => "unknown_session",
        408 => "timeout",
        413 | 431 => "too_large",
        503 => "overload",
        _ => "other",
    }
}

/// Per-device sums.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Totals {
    /// Stream bytes from the device (to targets and monitoring clients).
    pub bytes_up: u64,
    /// Stream bytes to the device.
    pub bytes_down: u64,
    pub resent: u64,
    pub rejected_packets: u64,
    pub carrier_connections: u64,
    pub sessions: u64,
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, other: Totals) {
        self.bytes_up += other.bytes_up;
        self.bytes_down += other.bytes_down;
        self.resent += other.resent;
        self.rejected_packets += other.rejected_packets;
        self.carrier_connections += other.carrier_connections;
        self.sessions += other.sessions;
    }
}

/// Which carrier shape a session's requests last used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    Stream = 1,
    Poll = 2,
}

/// What a live session shows beyond its tunnel's counters.
pub(super) struct LiveStatus {
    pub since: SystemTime,
    /// Unix milliseconds of the last authentic packet.
    last_seen: AtomicU64,
    shape: AtomicU8,
    pub carrier_connections: AtomicU64,
}

impl LiveStatus {
    pub(super) fn new() -> Self {
        LiveStatus {
            since: SystemTime::now(),
            last_seen: AtomicU64::new(unix_millis(SystemTime::now())),
            shape: AtomicU8::new(0),
            carrier_connections: AtomicU64::new(0),
        }
    }

    /// An authentic packet arrived over a carrier of this shape.
    /// Whether an authentic packet arrived at `since` or later.
    pub(super) fn heard_since(&self, since: SystemTime) -> bool {
        self.last_seen.load(Ordering::Relaxed) >= unix_millis(since)
    }

    /// Whether an authentic packet arrived within `window`.
    pub(super) fn heard_within(&self, window: Duration) -> bool {
        // A window reaching back before the epoch covers every packet.
        SystemTime::now().checked_sub(window).map_or(true, |since| self.heard_since(since))
    }

    pub(super) fn seen(&self, shape: Shape) {
        self.last_seen.store(unix_millis(SystemTime::now()), Ordering::Relaxed);
        self.shape.store(shape as u8, Ordering::Relaxed);
    }

    fn shape(&self) -> Option<&'static str> {
        match self.shape.load(Ordering::Relaxed) {
            1 => Some("stream"),
            2 => Some("poll"),
            _ => None,
        }
    }
}

fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One configured device as the status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStatus {
    pub name: String,
    pub connected: bool,
    /// Unix seconds the live session started, if there is one.
    pub connected_since: Option<f64>,
    /// Unix seconds of the last authentic packet of the live session.
    pub last_seen: Option<f64>,
    pub carrier: Option<&'static str>,
    pub streams: usize,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub resent_packets: u64,
    pub rejected_packets: u64,
    pub carrier_connections: u64,
    pub sessions: u64,
}

/// Everything the two pages show, taken at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub devices: Vec<DeviceStatus>,
    pub sessions: usize,
    pub connections_devices: usize,
    pub connections_strangers: usize,
    pub handshakes: u64,
    pub unknown_keys: u64,
    pub bad_handshakes: u64,
    pub duplicate_keys: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    /// With `[cluster]`: the registry's state and the traffic passed on.
    pub cluster: Option<ClusterStatus>,
}

/// A clustered station's part of the [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// Whether the last registry call reached the store.
    pub store_up: bool,
    pub forwarded_requests: u64,
    pub relayed_clients: u64,
}

pub(super) fn snapshot(shared: &Shared) -> Snapshot {
    let roster = shared.roster();
    let ended = lock(&shared.counters.ended).clone();
    let live_by_name = live_sessions(shared);
    let mut devices: Vec<DeviceStatus> = roster
        .devices
        .values()
        .map(|device| {
            let mut totals = ended.get(&device.name).copied().unwrap_or_default();
            let live = live_by_name.get(&device.name);
            let mut status = DeviceStatus {
                name: device.name.clone(),
                connected: live.is_some(),
                connected_since: None,
                last_seen: None,
                carrier: None,
                streams: 0,
                bytes_up: 0,
                bytes_down: 0,
                resent_packets: 0,
                rejected_packets: 0,
                carrier_connections: 0,
                sessions: 0,
            };
            if let Some(live) = live {
                totals += live.totals();
                status.connected_since = Some(unix_millis(live.status.since) as f64 / 1000.0);
                status.last_seen =
                    Some(live.status.last_seen.load(Ordering::Relaxed) as f64 / 1000.0);
                status.carrier = live.status.shape();
                status.streams = live.tunnel.stream_count();
            }
            status.bytes_up = totals.bytes_up;
            status.bytes_down = totals.bytes_down;
            status.resent_packets = totals.resent;
            status.rejected_packets = totals.rejected_packets;
            status.carrier_connections = totals.carrier_connections;
            status.sessions = totals.sessions;
            status
        })
        .collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    let (strangers, proven) = shared.slots.counts();
    let counters = &shared.counters;
    Snapshot {
        devices,
        sessions: lock(&shared.sessions).len(),
        connections_devices: proven,
        connections_strangers: strangers,
        handshakes: counters.handshakes.load(Ordering::Relaxed),
        unknown_keys: counters.unknown_keys.load(Ordering::Relaxed),
        bad_handshakes: counters.bad_handshakes.load(Ordering::Relaxed),
        duplicate_keys: counters.duplicate_keys.load(Ordering::Relaxed),
        rejected: lock(&counters.rejected).clone(),
        cluster: shared.registry.as_ref().map(|registry| ClusterStatus {
            store_up: registry.is_up(),
            forwarded_requests: counters.forwarded.load(Ordering::Relaxed),
            relayed_clients: counters.relayed_clients.load(Ordering::Relaxed),
        }),
    }
}

/// The Prometheus text exposition format, version 0.0.4.
pub fn render_metrics(snap: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |value: String| vec![(String::new(), value)];
    let per_device = |value: &dyn Fn(&DeviceStatus) -> String| -> Vec<(String, String)> {
        snap.devices
            .iter()
            .map(|d| (format!("{{device=\"{}\"}}", label(&d.name)), value(d)))
            .collect()
    };
    family(
        "postern_devices_configured",
        "gauge",
        "Devices in the station's config.",
        &one(snap.devices.len().to_string()),
    );
    let connected = snap.devices.iter().filter(|d| d.connected).count();
    family(
        "postern_devices_connected",
        "gauge",
        "Devices with a live session.",
        &one(connected.to_string()),
    );
    family(
        "postern_sessions",
        "gauge",
        "Sessions, confirmed or not.",
        &one(snap.sessions.to_string()),
    );
    let streams: usize = snap.devices.iter().map(|d| d.streams).sum();
    family(
        "postern_streams_open",
        "gauge",
        "Streams open in all sessions.",
        &one(streams.to_string()),
    );
    family(
        "postern_connections",
        "gauge",
        "Carrier connections, by whether they carried an authentic packet yet.",
        &[
            ("{kind=\"device\"}".into(), snap.connections_devices.to_string()),
            ("{kind=\"stranger\"}".into(), snap.connections_strangers.to_string()),
        ],
    );
    family(
        "postern_handshakes_total",
        "counter",
        "Handshakes completed with known devices.",
        &one(snap.handshakes.to_string()),
    );
    let rejected_packets: u64 = snap.devices.iter().map(|d| d.rejected_packets).sum();
    family(
        "postern_auth_failures_total",
        "counter",
        "Authentication failures, by kind.",
        &[
            ("{kind=\"unknown_key\"}".into(), snap.unknown_keys.to_string()),
            ("{kind=\"bad_handshake\"}".into(), snap.bad_handshakes.to_string()),
            ("{kind=\"duplicate_key\"}".into(), snap.duplicate_keys.to_string()),
            ("{kind=\"forged_or_replayed_packet\"}".into(), rejected_packets.to_string()),
        ],
    );
    let rejected: Vec<(String, String)> = snap
        .rejected
        .iter()
        .map(|(reason, count)| (format!("{{reason=\"{reason}\"}}"), count.to_string()))
        .collect();
    family("postern_rejected_requests_total", "counter", "Refused requests, by reason.", &rejected);
    if let Some(cluster) = &snap.cluster {
        family(
            "postern_cluster_store_up",
            "gauge",
            "Whether the cluster's session registry answered the station's last call.",
            &one(u8::from(cluster.store_up).to_string()),
        );
        family(
            "postern_cluster_forwarded_requests_total",
            "counter",
            "Carrier requests passed to the station holding their session.",
            &one(cluster.forwarded_requests.to_string()),
        );
        family(
            "postern_cluster_relayed_clients_total",
            "counter",
            "Reverse clients relayed to the station holding their device.",
            &one(cluster.relayed_clients.to_string()),
        );
    }
    family(
        "postern_device_connected",
        "gauge",
        "Whether the device has a live session.",
        &per_device(&|d| u8::from(d.connected).to_string()),
    );
    let bytes: Vec<(String, String)> = snap
        .devices
        .iter()
        .flat_map(|d| {
            let name = label(&d.name);
            [
                (format!("{{device=\"{name}\",direction=\"up\"}}"), d.bytes_up.to_string()),
                (format!("{{device=\"{name}\",direction=\"down\"}}"), d.bytes_down.to_string()),
            ]
        })
        .collect();
    family(
        "postern_device_bytes_total",
        "counter",
        "Stream bytes from (up) and to (down) the device.",
        &bytes,
    );
    let carriers: Vec<(String, String)> = snap
        .devices
        .iter()
        .filter_map(|d| {
            d.carrier.map(|kind| {
                (format!("{{device=\"{}\",kind=\"{kind}\"}}", label(&d.name)), "1".into())
            })
        })
        .collect();
    family(
        "postern_device_carrier",
        "gauge",
        "The carrier shape a connected device uses.",
        &carriers,
    );
    family(
        "postern_device_streams",
        "gauge",
        "Streams open in the device's session.",
        &per_device(&|d| d.streams.to_string()),
    );
    family(
        "postern_device_resent_packets_total",
        "counter",
        "Packets the station sent the device again after a carrier was lost.",
        &per_device(&|d| d.resent_packets.to_string()),
    );
    family(
        "postern_device_carrier_connections_total",
        "counter",
        "Carrier connections that carried an authentic packet (reconnects show here).",
        &per_device(&|d| d.carrier_connections.to_string()),
    );
    family(
        "postern_device_sessions_total",
        "counter",
        "Sessions the device started.",
        &per_device(&|d| d.sessions.to_string()),
    );
    out
}

/// `{"devices":[...], ...}`, one object per configured device.
pub fn render_status(snap: &Snapshot) -> String {
    let optional = |value: Option<f64>| value.map_or("null".to_owned(), |v| format!("{v:.3}"));
    let mut out = String::from("{\"devices\":[");
    for (i, d) in snap.devices.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"name\":{},\"connected\":{},\"connected_since\":{},\"last_seen\":{},\
             \"carrier\":{},\"streams\":{},\"bytes_up\":{},\"bytes_down\":{},\
             \"resent_packets\":{},\"carrier_connections\":{},\"sessions\":{}}}",
            json_string(&d.name),
            d.connected,
            optional(d.connected_since),
            optional(d.last_seen),
            d.carrier.map_or("null".to_owned(), json_string),
            d.streams,
            d.bytes_up,
            d.bytes_down,
            d.resent_packets,
            d.carrier_connections,
            d.sessions
        );
    }
    let _ = write!(
        out,
        "],\"sessions\":{},\"connections\":{{\"device\":{},\"stranger\":{}}}}}",
        snap.sessions, snap.connections_devices, snap.connections_strangers
    );
    out
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Serves the status pages until the station's scope stops.
pub(super) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    log::info!("status on http://{addr}/metrics and http://{addr}/status");
    let clients = Scope::new();
    let open = Arc::new(AtomicU64::new(0));
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            smol::Timer::after(Duration::from_millis(100)).await;
            continue;
        };
        if open.load(Ordering::Acquire) >= MAX_STATUS_CLIENTS as u64 {
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let (shared, open) = (shared.clone(), open.clone());
        clients.spawn(async move {
            answer(&shared, socket).await;
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn answer(shared: &Shared, socket: TcpStream) {
    let mut conn = HttpConn::with_capacity(socket, MIN_READ_BUF_BYTES);
    let request =
        futures_lite::future::or(async { conn.read_request().await.ok().flatten() }, async {
            smol::Timer::after(STATUS_HEAD_TIMEOUT).await;
            None
        })
        .await;
    let Some(head) = request else { return };
    let path = head.target.split('?').next().unwrap_or("");
    let (content_type, body) = match (head.method.as_str(), path) {
        ("GET", "/metrics") => {
            ("text/plain; version=0.0.4; charset=utf-8", render_metrics(&snapshot(shared)))
        }
        ("GET", "/status") => ("application/json", render_status(&snapshot(shared))),
        _ => {
            let _ = conn.write_all(&http::unmarked_error_response(404)).await;
            return;
        }
    };
    let mut out = Vec::with_capacity(body.len() + 200);
    let headers = [("Content-Type", content_type), ("Cache-Control", "no-store")];
    http::write_response_head(
        &mut out,
        200,
        "OK",
        &headers,
        BodyKind::Length(body.len() as u64),
        false,
    );
    out.extend_from_slice(body.as_bytes());
    let _ = conn.write_all(&out).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            devices: vec![DeviceStatus {
                name: "pump \"17\"".into(),
                connected: true,
                connected_since: Some(1000.5),
                last_seen: Some(1001.25),
                carrier: Some("stream"),
                streams: 2,
                bytes_up: 16_777_216,
                bytes_down: 42,
                resent_packets: 3,
                rejected_packets: 1,
                carrier_connections: 4,
                sessions: 1,
            }],
            sessions: 1,
            connections_devices: 2,
            connections_strangers: 0,
            handshakes: 1,
            unknown_keys: 5,
            bad_handshakes: 0,
            duplicate_keys: 0,
            rejected: BTreeMap::from([("malformed", 7)]),
            cluster: Some(ClusterStatus {
                store_up: true,
                forwarded_requests: 9,
                relayed_clients: 2,
            }),
        }
    }

    #[test]
    fn metrics_text_has_each_family_and_escaped_labels() {
        let text = render_metrics(&sample());
        for line in [
            "# TYPE postern_devices_connected gauge",
            "postern_devices_connected 1",
            "postern_device_bytes_total{device=\"pump \\\"17\\\"\",direction=\"up\"} 16777216",
            "postern_device_bytes_total{device=\"pump \\\"17\\\"\",direction=\"down\"} 42",
            "postern_device_carrier{device=\"pump \\\"17\\\"\",kind=\"stream\"} 1",
            "postern_auth_failures_total{kind=\"unknown_key\"} 5",
            "postern_auth_failures_total{kind=\"forged_or_replayed_packet\"} 1",
            "postern_rejected_requests_total{reason=\"malformed\"} 7",
            "postern_streams_open 2",
            "postern_cluster_store_up 1",
            "postern_cluster_forwarded_requests_total 9",
            "postern_cluster_relayed_clients_total 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn status_is_json() {
        assert_eq!(
            render_status(&sample()),
            "{\"devices\":[{\"name\":\"pump \\\"17\\\"\",\"connected\":true,\
             \"connected_since\":1000.500,\"last_seen\":1001.250,\"carrier\":\"stream\",\
             \"streams\":2,\"bytes_up\":16777216,\"bytes_down\":42,\"resent_packets\":3,\
             \"carrier_connections\":4,\"sessions\":1}],\"sessions\":1,\
             \"connections\":{\"device\":2,\"stranger\":0}}"
        );
        assert_eq!(json_string("a\u{1}\\"), "\"a\\u0001\\\\\"");
    }
}
