//! HTTP/1.1 message framing for the carrier: parse heads, decode chunked
//! bodies, encode heads. No I/O; `conn` drives this over a socket.
//!
//! ```text
//!  bytes in ──► parse_request / parse_response ──► RequestHead / ResponseHead
//!                                                    │ .body: BodyKind
//!               ChunkedDecoder::decode ◄──────────────┘  (when Chunked)
//!
//!  write_request_head / write_response_head ──► bytes out
//!  write_chunk_header + payload + CHUNK_END, ..., LAST_CHUNK
//!  open_chunk + records sealed in place + close_chunk (size unknown ahead)
//! ```
//!
//! Carrier messages cross forward proxies and load balancers we do not
//! control, so wherever two hops could disagree on where a body ends (request
//! smuggling) the parser refuses the message instead of picking a reading:
//! duplicate or list-valued `Content-Length`, `Content-Length` together with
//! `Transfer-Encoding`, any transfer coding but a lone `chunked`. Every input
//! is bounded by a named constant below, and nothing here panics on input.
//!
//! Not done here: I/O and deadlines (`conn` and its callers), content codings
//! (gzip), `Expect: 100-continue`, upgrades, percent-decoding of targets,
//! interpreting trailer fields (they are skipped).

/// Longest head (request or status line plus header fields plus the empty
/// line) we accept. 8 KiB is what nginx and Apache accept by default, so any
/// head a proxy on the path lets through fits; our own heads are a few
/// hundred bytes, and proxies add `Via`, `X-Forwarded-For` and cookies.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Most header fields in one head. Our messages carry at most eight; 32
/// leaves room for what proxies and load balancers add, and keeps the
/// parser's field array (on the stack) small.
pub const MAX_HEADERS: usize = 32;

/// Longest chunk-size line (the size plus any extensions, without its CRLF).
/// We never send extensions and the size is at most 8 digits; 64 bytes lets a
/// proxy's short extension through while a peer cannot make us buffer an
/// endless line.
pub const MAX_CHUNK_LINE: usize = 64;

/// Longest trailer section after the last chunk, counted from after the
/// `0` line through the final empty line. We send no trailers and ignore
/// any we get; 1 KiB allows a proxy's checksum field or two.
pub const MAX_TRAILER_BYTES: usize = 1024;

/// Most hex digits in a chunk size, leading zeros included: 8 digits keep a
/// chunk under 4 GiB (it fits a `u32`), far above any chunk we write (at
/// most a read buffer) or a proxy re-chunks to.
pub const MAX_CHUNK_SIZE_DIGITS: usize = 8;

/// Ends the payload of every chunk.
pub const CHUNK_END: &[u8] = b"\r\n";

/// Ends a chunked body: the zero-size chunk and an empty trailer section.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// How the body after a head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body.
    Empty,
    /// Exactly this many bytes (`Content-Length`).
    Length(u64),
    /// `Transfer-Encoding: chunked`; decode with [`ChunkedDecoder`].
    Chunked,
    /// Everything until the peer closes the connection (responses only, as
    /// HTTP/1.0 proxies send them).
    UntilClose,
}

/// A parsed request head; the body, if any, follows in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Method token as sent, e.g. `GET`.
    pub method: String,
    /// Request target as sent: origin-form (`/s/abc`) or absolute-form.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields in arrival order, names as sent.
    pub headers: Vec<(String, Vec<u8>)>,
    /// How the body is delimited.
    pub body: BodyKind,
    /// Whether the connection may carry another request after this one.
    pub keep_alive: bool,
}

/// A parsed response head; the body, if any, follows in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Reason phrase as sent; empty if missing or not ASCII.
    pub reason: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields in arrival order, names as sent.
    pub headers: Vec<(String, Vec<u8>)>,
    /// How the body is delimited.
    pub body: BodyKind,
    /// Whether the connection may carry another request after this one.
    pub keep_alive: bool,
}

impl RequestHead {
    /// Value of the first field named `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        first_field(&self.headers, name)
    }
}

impl ResponseHead {
    /// Value of the first field named `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        first_field(&self.headers, name)
    }

    /// Values of every field named `name`, in order: `Set-Cookie` may not
    /// be joined into one line, so each comes as its own field.
    pub fn headers_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(field, _)| field.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_slice())
    }
}

fn first_field<'h>(headers: &'h [(String, Vec<u8>)], name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .find(|(field, _)| field.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_slice())
}

/// Why an HTTP message could not be read.
///
/// All but the last two are the peer's fault (or a middlebox's on the path):
/// it sent something we will not interpret. `Io` and `Timeout` are the
/// network's or ours.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The head is not HTTP/1.x syntax (httparse's reason attached); this
    /// includes obsolete line folding.
    #[error("malformed HTTP head: {0}")]
    Malformed(httparse::Error),
    /// No complete head within `MAX_HEAD_BYTES`.
    #[error("HTTP head longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// More than `MAX_HEADERS` header fields.
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    /// Several `Content-Length` fields, or one holding a list, even if the
    /// values agree: hops could disagree on which one counts.
    #[error("more than one Content-Length")]
    DuplicateContentLength,
    /// `Content-Length` is not all ASCII digits or does not fit in 64 bits.
    #[error("Content-Length is not a decimal number below 2^64")]
    BadContentLength,
    /// Both `Content-Length` and `Transfer-Encoding`: hops could disagree on
    /// which one frames the body.
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndTransferEncoding,
    /// `Transfer-Encoding` is anything but a single `chunked`, or appears in
    /// an HTTP/1.0 message, which cannot carry it.
    #[error("unsupported Transfer-Encoding")]
    UnsupportedTransferEncoding,
    /// A chunked body broke chunked syntax or its bounds.
    #[error("bad chunked body: {0}")]
    BadChunk(ChunkError),
    /// The body is longer than the caller allows.
    #[error("body longer than the {limit} bytes allowed")]
    BodyTooLarge {
        /// The caller's limit in bytes.
        limit: u64,
    },
    /// The connection closed in the middle of a head or a body.
    #[error("connection closed in the middle of an HTTP message")]
    UnexpectedEof,
    /// Reading or writing the connection failed.
    #[error("connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// A deadline set by the caller passed; nothing in this module sets one.
    #[error("timed out waiting for the peer")]
    Timeout,
}

impl HttpError {
    /// The status a server should answer with before closing (if it can
    /// still write: after `Io` or `UnexpectedEof` there is usually no one to
    /// read it).
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge | HttpError::TooManyHeaders => 431,
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::Timeout => 408,
            _ => 400,
        }
    }
}

