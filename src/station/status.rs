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
//! Every counter is rendered from the start, at zero, each reason of a
//! family included: an alert on `rate()` or `increase()` needs a series
//! before the first event. The families and the alerts written on them are
//! described in docs/MONITORING.md.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use smol::net::TcpListener;

use super::{live_sessions, lock, Shared};
use crate::status::{ago, label, Exposition, Millis, Pages};

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
    /// Connections opened to other stations for forwarded requests.
    pub peer_connections: AtomicU64,
    /// Streams connected to their target or exposed service.
    pub streams_opened: AtomicU64,
    streams_refused: Tally<{ StreamRefusal::ALL.len() }>,
    /// Streams sessions that ended refused past the limit of open streams
    /// (live sessions count theirs in `Tunnel::stats`); changed with the
    /// sessions' lock held, so a scrape sees each refusal once.
    pub ended_past_limit: AtomicU64,
    handshake_refusals: Tally<{ HandshakeRefusal::ALL.len() }>,
    reloads: Mutex<Reloads>,
}

impl Counters {
    pub(super) fn refused(&self, status: u16) {
        *lock(&self.rejected).entry(reason(status)).or_default() += 1;
    }

    pub(super) fn stream_refused(&self, why: StreamRefusal) {
        self.streams_refused.add(why as usize);
    }

    pub(super) fn handshake_refused(&self, why: HandshakeRefusal) {
        self.handshake_refusals.add(why as usize);
    }

    /// A reload was applied (`true`) or refused, now.
    pub(super) fn reloaded(&self, applied: bool) {
        let mut reloads = lock(&self.reloads);
        let tally = if applied { &mut reloads.successes } else { &mut reloads.failures };
        tally.count += 1;
        tally.last = Some(unix_millis(SystemTime::now()) as f64 / 1000.0);
    }
}

/// One count per reason of a small fixed set, so each is rendered from
/// the start.
struct Tally<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for Tally<N> {
    fn default() -> Self {
        Tally(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> Tally<N> {
    fn add(&self, index: usize) {
        self.0[index].fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self, labels: [&'static str; N]) -> Vec<(&'static str, u64)> {
        labels.into_iter().zip(&self.0).map(|(l, n)| (l, n.load(Ordering::Relaxed))).collect()
    }
}

/// Why the station refused a stream: the reasons of
/// `postern_streams_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamRefusal {
    /// The device asked for a target its allow list does not name.
    NotAllowed,
    /// The device asked for a name that is no target in the config.
    UnknownTarget,
    /// The target's address refused the connection or could not be reached.
    ConnectFailed,
    /// The target did not accept within the station's connect timeout.
    ConnectTimeout,
    /// A graceful stop had begun.
    Stopping,
    /// A reverse client came for a device with no live session.
    DeviceOffline,
    /// The session had the most streams it may have open.
    TooManyStreams,
}

impl StreamRefusal {
    /// In declaration order: `why as usize` indexes this.
    const ALL: [StreamRefusal; 7] = [
        StreamRefusal::NotAllowed,
        StreamRefusal::UnknownTarget,
        StreamRefusal::ConnectFailed,
        StreamRefusal::ConnectTimeout,
        StreamRefusal::Stopping,
        StreamRefusal::DeviceOffline,
        StreamRefusal::TooManyStreams,
    ];

    fn label(self) -> &'static str {
        match self {
            StreamRefusal::NotAllowed => "not_allowed",
            StreamRefusal::UnknownTarget => "unknown_target",
            StreamRefusal::ConnectFailed => "connect_failed",
            StreamRefusal::ConnectTimeout => "connect_timeout",
            StreamRefusal::Stopping => "stopping",
            StreamRefusal::DeviceOffline => "device_offline",
            StreamRefusal::TooManyStreams => "too_many_streams",
        }
    }
}

/// Why the station refused a handshake (a new session's or a renewal's):
/// the reasons of `postern_handshake_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HandshakeRefusal {
    /// The handshake budget was spent: 503 with `Retry-After`.
    Busy,
    /// A graceful stop had begun.
    Stopping,
    /// Not a postern handshake, or one for a session id it does not own.
    Malformed,
    /// A key that is not (or no longer) one of the device's.
    UnknownKey,
    /// Two agents use the device's key; the newcomer is refused a while.
    DuplicateKey,
}

impl HandshakeRefusal {
    /// In declaration order: `why as usize` indexes this.
    const ALL: [HandshakeRefusal; 5] = [
        HandshakeRefusal::Busy,
        HandshakeRefusal::Stopping,
        HandshakeRefusal::Malformed,
        HandshakeRefusal::UnknownKey,
        HandshakeRefusal::DuplicateKey,
    ];

