//! The cluster's shared session registry, on Redis: which station holds
//! each session and each device. Every record expires unless its station
//! renews it, so a station that dies drops out by itself.
//!
//! ```text
//! postern:session:<session hex> = <station peer address>          (EX record_ttl)
//! postern:device:<device name>  = <station peer address> <session hex>  (EX record_ttl)
//! ```
//!
//! A handshake overwrites both (the newest session of a device wins);
//! renewals and removals touch a device's record only while it still
//! names the session doing so, so a station left with a stale session
//! never takes the device back. While the store cannot be reached the
//! station serves alone: every call fails at once, and the store is tried
//! again every [`RETRY_EVERY`].

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use event_listener::Event;

use super::lock;
use super::resp::{Dial, Reply, Resp, StoreError};
use crate::carrier;
use crate::config::StoreAddr;
use crate::crypto::SessionId;

/// How often an unreachable store is tried again.
pub(super) const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Commands sent in one pipelined write when records are renewed.
const RENEW_BATCH: usize = 512;

/// Deletes KEYS[1] if it holds ARGV[1].
const RELEASE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Sets KEYS[1] to ARGV[1] for ARGV[2] seconds if it is missing or holds
/// ARGV[1] already; returns 1 if it did.
const KEEP: &str = "local v = redis.call('GET', KEYS[1]) \
     if v == false or v == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1 end \
     return 0";

/// Where a device's session lives, as the registry has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Holder {
    pub station: SocketAddr,
    pub session: String,
}

impl Holder {
    /// The device record's value when `station` holds `session`.
    fn record(station: SocketAddr, session: &SessionId) -> String {
        format!("{station} {}", carrier::hex(session))
    }

    /// A device record's value, as [`Holder::record`] writes it.
    fn parse(record: &str) -> Option<Holder> {
        let (station, session) = record.split_once(' ')?;
        Some(Holder { station: station.parse().ok()?, session: session.to_owned() })
    }
}

/// A session this station holds, for [`Registry::renew`].
pub(super) struct Held {
    pub session: SessionId,
    pub device: String,
    /// Heard from lately: only such a session may put its device's record
    /// back after the store lost it.
    pub active: bool,
}

enum Health {
    Up,
    Down { retry_at: Instant },
}

/// The registry, over TCP to the store, or in the tests over a pipe.
pub(super) struct Registry<S = smol::net::TcpStream> {
    store: StoreAddr,
    /// This station, as the other stations reach it.
    me: SocketAddr,
    ttl: Duration,
    conn: smol::lock::Mutex<Option<Resp<S>>>,
    health: Mutex<Health>,
    /// Notified when the store is back after an outage, so that every
    /// record is written again at once.
    rejoined: Event,
}

impl<S: Dial> Registry<S> {
    pub(super) fn new(store: StoreAddr, me: SocketAddr, ttl: Duration) -> Self {
        Registry {
            store,
            me,
            ttl,
            conn: smol::lock::Mutex::new(None),
            health: Mutex::new(Health::Up),
            rejoined: Event::new(),
        }
    }

    /// This station's address in the registry.
    pub(super) fn me(&self) -> SocketAddr {
        self.me
    }

    /// The store, for logs.
    pub(super) fn store(&self) -> &StoreAddr {
        &self.store
    }

    /// Whether the last call reached the store.
    pub(super) fn is_up(&self) -> bool {
        matches!(*lock(&self.health), Health::Up)
    }

    /// Records that this station now holds `session` of `device`.
    pub(super) async fn claim(&self, session: &SessionId, device: &str) {
        let (ttl, me) = (self.ttl.as_secs().to_string(), self.me.to_string());
        let (session_key, device_key) = (session_key(session), device_key(device));
        let holder = Holder::record(self.me, session);
        let _ = self
            .run(&[
                &["SET", &session_key, &me, "EX", &ttl],
                &["SET", &device_key, &holder, "EX", &ttl],
            ])
            .await;
    }

    /// Removes the records of a session that ended here.
    pub(super) async fn release(&self, session: &SessionId, device: &str) {
        let me = self.me.to_string();
        let holder = Holder::record(self.me, session);
        let _ = self
            .run(&[
                &["EVAL", RELEASE, "1", &session_key(session), &me],
                &["EVAL", RELEASE, "1", &device_key(device), &holder],
            ])
            .await;
    }

