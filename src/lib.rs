//! postern: TCP and serial byte streams through firewalls that only let HTTP out.
//!
//! ```text
//!  device process ─tcp─▶ endpoint ─▶ streams ─▶ session ─▶ crypto ─▶ carrier ══HTTP══▶ station …
//!                        (agent)    credit     seq/ack    Noise IK   stream | poll
//! ```
//!
//! The [`core`] (streams and session) does no I/O and takes time as a
//! parameter; [`tunnel`] drives it with smol; [`agent`] and [`station`] own
//! the sockets, the carrier connections and the tasks.
#![forbid(unsafe_code)]

#[cfg(any(feature = "agent", feature = "station"))]
pub mod accept;
#[cfg(feature = "station")]
pub mod admission;
#[cfg(feature = "agent")]
pub mod agent;
pub mod carrier;
pub mod config;
#[cfg(any(feature = "agent", feature = "station"))]
pub mod connect;
pub mod core;
pub mod crypto;
#[cfg(all(feature = "agent", feature = "station"))]
pub mod demo;
pub mod endpoint;
pub mod keys;
pub mod logger;
#[cfg(any(feature = "agent", feature = "station"))]
pub mod notify;
#[cfg(feature = "station")]
pub mod station;
#[cfg(any(feature = "agent", feature = "station"))]
pub mod status;
pub mod task;
pub mod tunnel;

/// The cargo features this build has, as `--version` and the station's
/// `postern_build_info` tell them: what a board build left out is the first
/// thing to ask about.
pub const FEATURES: &[&str] = &[
    #[cfg(feature = "agent")]
    "agent",
    #[cfg(feature = "station")]
    "station",
    #[cfg(feature = "tls")]
    "tls",
    #[cfg(feature = "tls12")]
    "tls12",
    #[cfg(feature = "ntlm")]
    "ntlm",
    #[cfg(feature = "ring")]
    "ring",
];

/// The git commit this build was made from (build.rs), or `unknown` when
/// built outside a git checkout without `POSTERN_COMMIT` set.
pub const COMMIT: &str = env!("POSTERN_COMMIT");
