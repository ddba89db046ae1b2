//! What the station's unit tests build on: a station that binds nothing,
//! a session held by it, and a connection served over an in-memory pipe
//! whose client has sent all it will.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_lite::future::block_on;
use futures_lite::AsyncWriteExt;

use super::expose::Exposes;
use super::requests::{serve, Via};
use super::resp::{Dial, Resp, StoreError};
use super::tls::ListenerTls;
use super::{lock, Live, Shared};
use crate::carrier::harness::{pipe, End};
use crate::carrier::link::Link;
use crate::config::StationConfig;
use crate::core::session::Limits;
use crate::core::streams::Side;
use crate::crypto::{session_pair, SessionId};
use crate::keys::PrivateKey;
use crate::tunnel::Tunnel;

/// Where the tests' requests come from (TEST-NET-1).
pub(super) fn client() -> SocketAddr {
    ([192, 0, 2, 7], 40_000).into()
}

/// The device [`station`] knows.
pub(super) const DEVICE: &str = "pump-17";

/// The config of a station that knows [`DEVICE`], with `settings` among
/// its top-level ones.
pub(super) fn config(key: &PrivateKey, settings: &str) -> StationConfig {
    let text = format!(
        "listen = \"127.0.0.1:8080\"\nprivate_key = \"{}\"\n{settings}\n[[devices]]\n\
         name = \"{DEVICE}\"\npublic_key = \"{}\"\n",
        key.to_base64(),
        PrivateKey::generate().public_key().to_base64()
    );
    StationConfig::parse(&text, "station.toml").expect("a valid station config")
}

/// A station for `config`, with no listener: nothing binds.
pub(super) fn station_for(config: &StationConfig) -> Arc<Shared> {
    let tls = ListenerTls::new(config).expect("no TLS configured");
    Shared::new(config, Limits::default(), Exposes::default(), tls, None)
}

/// A station with a fresh key that knows [`DEVICE`].
pub(super) fn station() -> Arc<Shared> {
    station_for(&config(&PrivateKey::generate(), ""))
}

/// A session of [`DEVICE`] that `shared` holds, and the agent's end of it.
pub(super) fn session(shared: &Shared) -> (SessionId, Arc<Live>, Arc<Tunnel>) {
    let (agent_keys, station_keys) = session_pair();
    let (agent, _) = Tunnel::new(Side::Agent, agent_keys, Limits::default());
    let (tunnel, _) = Tunnel::new(Side::Station, station_keys, Limits::default());
    let id: SessionId = [0x5a; 16];
    let device_key = PrivateKey::generate().public_key();
    let live = Live::new(id, device_key, DEVICE.to_owned(), tunnel, client());
    lock(&shared.sessions).insert(id, live.clone());
    (id, live, agent)
}

/// Serves `request` on a fresh connection that came in `via`, its client
/// closing its sending half after it; everything the station answered.
/// The closed pipe ends every wait for more, so nothing waits on a timer.
pub(super) fn exchange(shared: &Arc<Shared>, via: Via, request: &[u8]) -> Vec<u8> {
    let (agent, station) = pipe();
    block_on(async {
        let mut sending = agent.clone();
        sending.write_all(request).await.expect("the pipe takes everything");
        sending.close().await.expect("the pipe closes");
    });
    let slot = shared.slots.take().expect("a free connection slot");
    let link = futures_lite::future::ready(Ok(Link::Memory(station)));
    block_on(serve(shared.clone(), link, client(), slot, via));
    agent.received()
}

/// The refusals counted so far, by reason.
pub(super) fn refusals(shared: &Shared) -> BTreeMap<&'static str, u64> {
    lock(&shared.counters.rejected).clone()
}

/// A test's store is reached only over the pipe it scripted: no other
/// connection can be made.
impl Dial for End {
    async fn dial(_: &str) -> Result<End, StoreError> {
        Err(StoreError::Io(std::io::ErrorKind::ConnectionRefused.into()))
    }
}

/// A connection to a store that answers with `replies`, whatever it is
/// sent, then closes; and the store's end, which holds what was sent.
pub(super) fn scripted_store(replies: &[u8]) -> (Resp<End>, End) {
    let (client, store) = pipe();
    block_on(async {
        let mut answering = store.clone();
        answering.write_all(replies).await.expect("the pipe takes everything");
        answering.close().await.expect("the pipe closes");
    });
    (Resp::over(client), store)
}
