//! One HTTP/1.1 connection: reads heads and bodies out of a fixed read
//! buffer, writes bytes through.
//!
//! ```text
//!  io ──read──► [ consumed | unconsumed | free ]   2 KiB idle, up to 64 KiB while busy,
//!                            │                      none while not reading (`release`)
//!                            │
//!                            ├─► read_request / read_response ──► owned head
//!                            └─► body(kind).next() ──► &[u8] inside the buffer (no copy)
//!  io ◄─write── write_all / flush   (messages are built with http::write_*)
//! ```
//!
//! Bytes after a message stay in the buffer for the next one, so pipelined
//! requests and keep-alive work. Bodies stream through the buffer whatever
//! their length; only `read_to_end` collects one, bounded by the caller.
//!
//! Not done here: deadlines (callers wrap each future in one, and every await
//! here either gets bytes or returns), keep-alive policy, write buffering.

use std::ops::Range;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::http::{
    parse_request, parse_response, BodyKind, ChunkedDecoder, Decoded, HttpError, RequestHead,
    ResponseHead, MAX_HEAD_BYTES,
};

/// Largest read buffer. 64 KiB takes in one read what a socket typically
/// has ready (a full TCP window on a LAN) and holds a whole head several
/// times over; a busy connection grows to it, an idle one gives it back.
pub const READ_BUF_BYTES: usize = 64 * 1024;

/// Largest read buffer a head may need: a whole head and as much again, so
/// a head never fills the buffer and there is always room to read its rest.
pub const MIN_READ_BUF_BYTES: usize = 2 * MAX_HEAD_BYTES;

/// Read buffer of an idle connection, and a new one's: more than a carrier
/// request's head from an agent (about 300 bytes, a proxy's additions
/// included); a longer head grows it. What a station pays per idle
/// connection of its fleet.
pub const SMALL_READ_BUF_BYTES: usize = 2 * 1024;

const _: () = assert!(READ_BUF_BYTES >= MIN_READ_BUF_BYTES);
const _: () = assert!(MIN_READ_BUF_BYTES >= SMALL_READ_BUF_BYTES);

/// A buffered HTTP/1.1 connection over any byte stream.
pub struct HttpConn<S> {
    io: S,
    /// Sized by use (see [`HttpConn::fill`]); bodies are streamed through
    /// it, never collected in it.
    buf: Box<[u8]>,
    /// `buf[start..end]` holds bytes read but not yet consumed.
    start: usize,
    end: usize,
    /// Largest the buffer may grow to for bodies (heads may always take
    /// [`MIN_READ_BUF_BYTES`]).
    cap: usize,
    /// Bytes the last read brought.
    last_read: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> HttpConn<S> {
    /// Wraps `io`, with a read buffer that may grow to [`READ_BUF_BYTES`].
    pub fn new(io: S) -> Self {
        Self::with_capacity(io, READ_BUF_BYTES)
    }

    /// Wraps `io` with a read buffer that grows to at most `bytes` (at
    /// least [`MIN_READ_BUF_BYTES`]) for bodies: a server gives strangers a
    /// small one and lets it [`HttpConn::grow`] for peers that proved who
    /// they are.
    pub fn with_capacity(io: S, bytes: usize) -> Self {
        let buf = vec![0; SMALL_READ_BUF_BYTES].into_boxed_slice();
        let cap = bytes.max(MIN_READ_BUF_BYTES);
        HttpConn { io, buf, start: 0, end: 0, cap, last_read: 0 }
    }

    /// Lets the read buffer grow to [`READ_BUF_BYTES`] for bodies.
    pub fn grow(&mut self) {
        self.cap = READ_BUF_BYTES;
    }

    /// The size of the read buffer now.
    pub fn buffer_len(&self) -> usize {
        self.buf.len()
    }

    /// Lets the read buffer go if it holds nothing unread, for a connection
    /// about to wait long without reading (a held poll; a downlink, whose
    /// request is read): an idle device's connection then costs no buffer.
    /// The next read takes a small one again.
    pub fn release(&mut self) {
        if self.start == self.end {
            self.buf = Box::default();
            self.start = 0;
            self.end = 0;
            self.last_read = 0;
        }
    }

    /// The underlying stream, e.g. for its peer address.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Reads the next request head. `Ok(None)` when the peer closed the
    /// connection cleanly between requests (nothing, or only the empty lines
    /// RFC 9112 lets a server ignore, was sent).
    pub async fn read_request(&mut self) -> Result<Option<RequestHead>, HttpError> {
        self.read_head(parse_request).await
    }

    /// Reads the next response head; `head_request` says the request was
    /// `HEAD`, so the response has no body whatever it declares.
    pub async fn read_response(&mut self, head_request: bool) -> Result<ResponseHead, HttpError> {
        let parse = |buf: &[u8]| parse_response(buf, head_request);
        self.read_head(parse).await?.ok_or(HttpError::UnexpectedEof)
    }

    /// Whether bytes the peer sent wait unread: none after a timeout means
    /// the peer sent nothing, not part of a message.
    pub fn has_buffered(&self) -> bool {
        self.end > self.start
    }

    /// A reader for the body that follows the head just read. With
    /// `max_len`, a longer body is [`HttpError::BodyTooLarge`]: at once if
    /// its `Content-Length` says so, otherwise as soon as it grows past.
    pub fn body(&mut self, kind: BodyKind, max_len: Option<u64>) -> BodyReader<'_, S> {
        let framing = match kind {
            BodyKind::Empty => Framing::Finished,
            BodyKind::Length(len) => match max_len {
                Some(limit) if len > limit => Framing::TooLarge { limit },
                _ => Framing::Length { remaining: len },
            },
            BodyKind::Chunked => Framing::Chunked(ChunkedDecoder::new()),
            BodyKind::UntilClose => Framing::UntilClose,
        };
        BodyReader { conn: self, framing, max_len, delivered: 0 }
    }

