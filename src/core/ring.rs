//! A bounded byte ring: the send and receive buffer of one stream.
//!
//! ```text
//!  [ free | filled (head..) | free ]      or      [ filled | free | filled (head..) ]
//!           └─ filled(): oldest bytes first          free_mut(): where new bytes go ─┘
//! ```
//!
//! Unlike a `VecDeque<u8>` it hands out its free space as slices, so a driver
//! can read a socket straight into it and write a socket straight out of it
//! (`read_vectored` / `write_vectored` with both slices): no staging buffer
//! and no copy between the socket and the stream. It grows by doubling from
//! [`Ring::FIRST`] up to its limit, so an interactive stream that never has
//! much in flight keeps a small buffer, and never grows past the limit. A
//! driver lets a small one go ([`Ring::release_when_drained`]) when its
//! stream waits between small messages, so an open stream that idles
//! holds none.
//!
//! No I/O here; the slices are plain memory.

/// A byte queue of at most `limit` bytes.
#[derive(Debug)]
pub struct Ring {
    /// Empty until the first byte; then a power of two up to `limit`.
    buf: Box<[u8]>,
    /// Index of the oldest byte.
    head: usize,
    /// Bytes held.
    len: usize,
    limit: usize,
    /// Let the allocation go when the ring next drains.
    shed: bool,
}

impl Ring {
    /// Size of the first allocation: a few typical small writes.
    pub const FIRST: usize = 16 * 1024;

    /// Allocations larger than this are given back when the ring drains,
    /// so a stream that once buffered a long path's window holds nothing
    /// big while it idles.
    pub const KEEP: usize = 256 * 1024;

    /// An empty ring that will hold at most `limit` bytes.
    pub fn new(limit: usize) -> Ring {
        Ring { buf: Box::default(), head: 0, len: 0, limit, shed: false }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes allocated, held or not.
    #[cfg(test)]
    pub fn allocated(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes that can still be added.
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.len)
    }

