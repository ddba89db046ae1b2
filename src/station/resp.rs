//! A Redis client for the few commands the session registry sends: RESP2
//! over one TCP connection, commands pipelined, every reply bounded.
//!
//! Redis and Valkey speak the same protocol. Written here rather than
//! taken from the `redis` crate because that one runs on tokio or
//! async-std, and the registry needs five commands and three reply shapes.

use std::time::Duration;

use futures_lite::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use futures_lite::{AsyncBufReadExt, AsyncRead, AsyncWrite};
use smol::net::TcpStream;

use crate::connect::{connect, ConnectError};

/// Longest reply line or bulk string taken from the store: the registry's
/// values are station addresses and session ids, far shorter.
const MAX_REPLY_BYTES: usize = 4096;

/// Longest a store command may take, connect included, before the store
/// counts as unreachable.
pub(super) const STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reply {
    /// `+OK` and the like.
    Status(String),
    Integer(i64),
    /// A bulk string; `None` is the nil reply (no such key).
    Bulk(Option<Vec<u8>>),
}

impl Reply {
    /// The reply as text, if it is a string.
    pub(super) fn text(&self) -> Option<String> {
        match self {
            Reply::Status(text) => Some(text.clone()),
            Reply::Bulk(Some(bytes)) => String::from_utf8(bytes.clone()).ok(),
            Reply::Bulk(None) | Reply::Integer(_) => None,
        }
    }
}

/// Why a store command failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum StoreError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {} s", STORE_TIMEOUT.as_secs())]
    Timeout,
    /// The store answered with an error reply (`-ERR ...`).
    #[error("the store refused: {0}")]
    Refused(String),
    #[error("not a Redis reply: {0}")]
    Protocol(&'static str),
    /// The last attempt failed moments ago; not tried again yet.
    #[error("unreachable a moment ago")]
    Unavailable,
}

/// How a connection to the store is made: TCP, or in the tests a pipe
/// they script the store's side of.
pub(super) trait Dial: AsyncRead + AsyncWrite + Unpin + Sized {
    /// Connects to `addr` ("host:port") within [`STORE_TIMEOUT`].
    fn dial(addr: &str) -> impl std::future::Future<Output = Result<Self, StoreError>> + Send;
}

impl Dial for TcpStream {
    async fn dial(addr: &str) -> Result<TcpStream, StoreError> {
        connect(addr, STORE_TIMEOUT).await.map_err(|e| match e {
            ConnectError::Failed(e) => StoreError::Io(e),
            ConnectError::NoAnswer(_) => StoreError::Timeout,
        })
    }
}

/// A connection to the store.
pub(super) struct Resp<S = TcpStream> {
    io: BufReader<S>,
}