    /// Writes all of `bytes` to the stream and flushes it: a TLS link
    /// holds what it could not send yet until flushed (a no-op on TCP).
    pub async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Flushes the stream.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.io.flush().await
    }

    /// The stream and the bytes read from it but not consumed yet.
    pub fn into_inner(self) -> (S, Vec<u8>) {
        let unconsumed = self.buf[self.start..self.end].to_vec();
        (self.io, unconsumed)
    }
}

impl<S> HttpConn<S> {
    /// Replaces the buffer with one of `len` bytes holding what it held
    /// unconsumed, at its start.
    fn resize(&mut self, len: usize) {
        let held = self.end - self.start;
        let mut new = vec![0; len.max(held)].into_boxed_slice();
        new[..held].copy_from_slice(&self.buf[self.start..self.end]);
        self.buf = new;
        self.start = 0;
        self.end = held;
    }
}

impl<S: AsyncRead + Unpin> HttpConn<S> {
    /// Reads until `parse` finds a whole head at the start of the
    /// unconsumed bytes, then consumes it. `Ok(None)`: EOF with only empty
    /// lines before it.
    async fn read_head<T>(
        &mut self,
        parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, HttpError>,
    ) -> Result<Option<T>, HttpError> {
        // Unconsumed bytes already known to hold no complete head.
        let mut scanned = 0;
        let mut eof = false;
        loop {
            let buffered = &self.buf[self.start..self.end];
            // A head can only complete with a line end, so parse only when
            // new bytes bring one: a peer trickling a byte at a time costs a
            // parse per line, not per byte. At the bound or at EOF, parse to
            // say what is wrong with the bytes.
            if eof || buffered.len() >= MAX_HEAD_BYTES || buffered[scanned..].contains(&b'\n') {
                if let Some((head, len)) = parse(buffered)? {
                    self.start += len;
                    return Ok(Some(head));
                }
                if eof {
                    if buffered.iter().all(|&byte| byte == b'\r' || byte == b'\n') {
                        self.start = self.end;
                        return Ok(None);
                    }
                    return Err(HttpError::UnexpectedEof);
                }
            }
            // Here fewer than MAX_HEAD_BYTES are buffered: parse never
            // reports an incomplete head at or past the bound.
            scanned = buffered.len();
            eof = self.fill().await? == 0;
        }
    }