    /// The station holding `session`, if the registry knows one.
    pub(super) async fn session_holder(
        &self,
        session: &SessionId,
    ) -> Result<Option<SocketAddr>, StoreError> {
        let reply = self.run(&[&["GET", &session_key(session)]]).await?;
        Ok(reply.first().and_then(Reply::text).and_then(|text| text.parse().ok()))
    }

    /// The station holding `device`'s newest session, if the registry knows one.
    pub(super) async fn device_holder(&self, device: &str) -> Result<Option<Holder>, StoreError> {
        let reply = self.run(&[&["GET", &device_key(device)]]).await?;
        Ok(reply.first().and_then(Reply::text).as_deref().and_then(Holder::parse))
    }

    /// Writes the records of every session held here again, for another
    /// `record_ttl`.
    pub(super) async fn renew(&self, held: &[Held]) {
        let (ttl, me) = (self.ttl.as_secs().to_string(), self.me.to_string());
        let keys: Vec<(String, String, String, bool)> = held
            .iter()
            .map(|h| {
                let holder = Holder::record(self.me, &h.session);
                (session_key(&h.session), device_key(&h.device), holder, h.active)
            })
            .collect();
        if keys.is_empty() {
            // Nothing to renew, but the store's going away (or coming
            // back) is still noticed and logged when it happens.
            let _ = self.run(&[&["PING"]]).await;
            return;
        }
        for batch in keys.chunks(RENEW_BATCH / 2) {
            let mut commands: Vec<Vec<&str>> = Vec::with_capacity(2 * batch.len());
            for (session_key, device_key, holder, active) in batch {
                commands.push(vec!["SET", session_key, &me, "EX", &ttl]);
                if *active {
                    commands.push(vec!["EVAL", KEEP, "1", device_key, holder, &ttl]);
                }
            }
            let commands: Vec<&[&str]> = commands.iter().map(Vec::as_slice).collect();
            if self.run(&commands).await.is_err() {
                return;
            }
        }
    }

    /// Waits until the next renewal is due: a third of the record's life,
    /// or at once when the store comes back after an outage.
    pub(super) async fn renewal_due(&self) {
        let listener = self.rejoined.listen();
        futures_lite::future::or(
            async {
                smol::Timer::after(self.ttl / 3).await;
            },
            listener,
        )
        .await;
    }

    /// Runs `commands` on the store, connecting first if need be; logs the
    /// store's going away and coming back, once each.
    async fn run(&self, commands: &[&[&str]]) -> Result<Vec<Reply>, StoreError> {
        let resting = || match *lock(&self.health) {
            Health::Down { retry_at } => Instant::now() < retry_at,
            Health::Up => false,
        };
        if resting() {
            return Err(StoreError::Unavailable);
        }
        let mut conn = self.conn.lock().await;
        // Calls queued behind one that just found the store gone fail at
        // once, rather than each waiting out its own timeout (a hanging
        // store would otherwise hold every handshake for seconds in turn).
        if resting() {
            return Err(StoreError::Unavailable);
        }
        let result = async {
            if conn.is_none() {
                let password = self.store.password.as_deref();
                let mut fresh = Resp::connect(&self.store.host_port, password).await?;
                if self.store.db != 0 {
                    fresh.run(&[&["SELECT", &self.store.db.to_string()]]).await?;
                }
                *conn = Some(fresh);
            }
            conn.as_mut().expect("connected above").run(commands).await
        }
        .await;
        let mut health = lock(&self.health);
        match (&result, &*health) {
            (Ok(_), Health::Down { .. }) => {
                log::info!(
                    "cluster store {} reachable again: writing this station's records; \
                     requests for sessions on other stations are forwarded again",
                    self.store
                );
                *health = Health::Up;
                self.rejoined.notify(usize::MAX);
            }
            (Err(e), Health::Up) => {
                log::warn!(
                    "cluster store {} unreachable ({e}): serving as a stand-alone station; \
                     requests for sessions on other stations get 410 (their agents start \
                     new sessions) and reverse clients reach only devices held here; \
                     retrying every {} s",
                    self.store,
                    RETRY_EVERY.as_secs()
                );
                *health = Health::Down { retry_at: Instant::now() + RETRY_EVERY };
            }
            (Err(_), Health::Down { .. }) => {
                *health = Health::Down { retry_at: Instant::now() + RETRY_EVERY };
            }
            (Ok(_), Health::Up) => {}
        }
        if result.is_err() {
            // An unanswered pipeline leaves replies in flight: start afresh.
            *conn = None;
        }
        result
    }
}

