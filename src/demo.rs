//! `postern demo`: a station, an agent and an echo target on loopback, with
//! fresh keys and nothing to configure.
//!
//! ```text
//!  demo client ─tcp─▶ agent forward ═HTTP═▶ station ─tcp─▶ echo target
//!       ▲                                                      │
//!       └──────────────── the same bytes, hashed ◀─────────────┘
//! ```
//!
//! The demo pushes a known amount of pseudo-random bytes through the tunnel
//! and back, hashes what it sent and what returned (BLAKE2s), and reports
//! the carrier, the byte count, whether the hashes match, and the rate.
//! Tests and benchmarks use [`Lab`] to get the same setup.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use smol::net::{TcpListener, TcpStream};
use snow::types::Hash;

use crate::agent::Agent;
use crate::carrier;
use crate::config::{
    AgentConfig, AgentTls, CarrierKind, DeviceConfig, Forward, ForwardSource, StationConfig,
    StationUrl, DEFAULT_KEEPALIVE, DEFAULT_SESSION_TIMEOUT,
};
use crate::crypto::Blake2s;
use crate::keys::PrivateKey;
use crate::station::Station;
use crate::task::Scope;

/// Bytes the demo sends through the tunnel unless told otherwise.
pub const DEFAULT_BYTES: u64 = 8 << 20;

/// Bytes per write of the demo client: a typical application buffer.
const WRITE_SIZE: usize = 64 * 1024;