/// How a chunked body broke the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// The chunk-size line is not `HEX [BWS] [; extensions]`: an empty
    /// size, a non-hex digit, or a control byte.
    #[error("chunk-size line is not hex digits with optional extensions")]
    BadSizeLine,
    /// The chunk size has more than `MAX_CHUNK_SIZE_DIGITS` hex digits.
    #[error("chunk size has more than {MAX_CHUNK_SIZE_DIGITS} hex digits")]
    SizeTooLarge,
    /// The chunk-size line is longer than `MAX_CHUNK_LINE`.
    #[error("chunk-size line longer than {MAX_CHUNK_LINE} bytes")]
    LineTooLong,
    /// A chunk-size line, chunk data or trailer line did not end in CRLF
    /// (a bare LF included).
    #[error("missing CRLF")]
    MissingCrlf,
    /// The trailer section is longer than `MAX_TRAILER_BYTES`.
    #[error("trailer section longer than {MAX_TRAILER_BYTES} bytes")]
    TrailerTooLarge,
}

/// Parses a request head at the start of `buf`.
///
/// `Ok(None)`: the head is incomplete, read more. `Ok(Some((head, len)))`:
/// the body (or the next request) starts at `buf[len..]`.
pub fn parse_request(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let window = head_window(buf);
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut slots);
    let len = match request.parse(window).map_err(head_error)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return incomplete(window),
    };
    // httparse fills all three before it reports Complete.
    let (Some(method), Some(target), Some(minor_version)) =
        (request.method, request.path, request.version)
    else {
        return Err(HttpError::Malformed(httparse::Error::Token));
    };
    let fields = &*request.headers;
    let body = match declared_framing(fields, minor_version)? {
        Declared::Nothing => BodyKind::Empty,
        Declared::Length(n) => BodyKind::Length(n),
        Declared::Chunked => BodyKind::Chunked,
    };
    let head = RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        minor_version,
        headers: owned_fields(fields),
        body,
        keep_alive: keep_alive(fields, minor_version),
    };
    Ok(Some((head, len)))
}

/// Parses a response head at the start of `buf`; `head_request` says the
/// request was `HEAD`, whose response never has a body whatever it declares.
///
/// Return values as for [`parse_request`].
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
) -> Result<Option<(ResponseHead, usize)>, HttpError> {
    let window = head_window(buf);
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let len = match response.parse(window).map_err(head_error)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return incomplete(window),
    };
    // httparse fills all three before it reports Complete.
    let (Some(status), Some(reason), Some(minor_version)) =
        (response.code, response.reason, response.version)
    else {
        return Err(HttpError::Malformed(httparse::Error::Status));
    };
    let fields = &*response.headers;
    // Framing is checked even where it is then ignored: a response that
    // declares two lengths is not one we want to read anything else from.
    let declared = declared_framing(fields, minor_version)?;
    let body = if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        BodyKind::Empty
    } else {
        match declared {
            Declared::Length(n) => BodyKind::Length(n),
            Declared::Chunked => BodyKind::Chunked,
            Declared::Nothing => BodyKind::UntilClose,
        }
    };
    let head = ResponseHead {
        status,
        reason: reason.to_owned(),
        minor_version,
        headers: owned_fields(fields),
        body,
        // The close is the end of the body, so the connection cannot go on.
        keep_alive: body != BodyKind::UntilClose && keep_alive(fields, minor_version),
    };
    Ok(Some((head, len)))
}

/// The part of `buf` a head may occupy: parsing stops at the bound rather
/// than looking for the end of a head in bytes we would refuse anyway.
fn head_window(buf: &[u8]) -> &[u8] {
    &buf[..buf.len().min(MAX_HEAD_BYTES)]
}

fn incomplete<T>(window: &[u8]) -> Result<Option<T>, HttpError> {
    if window.len() >= MAX_HEAD_BYTES {
        Err(HttpError::HeadTooLarge)
    } else {
        Ok(None)
    }
}

fn head_error(error: httparse::Error) -> HttpError {
    match error {
        httparse::Error::TooManyHeaders => HttpError::TooManyHeaders,
        other => HttpError::Malformed(other),
    }
}

fn owned_fields(fields: &[httparse::Header<'_>]) -> Vec<(String, Vec<u8>)> {
    fields.iter().map(|field| (field.name.to_owned(), field.value.to_vec())).collect()
}

/// What the framing fields say, before the request or response rules apply.
enum Declared {
    Nothing,
    Length(u64),
    Chunked,
}

fn declared_framing(
    fields: &[httparse::Header<'_>],
    minor_version: u8,
) -> Result<Declared, HttpError> {
    let mut content_length = None;
    let mut transfer_encoding = None;
    for field in fields {
        if field.name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err(HttpError::DuplicateContentLength);
            }
            content_length = Some(field.value);
        } else if field.name.eq_ignore_ascii_case("transfer-encoding") {
            // Two fields mean a list of codings, which is never just `chunked`.
            if transfer_encoding.is_some() {
                return Err(HttpError::UnsupportedTransferEncoding);
            }
            transfer_encoding = Some(field.value);
        }
    }
    match (content_length, transfer_encoding) {
        (Some(_), Some(_)) => Err(HttpError::LengthAndTransferEncoding),
        (Some(value), None) => parse_content_length(value).map(Declared::Length),
        (None, Some(value)) => {
            if minor_version == 0 || !trim_ows(value).eq_ignore_ascii_case(b"chunked") {
                Err(HttpError::UnsupportedTransferEncoding)
            } else {
                Ok(Declared::Chunked)
            }
        }
        (None, None) => Ok(Declared::Nothing),
    }
}

fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    let digits = trim_ows(value);
    if digits.contains(&b',') {
        return Err(HttpError::DuplicateContentLength);
    }
    if digits.is_empty() {
        return Err(HttpError::BadContentLength);
    }
    digits.iter().try_fold(0u64, |total, &byte| {
        if !byte.is_ascii_digit() {
            return Err(HttpError::BadContentLength);
        }
        total
            .checked_mul(10)
            .and_then(|total| total.checked_add(u64::from(byte - b'0')))
            .ok_or(HttpError::BadContentLength)
    })
}