fn session_key(session: &SessionId) -> String {
    format!("postern:session:{}", carrier::hex(session))
}

fn device_key(device: &str) -> String {
    format!("postern:device:{device}")
}

#[cfg(test)]
mod tests {
    use futures_lite::future::{block_on, poll_once};

    use super::*;
    use crate::carrier::harness::End;
    use crate::station::fixture::scripted_store;

    const TTL: Duration = Duration::from_secs(30);

    fn me() -> SocketAddr {
        "192.0.2.1:7001".parse().unwrap()
    }

    /// A registry connected to a store that answers with `replies`; and
    /// the store's end of the connection.
    fn connected(replies: &[u8]) -> (Registry<End>, End) {
        let store = StoreAddr { host_port: "store:6379".into(), password: None, db: 0 };
        let registry = Registry::new(store, me(), TTL);
        let (resp, store) = scripted_store(replies);
        *registry.conn.try_lock().expect("no call runs yet") = Some(resp);
        (registry, store)
    }

    /// The commands a store received, each as its parts (RESP arrays of
    /// bulk strings, as `resp::encode` writes them).
    fn commands(sent: &[u8]) -> Vec<Vec<String>> {
        let text = String::from_utf8(sent.to_vec()).expect("the registry sends text");
        let mut lines = text.split("\r\n");
        let mut commands = Vec::new();
        while let Some(count) = lines.next().and_then(|l| l.strip_prefix('*')) {
            let parts = (0..count.parse().expect("a count"))
                .map(|_| {
                    let len: usize = lines
                        .next()
                        .and_then(|l| l.strip_prefix('$'))
                        .expect("a length")
                        .parse()
                        .expect("a number");
                    let part = lines.next().expect("a part").to_owned();
                    assert_eq!(part.len(), len);
                    part
                })
                .collect();
            commands.push(parts);
        }
        commands
    }

    fn owned(commands: &[&[&str]]) -> Vec<Vec<String>> {
        commands.iter().map(|c| c.iter().map(|p| p.to_string()).collect()).collect()
    }

    const SESSION: SessionId = [0xab; 16];
    const SESSION_HEX: &str = "abababababababababababababababab";

    #[test]
    fn a_claim_writes_both_records_for_the_records_life() {
        let (registry, store) = connected(b"+OK\r\n+OK\r\n");
        block_on(registry.claim(&SESSION, "pump-17"));
        let holder = format!("192.0.2.1:7001 {SESSION_HEX}");
        assert_eq!(
            commands(&store.received()),
            owned(&[
                &["SET", &format!("postern:session:{SESSION_HEX}"), "192.0.2.1:7001", "EX", "30"],
                &["SET", "postern:device:pump-17", &holder, "EX", "30"],
            ])
        );
        assert!(registry.is_up());
    }

    #[test]
    fn a_release_removes_only_the_records_that_still_name_this_station() {
        let (registry, store) = connected(b":1\r\n:0\r\n");
        block_on(registry.release(&SESSION, "pump-17"));
        let holder = format!("192.0.2.1:7001 {SESSION_HEX}");
        let session_key = format!("postern:session:{SESSION_HEX}");
        assert_eq!(
            commands(&store.received()),
            owned(&[
                &["EVAL", RELEASE, "1", &session_key, "192.0.2.1:7001"],
                &["EVAL", RELEASE, "1", "postern:device:pump-17", &holder],
            ])
        );
    }

    #[test]
    fn holders_are_read_from_the_records_and_a_missing_one_is_none() {
        let (registry, store) = connected(b"$13\r\n10.0.0.2:7001\r\n$-1\r\n$6\r\nnot me\r\n");
        let held = block_on(registry.session_holder(&SESSION)).expect("an answer");
        assert_eq!(held, Some("10.0.0.2:7001".parse().unwrap()));
        assert_eq!(block_on(registry.session_holder(&SESSION)).expect("an answer"), None);
        assert_eq!(block_on(registry.device_holder("pump-17")).expect("an answer"), None);
        let session_key = format!("postern:session:{SESSION_HEX}");
        assert_eq!(
            commands(&store.received()),
            owned(&[
                &["GET", &session_key],
                &["GET", &session_key],
                &["GET", "postern:device:pump-17"]
            ])
        );
        let record = format!("10.0.0.2:7001 {SESSION_HEX}");
        let reply = format!("${}\r\n{record}\r\n", record.len());
        let (registry, _) = connected(reply.as_bytes());
        let holder = block_on(registry.device_holder("pump-17")).expect("an answer");
        let want =
            Holder { station: "10.0.0.2:7001".parse().unwrap(), session: SESSION_HEX.into() };
        assert_eq!(holder, Some(want));
    }