impl<S: Dial> Resp<S> {
    /// Connects to `addr` ("host:port"), authenticating with `password` if given.
    pub(super) async fn connect(addr: &str, password: Option<&str>) -> Result<Self, StoreError> {
        let socket = S::dial(addr).await?;
        let mut resp = Resp::over(socket);
        if let Some(password) = password {
            resp.run(&[&["AUTH", password]]).await?;
        }
        Ok(resp)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Resp<S> {
    /// The store's protocol over a connection made already.
    pub(super) fn over(io: S) -> Self {
        Resp { io: BufReader::new(io) }
    }

    /// Sends `commands` in one write and reads their replies, in order. An
    /// error reply to any of them fails the whole call.
    pub(super) async fn run(&mut self, commands: &[&[&str]]) -> Result<Vec<Reply>, StoreError> {
        let mut out = Vec::new();
        for command in commands {
            encode(&mut out, command);
        }
        within(async {
            self.io.get_mut().write_all(&out).await?;
            let mut replies = Vec::with_capacity(commands.len());
            let mut refused = None;
            for _ in commands {
                match self.read_reply().await {
                    Err(StoreError::Refused(why)) => refused = Some(why),
                    reply => replies.push(reply?),
                }
            }
            match refused {
                Some(why) => Err(StoreError::Refused(why)),
                None => Ok(replies),
            }
        })
        .await
    }

    async fn read_reply(&mut self) -> Result<Reply, StoreError> {
        let line = self.read_line().await?;
        let (kind, rest) = line.split_at(1);
        match kind {
            "+" => Ok(Reply::Status(rest.to_owned())),
            "-" => Err(StoreError::Refused(rest.to_owned())),
            ":" => rest.parse().map(Reply::Integer).map_err(|_| StoreError::Protocol("integer")),
            "$" => {
                let len: i64 = rest.parse().map_err(|_| StoreError::Protocol("bulk length"))?;
                if len < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let len = usize::try_from(len).map_err(|_| StoreError::Protocol("bulk length"))?;
                if len > MAX_REPLY_BYTES {
                    return Err(StoreError::Protocol("a value longer than the registry writes"));
                }
                let mut bytes = vec![0; len + 2];
                self.io.read_exact(&mut bytes).await?;
                if !bytes.ends_with(b"\r\n") {
                    return Err(StoreError::Protocol("bulk string without its line end"));
                }
                bytes.truncate(len);
                Ok(Reply::Bulk(Some(bytes)))
            }
            _ => Err(StoreError::Protocol("a reply type the registry does not ask for")),
        }
    }

    /// One CRLF-terminated line, without its end; at most [`MAX_REPLY_BYTES`].
    async fn read_line(&mut self) -> Result<String, StoreError> {
        let mut line = Vec::new();
        loop {
            let buf = self.io.fill_buf().await?;
            if buf.is_empty() {
                return Err(StoreError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let (take, ended) = match buf.iter().position(|b| *b == b'\n') {
                Some(at) => (at + 1, true),
                None => (buf.len(), false),
            };
            if line.len() + take > MAX_REPLY_BYTES {
                return Err(StoreError::Protocol("a reply line too long or without its end"));
            }
            line.extend_from_slice(&buf[..take]);
            self.io.consume(take);
            if ended {
                break;
            }
        }
        if !line.ends_with(b"\r\n") || line.len() < 3 {
            return Err(StoreError::Protocol("a reply line too long or without its end"));
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).map_err(|_| StoreError::Protocol("a reply line that is not UTF-8"))
    }
}

/// Appends `command` as a RESP array of bulk strings.
fn encode(out: &mut Vec<u8>, command: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", command.len()).as_bytes());
    for part in command {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

async fn within<T>(
    work: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    crate::task::within(STORE_TIMEOUT, || StoreError::Timeout, work).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::station::fixture::scripted_store;

    #[test]
    fn pipelined_commands_are_encoded_and_their_replies_read_in_order() {
        let (mut resp, store) = scripted_store(b"+OK\r\n$2\r\nv1\r\n$-1\r\n:1\r\n");
        let replies = smol::block_on(resp.run(&[
            &["SET", "k", "v1"],
            &["GET", "k"],
            &["GET", "none"],
            &["DEL", "k"],
        ]))
        .expect("replies");
        assert_eq!(
            store.received(),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n\
              *2\r\n$3\r\nGET\r\n$4\r\nnone\r\n*2\r\n$3\r\nDEL\r\n$1\r\nk\r\n"
        );
        assert_eq!(
            replies,
            vec![
                Reply::Status("OK".into()),
                Reply::Bulk(Some(b"v1".to_vec())),
                Reply::Bulk(None),
                Reply::Integer(1)
            ]
        );
    }

    #[test]
    fn an_error_reply_fails_the_call_after_every_reply_is_read() {
        let (mut resp, store) =
            scripted_store(b"-NOAUTH Authentication required.\r\n+PONG\r\n+PONG\r\n");
        let err = smol::block_on(resp.run(&[&["PING"], &["PING"]])).expect_err("refused");
        assert_eq!(err.to_string(), "the store refused: NOAUTH Authentication required.");
        assert_eq!(store.received(), b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n");
        // Both replies were read: the next call reads its own.
        let replies = smol::block_on(resp.run(&[&["PING"]])).expect("its own reply");
        assert_eq!(replies, [Reply::Status("PONG".into())]);
    }

    #[test]
    fn replies_longer_than_the_registry_writes_are_refused_unread() {
        let (mut resp, _) = scripted_store(b"$999999999\r\n");
        let err = smol::block_on(resp.run(&[&["GET", "k"]])).expect_err("too long");
        assert_eq!(err.to_string(), "not a Redis reply: a value longer than the registry writes");
        // A line that never ends stops at the bound too.
        let (mut resp, _) = scripted_store(&[b'+'; 10_000]);
        let err = smol::block_on(resp.run(&[&["GET", "k"]])).expect_err("too long");
        assert_eq!(err.to_string(), "not a Redis reply: a reply line too long or without its end");
    }

    #[test]
    fn replies_cut_short_or_of_other_kinds_are_errors_not_hangs() {
        for (reply, error) in [
            (&b""[..], "unexpected end of file"),
            (b"+OK", "unexpected end of file"),
            (b"$5\r\nab", "unexpected end of file"),
            (b"$2\r\nabcd\r\n", "not a Redis reply: bulk string without its line end"),
            (b":x\r\n", "not a Redis reply: integer"),
            (b"*1\r\n:1\r\n", "not a Redis reply: a reply type the registry does not ask for"),
            (b"+OK\n", "not a Redis reply: a reply line too long or without its end"),
            (b"\r\n", "not a Redis reply: a reply line too long or without its end"),
        ] {
            let (mut resp, _) = scripted_store(reply);
            let err = smol::block_on(resp.run(&[&["GET", "k"]])).expect_err("not a reply");
            assert_eq!(err.to_string(), error, "{:?}", String::from_utf8_lossy(reply));
        }
    }
}