    fn label(self) -> &'static str {
        match self {
            HandshakeRefusal::Busy => "busy",
            HandshakeRefusal::Stopping => "stopping",
            HandshakeRefusal::Malformed => "malformed",
            HandshakeRefusal::UnknownKey => "unknown_key",
            HandshakeRefusal::DuplicateKey => "duplicate_key",
        }
    }
}

/// Reloads of one result: how many since the station started, and when
/// the last one was.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ReloadTally {
    pub count: u64,
    /// Unix seconds of the last one; `None` before the first.
    pub last: Option<f64>,
}

/// Reloads applied and refused.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Reloads {
    pub successes: ReloadTally,
    pub failures: ReloadTally,
}

/// Every label [`reason`] gives, so each is rendered from the start.
const REJECT_REASONS: [&str; 10] = [
    "malformed",
    "not_authentic",
    "not_found",
    "method",
    "duplicate_key",
    "unknown_session",
    "timeout",
    "too_large",
    "overload",
    "other",
];

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

/// Per-device sums, and when the device was last heard from.
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
    /// Unix milliseconds of the last authentic packet; 0 if none.
    pub last_heard: u64,
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, other: Totals) {
        self.bytes_up += other.bytes_up;
        self.bytes_down += other.bytes_down;
        self.resent += other.resent;
        self.rejected_packets += other.rejected_packets;
        self.carrier_connections += other.carrier_connections;
        self.sessions += other.sessions;
        self.last_heard = self.last_heard.max(other.last_heard);
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

    /// Unix milliseconds of the last authentic packet (or of the handshake).
    pub(super) fn last_seen(&self) -> u64 {
        self.last_seen.load(Ordering::Relaxed)
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
    /// Unix seconds of the last authentic packet of any session since the
    /// station started, ended ones included; `None` if none.
    pub last_heard: Option<f64>,
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
    /// Refused requests by reason, every reason present.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Unix seconds the station started.
    pub started: f64,
    /// Streams connected to their target or exposed service.
    pub streams_opened: u64,
    /// Streams refused, by reason, every reason present.
    pub streams_refused: Vec<(&'static str, u64)>,
    /// Handshakes refused, by reason, every reason present.
    pub handshake_refusals: Vec<(&'static str, u64)>,
    pub reloads: Reloads,
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
    pub peer_connections: u64,
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
                last_heard: None,
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
                status.connected_since = Some(seconds(unix_millis(live.status.since)));
                status.last_seen = Some(seconds(live.status.last_seen()));
                status.carrier = live.status.shape();
                status.streams = live.tunnel.stream_count();
            }
            status.bytes_up = totals.bytes_up;
            status.bytes_down = totals.bytes_down;
            status.resent_packets = totals.resent;
            status.rejected_packets = totals.rejected_packets;
            status.carrier_connections = totals.carrier_connections;
            status.sessions = totals.sessions;
            status.last_heard = (totals.last_heard > 0).then(|| seconds(totals.last_heard));
            status
        })
        .collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    let (strangers, proven) = shared.slots.counts();
    let counters = &shared.counters;
    let mut streams_refused =
        counters.streams_refused.read(StreamRefusal::ALL.map(StreamRefusal::label));
    let past_limit = past_limit(shared);
    for (label, count) in &mut streams_refused {
        if *label == StreamRefusal::TooManyStreams.label() {
            *count += past_limit;
        }
    }
    let mut rejected: BTreeMap<&'static str, u64> =
        REJECT_REASONS.iter().map(|reason| (*reason, 0)).collect();
    rejected.extend(lock(&counters.rejected).iter());
    Snapshot {
        devices,
        sessions: lock(&shared.sessions).len(),
        connections_devices: proven,
        connections_strangers: strangers,
        handshakes: counters.handshakes.load(Ordering::Relaxed),
        unknown_keys: counters.unknown_keys.load(Ordering::Relaxed),
        bad_handshakes: counters.bad_handshakes.load(Ordering::Relaxed),
        duplicate_keys: counters.duplicate_keys.load(Ordering::Relaxed),
        rejected,
        started: seconds(unix_millis(shared.started)),
        streams_opened: counters.streams_opened.load(Ordering::Relaxed),
        streams_refused,
        handshake_refusals: counters
            .handshake_refusals
            .read(HandshakeRefusal::ALL.map(HandshakeRefusal::label)),
        reloads: *lock(&counters.reloads),
        cluster: shared.registry.as_ref().map(|registry| ClusterStatus {
            store_up: registry.is_up(),
            forwarded_requests: counters.forwarded.load(Ordering::Relaxed),
            relayed_clients: counters.relayed_clients.load(Ordering::Relaxed),
            peer_connections: counters.peer_connections.load(Ordering::Relaxed),
        }),
    }
}