    /// Every held session's record is renewed; its device's only if the
    /// session is heard from, and only where the record still names it.
    #[test]
    fn a_renewal_writes_every_session_and_the_devices_of_active_ones() {
        let (registry, store) = connected(b"+OK\r\n:1\r\n+OK\r\n");
        let quiet = [0x01; 16];
        let held = [
            Held { session: SESSION, device: "pump-17".into(), active: true },
            Held { session: quiet, device: "gate-2".into(), active: false },
        ];
        block_on(registry.renew(&held));
        let holder = format!("192.0.2.1:7001 {SESSION_HEX}");
        assert_eq!(
            commands(&store.received()),
            owned(&[
                &["SET", &format!("postern:session:{SESSION_HEX}"), "192.0.2.1:7001", "EX", "30"],
                &["EVAL", KEEP, "1", "postern:device:pump-17", &holder, "30"],
                &["SET", &session_key(&quiet), "192.0.2.1:7001", "EX", "30"],
            ])
        );
        // Nothing held: the store is still asked after, so its state is known.
        let (registry, store) = connected(b"+PONG\r\n");
        block_on(registry.renew(&[]));
        assert_eq!(commands(&store.received()), owned(&[&["PING"]]));
    }

    /// A store that fails a call is rested: calls fail at once, without a
    /// connection, until the retry is due; the store's return wakes the
    /// renewals so every record is written again.
    #[test]
    fn a_failing_store_is_rested_and_its_return_wakes_the_renewals() {
        let (registry, store) =
            connected(b"-READONLY You can't write against a read only replica.\r\n");
        block_on(registry.claim(&SESSION, "pump-17"));
        assert!(!registry.is_up());
        assert_eq!(commands(&store.received()).len(), 2);
        let resting = block_on(registry.session_holder(&SESSION));
        assert!(matches!(resting, Err(StoreError::Unavailable)), "{resting:?}");
        assert!(registry.conn.try_lock().expect("no call runs").is_none(), "the connection went");

        // The retry is due, the store answers again.
        *lock(&registry.health) = Health::Down { retry_at: Instant::now() };
        let (resp, store) = scripted_store(b"+PONG\r\n");
        *registry.conn.try_lock().expect("no call runs") = Some(resp);
        let rejoined = registry.rejoined.listen();
        block_on(registry.renew(&[]));
        assert_eq!(commands(&store.received()), owned(&[&["PING"]]));
        assert!(registry.is_up());
        assert!(block_on(poll_once(rejoined)).is_some(), "the renewals were woken");
        // The retry is due and the store is away still: tried, and failed
        // with what the connect met.
        *lock(&registry.health) = Health::Down { retry_at: Instant::now() };
        let failed = block_on(registry.session_holder(&SESSION));
        assert!(matches!(failed, Err(StoreError::Io(_))), "{failed:?}");
    }

    #[test]
    fn records_are_keyed_by_session_hex_and_device_name() {
        let mut session = [0u8; 16];
        session[0] = 0xab;
        session[15] = 0x01;
        assert_eq!(session_key(&session), "postern:session:ab000000000000000000000000000001");
        assert_eq!(device_key("pump-17"), "postern:device:pump-17");
    }

    #[test]
    fn a_device_record_names_its_station_and_session() {
        let holder = Holder::parse("10.0.0.2:7001 ab01").expect("a record");
        assert_eq!(holder.station, "10.0.0.2:7001".parse().unwrap());
        assert_eq!(holder.session, "ab01");
        let v6 = Holder::parse("[2001:db8::2]:7001 ab01").expect("a record");
        assert_eq!(v6.station, "[2001:db8::2]:7001".parse().unwrap());
        // What a claim writes is what is read back.
        let me: SocketAddr = "192.0.2.1:7001".parse().unwrap();
        let session = [7; 16];
        let written = Holder::record(me, &session);
        assert_eq!(written, "192.0.2.1:7001 07070707070707070707070707070707");
        let read = Holder::parse(&written).expect("a record");
        assert_eq!(read, Holder { station: me, session: carrier::hex(&session) });
        for broken in ["", "10.0.0.2:7001", "station-b:7001 ab01", "10.0.0.2 ab01"] {
            assert_eq!(Holder::parse(broken), None, "{broken:?}");
        }
    }
}