    /// Reads once into the free end of the buffer; `Ok(0)` is EOF.
    ///
    /// Callers fill only when what is buffered is less than a head or
    /// nothing. The buffer follows the traffic: an empty one grows fourfold
    /// (up to `cap`) after a read that filled it, and drops back to
    /// [`SMALL_READ_BUF_BYTES`] after a read that used an eighth of it or
    /// less, so that an idle connection (keepalives, a held poll) keeps 2
    /// KiB and a busy one reads 64 KiB at a time. A head that fills it
    /// doubles it, up to [`MIN_READ_BUF_BYTES`], where a head always fits.
    /// One let go ([`HttpConn::release`]) comes back small.
    async fn fill(&mut self) -> Result<usize, HttpError> {
        if self.buf.is_empty() {
            // Let go by `release`: nothing was unread.
            self.resize(SMALL_READ_BUF_BYTES);
        }
        let len = self.buf.len();
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.last_read == len && len < self.cap {
                self.resize((len * 4).min(self.cap));
            } else if self.last_read <= len / 8 && len > SMALL_READ_BUF_BYTES {
                self.resize(SMALL_READ_BUF_BYTES);
            }
        } else if self.start > 0 {
            // Only a partial head is ever moved, at most once per head.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            self.resize((len * 2).min(MIN_READ_BUF_BYTES));
        }
        debug_assert!(self.end < self.buf.len(), "fill needs free space");
        let read = self.io.read(&mut self.buf[self.end..]).await?;
        self.end += read;
        self.last_read = read;
        Ok(read)
    }

    /// Consumes the next `len` buffered bytes, returning where they are.
    fn take(&mut self, len: usize) -> Range<usize> {
        let run = self.start..self.start + len;
        self.start += len;
        run
    }

    /// Next run of a `Content-Length` body, reading if nothing is buffered.
    async fn next_counted(
        &mut self,
        remaining: &mut u64,
    ) -> Result<Option<Range<usize>>, HttpError> {
        if *remaining == 0 {
            return Ok(None);
        }
        if self.start == self.end && self.fill().await? == 0 {
            return Err(HttpError::UnexpectedEof);
        }
        let buffered = self.end - self.start;
        let len = usize::try_from(*remaining).map_or(buffered, |r| r.min(buffered));
        // usize is at most 64 bits on every target we build for.
        *remaining -= len as u64;
        Ok(Some(self.take(len)))
    }

    /// Next run of a chunked body: framing is consumed on the way, and a
    /// `NeedMore` always leaves the buffer empty, so `fill` has all of it.
    async fn next_chunked(
        &mut self,
        decoder: &mut ChunkedDecoder,
    ) -> Result<Option<Range<usize>>, HttpError> {
        loop {
            match decoder.decode(&self.buf[self.start..self.end])? {
                Decoded::Data { consumed, start, len } => {
                    let run = self.start + start..self.start + start + len;
                    self.start += consumed;
                    return Ok(Some(run));
                }
                Decoded::End { consumed } => {
                    self.start += consumed;
                    return Ok(None);
                }
                Decoded::NeedMore { consumed } => {
                    self.start += consumed;
                    if self.fill().await? == 0 {
                        return Err(HttpError::UnexpectedEof);
                    }
                }
            }
        }
    }

    /// Next run of a body that ends when the peer closes.
    async fn next_until_close(&mut self) -> Result<Option<Range<usize>>, HttpError> {
        if self.start == self.end && self.fill().await? == 0 {
            return Ok(None);
        }
        Ok(Some(self.take(self.end - self.start)))
    }
}

/// Reads one body out of an [`HttpConn`]; made by [`HttpConn::body`].
pub struct BodyReader<'a, S> {
    conn: &'a mut HttpConn<S>,
    framing: Framing,
    max_len: Option<u64>,
    /// Body bytes handed out so far, held against `max_len`.
    delivered: u64,
}

/// Where a body reader is in its body.
enum Framing {
    Length {
        remaining: u64,
    },
    Chunked(ChunkedDecoder),
    UntilClose,
    /// The body is over; the connection's next bytes are the next message's.
    Finished,
    /// The body went past the caller's limit; the connection is unusable.
    TooLarge {
        limit: u64,
    },
}

