//! Test doubles shared by the unit tests and the fuzz targets (fuzz/), so
//! both drive the HTTP layer the same way: an in-memory peer that hands
//! out bytes in chosen pieces, an in-memory pipe that stands in for a
//! socket (a carrier connection's [`super::link::Link::Memory`], a pump's
//! local end), and chunked decoding in pieces with its contract checked on
//! every call. Built only for tests and with the `fuzzing` feature, never
//! into a shipped binary; it panics on purpose.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_lite::{AsyncRead, AsyncWrite};

use super::http::{ChunkedDecoder, Decoded};

/// An in-memory peer: hands out its input in the given pieces (a read
/// never crosses a piece boundary), answers every other read `Pending`
/// after waking itself so that path is exercised too, and records what
/// is written to it. EOF after the last piece.
pub struct Peer {
    pieces: VecDeque<Vec<u8>>,
    pend_next: bool,
    /// Everything written to the peer.
    pub written: Vec<u8>,
}

impl Peer {
    pub fn split(input: &[u8], cuts: &[usize]) -> Self {
        let mut pieces = VecDeque::new();
        let mut from = 0;
        for &cut in cuts.iter().chain([&input.len()]) {
            if cut > from {
                pieces.push_back(input[from..cut].to_vec());
                from = cut;
            }
        }
        Peer { pieces, pend_next: true, written: Vec::new() }
    }

    pub fn whole(input: &[u8]) -> Self {
        Self::split(input, &[])
    }

    /// Pieces of 1 to `max_piece` bytes, sizes from a seeded xorshift.
    pub fn random(input: &[u8], seed: u64, max_piece: usize) -> Self {
        let mut rng = seed | 1;
        let mut cuts = Vec::new();
        let mut at = 0;
        while at < input.len() {
            at += 1 + below(&mut rng, max_piece);
            cuts.push(at.min(input.len()));
        }
        Self::split(input, &cuts)
    }
}

impl AsyncRead for Peer {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.pend_next = !this.pend_next;
        if !this.pend_next {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let Some(piece) = this.pieces.front_mut() else {
            return Poll::Ready(Ok(0));
        };
        let len = piece.len().min(buf.len());
        buf[..len].copy_from_slice(&piece[..len]);
        piece.drain(..len);
        if piece.is_empty() {
            this.pieces.pop_front();
        }
        Poll::Ready(Ok(len))
    }
}

impl AsyncWrite for Peer {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One direction of an in-memory pipe.
#[derive(Default)]
struct Flow {
    bytes: VecDeque<u8>,
    closed: bool,
    reset: bool,
    reader: Option<Waker>,
}

impl Flow {
    fn wake(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
    }
}

/// The two directions as one end sees them. Dropped with the end's last
/// clone, which then closes its writing half, as closing a socket's last
/// descriptor sends its FIN.
struct Ends {
    inbound: Arc<Mutex<Flow>>,
    outbound: Arc<Mutex<Flow>>,
}

impl Drop for Ends {
    fn drop(&mut self) {
        let mut flow = self.outbound.lock().unwrap();
        flow.closed = true;
        flow.wake();
    }
}

/// One end of an in-memory byte pipe, shared by its clones as a socket
/// is: writes never block, a read waits for bytes, `close` ends this
/// end's writing half (the other end then reads EOF after what is
/// buffered), and [`End::reset`] fails both ends as a peer's RST does.
#[derive(Clone)]
pub struct End(Arc<Ends>);

/// A connected pair of in-memory ends.
pub fn pipe() -> (End, End) {
    let (a, b): (Arc<Mutex<Flow>>, Arc<Mutex<Flow>>) = Default::default();
    let one = Ends { inbound: a.clone(), outbound: b.clone() };
    (End(Arc::new(one)), End(Arc::new(Ends { inbound: b, outbound: a })))
}

impl End {
    /// What has arrived at this end and is not read yet, taken without
    /// waiting: what a test asserts once the other side is done.
    pub fn received(&self) -> Vec<u8> {
        self.0.inbound.lock().unwrap().bytes.drain(..).collect()
    }

    /// Whether the other end closed its writing half.
    pub fn peer_closed(&self) -> bool {
        self.0.inbound.lock().unwrap().closed
    }

    /// Breaks the connection: every later read and write at either end
    /// fails with `ConnectionReset`, and bytes in flight are lost.
    pub fn reset(&self) {
        for flow in [&self.0.inbound, &self.0.outbound] {
            let mut flow = flow.lock().unwrap();
            flow.reset = true;
            flow.bytes.clear();
            flow.wake();
        }
    }
}

fn reset_error() -> io::Error {
    io::ErrorKind::ConnectionReset.into()
}

impl AsyncRead for End {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut flow = self.0.inbound.lock().unwrap();
        if flow.reset {
            return Poll::Ready(Err(reset_error()));
        }
        if flow.bytes.is_empty() && !flow.closed {
            flow.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(flow.bytes.len());
        for (slot, byte) in buf.iter_mut().zip(flow.bytes.drain(..n)) {
            *slot = byte;
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for End {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut flow = self.0.outbound.lock().unwrap();
        if flow.reset {
            return Poll::Ready(Err(reset_error()));
        }
        if flow.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        flow.bytes.extend(buf);
        flow.wake();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut flow = self.0.outbound.lock().unwrap();
        flow.closed = true;
        flow.wake();
        Poll::Ready(Ok(()))
    }
}

/// A step of xorshift64: cheap, seeded, reproducible noise for tests.
pub fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// A number below `bound` from [`xorshift`].
pub fn below(state: &mut u64, bound: usize) -> usize {
    (xorshift(state) % bound as u64) as usize
}

/// How a chunked body fed in pieces ended.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The body ended after this many input bytes.
    End(usize),
    /// The decoder refused the body (its error, debug-printed).
    Error(String),
    /// The input ended inside the body.
    Incomplete,
}

/// Feeds `input` to a fresh decoder in pieces ending at `cuts`, as a
/// connection does: each piece is offered until used up. Checks the
/// progress contract on every call.
pub fn decode_in_pieces(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Outcome) {
    let mut decoder = ChunkedDecoder::new();
    let mut payload = Vec::new();
    let mut offset = 0;
    for &piece_end in cuts.iter().chain([&input.len()]) {
        loop {
            let window = &input[offset..piece_end.max(offset)];
            match decoder.decode(window) {
                Ok(Decoded::Data { consumed, start, len }) => {
                    assert!(len > 0 && start + len == consumed && consumed <= window.len());
                    payload.extend_from_slice(&window[start..consumed]);
                    offset += consumed;
                }
                Ok(Decoded::NeedMore { consumed }) => {
                    assert_eq!(consumed, window.len());
                    offset += consumed;
                    break;
                }
                Ok(Decoded::End { consumed }) => {
                    assert!(consumed <= window.len());
                    offset += consumed;
                    for after in [&b"more"[..], b"5\r\nmore\r\n"] {
                        assert!(matches!(decoder.decode(after), Ok(Decoded::End { consumed: 0 })));
                    }
                    return (payload, Outcome::End(offset));
                }
                Err(error) => {
                    // Sticky: the same error again, whatever comes next.
                    let again = decoder.decode(b"0\r\n\r\n");
                    assert_eq!(format!("{again:?}"), format!("{:?}", Err::<(), _>(&error)));
                    return (payload, Outcome::Error(format!("{error:?}")));
                }
            }
        }
    }
    (payload, Outcome::Incomplete)
}
