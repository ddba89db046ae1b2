//! TCP sockets as the local ends of streams: bytes go straight between the
//! kernel and the stream's rings, with no staging buffer and no copy.

use std::io::{IoSlice, IoSliceMut, Read as _, Write as _};
use std::net::Shutdown;
use std::sync::Arc;

use async_io::Async;
use event_listener::Event as Notify;
use futures_lite::future;

use super::{PumpError, SOCKET_READ};
use crate::core::streams::{Buffer, Received, StreamId};
use crate::tunnel::Tunnel;

/// Carries bytes between `socket` and stream `id` both ways, with
/// half-close, until both directions finish or either side resets.
pub async fn pump(tunnel: &Tunnel, id: StreamId, socket: smol::net::TcpStream) {
    let socket: Arc<Async<std::net::TcpStream>> = socket.into();
    tunnel
        .pump_with(id, |waker| async move {
            let up = socket_to_stream(tunnel, id, &socket, &waker);
            let down = stream_to_socket(tunnel, id, &socket, &waker);
            future::try_zip(up, down).await.map(drop)
        })
        .await;
}

/// What one non-blocking pass of a pump direction did.
enum Step {
    /// Bytes moved between the socket and the stream.
    Moved,
    /// Nothing to move until the stream wakes us: its send buffer is full,
    /// or nothing was received yet.
    Full,
    /// This direction is over: the socket's EOF, or the peer's FIN.
    End,
    /// The stream is gone (reset or session closed).
    Gone,
}

/// Reads `socket` straight into the stream's send buffer, up to
/// [`SOCKET_READ`] bytes a call.
async fn socket_to_stream(
    tunnel: &Tunnel,
    id: StreamId,
    socket: &Async<std::net::TcpStream>,
    waker: &Notify,
) -> Result<(), PumpError> {
    let mut burst = 0;
    loop {
        let listener = waker.listen();
        // Called again after each wait for readability; the session's lock
        // is held only across one non-blocking read.
        let step = socket.read_with(|mut socket| {
            tunnel.with_streams_if(|streams, stats| {
                let (first, second) = match streams.send_space(id, SOCKET_READ) {
                    Ok(space) => space,
                    // Reset while we waited: the pump's watch on the stream ends it.
                    Err(_) => return (Ok(Step::Gone), false),
                };
                if first.is_empty() {
                    return (Ok(Step::Full), false);
                }
                let read =
                    socket.read_vectored(&mut [IoSliceMut::new(first), IoSliceMut::new(second)]);
                let n = match read {
                    Ok(n) => n,
                    Err(e) => {
                        // WouldBlock: read_with waits for readability.
                        streams.waits(id, Buffer::Send, std::mem::take(&mut burst));
                        return (Err(e), false);
                    }
                };
                burst += n;
                if n == 0 {
                    let _ = streams.finish(id);
                    return (Ok(Step::End), true);
                }
                if streams.commit_send(id, n).is_ok() {
                    stats.stream_out += n as u64;
                }
                (Ok(Step::Moved), true)
            })
        });
        match step.await.map_err(PumpError::Read)? {
            Step::Moved => {}
            Step::Full => listener.await,
            Step::End | Step::Gone => return Ok(()),
        }
    }
}

/// Writes the stream's received bytes straight from its receive buffer to
/// `socket`, then half-closes the socket at the peer's FIN.
async fn stream_to_socket(
    tunnel: &Tunnel,
    id: StreamId,
    socket: &Async<std::net::TcpStream>,
    waker: &Notify,
) -> Result<(), PumpError> {
    let mut burst = 0;
    loop {
        let listener = waker.listen();
        let step = socket.write_with(|mut socket| {
            tunnel.with_streams(|streams, stats| {
                Ok(match streams.received(id) {
                    Ok(Received::Data(first, second)) => {
                        let n =
                            socket.write_vectored(&[IoSlice::new(first), IoSlice::new(second)])?;
                        if streams.consume(id, n).is_ok() {
                            stats.stream_in += n as u64;
                        }
                        burst += n;
                        Step::Moved
                    }
                    Ok(Received::Fin) => Step::End,
                    Ok(Received::Blocked) => {
                        streams.waits(id, Buffer::Receive, std::mem::take(&mut burst));
                        Step::Full
                    }
                    Err(_) => Step::Gone,
                })
            })
        });
        match step.await.map_err(PumpError::Write)? {
            Step::Moved => {}
            Step::Full => listener.await,
            Step::End => {
                let _ = socket.get_ref().shutdown(Shutdown::Write);
                return Ok(());
            }
            Step::Gone => return Ok(()),
        }
    }
}
