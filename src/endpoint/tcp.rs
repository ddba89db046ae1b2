//! TCP sockets as the local ends of streams: bytes go straight between the
//! kernel and the stream's rings, with no staging buffer and no copy.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use async_io::Async;
use event_listener::Event as Notify;
use futures_lite::future;

use super::{PumpError, SOCKET_READ};
use crate::core::connection::Stats;
use crate::core::streams::{Buffer, Received, StreamId, Streams};
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
#[derive(Debug, PartialEq, Eq)]
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
        let step = socket.read_with(|socket| {
            tunnel
                .with_streams_if(|streams, stats| read_pass(streams, stats, id, socket, &mut burst))
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
        let step = socket.write_with(|socket| {
            tunnel.with_streams(|streams, stats| write_pass(streams, stats, id, socket, &mut burst))
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

/// One non-blocking pass of [`socket_to_stream`]: reads what `socket` has
/// straight into the stream's send space. Beside the step, whether it
/// changed the streams.
fn read_pass(
    streams: &mut Streams,
    stats: &mut Stats,
    id: StreamId,
    mut socket: impl Read,
    burst: &mut usize,
) -> (io::Result<Step>, bool) {
    let (first, second) = match streams.send_space(id, SOCKET_READ) {
        Ok(space) => space,
        // Reset while we waited: the pump's watch on the stream ends it.
        Err(_) => return (Ok(Step::Gone), false),
    };
    if first.is_empty() {
        return (Ok(Step::Full), false);
    }
    let n = match socket.read_vectored(&mut [IoSliceMut::new(first), IoSliceMut::new(second)]) {
        Ok(n) => n,
        Err(e) => {
            // WouldBlock: read_with waits for readability.
            streams.waits(id, Buffer::Send, std::mem::take(burst));
            return (Err(e), false);
        }
    };
    *burst += n;
    if n == 0 {
        let _ = streams.finish(id);
        return (Ok(Step::End), true);
    }
    if streams.commit_send(id, n).is_ok() {
        stats.stream_out += n as u64;
    }
    (Ok(Step::Moved), true)
}

/// One non-blocking pass of [`stream_to_socket`]: writes what the stream
/// received straight from its receive buffer to `socket`.
fn write_pass(
    streams: &mut Streams,
    stats: &mut Stats,
    id: StreamId,
    mut socket: impl Write,
    burst: &mut usize,
) -> io::Result<Step> {
    Ok(match streams.received(id) {
        Ok(Received::Data(first, second)) => {
            let n = socket.write_vectored(&[IoSlice::new(first), IoSlice::new(second)])?;
            if streams.consume(id, n).is_ok() {
                stats.stream_in += n as u64;
            }
            *burst += n;
            Step::Moved
        }
        Ok(Received::Fin) => Step::End,
        Ok(Received::Blocked) => {
            streams.waits(id, Buffer::Receive, std::mem::take(burst));
            Step::Full
        }
        Err(_) => Step::Gone,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::core::session::Lane;
    use crate::core::streams::{Read as Got, SEND_BUFFER};
    use crate::tunnel::testing::{carry, pair};
    use crate::tunnel::LaneToken;

    /// A socket's reads as a test scripts them: each a result, its bytes
    /// taken in as many reads as the buffers offered need; no bytes is EOF.
    struct Script(VecDeque<io::Result<Vec<u8>>>);

    impl Script {
        fn new(reads: impl IntoIterator<Item = io::Result<Vec<u8>>>) -> Script {
            Script(reads.into_iter().collect())
        }
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut bytes = self.0.pop_front().expect("a read the test scripted")?;
            let n = bytes.len().min(buf.len());
            buf[..n].copy_from_slice(&bytes[..n]);
            if n < bytes.len() {
                self.0.push_front(Ok(bytes.split_off(n)));
            }
            Ok(n)
        }
    }

    /// A socket whose send buffer takes at most `room` bytes a write, or
    /// that the peer reset.
    struct Sink {
        taken: Vec<u8>,
        room: usize,
        reset: bool,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.reset {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            let n = buf.len().min(self.room);
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A stream the agent opened and the station knows of, and the
    /// station's lane to the agent.
    fn opened() -> (Arc<Tunnel>, Arc<Tunnel>, LaneToken, StreamId) {
        let (agent, up, station, _opened) = pair();
        let down = station.begin_lane(Lane::Data);
        let id = agent.open("collector").expect("open");
        carry(&agent, up, &station).1.expect("authentic");
        (agent, station, down, id)
    }

    fn read(
        tunnel: &Tunnel,
        id: StreamId,
        socket: &mut Script,
        burst: &mut usize,
    ) -> io::Result<Step> {
        tunnel.with_streams_if(|streams, stats| read_pass(streams, stats, id, socket, burst))
    }

    fn write(
        tunnel: &Tunnel,
        id: StreamId,
        socket: &mut Sink,
        burst: &mut usize,
    ) -> io::Result<Step> {
        tunnel.with_streams(|streams, stats| write_pass(streams, stats, id, socket, burst))
    }

    fn would_block() -> io::Result<Vec<u8>> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// What the station's end of stream `id` received, up to its FIN.
    fn drain(station: &Tunnel, id: StreamId) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        let mut buf = vec![0; SEND_BUFFER];
        loop {
            match station.with_streams(|streams, _| streams.read(id, &mut buf)) {
                Ok(Got::Data(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Got::Fin) => return (got, true),
                Ok(Got::Blocked) | Err(_) => return (got, false),
            }
        }
    }

    #[test]
    fn socket_bytes_go_into_the_stream_as_read_and_the_sockets_eof_finishes_it() {
        let (agent, up, station, _opened) = pair();
        let id = agent.open("collector").expect("open");
        let mut socket =
            Script::new([Ok(b"hello ".to_vec()), would_block(), Ok(b"world".to_vec()), Ok(vec![])]);
        let mut burst = 0;
        let mut pass = || read(&agent, id, &mut socket, &mut burst);
        assert_eq!(pass().ok(), Some(Step::Moved));
        let blocked = pass().expect_err("nothing to read now");
        assert_eq!(blocked.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(pass().ok(), Some(Step::Moved));
        assert_eq!(pass().ok(), Some(Step::End));
        assert_eq!(agent.stats().stream_out, 11);
        // The wait between the messages let the burst's count go.
        assert_eq!(burst, 5);
        carry(&agent, up, &station).1.expect("authentic");
        assert_eq!(drain(&station, id), (b"hello world".to_vec(), true));
    }

    #[test]
    fn a_socket_read_stops_at_the_streams_send_space() {
        let (agent, up, station, _opened) = pair();
        let id = agent.open("collector").expect("open");
        let sent: Vec<u8> = (0..3 * SEND_BUFFER).map(|i| (i % 251) as u8).collect();
        let mut socket = Script::new([Ok(sent.clone())]);
        let mut burst = 0;
        let mut passes = 0;
        let last = loop {
            passes += 1;
            match read(&agent, id, &mut socket, &mut burst).expect("a scripted read") {
                Step::Moved => continue,
                other => break other,
            }
        };
        assert_eq!(last, Step::Full);
        let moved = agent.stats().stream_out as usize;
        assert_eq!(moved, SEND_BUFFER, "after {passes} passes");
        // What did not fit stays in the socket, unread.
        let unread: usize = socket.0.iter().map(|r| r.as_ref().map_or(0, Vec::len)).sum();
        assert_eq!(unread, sent.len() - moved);
        carry(&agent, up, &station).1.expect("authentic");
        assert_eq!(drain(&station, id), (sent[..moved].to_vec(), false));
    }

    #[test]
    fn received_bytes_go_to_the_socket_as_it_takes_them_and_the_fin_ends_the_direction() {
        let (agent, station, down, id) = opened();
        let mut socket = Sink { taken: Vec::new(), room: 4, reset: false };
        let mut burst = 0;
        let mut pass = |socket: &mut Sink| write(&agent, id, socket, &mut burst);
        assert_eq!(pass(&mut socket).ok(), Some(Step::Full));
        station.with_streams(|streams, _| {
            assert_eq!(streams.write(id, b"answer").expect("open"), 6);
            streams.finish(id).expect("open");
        });
        carry(&station, down, &agent).1.expect("authentic");
        // A write that fails takes nothing from the stream.
        let mut broken = Sink { taken: Vec::new(), room: 4, reset: true };
        let refused = pass(&mut broken).expect_err("reset");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(pass(&mut socket).ok(), Some(Step::Moved));
        assert_eq!(socket.taken, b"answ");
        assert_eq!(pass(&mut socket).ok(), Some(Step::Moved));
        assert_eq!(pass(&mut socket).ok(), Some(Step::End));
        assert_eq!(socket.taken, b"answer");
        assert_eq!(agent.stats().stream_in, 6);
    }

    /// A stream the peer reset ends both directions, and a socket the
    /// peer reset fails the read, which the pump resets the stream with.
    #[test]
    fn a_reset_on_either_side_ends_the_passes() {
        let (agent, station, down, id) = opened();
        let mut burst = 0;
        let mut reset = Script::new([Err(io::ErrorKind::ConnectionReset.into())]);
        let failed = read(&agent, id, &mut reset, &mut burst).expect_err("reset");
        assert_eq!(failed.kind(), io::ErrorKind::ConnectionReset);

        station.reset(id, "target refused");
        carry(&station, down, &agent).1.expect("authentic");
        let mut unread = Script::new([Ok(b"late".to_vec())]);
        assert_eq!(read(&agent, id, &mut unread, &mut burst).ok(), Some(Step::Gone));
        assert_eq!(unread.0.len(), 1, "nothing read for a stream that is gone");
        let mut socket = Sink { taken: Vec::new(), room: usize::MAX, reset: false };
        assert_eq!(write(&agent, id, &mut socket, &mut burst).ok(), Some(Step::Gone));
        assert!(socket.taken.is_empty());
    }
}
