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

#[cfg(test)]
mod tests {
    use futures_lite::future::{self, block_on};

    use super::*;
    use crate::carrier::harness::pipe;
    use crate::core::session::Lane;
    use crate::tunnel::testing::{carry, pair};

    /// A line's bytes cross both ways through a staged pump, the peer's
    /// finish closes the line's writing half, and a stream waiting
    /// between messages holds no buffer at this side.
    #[test]
    fn a_line_carried_through_a_staged_pump_keeps_every_byte_and_the_half_close() {
        let (agent, up, station, opened) = pair();
        let down = station.begin_lane(Lane::Data);
        let id = agent.open("console").expect("open");
        let (line, device) = pipe();
        let request: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut app = device;

        let test = async {
            // The station's side reads everything the line sent: a bulk
            // transfer, then a message.
            let mut got = Vec::new();
            let mut buf = vec![0u8; 8192];
            for message in [&request[..], b"status?\n"] {
                app.write_all(message).await.unwrap();
                got.clear();
                while got.len() < message.len() {
                    carry(&agent, up, &station).1.expect("authentic");
                    carry(&station, down, &agent).1.expect("authentic");
                    while let Ok(Read::Data(n)) =
                        station.with_streams(|streams, _| streams.read(id, &mut buf))
                    {
                        got.extend_from_slice(&buf[..n]);
                    }
                    future::yield_now().await;
                }
                assert_eq!(got, message);
            }
            assert_eq!(opened.try_recv().expect("opened at the station").name, "console");
            // The pump waits on the line after a message: no buffer held.
            assert_eq!(agent.with_streams(|streams, _| streams.allocated(id)), (0, 0));

            // The answer, then the station's finish: the line reads it all, then EOF.
            station.with_streams(|streams, _| {
                assert_eq!(streams.write(id, b"ok\n").unwrap(), 3);
                streams.finish(id).unwrap();
            });
            carry(&station, down, &agent).1.expect("authentic");
            let mut answer = Vec::new();
            app.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, b"ok\n");
        };
        block_on(future::or(
            async {
                pump(&agent, id, line).await;
                panic!("the pump ended before the test");
            },
            test,
        ));
    }
}