    /// Moves the limit. Bytes held past a lowered limit stay; the ring
    /// takes no more until it is below the limit again.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
        if self.len == 0 && self.buf.len() > limit {
            self.buf = Box::default();
        }
    }

    /// The held bytes, oldest first, as one or two slices.
    pub fn as_slices(&self) -> (&[u8], &[u8]) {
        let end = self.head + self.len;
        if end <= self.buf.len() {
            (&self.buf[self.head..end], &[])
        } else {
            (&self.buf[self.head..], &self.buf[..end - self.buf.len()])
        }
    }

    /// Where new bytes go, as one or two slices (the first to fill first),
    /// at most `max` bytes in all. Grows the allocation when it is full
    /// and below the limit. Both are empty when the ring is full.
    pub fn free_mut(&mut self, max: usize) -> (&mut [u8], &mut [u8]) {
        if self.len == self.buf.len() && self.buf.len() < self.limit {
            self.grow(self.len + 1);
        }
        let size = self.buf.len();
        let tail = (self.head + self.len) % size.max(1);
        let max = max.min(self.room()).min(size - self.len);
        if tail >= self.head && self.len < size {
            // Free space runs from the tail to the end, then from the start
            // to the head.
            let (start, end) = self.buf.split_at_mut(tail);
            let first = max.min(end.len());
            let second = max - first;
            (&mut end[..first], &mut start[..second])
        } else {
            (&mut self.buf[tail..tail + max], &mut [])
        }
    }

    /// Records that the first `n` bytes of what [`Ring::free_mut`] returned
    /// were filled.
    pub fn commit(&mut self, n: usize) {
        assert!(n <= self.buf.len() - self.len, "commit of more than the free space");
        self.len += n;
    }

    /// Drops the `n` oldest bytes.
    pub fn consume(&mut self, n: usize) {
        assert!(n <= self.len, "consume of more than is held");
        self.len -= n;
        self.head = if self.len == 0 { 0 } else { (self.head + n) % self.buf.len() };
        self.release_if_drained();
    }

    /// Gives the allocation back if the ring is empty and either was asked
    /// to ([`Ring::release_when_drained`]) or holds a large one.
    fn release_if_drained(&mut self) {
        if self.len == 0 && (self.shed || self.buf.len() > Self::KEEP.min(self.limit)) {
            self.buf = Box::default();
            self.shed = false;
        }
    }

    /// Gives the allocation back now if the ring is empty, else when it
    /// drains; the next byte takes a new one of [`Ring::FIRST`]. For a
    /// stream that waits between small messages (after a bulk transfer
    /// too), not for a busy one, which would reallocate at each drain:
    /// growing forgets the request, as more than a message is arriving.
    pub fn release_when_drained(&mut self) {
        self.shed = true;
        self.release_if_drained();
    }

    /// Appends as much of `bytes` as there is room for; returns how much.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.room());
        if n == 0 {
            return 0;
        }
        if self.len + n > self.buf.len() {
            self.grow(self.len + n);
        }
        let (first, second) = self.free_mut(n);
        let split = first.len();
        first.copy_from_slice(&bytes[..split]);
        second.copy_from_slice(&bytes[split..n]);
        self.commit(n);
        n
    }

    /// Moves the oldest bytes into `out`; returns how many.
    pub fn pop_into(&mut self, out: &mut [u8]) -> usize {
        let (first, second) = self.as_slices();
        let a = first.len().min(out.len());
        out[..a].copy_from_slice(&first[..a]);
        let b = second.len().min(out.len() - a);
        out[a..a + b].copy_from_slice(&second[..b]);
        self.consume(a + b);
        a + b
    }

    /// Reallocates to hold at least `need` bytes (a power of two, at least
    /// [`Ring::FIRST`], at most the limit), with the bytes moved to the start.
    fn grow(&mut self, need: usize) {
        let size = need.next_power_of_two().max(Self::FIRST).min(self.limit);
        let mut bigger = vec![0u8; size].into_boxed_slice();
        let (first, second) = self.as_slices();
        bigger[..first.len()].copy_from_slice(first);
        bigger[first.len()..self.len].copy_from_slice(second);
        self.buf = bigger;
        self.head = 0;
        self.shed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Drives a ring and a VecDeque model with the same seeded operations.
    #[test]
    fn behaves_like_a_bounded_deque() {
        for limit in [1, 7, Ring::FIRST, 3 * Ring::FIRST + 5, 128 * 1024] {
            let mut ring = Ring::new(limit);
            let mut model = VecDeque::new();
            let mut seed = 0x2545_f491_4f6c_dd1du64 ^ limit as u64;
            let mut next = |bound: usize| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % (bound as u64 + 1)) as usize
            };
            let mut counter = 0u8;
            for _ in 0..3000 {
                match next(3) {
                    0 => {
                        // A socket read: straight into the free slices.
                        let want = next(limit);
                        let (a, b) = ring.free_mut(want);
                        assert!(a.len() + b.len() <= want);
                        let n = next(a.len() + b.len());
                        for byte in a.iter_mut().chain(b.iter_mut()).take(n) {
                            counter = counter.wrapping_add(1);
                            *byte = counter;
                            model.push_back(counter);
                        }
                        ring.commit(n);
                    }
                    1 => {
                        let bytes: Vec<u8> = (0..next(limit))
                            .map(|_| {
                                counter = counter.wrapping_add(1);
                                counter
                            })
                            .collect();
                        let n = ring.push(&bytes);
                        assert_eq!(n, bytes.len().min(limit - model.len()));
                        model.extend(&bytes[..n]);
                    }
                    2 => {
                        let n = next(ring.len());
                        let (a, b) = ring.as_slices();
                        let held: Vec<u8> = a.iter().chain(b).copied().collect();
                        assert_eq!(held, model.iter().copied().collect::<Vec<_>>());
                        ring.consume(n);
                        model.drain(..n);
                    }
                    _ => {
                        let mut out = vec![0u8; next(limit)];
                        let n = ring.pop_into(&mut out);
                        let expected: Vec<u8> = model.drain(..n).collect();
                        assert_eq!(&out[..n], &expected[..]);
                        assert_eq!(n, out.len().min(n + ring.len()));
                    }
                }
                assert_eq!(ring.len(), model.len());
                assert!(ring.len() <= limit);
                assert!(ring.buf.len() <= limit, "the allocation never passes the limit");
            }
        }
    }

    #[test]
    fn a_full_ring_offers_no_space_and_grows_only_to_its_limit() {
        let mut ring = Ring::new(40_000);
        assert_eq!(ring.push(&[1; 50_000]), 40_000);
        assert_eq!(ring.buf.len(), 40_000);
        let (a, b) = ring.free_mut(usize::MAX);
        assert!(a.is_empty() && b.is_empty());
        assert_eq!(ring.push(b"x"), 0);
    }

    #[test]
    fn a_drained_large_ring_gives_its_memory_back() {
        let mut ring = Ring::new(4 * Ring::KEEP);
        assert_eq!(ring.push(&vec![1; 2 * Ring::KEEP]), 2 * Ring::KEEP);
        assert_eq!(ring.buf.len(), 2 * Ring::KEEP);
        ring.consume(Ring::KEEP);
        assert_eq!(ring.buf.len(), 2 * Ring::KEEP, "kept while it holds bytes");
        ring.consume(Ring::KEEP);
        assert_eq!(ring.buf.len(), 0);
        // A lowered limit takes effect at once on an empty ring, and stops
        // a full one from taking more.
        ring.push(&vec![2; 3 * Ring::KEEP]);
        ring.set_limit(Ring::KEEP);
        assert_eq!((ring.len(), ring.room()), (3 * Ring::KEEP, 0));
        assert_eq!(ring.push(b"x"), 0);
        ring.consume(3 * Ring::KEEP);
        assert_eq!(ring.push(&vec![3; 2 * Ring::KEEP]), Ring::KEEP);
    }

    #[test]
    fn small_use_keeps_a_small_allocation_until_let_go() {
        let mut ring = Ring::new(256 * 1024);
        for _ in 0..100 {
            assert_eq!(ring.push(&[9; 1000]), 1000);
            ring.consume(1000);
        }
        assert_eq!(ring.buf.len(), Ring::FIRST);
        ring.push(&[9; 10]);
        ring.release_when_drained();
        assert_eq!(ring.buf.len(), Ring::FIRST, "kept while it holds bytes");
        ring.consume(4);
        assert_eq!(ring.buf.len(), Ring::FIRST, "kept while it holds bytes");
        ring.consume(6);
        assert_eq!(ring.buf.len(), 0, "an idle stream holds no buffer");
        ring.push(&[9; 10]);
        ring.consume(10);
        assert_eq!(ring.buf.len(), Ring::FIRST, "let go once per request");
        // A driver asks for space, finds nothing to read, gives it back.
        assert_eq!(ring.free_mut(usize::MAX).0.len(), Ring::FIRST);
        ring.release_when_drained();
        assert_eq!(ring.buf.len(), 0);
        // A ring that grows forgets the request, and keeps its buffer for
        // the next burst; asked again once it waits, it lets even a grown
        // buffer go.
        ring.push(&[8; 10]);
        ring.release_when_drained();
        assert_eq!(ring.push(&[8; 3 * Ring::FIRST]), 3 * Ring::FIRST);
        ring.consume(3 * Ring::FIRST + 10);
        assert_eq!(ring.buf.len(), 4 * Ring::FIRST);
        // An emptied ring starts again at its beginning, so a read gets
        // the whole allocation as one slice.
        assert_eq!(ring.free_mut(usize::MAX).0.len(), 4 * Ring::FIRST);
        ring.push(&[8; 10]);
        ring.release_when_drained();
        assert_eq!(ring.buf.len(), 4 * Ring::FIRST, "kept while it holds bytes");
        ring.consume(10);
        assert_eq!(ring.buf.len(), 0);
    }
}