/// Streams that sessions refused past the limit of open streams: those
/// that ended and those that live, read under one lock.
fn past_limit(shared: &Shared) -> u64 {
    let sessions = lock(&shared.sessions);
    let live: u64 = sessions.values().map(|live| live.tunnel.stats().streams_refused).sum();
    shared.counters.ended_past_limit.load(Ordering::Relaxed) + live
}

fn seconds(unix_millis: u64) -> f64 {
    unix_millis as f64 / 1000.0
}

/// The Prometheus text exposition format, version 0.0.4.
pub fn render_metrics(snap: &Snapshot) -> String {
    let mut out = Exposition::default();
    out.build_info("postern_build_info");
    out.start_time("station", Millis((snap.started * 1000.0) as u64));
    let tally = |t: ReloadTally| (t.count, Millis(t.last.map_or(0, |at| (at * 1000.0) as u64)));
    out.reloads("postern_", tally(snap.reloads.successes), tally(snap.reloads.failures));
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        out.family(name, kind, help, samples)
    };
    let one = |value: String| vec![(String::new(), value)];
    let by = |name: &str, counts: &[(&str, u64)]| -> Vec<(String, String)> {
        counts.iter().map(|(label, n)| (format!("{{{name}=\"{label}\"}}"), n.to_string())).collect()
    };
    // A time that has not happened yet is 0, as Prometheus' own
    // `*_timestamp_seconds` gauges show it.
    let time = |at: Option<f64>| at.map_or("0".to_owned(), |t| format!("{t:.3}"));
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
    family(
        "postern_handshake_refusals_total",
        "counter",
        "Handshakes (new sessions and key renewals) refused, by reason.",
        &by("reason", &snap.handshake_refusals),
    );
    let rejected: Vec<(&str, u64)> = snap.rejected.iter().map(|(r, n)| (*r, *n)).collect();
    family(
        "postern_rejected_requests_total",
        "counter",
        "Refused requests, by reason.",
        &by("reason", &rejected),
    );
    family(
        "postern_streams_opened_total",
        "counter",
        "Streams connected to their target (opened by a device) or exposed service (opened for a reverse client).",
        &one(snap.streams_opened.to_string()),
    );
    family(
        "postern_streams_refused_total",
        "counter",
        "Streams refused, by reason.",
        &by("reason", &snap.streams_refused),
    );
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
        family(
            "postern_cluster_peer_connections_total",
            "counter",
            "Connections opened to other stations for forwarded requests (kept alive between polls and pushes).",
            &one(cluster.peer_connections.to_string()),
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
        "postern_device_last_heard_seconds",
        "gauge",
        "Unix time of the last authentic packet from the device, also after its session ended; 0 if none since the station started.",
        &per_device(&|d| time(d.last_heard)),
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
    out.finish()
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

/// The station's lines for `postern status`: one per configured device.
pub fn render_text(snap: &Snapshot, now: f64) -> String {
    let connected = snap.devices.iter().filter(|d| d.connected).count();
    let mut out = format!(
        "station: {connected} of {} devices connected, {} sessions, {} carrier connections\n",
        snap.devices.len(),
        snap.sessions,
        snap.connections_devices + snap.connections_strangers
    );
    for d in &snap.devices {
        let heard = match d.last_heard {
            Some(at) if at > 0.0 => format!("heard {} ago", ago((now - at).max(0.0) as u64)),
            _ => "not heard since the station started".to_owned(),
        };
        let state = match (d.connected, d.carrier) {
            (true, Some(carrier)) => format!("connected ({carrier})"),
            (true, None) => "connected".to_owned(),
            (false, _) => "offline".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {}: {state}, {heard}, {} streams, {} bytes up, {} down",
            d.name, d.streams, d.bytes_up, d.bytes_down
        );
    }
    out
}

/// A JSON string literal of `text`.
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

/// Seconds since the unix epoch, as the station's figures give times.
fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Pages for Snapshot {
    fn metrics(&self) -> String {
        render_metrics(self)
    }

    fn json(&self) -> Option<String> {
        Some(render_status(self))
    }

    fn text(&self) -> String {
        render_text(self, unix_seconds(SystemTime::now()))
    }
}

/// Serves the status pages until the station's scope stops.
pub(super) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    crate::status::serve(listener, move || snapshot(&shared)).await;
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
                last_heard: Some(1001.25),
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
            rejected: BTreeMap::from([("malformed", 7), ("overload", 0)]),
            started: 999.5,
            streams_opened: 11,
            streams_refused: vec![("not_allowed", 0), ("connect_failed", 3)],
            handshake_refusals: vec![("busy", 6), ("unknown_key", 5)],
            reloads: Reloads {
                successes: ReloadTally { count: 2, last: Some(1002.0) },
                failures: ReloadTally { count: 0, last: None },
            },
            cluster: Some(ClusterStatus {
                store_up: true,
                forwarded_requests: 9,
                relayed_clients: 2,
                peer_connections: 3,
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
            "postern_cluster_peer_connections_total 3",
            "process_start_time_seconds 999.500",
            "postern_device_last_heard_seconds{device=\"pump \\\"17\\\"\"} 1001.250",
            "postern_streams_opened_total 11",
            "postern_streams_refused_total{reason=\"not_allowed\"} 0",
            "postern_streams_refused_total{reason=\"connect_failed\"} 3",
            "postern_handshake_refusals_total{reason=\"busy\"} 6",
            "postern_rejected_requests_total{reason=\"overload\"} 0",
            "postern_reloads_total{result=\"success\"} 2",
            "postern_reloads_total{result=\"failure\"} 0",
            "postern_last_reload_seconds{result=\"success\"} 1002.000",
            "postern_last_reload_seconds{result=\"failure\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        let build = format!(
            "postern_build_info{{version=\"{}\",commit=\"{}\",features=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            crate::COMMIT,
            crate::FEATURES.join(",")
        );
        assert!(text.lines().any(|l| l == build), "missing {build:?} in\n{text}");
    }

    /// A device never heard from since the station started has a 0
    /// sample, so an alert on how long ago it was heard covers it too.
    #[test]
    fn a_device_never_heard_has_zero() {
        let mut snap = sample();
        snap.devices[0].last_heard = None;
        let text = render_metrics(&snap);
        let line = "postern_device_last_heard_seconds{device=\"pump \\\"17\\\"\"} 0";
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }

    /// `why as usize` indexes the counts: the lists must be in
    /// declaration order.
    #[test]
    fn reason_lists_are_in_declaration_order() {
        for (i, why) in StreamRefusal::ALL.iter().enumerate() {
            assert_eq!(*why as usize, i, "{why:?}");
        }
        for (i, why) in HandshakeRefusal::ALL.iter().enumerate() {
            assert_eq!(*why as usize, i, "{why:?}");
        }
        let tally = Tally::<{ StreamRefusal::ALL.len() }>::default();
        tally.add(StreamRefusal::TooManyStreams as usize);
        let read = tally.read(StreamRefusal::ALL.map(StreamRefusal::label));
        assert_eq!(read.len(), 7);
        assert_eq!(read[6], ("too_many_streams", 1));
        assert!(read[..6].iter().all(|(_, n)| *n == 0), "{read:?}");
        for status in [400, 403, 404, 405, 408, 409, 410, 413, 431, 503, 500] {
            assert!(REJECT_REASONS.contains(&reason(status)), "{status}");
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