fn keep_alive(fields: &[httparse::Header<'_>], minor_version: u8) -> bool {
    let mut close = false;
    let mut keep = false;
    let tokens = fields
        .iter()
        .filter(|field| field.name.eq_ignore_ascii_case("connection"))
        .flat_map(|field| field.value.split(|&byte| byte == b','))
        .map(trim_ows);
    for token in tokens {
        close |= token.eq_ignore_ascii_case(b"close");
        keep |= token.eq_ignore_ascii_case(b"keep-alive");
    }
    !close && (minor_version >= 1 || keep)
}

/// Strips optional whitespace (SP, HTAB) around a field value or list item.
/// httparse already trims whole values; list items still need it.
fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |byte: &u8| *byte == b' ' || *byte == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !is_ows(b)).map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// What one [`ChunkedDecoder::decode`] call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// Payload at `input[start..start + len]` (`len > 0`); `consumed` counts
    /// every byte eaten including any chunk framing before it and equals
    /// `start + len`. Call again with the rest of the input.
    Data {
        /// Bytes of input used up.
        consumed: usize,
        /// Where the payload starts in the input.
        start: usize,
        /// Payload length.
        len: usize,
    },
    /// All of the input was used up (`consumed == input.len()`) with no
    /// payload in it; call again with new bytes.
    NeedMore {
        /// Bytes of input used up.
        consumed: usize,
    },
    /// The body ended after `consumed` bytes; the rest of the input belongs
    /// to the next message. Further calls return `End { consumed: 0 }`.
    End {
        /// Bytes of input used up.
        consumed: usize,
    },
}

/// Decodes a chunked body in place, in any pieces the network delivers.
///
/// Holds only the position inside the framing, never payload, so it needs
/// no buffer and any split of the input gives the same result. Each call
/// with non-empty input either uses up at least one byte or reports `End`;
/// once it fails it keeps returning the same error.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy)]
enum ChunkState {
    /// Inside CRLF-terminated framing, one byte at a time.
    Line(LineState),
    /// Inside chunk data, with this many payload bytes to go (never 0).
    Data {
        remaining: u64,
    },
    Done,
    Failed(ChunkError),
}

#[derive(Debug, Clone, Copy)]
enum LineState {
    /// A chunk-size line; `line_len` counts its bytes so far, without CRLF.
    Size { phase: SizePhase, size: u64, digits: usize, line_len: usize },
    /// The CR ending a size line was seen; an LF must follow.
    SizeLf { size: u64 },
    /// Chunk data is over; its CR must follow.
    DataCr,
    /// The CR after chunk data was seen; an LF must follow.
    DataLf,
    /// In the trailer section; `total` counts all of it so far, `line_len`
    /// the current line (0 at the start of a line).
    Trailer { total: usize, line_len: usize },
    /// A CR in the trailer section was seen; an LF must follow.
    TrailerLf { total: usize, line_len: usize },
}

#[derive(Debug, Clone, Copy)]
enum SizePhase {
    Digits,
    /// Whitespace after the digits, before `;` or CRLF.
    Space,
    /// After the first `;`: extensions, which we ignore.
    Extension,
}

const SIZE_LINE_START: LineState =
    LineState::Size { phase: SizePhase::Digits, size: 0, digits: 0, line_len: 0 };

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a chunked body.
    pub const fn new() -> Self {
        ChunkedDecoder { state: ChunkState::Line(SIZE_LINE_START) }
    }

    /// Eats framing from the start of `input` up to and including the next
    /// run of payload, the end of the body, or the end of `input`.
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded, HttpError> {
        let mut pos = 0;
        loop {
            match self.state {
                ChunkState::Done => return Ok(Decoded::End { consumed: pos }),
                ChunkState::Failed(error) => return Err(HttpError::BadChunk(error)),
                ChunkState::Data { remaining } => {
                    let available = input.len() - pos;
                    if available == 0 {
                        return Ok(Decoded::NeedMore { consumed: pos });
                    }
                    let len = usize::try_from(remaining).map_or(available, |r| r.min(available));
                    // usize is at most 64 bits on every target we build for.
                    let left = remaining - len as u64;
                    self.state = if left == 0 {
                        ChunkState::Line(LineState::DataCr)
                    } else {
                        ChunkState::Data { remaining: left }
                    };
                    return Ok(Decoded::Data { consumed: pos + len, start: pos, len });
                }
                ChunkState::Line(line) => {
                    let Some(&byte) = input.get(pos) else {
                        return Ok(Decoded::NeedMore { consumed: pos });
                    };
                    pos += 1;
                    self.state = match step(line, byte) {
                        Ok(next) => next,
                        Err(error) => {
                            self.state = ChunkState::Failed(error);
                            return Err(HttpError::BadChunk(error));
                        }
                    };
                }
            }
        }
    }
}

/// One byte of chunk framing.
fn step(line: LineState, byte: u8) -> Result<ChunkState, ChunkError> {
    let next = match line {
        LineState::Size { phase, size, digits, line_len } => {
            match byte {
                b'\r' if digits == 0 => return Err(ChunkError::BadSizeLine),
                b'\r' => return Ok(ChunkState::Line(LineState::SizeLf { size })),
                b'\n' => return Err(ChunkError::MissingCrlf),
                _ => {}
            }
            let line_len = line_len + 1;
            if line_len > MAX_CHUNK_LINE {
                return Err(ChunkError::LineTooLong);
            }
            let hex = char::from(byte).to_digit(16);
            let (phase, size, digits) = match (phase, hex) {
                (SizePhase::Digits, Some(value)) => {
                    if digits == MAX_CHUNK_SIZE_DIGITS {
                        return Err(ChunkError::SizeTooLarge);
                    }
                    (SizePhase::Digits, size << 4 | u64::from(value), digits + 1)
                }
                // A size must come first: no leading whitespace, no bare `;`.
                (SizePhase::Digits | SizePhase::Space, _) if digits == 0 => {
                    return Err(ChunkError::BadSizeLine)
                }
                (SizePhase::Digits | SizePhase::Space, _) => match byte {
                    b' ' | b'\t' => (SizePhase::Space, size, digits),
                    b';' => (SizePhase::Extension, size, digits),
                    _ => return Err(ChunkError::BadSizeLine),
                },
                // Extensions are skipped, but control bytes have no place in them.
                (SizePhase::Extension, _) if byte == b'\t' || (byte >= b' ' && byte != 0x7f) => {
                    (SizePhase::Extension, size, digits)
                }
                (SizePhase::Extension, _) => return Err(ChunkError::BadSizeLine),
            };
            LineState::Size { phase, size, digits, line_len }
        }
        LineState::SizeLf { size } => {
            if byte != b'\n' {
                return Err(ChunkError::MissingCrlf);
            }
            if size == 0 {
                LineState::Trailer { total: 0, line_len: 0 }
            } else {
                return Ok(ChunkState::Data { remaining: size });
            }
        }
        LineState::DataCr if byte == b'\r' => LineState::DataLf,
        LineState::DataLf if byte == b'\n' => SIZE_LINE_START,
        LineState::DataCr | LineState::DataLf => return Err(ChunkError::MissingCrlf),
        LineState::Trailer { total, line_len } => {
            let total = trailer_total(total)?;
            match byte {
                b'\r' => LineState::TrailerLf { total, line_len },
                b'\n' => return Err(ChunkError::MissingCrlf),
                _ => LineState::Trailer { total, line_len: line_len + 1 },
            }
        }
        LineState::TrailerLf { total, line_len } => {
            let total = trailer_total(total)?;
            if byte != b'\n' {
                return Err(ChunkError::MissingCrlf);
            }
            if line_len == 0 {
                return Ok(ChunkState::Done);
            }
            LineState::Trailer { total, line_len: 0 }
        }
    };
    Ok(ChunkState::Line(next))
}

