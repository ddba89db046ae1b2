//! The bytes a transfer moves, and the hash that checks what arrived.

use std::io::{Read, Write};
use std::net::TcpStream;

/// Bytes per application write and read: a common socket buffer size
/// (iperf3's default), so every route sees the same syscall pattern.
const IO_SIZE: usize = 128 * 1024;

/// Length of the pattern block the sources repeat. Not a power of two, so a
/// misplaced or repeated packet or chunk changes the hash.
const BLOCK: usize = (1 << 20) + 24;

/// The bytes a transfer moves: a pattern block repeated to `len` bytes.
pub(crate) struct Payload {
    pub(crate) block: Vec<u8>,
    pub(crate) len: u64,
    /// [`StreamHash`] of all `len` bytes, computed before any transfer.
    pub(crate) hash: u64,
}

impl Payload {
    pub(crate) fn new(len: u64) -> Payload {
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ len;
        let mut block = vec![0u8; BLOCK];
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let mut payload = Payload { block, len, hash: 0 };
        let mut hash = StreamHash::default();
        payload
            .pieces(|piece| {
                hash.update(piece);
                Ok(())
            })
            .expect("hashing cannot fail");
        payload.hash = hash.finish();
        payload
    }

    /// Calls `each` with the payload in pieces of at most [`IO_SIZE`].
    fn pieces(&self, mut each: impl FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
        let mut left = self.len;
        let mut at = 0;
        while left > 0 {
            let n = (BLOCK - at).min(IO_SIZE).min(usize::try_from(left).unwrap_or(usize::MAX));
            each(&self.block[at..at + n])?;
            at = (at + n) % BLOCK;
            left -= n as u64;
        }
        Ok(())
    }

    pub(crate) fn write_to(&self, socket: &mut TcpStream) -> std::io::Result<()> {
        self.pieces(|piece| socket.write_all(piece))
    }
}

/// A fast position-sensitive hash of a byte stream, whatever the read
/// sizes: four independent multiply lanes over 32-byte blocks, so it runs
/// at many GB/s and never limits direct loopback. It catches lost,
/// repeated, reordered and corrupted bytes; it is not cryptographic.
#[derive(Default)]
struct StreamHash {
    lanes: [u64; 4],
    tail: [u8; 32],
    tail_len: usize,
    total: u64,
}

impl StreamHash {
    const PRIME: u64 = 0x9e37_79b1_85eb_ca87;

    fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if self.tail_len > 0 {
            let take = (32 - self.tail_len).min(bytes.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&bytes[..take]);
            self.tail_len += take;
            bytes = &bytes[take..];
            if self.tail_len < 32 {
                return;
            }
            let tail = self.tail;
            self.mix(&tail);
            self.tail_len = 0;
        }
        let blocks = bytes.chunks_exact(32);
        let rest = blocks.remainder();
        for block in blocks {
            self.mix(block.try_into().expect("chunks_exact gives 32 bytes"));
        }
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    fn mix(&mut self, block: &[u8; 32]) {
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            let word = u64::from_le_bytes(block[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            *lane = (*lane ^ word).wrapping_mul(Self::PRIME).rotate_left(29);
        }
    }

    fn finish(mut self) -> u64 {
        let mut last = [0u8; 32];
        last[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
        last[24..].copy_from_slice(&self.total.to_le_bytes());
        self.mix(&last);
        self.lanes.iter().fold(0, |acc, lane| (acc ^ lane).wrapping_mul(Self::PRIME))
    }
}

/// Byte count and hash of what one connection delivered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received {
    pub(crate) bytes: u64,
    pub(crate) hash: u64,
}

impl Received {
    pub(crate) fn read_all(socket: &mut TcpStream) -> std::io::Result<Received> {
        let mut hash = StreamHash::default();
        let mut buf = vec![0u8; IO_SIZE];
        loop {
            let n = socket.read(&mut buf)?;
            if n == 0 {
                let bytes = hash.total;
                return Ok(Received { bytes, hash: hash.finish() });
            }
            hash.update(&buf[..n]);
        }
    }
}