/// Longest the demo transfer may take before it is called a failure; ample
/// for the default size over loopback even on a slow board.
const TRANSFER_LIMIT: Duration = Duration::from_secs(120);

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    #[error("cannot start the demo's {what}: {source}")]
    Start { what: &'static str, source: std::io::Error },
    #[error(transparent)]
    Station(#[from] crate::station::Error),
    #[error(transparent)]
    Agent(#[from] crate::agent::Error),
    #[error("transfer through the tunnel failed: {0}")]
    Transfer(std::io::Error),
    #[error("transfer did not finish within {} s", TRANSFER_LIMIT.as_secs())]
    Timeout,
}

/// What one round trip through the tunnel showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub carrier: CarrierKind,
    pub bytes_sent: u64,
    pub bytes_back: u64,
    pub hash_sent: String,
    pub hash_back: String,
    pub elapsed: Duration,
}

impl Report {
    /// Every byte came back, unchanged.
    pub fn verified(&self) -> bool {
        self.bytes_sent == self.bytes_back && self.hash_sent == self.hash_back
    }

    /// Bytes per second one way (each byte crossed the tunnel twice).
    pub fn rate(&self) -> f64 {
        self.bytes_back as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let carrier = format!("{:?}", self.carrier).to_ascii_lowercase();
        writeln!(f, "carrier:  {carrier}")?;
        writeln!(f, "sent:     {} bytes, blake2s {}", self.bytes_sent, &self.hash_sent[..16])?;
        writeln!(f, "returned: {} bytes, blake2s {}", self.bytes_back, &self.hash_back[..16])?;
        let verdict = if self.verified() { "verified: every byte came back" } else { "MISMATCH" };
        writeln!(f, "hash:     {verdict}")?;
        write!(
            f,
            "rate:     {:.1} MB/s each way ({:.2} s)",
            self.rate() / 1e6,
            self.elapsed.as_secs_f64()
        )
    }
}

/// A streaming BLAKE2s hash: the one the Noise handshake uses.
#[derive(Default)]
pub struct Digest(Blake2s);

impl Digest {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.input(bytes);
    }

    /// The hash in hex.
    pub fn finish(mut self) -> String {
        let mut out = [0u8; 32];
        self.0.result(&mut out);
        out.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Deterministic bytes that do not compress: a test pattern for transfers.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// A station, an agent and an echo target on loopback, owned together:
/// dropping the lab stops all of them.
pub struct Lab {
    /// The agent's forward listener, carried to the echo target.
    pub forward: SocketAddr,
    /// The station's HTTP carrier listener.
    pub station: SocketAddr,
    pub carrier: CarrierKind,
    _scope: Scope,
}

impl Lab {
    /// Starts the three parts on ephemeral loopback ports.
    pub async fn start(carrier: CarrierKind) -> Result<Lab, DemoError> {
        let scope = Scope::new();
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let echo = TcpListener::bind(loopback)
            .await
            .map_err(|source| DemoError::Start { what: "echo target", source })?;
        let echo_addr =
            echo.local_addr().map_err(|source| DemoError::Start { what: "echo target", source })?;
        scope.spawn(serve_echo(echo));

        let station_key = PrivateKey::generate();
        let agent_key = PrivateKey::generate();
        let station = Station::bind(StationConfig {
            listen: loopback,
            private_key: station_key.clone(),
            next_private_key: None,
            status: None,
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            targets: BTreeMap::from([("echo".to_owned(), echo_addr.to_string())]),
            devices: vec![DeviceConfig {
                name: "demo-device".to_owned(),
                public_keys: vec![agent_key.public_key()],
                allow: vec!["echo".to_owned()],
                expose: BTreeMap::new(),
            }],
            tls: None,
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
            cluster: None,
        })
        .await?;
        let station_addr = station.local_addr();
        scope.spawn(station.run());

        let agent = Agent::bind(AgentConfig {
            station: StationUrl {
                https: false,
                host: Ipv4Addr::LOCALHOST.to_string(),
                port: station_addr.port(),
                path_prefix: "/".to_owned(),
            },
            station_public_keys: vec![station_key.public_key()],
            private_key: agent_key,
            proxy: None,
            carrier,
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            keepalive: DEFAULT_KEEPALIVE,
            poll_hold: carrier::poll::POLL_WAIT,
            stream_retry: carrier::auto::STREAM_RETRY,
            forwards: vec![Forward {
                source: ForwardSource::Listen(loopback),
                target: "echo".to_owned(),
            }],
            services: BTreeMap::new(),
            status: None,
            tls: AgentTls::default(),
        })
        .await?;
        let forward = agent.forward_addrs()[0];
        scope.spawn(agent.run());
        Ok(Lab { forward, station: station_addr, carrier, _scope: scope })
    }

    /// Sends `bytes` through the tunnel to the echo target and reads them
    /// back, hashing both.
    pub async fn round_trip(&self, bytes: u64) -> Result<Report, DemoError> {
        let work = round_trip(self.forward, bytes, self.carrier);
        future::or(work, async {
            smol::Timer::after(TRANSFER_LIMIT).await;
            Err(DemoError::Timeout)
        })
        .await
    }
}

async fn serve_echo(listener: TcpListener) {
    let scope = Scope::new();
    while let Ok((socket, _)) = listener.accept().await {
        scope.spawn(async move {
            let _ = socket.set_nodelay(true);
            let reader = socket.clone();
            let mut writer = socket.clone();
            let _ = futures_lite::io::copy(reader, &mut writer).await;
            let _ = socket.shutdown(std::net::Shutdown::Write);
        });
    }
}

async fn round_trip(
    forward: SocketAddr,
    bytes: u64,
    carrier: CarrierKind,
) -> Result<Report, DemoError> {
    let started = Instant::now();
    let socket = TcpStream::connect(forward).await.map_err(DemoError::Transfer)?;
    let _ = socket.set_nodelay(true);
    let mut writer = socket.clone();
    let mut reader = socket;
    let send = async {
        let mut digest = Digest::default();
        let mut pattern = Pattern::new(bytes);
        let mut buf = vec![0u8; WRITE_SIZE];
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left).map_or(WRITE_SIZE, |l| l.min(WRITE_SIZE));
            pattern.fill(&mut buf[..n]);
            digest.update(&buf[..n]);
            writer.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        writer.close().await?;
        Ok::<_, std::io::Error>(digest.finish())
    };
    let receive = async {
        let mut digest = Digest::default();
        let mut buf = vec![0u8; WRITE_SIZE];
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            digest.update(&buf[..n]);
            total += n as u64;
        }
        Ok::<_, std::io::Error>((total, digest.finish()))
    };
    let (hash_sent, (bytes_back, hash_back)) =
        future::try_zip(send, receive).await.map_err(DemoError::Transfer)?;
    Ok(Report {
        carrier,
        bytes_sent: bytes,
        bytes_back,
        hash_sent,
        hash_back,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_blake2s() {
        // BLAKE2s-256 of the empty string (RFC 7693 test vectors' family).
        assert_eq!(
            Digest::default().finish(),
            "69217a3079908094e11121d042354a7c1f55b6482ca1a51e1b250dfd1ed0eef9"
        );
    }

    #[test]
    fn pattern_is_deterministic_for_any_split() {
        let mut whole = vec![0u8; 100];
        Pattern::new(5).fill(&mut whole);
        let mut split = vec![0u8; 100];
        let mut p = Pattern::new(5);
        p.fill(&mut split[..40]);
        p.fill(&mut split[40..]);
        assert_eq!(whole, split);
    }
}