fn trailer_total(total: usize) -> Result<usize, ChunkError> {
    let total = total + 1;
    if total > MAX_TRAILER_BYTES {
        return Err(ChunkError::TrailerTooLarge);
    }
    Ok(total)
}

/// Appends a request head. `Host` and the body framing are written from the
/// arguments; `extra_headers` must not name them. An `Empty` body on `POST`
/// or `PUT` gets `Content-Length: 0`, because a proxy may otherwise wait for
/// a body (or refuse the request with 411).
///
/// # Panics
///
/// If `body` is `UntilClose`: a request cannot end by closing the
/// connection, since the response must come back on it.
pub fn write_request_head(
    out: &mut Vec<u8>,
    method: &str,
    target: &str,
    host: &str,
    extra_headers: &[(&str, &str)],
    body: BodyKind,
) {
    assert!(
        body != BodyKind::UntilClose,
        "a request body cannot be delimited by closing the connection"
    );
    push_line_part(out, method);
    out.push(b' ');
    push_line_part(out, target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    push_field(out, "Host", host);
    for (name, value) in extra_headers {
        push_field(out, name, value);
    }
    push_framing(out, body, matches!(method, "POST" | "PUT"));
    out.extend_from_slice(b"\r\n");
}

/// Appends an HTTP/1.1 response head. The body framing is written from
/// `body`; `extra_headers` must not name `Content-Length`,
/// `Transfer-Encoding` or `Connection`. `Connection: close` is written when
/// `keep_alive` is false and always for `UntilClose`, whose end is the close.
/// An `Empty` body gets `Content-Length: 0` except on 1xx, 204 and 304,
/// which cannot have one.
pub fn write_response_head(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    extra_headers: &[(&str, &str)],
    body: BodyKind,
    keep_alive: bool,
) {
    debug_assert!((100..1000).contains(&status), "status must be 3 digits");
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    push_line_part(out, reason);
    out.extend_from_slice(b"\r\n");
    for (name, value) in extra_headers {
        push_field(out, name, value);
    }
    let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
    push_framing(out, body, !bodiless);
    if !keep_alive || body == BodyKind::UntilClose {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends the size line of a chunk of `len` payload bytes; follow it with
/// the payload and [`CHUNK_END`]. `len` must not be 0: that is
/// [`LAST_CHUNK`], which ends the body.
pub fn write_chunk_header(out: &mut Vec<u8>, len: usize) {
    debug_assert!(len > 0, "a zero-size chunk ends the body; use LAST_CHUNK");
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut rest = len;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[rest % 16];
        rest /= 16;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(CHUNK_END);
}

/// Bytes of the fixed-width size line [`open_chunk`] leaves room for.
const OPEN_CHUNK_HEAD: usize = 10;

/// Starts a chunk whose size is not known yet (records sealed straight into
/// `out`): room for a fixed-width size line, returned as the place
/// [`close_chunk`] fills in. Leading zeros are valid chunk-size digits.
pub fn open_chunk(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(b"00000000\r\n");
    at
}

/// Ends the chunk [`open_chunk`] started at `at`: writes its size and
/// [`CHUNK_END`]. The chunk must not be empty: that is [`LAST_CHUNK`].
pub fn close_chunk(out: &mut Vec<u8>, at: usize) {
    let len = out.len() - at - OPEN_CHUNK_HEAD;
    debug_assert!(len > 0 && len <= u32::MAX as usize, "a chunk of 1 to 2^32-1 bytes");
    for (i, digit) in out[at..at + 8].iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[(len >> (28 - 4 * i)) & 0xf];
    }
    out.extend_from_slice(CHUNK_END);
}

/// A complete response for a request we refuse, to write before closing:
/// status line, a one-line text body, `Connection: close`. Statuses other
/// than 400, 403, 404, 405, 408, 410, 413, 431, 502 and 503 give a 500, so a
/// caller's slip cannot put a status line we did not mean on the wire.
pub fn error_response(status: u16) -> Vec<u8> {
    error_response_marked(status, Some(super::STATION_MARK), None)
}

/// The station's 503 for an agent to come back after `retry_after`
/// seconds (`Retry-After`), when the handshake budget is spent.
pub fn busy_response(retry_after: u64) -> Vec<u8> {
    error_response_marked(503, Some(super::STATION_MARK), Some(retry_after))
}

/// As [`error_response`] without the station's mark, for listeners that
/// are not the carrier's (the status listener): an agent pointed at one by
/// mistake must not take its answer for the station's.
pub fn unmarked_error_response(status: u16) -> Vec<u8> {
    error_response_marked(status, None, None)
}

fn error_response_marked(
    status: u16,
    mark: Option<(&'static str, &'static str)>,
    retry_after: Option<u64>,
) -> Vec<u8> {
    let (status, reason, text) = match status {
        400 => (400, "Bad Request", "bad request\n"),
        403 => (403, "Forbidden", "forbidden\n"),
        404 => (404, "Not Found", "not found\n"),
        410 => (410, "Gone", "gone\n"),
        405 => (405, "Method Not Allowed", "method not allowed\n"),
        409 => (409, "Conflict", "another agent uses this device's key\n"),
        408 => (408, "Request Timeout", "request timeout\n"),
        413 => (413, "Content Too Large", "content too large\n"),
        431 => (431, "Request Header Fields Too Large", "request header fields too large\n"),
        502 => (502, "Bad Gateway", "bad gateway\n"),
        503 => (503, "Service Unavailable", "service unavailable\n"),
        _ => (500, "Internal Server Error", "internal server error\n"),
    };
    // 404 and 405 are cacheable by default; a proxy must not replay one to
    // the next carrier request for the same path.
    let mut fields = vec![("Content-Type", "text/plain"), ("Cache-Control", "no-store")];
    fields.extend(mark);
    // RFC 9110 requires Allow on 405; the carrier uses only these two.
    if status == 405 {
        fields.push(("Allow", "GET, POST"));
    }
    let retry_after = retry_after.map(|secs| secs.to_string());
    if let Some(secs) = &retry_after {
        fields.push(("Retry-After", secs));
    }
    let mut out = Vec::with_capacity(160);
    // usize fits in u64 on every target we build for.
    let body = BodyKind::Length(text.len() as u64);
    write_response_head(&mut out, status, reason, &fields, body, false);
    out.extend_from_slice(text.as_bytes());
    out
}

fn push_framing(out: &mut Vec<u8>, body: BodyKind, empty_gets_length: bool) {
    match body {
        BodyKind::Empty if empty_gets_length => out.extend_from_slice(b"Content-Length: 0\r\n"),
        BodyKind::Empty | BodyKind::UntilClose => {}
        BodyKind::Length(len) => {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, len);
            out.extend_from_slice(b"\r\n");
        }
        BodyKind::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    push_line_part(out, name);
    out.extend_from_slice(b": ");
    push_line_part(out, value);
    out.extend_from_slice(b"\r\n");
}

/// Appends text that must stay on its line. Values come from our config and
/// from fields httparse already accepted (which cannot hold CR or LF), so a
/// line break here is a bug in the caller, caught in tests.
fn push_line_part(out: &mut Vec<u8>, text: &str) {
    debug_assert!(!text.contains(['\r', '\n']), "header text must not contain CR or LF: {text:?}");
    out.extend_from_slice(text.as_bytes());
}

fn push_decimal(out: &mut Vec<u8>, value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b"0123456789"[(rest % 10) as usize];
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carrier::harness::{decode_in_pieces, Outcome};

    fn request(text: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
        parse_request(text)
    }

    fn request_ok(text: &[u8]) -> RequestHead {
        match parse_request(text) {
            Ok(Some((head, len))) => {
                assert_eq!(len, text.len(), "head should span the whole input");
                head
            }
            other => panic!("expected a complete head, got {other:?}"),
        }
    }

    fn request_err(text: &[u8]) -> HttpError {
        match parse_request(text) {
            Err(error) => error,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn response_ok(text: &[u8], head_request: bool) -> ResponseHead {
        match parse_response(text, head_request) {
            Ok(Some((head, len))) => {
                assert_eq!(len, text.len(), "head should span the whole input");
                head
            }
            other => panic!("expected a complete head, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_request_head_and_reports_its_length() {
        let text = b"POST /s/abc?x=1 HTTP/1.1\r\nHost: st\r\nContent-Length: 5\r\nX-A: one\r\nx-a: two\r\n\r\nhello";
        let (head, len) = request(text).unwrap().unwrap();
        assert_eq!(len, text.len() - 5);
        assert_eq!(head.method, "POST");
        assert_eq!(head.target, "/s/abc?x=1");
        assert_eq!(head.minor_version, 1);
        assert_eq!(head.body, BodyKind::Length(5));
        assert!(head.keep_alive);
        assert_eq!(head.header("host"), Some(&b"st"[..]));
        assert_eq!(head.header("X-A"), Some(&b"one"[..]));
        assert_eq!(head.header("missing"), None);
        assert_eq!(head.headers.len(), 4);
    }

    #[test]
    fn incomplete_heads_ask_for_more_at_every_cut() {
        let text = b"GET / HTTP/1.1\r\nHost: st\r\n\r\n";
        for cut in 0..text.len() {
            assert!(matches!(request(&text[..cut]), Ok(None)), "cut at {cut}");
        }
        assert_eq!(request_ok(text).body, BodyKind::Empty);
    }

    #[test]
    fn head_bound_is_exact() {
        let mut text = b"GET / HTTP/1.1\r\nX: ".to_vec();
        text.resize(MAX_HEAD_BYTES - 4, b'a');
        text.extend_from_slice(b"\r\n\r\n");
        assert_eq!(text.len(), MAX_HEAD_BYTES);
        request_ok(&text);

        let mut long = text[..MAX_HEAD_BYTES - 4].to_vec();
        long.extend_from_slice(b"a\r\n\r\n");
        assert!(matches!(request_err(&long), HttpError::HeadTooLarge));
        // Without an end in sight, the bound applies as soon as it is reached.
        assert!(matches!(request(&long[..MAX_HEAD_BYTES - 1]), Ok(None)));
        assert!(matches!(request_err(&long[..MAX_HEAD_BYTES]), HttpError::HeadTooLarge));
        assert_eq!(HttpError::HeadTooLarge.status(), 431);
    }

    #[test]
    fn header_count_bound_is_exact() {
        let with = |count: usize| {
            let mut text = b"GET / HTTP/1.1\r\n".to_vec();
            for i in 0..count {
                text.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
            }
            text.extend_from_slice(b"\r\n");
            text
        };
        assert_eq!(request_ok(&with(MAX_HEADERS)).headers.len(), MAX_HEADERS);
        let error = request_err(&with(MAX_HEADERS + 1));
        assert!(matches!(error, HttpError::TooManyHeaders));
        assert_eq!(error.status(), 431);
    }

    #[test]
    fn malformed_heads_carry_httparse_reason() {
        for text in [
            &b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n"[..], // obsolete line folding
            b"GET / HTTP/1.1\r\n folded: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length : 5\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"G\x01T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        ] {
            let error = request_err(text);
            assert!(matches!(error, HttpError::Malformed(_)), "{text:?}: {error:?}");
            assert_eq!(error.status(), 400);
        }
        assert!(matches!(
            request_err(b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n"),
            HttpError::Malformed(httparse::Error::HeaderName)
        ));
    }

    #[test]
    fn content_length_is_strict() {
        let with = |fields: &str| format!("POST / HTTP/1.1\r\n{fields}\r\n").into_bytes();
        assert_eq!(request_ok(&with("Content-Length: 007\r\n")).body, BodyKind::Length(7));
        assert_eq!(
            request_ok(&with("content-length:\t 18446744073709551615 \r\n")).body,
            BodyKind::Length(u64::MAX)
        );
        for (fields, expected) in [
            ("Content-Length: 5\r\nContent-Length: 5\r\n", "Duplicate"),
            ("Content-Length: 5\r\ncontent-length: 6\r\n", "Duplicate"),
            ("Content-Length: 5, 5\r\n", "Duplicate"),
            ("Content-Length: 5,\r\n", "Duplicate"),
            ("Content-Length: \r\n", "Bad"),
            ("Content-Length: +5\r\n", "Bad"),
            ("Content-Length: -1\r\n", "Bad"),
            ("Content-Length: 0x5\r\n", "Bad"),
            ("Content-Length: 5 5\r\n", "Bad"),
            ("Content-Length: 18446744073709551616\r\n", "Bad"),
            ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "Both"),
            ("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "Both"),
        ] {
            let error = request_err(&with(fields));
            let matched = match expected {
                "Duplicate" => matches!(error, HttpError::DuplicateContentLength),
                "Bad" => matches!(error, HttpError::BadContentLength),
                _ => matches!(error, HttpError::LengthAndTransferEncoding),
            };
            assert!(matched, "{fields:?} gave {error:?}");
            assert_eq!(error.status(), 400);
        }
    }

    #[test]
    fn transfer_encoding_must_be_exactly_chunked() {
        let with = |version: &str, fields: &str| {
            format!("POST / HTTP/1.{version}\r\n{fields}\r\n").into_bytes()
        };
        for value in ["chunked", "Chunked", "CHUNKED", "  chunked\t"] {
            let text = with("1", &format!("Transfer-Encoding: {value}\r\n"));
            assert_eq!(request_ok(&text).body, BodyKind::Chunked, "{value:?}");
        }
        for fields in [
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: identity\r\n",
            "Transfer-Encoding: chunked;q=1\r\n",
            "Transfer-Encoding: \r\n",
            "Transfer-Encoding: xchunked\r\n",
        ] {
            let error = request_err(&with("1", fields));
            assert!(
                matches!(error, HttpError::UnsupportedTransferEncoding),
                "{fields:?} gave {error:?}"
            );
        }
        let error = request_err(&with("0", "Transfer-Encoding: chunked\r\n"));
        assert!(matches!(error, HttpError::UnsupportedTransferEncoding));
    }

    #[test]
    fn keep_alive_follows_version_and_connection_tokens() {
        for (version, fields, expected) in [
            ("1", "", true),
            ("1", "Connection: close\r\n", false),
            ("1", "Connection: Upgrade, CLOSE\r\n", false),
            ("1", "Connection: keep-alive\r\nConnection: close\r\n", false),
            ("1", "Connection: keep-alive\r\n", true),
            ("1", "Connection: closed\r\n", true),
            ("0", "", false),
            ("0", "Connection: Keep-Alive\r\n", true),
            ("0", "Connection: foo ,keep-alive \r\n", true),
            ("0", "Connection: keep-alive, close\r\n", false),
        ] {
            let text = format!("GET / HTTP/1.{version}\r\n{fields}\r\n");
            let head = request_ok(text.as_bytes());
            assert_eq!(head.keep_alive, expected, "{text:?}");
        }
    }

    #[test]
    fn response_body_kinds() {
        for (text, head_request, body, keep_alive) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"[..],
                false,
                BodyKind::Length(3),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                BodyKind::Chunked,
                true,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", false, BodyKind::UntilClose, false),
            (
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n",
                false,
                BodyKind::UntilClose,
                false,
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true, BodyKind::Empty, true),
            (b"HTTP/1.1 200 OK\r\n\r\n", true, BodyKind::Empty, true),
            (b"HTTP/1.1 100 Continue\r\n\r\n", false, BodyKind::Empty, true),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false, BodyKind::Empty, true),
            (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false,
                BodyKind::Empty,
                true,
            ),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n", false, BodyKind::Length(3), false),
            (
                b"HTTP/1.1 502 \r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                false,
                BodyKind::Length(0),
                false,
            ),
        ] {
            let head = response_ok(text, head_request);
            assert_eq!((head.body, head.keep_alive), (body, keep_alive), "{text:?}");
        }
    }

    #[test]
    fn response_fields_and_framing_errors() {
        let text = b"HTTP/1.1 200 Fine\r\nSet-Cookie: a=1\r\nX: y\r\nset-cookie: b=2\r\nContent-Length: 0\r\n\r\n";
        let head = response_ok(text, false);
        assert_eq!((head.status, head.reason.as_str()), (200, "Fine"));
        let cookies: Vec<&[u8]> = head.headers_all("Set-Cookie").collect();
        assert_eq!(cookies, [&b"a=1"[..], b"b=2"]);
        assert_eq!(head.header("SET-COOKIE"), Some(&b"a=1"[..]));

        for text in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 1, 1\r\n\r\n",
        ] {
            assert!(parse_response(text, true).is_err(), "{text:?}");
        }
        assert!(matches!(parse_response(b"HTTP/1.1 200 OK\r\n", false), Ok(None)));
        let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
        huge.resize(MAX_HEAD_BYTES, b'x');
        assert!(matches!(parse_response(&huge, false), Err(HttpError::HeadTooLarge)));
    }

    #[test]
    fn request_encoder_writes_exact_bytes_and_parses_back() {
        let cases: [(&str, BodyKind, &[u8]); 4] = [
            ("GET", BodyKind::Empty, b"GET /s/1 HTTP/1.1\r\nHost: st:80\r\nCookie: lb=7\r\n\r\n"),
            (
                "POST",
                BodyKind::Empty,
                b"POST /s/1 HTTP/1.1\r\nHost: st:80\r\nCookie: lb=7\r\nContent-Length: 0\r\n\r\n",
            ),
            (
                "POST",
                BodyKind::Length(1234),
                b"POST /s/1 HTTP/1.1\r\nHost: st:80\r\nCookie: lb=7\r\nContent-Length: 1234\r\n\r\n",
            ),
            (
                "POST",
                BodyKind::Chunked,
                b"POST /s/1 HTTP/1.1\r\nHost: st:80\r\nCookie: lb=7\r\nTransfer-Encoding: chunked\r\n\r\n",
            ),
        ];
        for (method, body, expected) in cases {
            let mut out = b"leading".to_vec();
            write_request_head(&mut out, method, "/s/1", "st:80", &[("Cookie", "lb=7")], body);
            assert_eq!(&out[..7], b"leading");
            assert_eq!(&out[7..], expected, "{}", String::from_utf8_lossy(&out));
            let head = request_ok(&out[7..]);
            let parsed = if body == BodyKind::Empty && method == "POST" {
                BodyKind::Length(0)
            } else {
                body
            };
            assert_eq!(head.body, parsed);
        }
    }

    #[test]
    #[should_panic(expected = "closing the connection")]
    fn request_encoder_refuses_until_close() {
        write_request_head(&mut Vec::new(), "POST", "/", "h", &[], BodyKind::UntilClose);
    }

    #[test]
    fn response_encoder_writes_exact_bytes() {
        let cases: [(u16, BodyKind, bool, &[u8]); 6] = [
            (200, BodyKind::Length(10), true, b"HTTP/1.1 200 OK\r\nX: y\r\nContent-Length: 10\r\n\r\n"),
            (200, BodyKind::Empty, true, b"HTTP/1.1 200 OK\r\nX: y\r\nContent-Length: 0\r\n\r\n"),
            (204, BodyKind::Empty, true, b"HTTP/1.1 204 OK\r\nX: y\r\n\r\n"),
            (
                200,
                BodyKind::Chunked,
                false,
                b"HTTP/1.1 200 OK\r\nX: y\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            ),
            (200, BodyKind::UntilClose, true, b"HTTP/1.1 200 OK\r\nX: y\r\nConnection: close\r\n\r\n"),
            (200, BodyKind::UntilClose, false, b"HTTP/1.1 200 OK\r\nX: y\r\nConnection: close\r\n\r\n"),
        ];
        for (status, body, keep_alive, expected) in cases {
            let mut out = Vec::new();
            write_response_head(&mut out, status, "OK", &[("X", "y")], body, keep_alive);
            assert_eq!(out, expected, "{}", String::from_utf8_lossy(&out));
            let head = response_ok(&out, false);
            assert_eq!(head.keep_alive, keep_alive && body != BodyKind::UntilClose);
        }
    }

    #[test]
    fn chunk_header_is_lowercase_hex() {
        let mut out = Vec::new();
        let at = open_chunk(&mut out);
        out.extend_from_slice(&[7; 0x2c]);
        close_chunk(&mut out, at);
        assert_eq!(&out[..10], b"0000002c\r\n");
        assert!(out.ends_with(b"\x07\r\n"));
        out.clear();
        write_chunk_header(&mut out, 0x1a2b);
        write_chunk_header(&mut out, 1);
        write_chunk_header(&mut out, 0xffff_ffff);
        assert_eq!(out, b"1a2b\r\n1\r\nffffffff\r\n");
        let mut out = Vec::new();
        push_decimal(&mut out, 0);
        out.push(b' ');
        push_decimal(&mut out, u64::MAX);
        assert_eq!(out, b"0 18446744073709551615");
    }

    #[test]
    fn error_responses_are_complete_and_parse_back() {
        assert_eq!(
            error_response(400),
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nCache-Control: no-store\r\nX-Postern: station\r\nContent-Length: 12\r\nConnection: close\r\n\r\nbad request\n"
        );
        for status in [400, 403, 404, 405, 408, 410, 413, 431, 502, 503, 500, 418, 0, 200] {
            let bytes = error_response(status);
            let (head, len) = parse_response(&bytes, false).unwrap().unwrap();
            let expected = if [400, 403, 404, 405, 408, 410, 413, 431, 502, 503].contains(&status) {
                status
            } else {
                500
            };
            assert_eq!(head.status, expected);
            assert!(!head.keep_alive);
            assert_eq!(head.body, BodyKind::Length((bytes.len() - len) as u64));
            assert!(bytes.ends_with(b"\n"));
            assert_eq!(head.header("allow").is_some(), expected == 405);
        }
    }

    #[test]
    fn error_statuses() {
        assert_eq!(HttpError::BodyTooLarge { limit: 1 }.status(), 413);
        assert_eq!(HttpError::Timeout.status(), 408);
        assert_eq!(HttpError::TooManyHeaders.status(), 431);
        assert_eq!(HttpError::BadChunk(ChunkError::MissingCrlf).status(), 400);
        assert_eq!(HttpError::UnexpectedEof.status(), 400);
    }

    // ---- chunked decoding ----

    fn decode_whole(input: &[u8]) -> (Vec<u8>, Outcome) {
        decode_in_pieces(input, &[])
    }

    /// The error decoding `input` in one piece ends with.
    fn chunk_error(input: &[u8]) -> ChunkError {
        let mut decoder = ChunkedDecoder::new();
        let mut rest = input;
        loop {
            match decoder.decode(rest) {
                Ok(Decoded::Data { consumed, .. }) => rest = &rest[consumed..],
                Ok(other) => panic!("{input:?}: no error but {other:?}"),
                Err(HttpError::BadChunk(error)) => return error,
                Err(other) => panic!("{input:?}: not a chunk error: {other:?}"),
            }
        }
    }

    #[test]
    fn decodes_chunks_with_extensions_and_trailers() {
        let input = b"5\r\nhello\r\n1A;name=value;x=\"q;\\\"\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0000000a \t; ext\r\n0123456789\r\n0\r\nChecksum: abc\r\nX: y\r\n\r\nNEXT";
        let (payload, outcome) = decode_whole(input);
        assert_eq!(payload, b"helloabcdefghijklmnopqrstuvwxyz0123456789".to_vec());
        assert_eq!(outcome, Outcome::End(input.len() - 4));
        let (payload, outcome) = decode_whole(b"0\r\n\r\n");
        assert_eq!((payload.len(), outcome), (0, Outcome::End(5)));
        let (payload, outcome) = decode_whole(b"3\r\nabc\r\n");
        assert_eq!((payload, outcome), (b"abc".to_vec(), Outcome::Incomplete));
    }

    #[test]
    fn chunk_framing_errors() {
        for (input, expected) in [
            (&b"\r\n"[..], ChunkError::BadSizeLine),
            (b";ext\r\n", ChunkError::BadSizeLine),
            (b" 5\r\n", ChunkError::BadSizeLine),
            (b"5 5\r\n", ChunkError::BadSizeLine),
            (b"g\r\n", ChunkError::BadSizeLine),
            (b"-1\r\n", ChunkError::BadSizeLine),
            (b"0x5\r\n", ChunkError::BadSizeLine),
            (b"5;a\x01\r\n", ChunkError::BadSizeLine),
            (b"5\n", ChunkError::MissingCrlf),
            (b"5\rx", ChunkError::MissingCrlf),
            (b"5;ext\n", ChunkError::MissingCrlf),
            (b"123456789\r\n", ChunkError::SizeTooLarge),
            (b"000000001\r\n", ChunkError::SizeTooLarge),
            (b"5\r\nhelloX", ChunkError::MissingCrlf),
            (b"5\r\nhello\n", ChunkError::MissingCrlf),
            (b"5\r\nhello\rX", ChunkError::MissingCrlf),
            (b"0\r\nX: y\n\r\n", ChunkError::MissingCrlf),
            (b"0\r\n\n", ChunkError::MissingCrlf),
            (b"0\r\n\rX", ChunkError::MissingCrlf),
        ] {
            assert_eq!(chunk_error(input), expected, "{input:?}");
        }
        assert_eq!(
            HttpError::BadChunk(ChunkError::SizeTooLarge).to_string(),
            "bad chunked body: chunk size has more than 8 hex digits"
        );
    }

    #[test]
    fn chunk_line_and_trailer_bounds_are_exact() {
        let line = |len: usize| {
            let mut text = b"1;".to_vec();
            text.resize(len, b'e');
            text.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
            text
        };
        assert_eq!(decode_whole(&line(MAX_CHUNK_LINE)).0, b"x");
        assert_eq!(chunk_error(&line(MAX_CHUNK_LINE + 1)), ChunkError::LineTooLong);

        let trailer = |total: usize| {
            // "X: " + filler + CRLF + CRLF = total bytes of trailer section.
            let mut text = b"0\r\nX: ".to_vec();
            text.resize(3 + total - 4, b't');
            text.extend_from_slice(b"\r\n\r\n");
            text
        };
        assert_eq!(
            decode_whole(&trailer(MAX_TRAILER_BYTES)).1,
            Outcome::End(3 + MAX_TRAILER_BYTES)
        );
        assert_eq!(chunk_error(&trailer(MAX_TRAILER_BYTES + 1)), ChunkError::TrailerTooLarge);
        // A trailer that never ends is still cut off at the bound.
        let mut endless = b"0\r\n".to_vec();
        endless.resize(10 * MAX_TRAILER_BYTES, b'a');
        assert_eq!(chunk_error(&endless), ChunkError::TrailerTooLarge);
        let mut lines = b"0\r\n".to_vec();
        for _ in 0..MAX_TRAILER_BYTES {
            lines.extend_from_slice(b"a\r\n");
        }
        assert_eq!(chunk_error(&lines), ChunkError::TrailerTooLarge);
    }

    #[test]
    fn largest_chunk_size_is_accepted() {
        let mut decoder = ChunkedDecoder::new();
        assert!(matches!(
            decoder.decode(b"FFFFFFFF\r\nab"),
            Ok(Decoded::Data { consumed: 12, start: 10, len: 2 })
        ));
        assert!(matches!(decoder.decode(b""), Ok(Decoded::NeedMore { consumed: 0 })));
    }

    fn xorshift(state: &mut u64) -> u64 {
        let mut x = *state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *state = x;
        x
    }

    fn below(state: &mut u64, bound: usize) -> usize {
        (xorshift(state) % bound as u64) as usize
    }

    /// A valid chunked body (random chunk sizes, hex case, extensions and
    /// trailers) and its payload.
    fn valid_body(rng: &mut u64) -> (Vec<u8>, Vec<u8>) {
        let mut encoded = Vec::new();
        let mut payload = Vec::new();
        for _ in 0..below(rng, 6) {
            let len = 1 + below(rng, 300);
            let data: Vec<u8> = (0..len).map(|_| xorshift(rng) as u8).collect();
            let mut size = format!("{len:x}");
            if below(rng, 2) == 0 {
                size = size.to_uppercase();
            }
            encoded.extend_from_slice(size.as_bytes());
            if below(rng, 3) == 0 {
                encoded.extend_from_slice(b" ;a=b");
            }
            encoded.extend_from_slice(b"\r\n");
            encoded.extend_from_slice(&data);
            encoded.extend_from_slice(CHUNK_END);
            payload.extend_from_slice(&data);
        }
        encoded.extend_from_slice(b"0\r\n");
        if below(rng, 3) == 0 {
            encoded.extend_from_slice(b"Trailer: x\r\n");
        }
        encoded.extend_from_slice(b"\r\n");
        (encoded, payload)
    }

    fn random_cuts(rng: &mut u64, len: usize) -> Vec<usize> {
        let mut cuts: Vec<usize> = (0..below(rng, 8)).map(|_| below(rng, len + 1)).collect();
        cuts.sort_unstable();
        cuts
    }

    #[test]
    fn any_split_gives_the_same_result_as_whole_input() {
        const ALPHABET: &[u8] = b"0123456789abcdefABCDEFg;= \t\r\n\r\n\r\nxZ\x00\x7f\xff";
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        for case in 0..3000 {
            let input: Vec<u8> = match case % 3 {
                // Noise over the characters chunked framing is made of.
                0 => (0..below(&mut rng, 200))
                    .map(|_| ALPHABET[below(&mut rng, ALPHABET.len())])
                    .collect(),
                // A valid body, checked exactly, then used as is.
                1 => {
                    let (encoded, payload) = valid_body(&mut rng);
                    let cuts = random_cuts(&mut rng, encoded.len());
                    assert_eq!(
                        decode_in_pieces(&encoded, &cuts),
                        (payload, Outcome::End(encoded.len()))
                    );
                    encoded
                }
                // A valid body with a few bytes changed, dropped or added.
                _ => {
                    let (mut encoded, _) = valid_body(&mut rng);
                    for _ in 0..1 + below(&mut rng, 3) {
                        let at = below(&mut rng, encoded.len());
                        match below(&mut rng, 3) {
                            0 => encoded[at] = ALPHABET[below(&mut rng, ALPHABET.len())],
                            1 => {
                                encoded.remove(at);
                            }
                            _ => encoded.insert(at, xorshift(&mut rng) as u8),
                        }
                    }
                    encoded
                }
            };
            let whole = decode_whole(&input);
            let bytewise: Vec<usize> = (1..input.len()).collect();
            assert_eq!(decode_in_pieces(&input, &bytewise), whole, "{input:?}");
            for _ in 0..4 {
                let cuts = random_cuts(&mut rng, input.len());
                assert_eq!(decode_in_pieces(&input, &cuts), whole, "{input:?} {cuts:?}");
            }
        }
    }
}
