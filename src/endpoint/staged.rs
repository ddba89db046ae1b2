//! Any async byte stream as the local end of a stream, through a staging
//! buffer of [`SOCKET_READ`] bytes each way: what a serial line's reads and
//! writes need, where TCP's in-place path ([`super::tcp`]) does not apply.

use event_listener::Event as Notify;
use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{PumpError, SOCKET_READ};
use crate::core::streams::{Buffer, Read, StreamId};
use crate::tunnel::Tunnel;

/// Carries bytes between `socket` and stream `id` both ways, with
/// half-close, until both directions finish or either side resets.
/// Clones of `socket` share one connection, and `close` ends our writing
/// half, which is what the peer's finish turns into.
pub async fn pump<S>(tunnel: &Tunnel, id: StreamId, socket: S)
where
    S: AsyncRead + AsyncWrite + Clone + Unpin,
{
    tunnel
        .pump_with(id, |waker| async move {
            let up = socket_to_stream(tunnel, id, socket.clone(), &waker);
            let down = stream_to_socket(tunnel, id, socket, &waker);
            future::try_zip(up, down).await.map(drop)
        })
        .await;
}

async fn socket_to_stream(
    tunnel: &Tunnel,
    id: StreamId,
    mut socket: impl AsyncRead + Unpin,
    waker: &Notify,
) -> Result<(), PumpError> {
    let mut buf = vec![0u8; SOCKET_READ];
    let mut burst = 0;
    loop {
        let n = match future::poll_once(socket.read(&mut buf)).await {
            Some(read) => read,
            None => {
                // The line has nothing now and may stay quiet for long:
                // after a message, its small buffer goes once it is sent.
                tunnel.with_streams(|streams, _| {
                    streams.waits(id, Buffer::Send, std::mem::take(&mut burst));
                });
                socket.read(&mut buf).await
            }
        }
        .map_err(PumpError::Read)?;
        burst += n;
        if n == 0 {
            tunnel.with_streams(|streams, _| {
                let _ = streams.finish(id);
            });
            return Ok(());
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let listener = waker.listen();
            let written = tunnel.with_streams(|streams, stats| {
                let written = streams.write(id, rest);
                if let Ok(k) = written {
                    stats.stream_out += k as u64;
                }
                written
            });
            match written {
                Ok(0) => listener.await,
                Ok(k) => rest = &rest[k..],
                // Reset while we read: the pump's watch on the stream ends it.
                Err(_) => return Ok(()),
            }
        }
    }
}

async fn stream_to_socket(
    tunnel: &Tunnel,
    id: StreamId,
    mut socket: impl AsyncWrite + Unpin,
    waker: &Notify,
) -> Result<(), PumpError> {
    let mut buf = vec![0u8; SOCKET_READ];
    let mut burst = 0;
    loop {
        let listener = waker.listen();
        let read = tunnel.with_streams(|streams, stats| {
            let read = streams.read(id, &mut buf);
            match read {
                Ok(Read::Data(n)) => stats.stream_in += n as u64,
                Ok(Read::Blocked) => {
                    streams.waits(id, Buffer::Receive, std::mem::take(&mut burst));
                }
                _ => {}
            }
            read
        });
        match read {
            Ok(Read::Data(n)) => {
                burst += n;
                socket.write_all(&buf[..n]).await.map_err(PumpError::Write)?;
            }
            Ok(Read::Fin) => {
                let _ = socket.close().await;
                return Ok(());
            }
            Ok(Read::Blocked) => listener.await,
            Err(_) => return Ok(()),
        }
    }
}
