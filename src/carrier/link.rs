//! The byte stream a carrier connection runs over: a plain TCP socket, or
//! TLS on one (an `https://` station seen from the agent, or a station that
//! terminates TLS itself).
//!
//! ```text
//!  HttpConn<Link> ─▶ Link::Plain(tcp)                      http://
//!                 ├▶ Link::Client(TLS client over tcp)     agent, https:// (maybe inside CONNECT)
//!                 ├▶ Link::Server(TLS server over tcp)     station, tls_cert_file
//!                 └▶ Link::Memory(in-memory pipe)          unit tests and fuzz targets only
//! ```
//!
//! One enum rather than a generic parameter, so the agent's and station's
//! code above it is written once whichever the config chose. A link clones
//! like a TCP socket does (the agent's `up` lane writes on one clone while
//! it reads the answer on another): a TLS session is one state for both
//! directions, so its clones share it behind a lock taken for one poll at
//! a time, never across an await.
//!
//! TLS holds ciphertext it could not write yet until the next write or
//! flush: writers of a link flush after each message (`HttpConn::write_all`
//! does), else the last message of a burst would wait for the next.
//!
//! Not here: how TLS is set up and verified ([`super::tls`]).

use std::io;
use std::pin::Pin;
#[cfg(feature = "tls")]
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use smol::net::TcpStream;

/// A carrier connection's transport.
#[derive(Clone)]
pub enum Link {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Client(Arc<Mutex<futures_rustls::client::TlsStream<TcpStream>>>),
    #[cfg(all(feature = "tls", feature = "station"))]
    Server(Arc<Mutex<futures_rustls::server::TlsStream<TcpStream>>>),
    /// A test's in-memory connection, so that what runs over a link (the
    /// station's requests) is tested without sockets. Never shipped.
    #[cfg(any(test, feature = "fuzzing"))]
    Memory(super::harness::End),
}

impl Link {
    /// Whether TLS runs on this connection.
    #[must_use]
    pub fn is_tls(&self) -> bool {
        match self {
            Link::Plain(_) => false,
            #[cfg(feature = "tls")]
            Link::Client(_) => true,
            #[cfg(all(feature = "tls", feature = "station"))]
            Link::Server(_) => true,
            #[cfg(any(test, feature = "fuzzing"))]
            Link::Memory(_) => false,
        }
    }
}

/// Calls `$call` on whichever stream the link holds, a TLS one locked for
/// the call.
macro_rules! each {
    ($link:expr, $stream:ident => $call:expr) => {
        match $link {
            Link::Plain($stream) => $call,
            #[cfg(any(test, feature = "fuzzing"))]
            Link::Memory($stream) => $call,
            #[cfg(feature = "tls")]
            Link::Client(shared) => {
                let $stream = &mut *shared.lock().unwrap_or_else(|p| p.into_inner());
                $call
            }
            #[cfg(all(feature = "tls", feature = "station"))]
            Link::Server(shared) => {
                let $stream = &mut *shared.lock().unwrap_or_else(|p| p.into_inner());
                $call
            }
        }
    };
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_close(cx))
    }
}

#[cfg(test)]
mod tests {
    use futures_lite::future::block_on;
    use futures_lite::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::carrier::harness::pipe;

    /// A link's clones are one connection, as a socket's are: what one
    /// writes the peer reads once, and closing one ends the writing half.
    #[test]
    fn a_links_clones_share_one_connection() {
        let (near, far) = pipe();
        let link = Link::Memory(near);
        assert!(!link.is_tls());
        let (mut writer, mut reader) = (link.clone(), link);
        block_on(async {
            writer.write_all(b"request").await.expect("written");
            let mut far = far;
            let mut got = [0; 7];
            far.read_exact(&mut got).await.expect("read");
            assert_eq!(&got, b"request");
            far.write_all(b"answer").await.expect("written");
            far.close().await.expect("closed");
            let mut answer = Vec::new();
            reader.read_to_end(&mut answer).await.expect("read to the end");
            assert_eq!(answer, b"answer");
            writer.close().await.expect("closed");
            assert!(far.peer_closed());
            assert_eq!(far.read(&mut got).await.expect("EOF"), 0);
        });
    }
}
