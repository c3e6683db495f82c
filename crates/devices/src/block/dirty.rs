//! Which blocks of a disk a guest changed since a point in time: the map a disk copy made
//! while the guest runs (live migration without shared storage) iterates on. The device marks
//! a write, a discard or a write-zeroes when it submits it, before the backend starts it, and
//! again when it completes, so a copier that takes the map and then reads the disk can miss no
//! change: a request in flight during the read is marked again once its bytes are in the image,
//! and copied again in the next round.
//!
//! Lock-free: one bit per block in a vector of atomic words, so the device's event loop marks
//! while a copier thread takes, without a lock between them.

use std::sync::atomic::{AtomicU64, Ordering};

/// A dirty-block map of a disk.
#[derive(Debug)]
pub struct DirtyMap {
    block: u64,
    blocks: u64,
    words: Vec<AtomicU64>,
}

impl DirtyMap {
    /// A clean map of a disk of `capacity` bytes, in blocks of `block` bytes (a power of two,
    /// at least 512; 64 KiB is qcow2's default cluster and a good copy unit).
    pub fn new(capacity: u64, block: u64) -> Self {
        assert!(
            block.is_power_of_two() && block >= 512,
            "block size {block}"
        );
        let blocks = capacity.div_ceil(block);
        Self {
            block,
            blocks,
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block
    }

    /// Marks every block `[offset, offset + len)` touches. Ranges past the end are cut (the
    /// device refuses them before they get here anyway).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.block;
        let last = (offset.saturating_add(len - 1) / self.block).min(self.blocks.saturating_sub(1));
        let mut b = first;
        while b <= last && b < self.blocks {
            let word = (b / 64) as usize;
            let lo = b % 64;
            let hi = (last - (b - lo)).min(63);
            let bits = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            self.words[word].fetch_or(bits, Ordering::AcqRel);
            b = b - lo + 64;
        }
    }

    /// Blocks marked now.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Takes the marked blocks as byte ranges `(offset, len)`, adjacent blocks joined, and
    /// clears them: a block marked after its word was taken stays for the next call.
    pub fn take(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let lo = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let off = (i as u64 * 64 + lo) * self.block;
                match out.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += self.block,
                    _ => out.push((off, self.block)),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_join_and_clear() {
        let m = DirtyMap::new(10 << 20, 65536);
        assert_eq!(m.count(), 0);
        m.mark(0, 1);
        m.mark(65535, 2); // blocks 0 and 1
        m.mark(5 * 65536 + 100, 512);
        assert_eq!(m.count(), 3);
        assert_eq!(m.take(), vec![(0, 2 * 65536), (5 * 65536, 65536)]);
        assert_eq!(m.count(), 0);
        assert!(m.take().is_empty());
    }

    #[test]
    fn spans_words_and_stops_at_the_end() {
        // 200 blocks: words of 64, the last partial.
        let m = DirtyMap::new(200 * 4096, 4096);
        m.mark(60 * 4096, 70 * 4096); // blocks 60..130
        assert_eq!(m.count(), 70);
        m.mark(199 * 4096, u64::MAX); // cut at the end
        assert_eq!(m.count(), 71);
        assert_eq!(m.take(), vec![(60 * 4096, 70 * 4096), (199 * 4096, 4096)]);
        // A whole word.
        m.mark(64 * 4096, 64 * 4096);
        assert_eq!(m.count(), 64);
        m.mark(0, 0);
        assert_eq!(m.count(), 64);
    }
}