impl<S: AsyncRead + Unpin> BodyReader<'_, S> {
    /// Next run of body bytes as a slice of the connection's read buffer (no
    /// copy, never empty); `Ok(None)` at the end of the body. The slice is
    /// valid until the next call. After an error the connection cannot be
    /// reused: its position in the stream is unknown.
    pub async fn next(&mut self) -> Result<Option<&[u8]>, HttpError> {
        let run = match &mut self.framing {
            Framing::Finished => None,
            Framing::TooLarge { limit } => return Err(HttpError::BodyTooLarge { limit: *limit }),
            Framing::Length { remaining } => self.conn.next_counted(remaining).await?,
            Framing::Chunked(decoder) => self.conn.next_chunked(decoder).await?,
            Framing::UntilClose => self.conn.next_until_close().await?,
        };
        let Some(run) = run else {
            self.framing = Framing::Finished;
            return Ok(None);
        };
        // usize is at most 64 bits on every target we build for.
        let delivered = self.delivered.saturating_add(run.len() as u64);
        if let Some(limit) = self.max_len {
            if delivered > limit {
                self.framing = Framing::TooLarge { limit };
                return Err(HttpError::BodyTooLarge { limit });
            }
        }
        self.delivered = delivered;
        Ok(Some(&self.conn.buf[run]))
    }

    /// Reads the rest of the body into `out`. Pass a `max_len` to
    /// [`HttpConn::body`] for any body from the network: it is the only
    /// bound on how much this collects.
    pub async fn read_to_end(&mut self, out: &mut Vec<u8>) -> Result<(), HttpError> {
        while let Some(bytes) = self.next().await? {
            out.extend_from_slice(bytes);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use super::*;
    use crate::carrier::harness::{below, xorshift, Peer};
    use crate::carrier::http::{write_chunk_header, ChunkError, CHUNK_END, LAST_CHUNK};

    /// Runs `future`, failing the test if it takes more than 5 s: a hang is
    /// a bug, and this turns it into a failure instead of a stuck test run.
    fn within_deadline<T>(future: impl Future<Output = T>) -> T {
        let deadline = async {
            async_io::Timer::after(Duration::from_secs(5)).await;
            None
        };
        let outcome =
            async_io::block_on(futures_lite::future::or(async { Some(future.await) }, deadline));
        match outcome {
            Some(value) => value,
            None => panic!("did not finish within 5 s"),
        }
    }

    async fn body_of<S: AsyncRead + AsyncWrite + Unpin>(
        conn: &mut HttpConn<S>,
        kind: BodyKind,
        max_len: Option<u64>,
    ) -> Result<Vec<u8>, HttpError> {
        let mut out = Vec::new();
        conn.body(kind, max_len).read_to_end(&mut out).await?;
        Ok(out)
    }

    fn chunked(payload: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in payload.chunks(chunk) {
            write_chunk_header(&mut out, piece.len());
            out.extend_from_slice(piece);
            out.extend_from_slice(CHUNK_END);
        }
        out.extend_from_slice(LAST_CHUNK);
        out
    }

    #[test]
    fn request_with_length_body_in_random_pieces() {
        let input = b"POST /s/1 HTTP/1.1\r\nHost: st\r\nContent-Length: 11\r\n\r\nhello world";
        for seed in 0..50 {
            within_deadline(async {
                let mut conn = HttpConn::new(Peer::random(input, seed, 7));
                let head = conn.read_request().await.unwrap().unwrap();
                assert_eq!((head.method.as_str(), head.body), ("POST", BodyKind::Length(11)));
                let body = body_of(&mut conn, head.body, Some(11)).await.unwrap();
                assert_eq!(body, b"hello world");
                assert!(conn.read_request().await.unwrap().is_none());
            });
        }
    }

    #[test]
    fn chunked_body_split_at_every_byte() {
        let mut input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        input.extend_from_slice(b"5;x=y\r\nhello\r\nA\r\n 012345678\r\n0\r\nT: v\r\n\r\n");
        for cut in 0..=input.len() {
            within_deadline(async {
                let mut conn = HttpConn::new(Peer::split(&input, &[cut]));
                let head = conn.read_request().await.unwrap().unwrap();
                assert_eq!(head.body, BodyKind::Chunked);
                let body = body_of(&mut conn, head.body, None).await.unwrap();
                assert_eq!(body, b"hello 012345678", "cut at {cut}");
                assert!(conn.read_request().await.unwrap().is_none());
            });
        }
        within_deadline(async {
            let bytewise: Vec<usize> = (1..input.len()).collect();
            let mut conn = HttpConn::new(Peer::split(&input, &bytewise));
            let head = conn.read_request().await.unwrap().unwrap();
            let body = body_of(&mut conn, head.body, None).await.unwrap();
            assert_eq!(body, b"hello 012345678");
        });
    }

    #[test]
    fn pipelined_requests_keep_their_leftovers() {
        let first = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        let second = b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n";
        let third = b"GET /c HTTP/1.1\r\nConnection: close\r\n\r\n";
        let input = [&first[..], second, third].concat();
        within_deadline(async {
            let mut conn = HttpConn::new(Peer::whole(&input));
            let head = conn.read_request().await.unwrap().unwrap();
            assert_eq!(head.target, "/a");
            assert_eq!(body_of(&mut conn, head.body, None).await.unwrap(), b"abc");
            // All of it came in one read; what follows the body is untouched.
            assert_eq!(conn.buf[conn.start..conn.end], [&second[..], third].concat());
            let head = conn.read_request().await.unwrap().unwrap();
            assert_eq!(head.target, "/b");
            assert_eq!(body_of(&mut conn, head.body, None).await.unwrap(), b"de");
            let (_, leftover) = conn.into_inner();
            assert_eq!(leftover, third);
        });
        for seed in 0..30 {
            within_deadline(async {
                let mut conn = HttpConn::new(Peer::random(&input, seed, 20));
                for (target, body) in [("/a", &b"abc"[..]), ("/b", b"de"), ("/c", b"")] {
                    let head = conn.read_request().await.unwrap().unwrap();
                    assert_eq!(head.target, target);
                    assert_eq!(body_of(&mut conn, head.body, None).await.unwrap(), body);
                }
                assert!(conn.read_request().await.unwrap().is_none());
            });
        }
    }

    #[test]
    fn response_until_close_over_tcp() {
        within_deadline(async {
            let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = async {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = HttpConn::new(stream.clone());
                let head = request.read_request().await.unwrap().unwrap();
                assert_eq!(head.target, "/poll");
                stream
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: x\r\n\r\nall of this")
                    .await
                    .unwrap();
                stream.write_all(b" and this").await.unwrap();
                // Dropping the stream closes it: the end of the body.
            };
            let client = async {
                let stream = smol::net::TcpStream::connect(addr).await.unwrap();
                let mut conn = HttpConn::new(stream);
                let mut out = Vec::new();
                crate::carrier::http::write_request_head(
                    &mut out,
                    "GET",
                    "/poll",
                    "st",
                    &[],
                    BodyKind::Empty,
                );
                conn.write_all(&out).await.unwrap();
                conn.flush().await.unwrap();
                let head = conn.read_response(false).await.unwrap();
                assert_eq!((head.body, head.keep_alive), (BodyKind::UntilClose, false));
                body_of(&mut conn, head.body, Some(100)).await.unwrap()
            };
            let ((), body) = futures_lite::future::zip(server, client).await;
            assert_eq!(body, b"all of this and this");
        });
    }

    #[test]
    fn responses_with_and_without_bodies_in_sequence() {
        let input = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nHTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        within_deadline(async {
            let mut conn = HttpConn::new(Peer::random(input, 7, 5));
            let head = conn.read_response(true).await.unwrap();
            assert_eq!(head.body, BodyKind::Empty);
            assert_eq!(body_of(&mut conn, head.body, None).await.unwrap(), b"");
            let head = conn.read_response(false).await.unwrap();
            assert_eq!((head.status, head.body), (204, BodyKind::Empty));
            let head = conn.read_response(false).await.unwrap();
            assert_eq!(body_of(&mut conn, head.body, None).await.unwrap(), b"ok");
            assert!(matches!(conn.read_response(false).await, Err(HttpError::UnexpectedEof)));
        });
    }

    #[test]
    fn bodies_over_max_len_are_refused() {
        within_deadline(async {
            // Refused from Content-Length alone, before any body byte is read.
            let input = b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n";
            let mut conn = HttpConn::new(Peer::whole(input));
            let head = conn.read_request().await.unwrap().unwrap();
            let mut body = conn.body(head.body, Some(10));
            assert!(matches!(body.next().await, Err(HttpError::BodyTooLarge { limit: 10 })));
            assert!(matches!(body.next().await, Err(HttpError::BodyTooLarge { limit: 10 })));

            let mut input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            input.extend_from_slice(&chunked(&[b'x'; 11], 4));
            let mut conn = HttpConn::new(Peer::whole(&input));
            let head = conn.read_request().await.unwrap().unwrap();
            let error = body_of(&mut conn, head.body, Some(10)).await.unwrap_err();
            assert!(matches!(error, HttpError::BodyTooLarge { limit: 10 }));
            assert_eq!(error.status(), 413);
            let mut conn = HttpConn::new(Peer::whole(&input));
            let head = conn.read_request().await.unwrap().unwrap();
            assert_eq!(body_of(&mut conn, head.body, Some(11)).await.unwrap().len(), 11);

            let input = b"HTTP/1.1 200 OK\r\n\r\n0123456789a";
            let mut conn = HttpConn::new(Peer::random(input, 3, 4));
            let head = conn.read_response(false).await.unwrap();
            let error = body_of(&mut conn, head.body, Some(10)).await.unwrap_err();
            assert!(matches!(error, HttpError::BodyTooLarge { limit: 10 }));
        });
    }

    #[test]
    fn head_over_the_bound_is_refused() {
        let mut input = b"GET / HTTP/1.1\r\n".to_vec();
        while input.len() <= MAX_HEAD_BYTES {
            // Few long fields, so the size bound trips before the count bound.
            input.extend_from_slice(b"X-Pad: ");
            input.extend_from_slice(&[b'p'; 500]);
            input.extend_from_slice(b"\r\n");
        }
        input.extend_from_slice(b"\r\n");
        within_deadline(async {
            let mut conn = HttpConn::new(Peer::random(&input, 11, 300));
            let error = conn.read_request().await.unwrap_err();
            assert!(matches!(error, HttpError::HeadTooLarge), "{error:?}");
            assert_eq!(error.status(), 431);
            // One line with no end, too.
            let mut conn = HttpConn::new(Peer::whole(&[b'G'; 3 * MAX_HEAD_BYTES]));
            assert!(matches!(conn.read_request().await, Err(HttpError::HeadTooLarge)));
        });
    }

    #[test]
    fn eof_inside_a_message_is_unexpected() {
        let request = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc";
        let chunked_request = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc";
        within_deadline(async {
            for cut in 1..38 {
                let mut conn = HttpConn::new(Peer::whole(&request[..cut]));
                let outcome = conn.read_request().await;
                assert!(matches!(outcome, Err(HttpError::UnexpectedEof)), "{cut}: {outcome:?}");
            }
            let mut conn = HttpConn::new(Peer::whole(request));
            let head = conn.read_request().await.unwrap().unwrap();
            let mut body = conn.body(head.body, None);
            assert_eq!(body.next().await.unwrap(), Some(&b"abc"[..]));
            assert!(matches!(body.next().await, Err(HttpError::UnexpectedEof)));
            assert!(matches!(body.next().await, Err(HttpError::UnexpectedEof)));

            let mut conn = HttpConn::new(Peer::whole(chunked_request));
            let head = conn.read_request().await.unwrap().unwrap();
            let error = body_of(&mut conn, head.body, None).await.unwrap_err();
            assert!(matches!(error, HttpError::UnexpectedEof));

            // Nothing, or only empty lines, before EOF is a clean close.
            for idle in [&b""[..], b"\r\n", b"\r\n\r\n\n"] {
                let mut conn = HttpConn::new(Peer::whole(idle));
                assert!(conn.read_request().await.unwrap().is_none());
            }
        });
    }

    #[test]
    fn a_small_buffer_reads_heads_and_grows_keeping_what_it_holds() {
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        // A head longer than the small buffer, as a proxy's cookies make it.
        let cookie = "c".repeat(5000);
        let mut input = format!(
            "POST /a HTTP/1.1\r\nCookie: {cookie}\r\nContent-Length: {}\r\n\r\n",
            payload.len()
        )
        .into_bytes();
        input.extend_from_slice(&payload);
        within_deadline(async {
            let mut conn = HttpConn::with_capacity(Peer::random(&input, 3, 30_000), 1);
            assert_eq!(conn.buffer_len(), SMALL_READ_BUF_BYTES);
            let head = conn.read_request().await.unwrap().unwrap();
            assert_eq!(head.header("Cookie"), Some(cookie.as_bytes()));
            assert!(conn.buffer_len() <= MIN_READ_BUF_BYTES);
            conn.grow();
            assert_eq!(body_of(&mut conn, head.body, None).await.unwrap(), payload);
        });
    }

    /// A connection that carried a bulk body and then only small messages
    /// (keepalives) goes back to the small buffer; a stranger's never grows
    /// past what a head needs.
    #[test]
    fn the_buffer_follows_the_traffic() {
        let bulk: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let mut input =
            format!("POST /bulk HTTP/1.1\r\nContent-Length: {}\r\n\r\n", bulk.len()).into_bytes();
        input.extend_from_slice(&bulk);
        let mut cuts = vec![input.len()];
        for i in 0..3 {
            input.extend_from_slice(
                format!("POST /k{i} HTTP/1.1\r\nContent-Length: 2\r\n\r\nka").as_bytes(),
            );
            cuts.push(input.len());
        }
        within_deadline(async {
            let mut conn = HttpConn::with_capacity(Peer::split(&input, &cuts), 1);
            let head = conn.read_request().await.unwrap().unwrap();
            conn.grow();
            assert_eq!(body_of(&mut conn, head.body, None).await.unwrap(), bulk);
            assert_eq!(conn.buffer_len(), READ_BUF_BYTES);
            for i in 0..3 {
                let head = conn.read_request().await.unwrap().unwrap();
                assert_eq!(head.target, format!("/k{i}"));
                assert_eq!(body_of(&mut conn, head.body, None).await.unwrap(), b"ka");
            }
            assert_eq!(conn.buffer_len(), SMALL_READ_BUF_BYTES);

            // Not grown: bodies stream through at most MIN_READ_BUF_BYTES.
            let mut conn = HttpConn::with_capacity(Peer::whole(&input), 1);
            let head = conn.read_request().await.unwrap().unwrap();
            assert_eq!(body_of(&mut conn, head.body, None).await.unwrap(), bulk);
            assert_eq!(conn.buffer_len(), MIN_READ_BUF_BYTES);
        });
    }

    /// A released buffer is gone while the connection waits, comes back
    /// small for the next message, and is kept while it holds unread bytes.
    #[test]
    fn a_released_buffer_comes_back_small() {
        let input = b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /b HTTP/1.1\r\n\r\n";
        within_deadline(async {
            let mut conn = HttpConn::new(Peer::whole(input));
            let head = conn.read_request().await.unwrap().unwrap();
            // The next request is buffered already: nothing is let go.
            conn.release();
            assert_eq!(conn.buffer_len(), SMALL_READ_BUF_BYTES);
            assert_eq!(body_of(&mut conn, head.body, None).await.unwrap(), b"hi");
            let head = conn.read_request().await.unwrap().unwrap();
            assert_eq!(head.target, "/b");
            conn.release();
            assert_eq!(conn.buffer_len(), 0);
            assert!(conn.read_request().await.unwrap().is_none());
            assert_eq!(conn.buffer_len(), SMALL_READ_BUF_BYTES);

            let mut conn = HttpConn::new(Peer::random(input, 5, 7));
            conn.release();
            let head = conn.read_request().await.unwrap().unwrap();
            assert_eq!(body_of(&mut conn, head.body, None).await.unwrap(), b"hi");
            conn.release();
            assert_eq!(conn.read_request().await.unwrap().unwrap().target, "/b");
        });
    }

    #[test]
    fn large_bodies_stream_through_the_buffer() {
        let mut rng = 5u64;
        let payload: Vec<u8> = (0..(3 << 20) + 17).map(|_| xorshift(&mut rng) as u8).collect();
        let mut input =
            format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", payload.len()).into_bytes();
        input.extend_from_slice(&payload);
        input.extend_from_slice(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        // Chunks bigger than the buffer, so one chunk spans many reads.
        input.extend_from_slice(&chunked(&payload, 100_000));
        input.extend_from_slice(b"GET /last HTTP/1.1\r\n\r\n");
        within_deadline(async {
            let mut conn = HttpConn::new(Peer::random(&input, 9, 100_000));
            for _ in 0..2 {
                let head = conn.read_request().await.unwrap().unwrap();
                let mut body = conn.body(head.body, Some(payload.len() as u64));
                let mut received = 0;
                while let Some(run) = body.next().await.unwrap() {
                    assert!(!run.is_empty() && run.len() <= READ_BUF_BYTES);
                    assert_eq!(run, &payload[received..received + run.len()]);
                    received += run.len();
                }
                assert_eq!(received, payload.len());
                assert!(conn.buffer_len() <= READ_BUF_BYTES);
            }
            let head = conn.read_request().await.unwrap().unwrap();
            assert_eq!(head.target, "/last");
        });
    }

    #[test]
    fn chunk_errors_surface_from_the_body() {
        let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX";
        within_deadline(async {
            let mut conn = HttpConn::new(Peer::whole(input));
            let head = conn.read_request().await.unwrap().unwrap();
            let mut body = conn.body(head.body, None);
            assert_eq!(body.next().await.unwrap(), Some(&b"abc"[..]));
            for _ in 0..2 {
                assert!(matches!(
                    body.next().await,
                    Err(HttpError::BadChunk(ChunkError::MissingCrlf))
                ));
            }
        });
    }

    #[test]
    fn writes_go_through() {
        within_deadline(async {
            let mut conn = HttpConn::new(Peer::whole(b""));
            conn.write_all(b"abc").await.unwrap();
            conn.write_all(b"def").await.unwrap();
            conn.flush().await.unwrap();
            assert_eq!(conn.get_ref().written, b"abcdef");
        });
    }

    #[test]
    fn random_garbage_is_an_error_never_a_panic_or_hang() {
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        for case in 0..100 {
            let len = 1 + below(&mut rng, 20_000);
            let garbage: Vec<u8> = (0..len).map(|_| xorshift(&mut rng) as u8).collect();
            let seed = xorshift(&mut rng);
            within_deadline(async {
                let mut conn = HttpConn::new(Peer::random(&garbage, seed, 2000));
                let outcome = conn.read_request().await;
                assert!(outcome.is_err(), "case {case}: {outcome:?}");
                let mut conn = HttpConn::new(Peer::random(&garbage, seed, 2000));
                let outcome = conn.read_response(false).await;
                assert!(outcome.is_err(), "case {case}: {outcome:?}");
            });
        }
    }

    #[test]
    fn mutated_streams_end_without_panic_or_hang() {
        let mut valid = b"POST /a HTTP/1.1\r\nHost: st\r\nContent-Length: 5\r\n\r\nhello".to_vec();
        valid.extend_from_slice(b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        valid.extend_from_slice(&chunked(b"some chunked payload", 6));
        valid.extend_from_slice(b"GET /c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let mut rng = 77u64;
        for _ in 0..300 {
            let mut input = valid.clone();
            for _ in 0..1 + below(&mut rng, 4) {
                let at = below(&mut rng, input.len());
                match below(&mut rng, 3) {
                    0 => input[at] = xorshift(&mut rng) as u8,
                    1 => {
                        input.remove(at);
                    }
                    _ => input.insert(at, b"\r\n0;: 9aF"[below(&mut rng, 9)]),
                }
            }
            let seed = xorshift(&mut rng);
            within_deadline(async {
                let mut conn = HttpConn::new(Peer::random(&input, seed, 16));
                // Each message consumes input, so this ends within the input.
                while let Ok(Some(head)) = conn.read_request().await {
                    if body_of(&mut conn, head.body, Some(1024)).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
}
