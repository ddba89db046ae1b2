//! The station's own TLS (`tls_cert_file`, `tls_key_file`): the hook
//! between accepting a TCP connection and reading HTTP from it, and the
//! certificate's reload on SIGHUP. Without those settings (or in a build
//! without the `tls` feature) connections pass through as plain TCP.
//!
//! Not here: the TLS setup itself (`carrier::tls`), the accept loop
//! (`mod.rs`), the requests (`requests`).

use std::time::Duration;

use smol::net::TcpStream;

use crate::carrier::link::Link;
#[cfg(feature = "tls")]
use crate::carrier::tls::ServerTls;
use crate::config::StationConfig;

/// Why the station's TLS could not be set up at start.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsStartError(String);

/// TLS on the carrier listener, or none.
pub(super) struct ListenerTls {
    #[cfg(feature = "tls")]
    server: Option<ServerTls>,
}

impl ListenerTls {
    pub(super) fn new(config: &StationConfig) -> Result<ListenerTls, TlsStartError> {
        #[cfg(feature = "tls")]
        {
            let server = match &config.tls {
                Some(files) => Some(
                    ServerTls::load(&files.cert_file, &files.key_file)
                        .map_err(|e| TlsStartError(e.to_string()))?,
                ),
                None => None,
            };
            Ok(ListenerTls { server })
        }
        #[cfg(not(feature = "tls"))]
        match &config.tls {
            Some(_) => Err(TlsStartError("this build has no TLS (cargo feature `tls`)".into())),
            None => Ok(ListenerTls {}),
        }
    }

    /// For the end of the startup line.
    pub(super) fn describe(&self) -> &'static str {
        #[cfg(feature = "tls")]
        if self.server.is_some() {
            return " over TLS";
        }
        ""
    }

    /// The TLS handshake of a freshly accepted connection, within `limit`
    /// (it holds an admission slot meanwhile, as a slow head would).
    pub(super) async fn accept(&self, socket: TcpStream, limit: Duration) -> std::io::Result<Link> {
        #[cfg(feature = "tls")]
        if let Some(server) = &self.server {
            let timeout = async {
                smol::Timer::after(limit).await;
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))
            };
            return futures_lite::future::or(server.accept(socket), timeout).await;
        }
        let _ = limit;
        Ok(Link::Plain(socket))
    }

    /// On reload: reads the certificate and key again (a renewed
    /// certificate). Returns the line for the reload's list of changes;
    /// on error the old certificate stays and the line says why.
    pub(super) fn reload(&self, config: &StationConfig) -> Option<String> {
        #[cfg(feature = "tls")]
        match (&self.server, &config.tls) {
            (Some(server), Some(files)) if server.same_files(&files.cert_file, &files.key_file) => {
                Some(match server.reload() {
                    Ok(()) => {
                        format!("TLS certificate read again from {}", files.cert_file.display())
                    }
                    Err(e) => format!("TLS certificate NOT reloaded, the old one stays: {e}"),
                })
            }
            (None, None) => None,
            _ => Some("tls_cert_file or tls_key_file changed: restart the station to apply".into()),
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = config;
            None
        }
    }
}
