//! In-memory dirty bitmap: lock-free marking, lazily committed storage and a
//! summary level so walks skip clean regions.
//!
//! Bit `k` covers guest bytes `[k * granularity, (k + 1) * granularity)` and
//! lives in word `k / 64` at bit `k % 64`. The little-endian bytes of the words
//! in order are therefore exactly the on-disk (QEMU) serialization, in which
//! bit `k` is bit `k % 8` of byte `k / 8`.
//!
//! Words are grouped in chunks of 64 words (4096 bits, 512 serialized bytes).
//! Each chunk has one summary bit meaning "may hold set bits": a clear summary
//! bit guarantees an all-zero chunk, so walks, clears and serialization skip it
//! without touching its memory. The words live in an anonymous mapping, which
//! the kernel commits page by page on first write.
//!
//! Memory ordering: reads that only observe (walks, counts, serialization) are
//! `Relaxed`; consistency with a store to disk comes from the caller's locks,
//! and marks racing a store raise `modified` again. Every read-modify-write and
//! the load that follows it are `SeqCst`: setting does RMW(data) then
//! load(summary) while clearing does RMW(summary) then load(data), a
//! store-buffering pattern in which weaker orderings could leave a set data bit
//! under a clear summary bit (likewise RMW(data) then load(modified) against
//! `take_modified`). On x86 these compile to the same instructions as `Relaxed`.

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{fence, AtomicBool, AtomicU64};

use memmap2::MmapMut;

const WORD_BITS: u64 = 64;
const CHUNK_WORDS: u64 = 64;
const CHUNK_BITS: u64 = WORD_BITS * CHUNK_WORDS;
const CHUNK_BYTES: u64 = CHUNK_BITS / 8;
const SUMMARY_BITS: u64 = 64;

/// A dirty bitmap over a virtual disk; all methods take `&self` and are safe to
/// call concurrently.
pub struct DirtyBitmap {
    /// Data words; only ever accessed through [`DirtyBitmap::words`].
    map: MmapMut,
    /// Number of data words (`ceil(bit_count / 64)`), fits in `usize`.
    word_count: u64,
    /// One bit per chunk, set before any data bit of the chunk is visible as
    /// settled (see the module docs).
    summary: Vec<AtomicU64>,
    size: u64,
    granularity_bits: u32,
    bit_count: u64,
    modified: AtomicBool,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("size", &self.size)
            .field("granularity", &self.granularity())
            .field("bit_count", &self.bit_count)
            .field("modified", &self.is_modified())
            .finish_non_exhaustive()
    }
}

/// Bits `[lo, hi)` of a word; requires `lo < hi <= 64`.
fn bit_span(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= WORD_BITS {
        u64::MAX
    } else {
        (1 << hi) - 1
    };
    upper & (u64::MAX << lo)
}

/// Bits of word `w` that lie in `[first, end)`; the range must overlap the word.
fn word_mask(w: u64, first: u64, end: u64) -> u64 {
    let base = w * WORD_BITS;
    bit_span(first.saturating_sub(base), (end - base).min(WORD_BITS))
}

impl DirtyBitmap {
    /// Creates an empty bitmap for a disk of `size` bytes with granularity
    /// `1 << granularity_bits` bytes (`granularity_bits` in 9..=31).
    ///
    /// Fails with `InvalidInput` for other granularities and `OutOfMemory`
    /// when the bitmap cannot be addressed or mapped.
    pub fn new(size: u64, granularity_bits: u32) -> io::Result<DirtyBitmap> {
        if !(9..=31).contains(&granularity_bits) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "dirty bitmap granularity must be between 2^9 and 2^31 bytes",
            ));
        }
        let too_big = || io::Error::new(io::ErrorKind::OutOfMemory, "dirty bitmap too large");
        let bit_count = size.div_ceil(1 << granularity_bits);
        let word_count = bit_count.div_ceil(WORD_BITS);
        let summary_len = word_count.div_ceil(CHUNK_WORDS).div_ceil(SUMMARY_BITS);
        let map_len = usize::try_from(word_count.max(1))
            .ok()
            .and_then(|w| w.checked_mul(8))
            .ok_or_else(too_big)?;
        let summary_len = usize::try_from(summary_len).map_err(|_| too_big())?;

        // map_anon of 0 bytes fails, hence the one-word minimum above.
        let map = MmapMut::map_anon(map_len)?;
        let mut summary = Vec::new();
        summary
            .try_reserve_exact(summary_len)
            .map_err(|_| too_big())?;
        summary.resize_with(summary_len, || AtomicU64::new(0));

        Ok(DirtyBitmap {
            map,
            word_count,
            summary,
            size,
            granularity_bits,
            bit_count,
            modified: AtomicBool::new(false),
        })
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes covered by one bit.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    pub fn granularity_bits(&self) -> u32 {
        self.granularity_bits
    }

    /// Number of bits, `ceil(size / granularity)`.
    pub fn bit_count(&self) -> u64 {
        self.bit_count
    }

    /// Length of the on-disk form in bytes, `ceil(bit_count / 8)`.
    pub fn serialized_len(&self) -> u64 {
        self.bit_count.div_ceil(8)
    }

    // ---- bit level ----

    /// Sets bits `[first, first + count)` (clamped); true if any bit went 0 -> 1.
    ///
    /// Lock-free, allocation-free and syscall-free: this is the per-write hot path.
    #[inline]
    pub fn set_bits(&self, first: u64, count: u64) -> bool {
        let changed = if count == 1 {
            // Common case (a write within one granule): skip the range math.
            first < self.bit_count && self.or_word(first / WORD_BITS, 1 << (first % WORD_BITS))
        } else {
            let end = first.saturating_add(count).min(self.bit_count);
            let mut changed = false;
            if first < end {
                for w in first / WORD_BITS..=(end - 1) / WORD_BITS {
                    changed |= self.or_word(w, word_mask(w, first, end));
                }
            }
            changed
        };
        if changed {
            self.note_modified();
        }
        changed
    }

    /// Clears bits `[first, first + count)` (clamped).
    pub fn reset_bits(&self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.bit_count);
        if first >= end {
            return;
        }
        let words = self.words();
        let mut changed = false;
        for c in self.flagged_chunks(first / CHUNK_BITS, (end - 1) / CHUNK_BITS) {
            let chunk_end = (c.saturating_add(1) * CHUNK_BITS).min(self.bit_count);
            if first <= c * CHUNK_BITS && end >= chunk_end {
                // Whole chunk: also drop its summary bit so it stops costing walks.
                changed |= self.clear_chunk(c);
                continue;
            }
            for w in self.chunk_words_in(c, first, end) {
                let mask = word_mask(w, first, end);
                let word = &words[w as usize];
                if word.load(Relaxed) & mask != 0 {
                    changed |= word.fetch_and(!mask, SeqCst) & mask != 0;
                }
            }
        }
        if changed {
            self.note_modified();
        }
    }

    /// Value of bit `bit`; false past the end.
    pub fn get_bit(&self, bit: u64) -> bool {
        bit < self.bit_count
            && self.chunk_flagged(bit / CHUNK_BITS)
            && self.words()[(bit / WORD_BITS) as usize].load(Relaxed) >> (bit % WORD_BITS) & 1 != 0
    }

    /// Clears every bit, visiting only flagged chunks.
    pub fn clear_all(&self) {
        let mut changed = false;
        for c in self.flagged_chunks(0, u64::MAX) {
            changed |= self.clear_chunk(c);
        }
        if changed {
            self.note_modified();
        }
    }

    /// Number of set bits.
    pub fn count_set_bits(&self) -> u64 {
        let words = self.words();
        self.flagged_chunks(0, u64::MAX)
            .flat_map(|c| self.chunk_words(c))
            .map(|w| u64::from(words[w as usize].load(Relaxed).count_ones()))
            .sum()
    }

    /// Next maximal run of set bits at or after `from`, as `(start, len)`.
    ///
    /// If `from` is inside a run, the returned run starts at `from`.
    pub fn next_set_run(&self, from: u64) -> Option<(u64, u64)> {
        let mut from = from;
        loop {
            let start = self.find_set(from)?;
            let end = self.find_clear(start);
            if end > start {
                return Some((start, end - start));
            }
            // The bit was cleared concurrently; never report an empty run.
            from = start + 1;
        }
    }

    // ---- byte level ----

    /// Marks every granule touched by guest bytes `[offset, offset + len)`,
    /// clamped to `size()`; true if any bit went 0 -> 1.
    #[inline]
    pub fn mark_bytes(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return false;
        }
        let first = offset >> self.granularity_bits;
        let last = (end - 1) >> self.granularity_bits;
        self.set_bits(first, last - first + 1)
    }

    /// Next dirty extent in guest bytes at or after `from`, as `(start, len)`,
    /// with the start clamped to `from` and the end clamped to `size()`.
    pub fn next_dirty_extent(&self, from: u64) -> Option<(u64, u64)> {
        if from >= self.size {
            return None;
        }
        let (run, len) = self.next_set_run(from >> self.granularity_bits)?;
        let start = (run << self.granularity_bits).max(from);
        let end = self.bit_to_byte(run + len);
        Some((start, end - start))
    }

    /// Total dirty guest bytes (the last granule counts only up to `size()`).
    pub fn dirty_bytes(&self) -> u64 {
        let count = self.count_set_bits();
        if count == 0 {
            return 0;
        }
        let last = self.bit_count - 1;
        if self.get_bit(last) {
            let tail = self.size - (last << self.granularity_bits);
            ((count - 1) << self.granularity_bits).saturating_add(tail)
        } else {
            count.saturating_mul(self.granularity())
        }
    }

    /// ORs `other` into `self`; true if any bit of `self` changed.
    ///
    /// Same granularity ORs words directly (bits past `self.bit_count()` are
    /// dropped); otherwise every dirty byte extent of `other` is marked.
    pub fn merge_from(&self, other: &DirtyBitmap) -> bool {
        if std::ptr::eq(self, other) {
            return false;
        }
        if self.granularity_bits != other.granularity_bits {
            let mut changed = false;
            let mut from = 0;
            while let Some((start, len)) = other.next_dirty_extent(from) {
                if start >= self.size {
                    break;
                }
                changed |= self.mark_bytes(start, len);
                from = start + len;
            }
            return changed;
        }
        let src = other.words();
        let mut changed = false;
        'chunks: for c in other.flagged_chunks(0, u64::MAX) {
            for w in other.chunk_words(c) {
                if w >= self.word_count {
                    break 'chunks;
                }
                let v = src[w as usize].load(Relaxed) & word_mask(w, 0, self.bit_count);
                if v != 0 {
                    changed |= self.or_word(w, v);
                }
            }
        }
        if changed {
            self.note_modified();
        }
        changed
    }

    // ---- serialization ----

    /// Copies serialized bytes `[byte_offset, byte_offset + buf.len())` into
    /// `buf`; bytes past `serialized_len()` read as 0. Clean chunks are not read.
    pub fn read_serialized(&self, byte_offset: u64, buf: &mut [u8]) {
        buf.fill(0);
        let Some(n) = self.serialized_span(byte_offset, buf.len()) else {
            return;
        };
        let words = self.words();
        let mut pos = 0;
        while pos < n {
            let byte = byte_offset + pos as u64;
            let w = byte / 8;
            if !self.chunk_flagged(w / CHUNK_WORDS) {
                // Skip to the next chunk; buf is already zero there.
                let to_chunk_end = CHUNK_BYTES - byte % CHUNK_BYTES;
                pos += (n - pos).min(to_chunk_end as usize);
                continue;
            }
            let off = (byte % 8) as usize;
            let take = (8 - off).min(n - pos);
            let bytes = words[w as usize].load(Relaxed).to_le_bytes();
            buf[pos..pos + take].copy_from_slice(&bytes[off..off + take]);
            pos += take;
        }
    }

    /// ORs serialized bytes into the bitmap at `byte_offset` (loading from
    /// disk). All-zero words are skipped; bits past `bit_count()` are dropped.
    pub fn write_serialized(&self, byte_offset: u64, data: &[u8]) {
        let Some(n) = self.serialized_span(byte_offset, data.len()) else {
            return;
        };
        let mut changed = false;
        let mut pos = 0;
        while pos < n {
            let byte = byte_offset + pos as u64;
            let w = byte / 8;
            let off = (byte % 8) as usize;
            let take = (8 - off).min(n - pos);
            let mut bytes = [0; 8];
            bytes[off..off + take].copy_from_slice(&data[pos..pos + take]);
            let v = u64::from_le_bytes(bytes) & word_mask(w, 0, self.bit_count);
            if v != 0 {
                changed |= self.or_word(w, v);
            }
            pos += take;
        }
        if changed {
            self.note_modified();
        }
    }

    /// Sets every bit covered by serialized bytes `[byte_offset, byte_offset + len)`
    /// (an all-ones cluster on disk), masked to `bit_count()`.
    pub fn fill_serialized_ones(&self, byte_offset: u64, len: u64) {
        self.set_bits(byte_offset.saturating_mul(8), len.saturating_mul(8));
    }

    /// True if serialized bytes `[byte_offset, byte_offset + len)` are all zero.
    /// Chunks with a clear summary bit are decided without touching memory.
    pub fn serialized_range_is_clean(&self, byte_offset: u64, len: u64) -> bool {
        let first = byte_offset.saturating_mul(8);
        let end = byte_offset
            .saturating_add(len)
            .saturating_mul(8)
            .min(self.bit_count);
        if first >= end {
            return true;
        }
        let words = self.words();
        !self
            .flagged_chunks(first / CHUNK_BITS, (end - 1) / CHUNK_BITS)
            .any(|c| {
                self.chunk_words_in(c, first, end)
                    .any(|w| words[w as usize].load(Relaxed) & word_mask(w, first, end) != 0)
            })
    }

    // ---- modified flag ----

    /// Returns and clears the modified flag. Call before serializing, so that
    /// marks racing with the store raise the flag again.
    pub fn take_modified(&self) -> bool {
        let was = self.modified.swap(false, SeqCst);
        // Orders the caller's following (Relaxed) reads of data words after the
        // swap, pairing with the SeqCst RMW(data) -> load(modified) of markers.
        fence(SeqCst);
        was
    }

    pub fn is_modified(&self) -> bool {
        self.modified.load(Acquire)
    }

    pub fn set_modified(&self) {
        self.modified.store(true, Release);
    }

    /// Rough resident size: flagged chunks times 512 bytes plus the summary.
    pub fn committed_bytes_estimate(&self) -> u64 {
        let flagged: u64 = self
            .summary
            .iter()
            .map(|s| u64::from(s.load(Relaxed).count_ones()))
            .sum();
        flagged * CHUNK_BYTES + self.summary.len() as u64 * 8
    }

    // ---- private helpers ----

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the anonymous map is page aligned (so aligned for AtomicU64),
        // zero-initialised and at least `word_count * 8` bytes long (checked to
        // fit in usize in `new`). It is owned by `self`, so it outlives the
        // returned borrow. AtomicU64 has the same size and bit validity as u64,
        // and these bytes are only ever accessed through this atomic view.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().cast::<AtomicU64>(),
                self.word_count as usize,
            )
        }
    }

    /// Raises the modified flag, skipping the store when already raised.
    fn note_modified(&self) {
        if !self.modified.load(SeqCst) {
            self.modified.store(true, Release);
        }
    }

    /// ORs `mask` into word `w`, then flags its chunk; true if any bit went 0 -> 1.
    /// Loads before each RMW so already-set words (and summary bits) stay
    /// read-only and pages without set bits are never written.
    fn or_word(&self, w: u64, mask: u64) -> bool {
        let word = &self.words()[w as usize];
        let changed =
            word.load(Relaxed) & mask != mask && word.fetch_or(mask, SeqCst) & mask != mask;
        let (slot, bit) = self.summary_slot(w / CHUNK_WORDS);
        if slot.load(SeqCst) & bit == 0 {
            slot.fetch_or(bit, SeqCst);
        }
        changed
    }

    /// Clears chunk `c`: summary bit first, then the nonzero words, so a racing
    /// `or_word` re-flags the chunk. True if any data bit was cleared.
    fn clear_chunk(&self, c: u64) -> bool {
        let (slot, bit) = self.summary_slot(c);
        if slot.fetch_and(!bit, SeqCst) & bit == 0 {
            return false; // a concurrent clear owns it
        }
        let words = self.words();
        let mut changed = false;
        for w in self.chunk_words(c) {
            let word = &words[w as usize];
            if word.load(SeqCst) != 0 {
                changed |= word.swap(0, SeqCst) != 0;
            }
        }
        changed
    }

    fn summary_slot(&self, c: u64) -> (&AtomicU64, u64) {
        (
            &self.summary[(c / SUMMARY_BITS) as usize],
            1 << (c % SUMMARY_BITS),
        )
    }

    fn chunk_flagged(&self, c: u64) -> bool {
        let (slot, bit) = self.summary_slot(c);
        slot.load(Relaxed) & bit != 0
    }

    /// First flagged chunk in `c..=last`. The scan stops at `last`: a walk
    /// over a small range of a big, clean bitmap must not read its whole summary.
    fn next_flagged_chunk(&self, c: u64, last: u64) -> Option<u64> {
        let mut sw = c / SUMMARY_BITS;
        let mut v = self.summary.get(sw as usize)?.load(Relaxed) & (u64::MAX << (c % SUMMARY_BITS));
        loop {
            if v != 0 {
                let found = sw * SUMMARY_BITS + u64::from(v.trailing_zeros());
                return (found <= last).then_some(found);
            }
            sw += 1;
            if sw > last / SUMMARY_BITS {
                return None;
            }
            v = self.summary.get(sw as usize)?.load(Relaxed);
        }
    }

    /// Flagged chunks in `first..=last`, in order.
    fn flagged_chunks(&self, first: u64, last: u64) -> impl Iterator<Item = u64> + '_ {
        let mut next = first;
        std::iter::from_fn(move || {
            let c = self.next_flagged_chunk(next, last)?;
            next = c + 1;
            Some(c)
        })
    }

    /// Word indices of chunk `c`.
    fn chunk_words(&self, c: u64) -> Range<u64> {
        let start = c * CHUNK_WORDS;
        start..(start + CHUNK_WORDS).min(self.word_count)
    }

    /// Word indices of chunk `c` that overlap bits `[first, end)` (`first < end`).
    fn chunk_words_in(&self, c: u64, first: u64, end: u64) -> Range<u64> {
        let words = self.chunk_words(c);
        words.start.max(first / WORD_BITS)..words.end.min((end - 1) / WORD_BITS + 1)
    }

    /// First set bit at or after `from`, skipping clean chunks.
    fn find_set(&self, from: u64) -> Option<u64> {
        if from >= self.bit_count {
            return None;
        }
        let words = self.words();
        let from_word = from / WORD_BITS;
        for c in self.flagged_chunks(from_word / CHUNK_WORDS, u64::MAX) {
            let chunk = self.chunk_words(c);
            for w in chunk.start.max(from_word)..chunk.end {
                let mut v = words[w as usize].load(Relaxed);
                if w == from_word {
                    v &= u64::MAX << (from % WORD_BITS);
                }
                if v != 0 {
                    return Some(w * WORD_BITS + u64::from(v.trailing_zeros()));
                }
            }
        }
        None
    }

    /// First clear bit at or after `from` (`< bit_count`), or `bit_count`.
    /// Runs of full words are skipped by comparing with `u64::MAX`; a clean
    /// chunk ends the run at its first bit without being read.
    fn find_clear(&self, from: u64) -> u64 {
        let words = self.words();
        let from_word = from / WORD_BITS;
        for w in from_word..self.word_count {
            if (w == from_word || w % CHUNK_WORDS == 0) && !self.chunk_flagged(w / CHUNK_WORDS) {
                return (w * WORD_BITS).max(from);
            }
            let mut v = words[w as usize].load(Relaxed);
            if w == from_word {
                v |= !(u64::MAX << (from % WORD_BITS));
            }
            if v != u64::MAX {
                let bit = w * WORD_BITS + u64::from(v.trailing_ones());
                return bit.min(self.bit_count);
            }
        }
        self.bit_count
    }

    /// Guest byte where bit `bit` starts, clamped to `size()`.
    fn bit_to_byte(&self, bit: u64) -> u64 {
        if bit >= self.bit_count {
            self.size
        } else {
            bit << self.granularity_bits
        }
    }

    /// How many of `len` bytes starting at serialized `byte_offset` exist.
    fn serialized_span(&self, byte_offset: u64, len: usize) -> Option<usize> {
        let avail = self.serialized_len().checked_sub(byte_offset)?;
        let n = usize::try_from(avail).map_or(len, |a| a.min(len));
        (n > 0).then_some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::{Duration, Instant};

    const _: () = {
        const fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<DirtyBitmap>();
    };

    fn serialized(bm: &DirtyBitmap) -> Vec<u8> {
        let mut buf = vec![0; bm.serialized_len() as usize];
        bm.read_serialized(0, &mut buf);
        buf
    }

    fn runs(bm: &DirtyBitmap) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut from = 0;
        while let Some((s, l)) = bm.next_set_run(from) {
            out.push((s, l));
            from = s + l;
        }
        out
    }

    /// Every nonzero word must have its chunk flagged.
    fn assert_summary_covers(bm: &DirtyBitmap) {
        for (w, word) in bm.words().iter().enumerate() {
            if word.load(Relaxed) != 0 {
                assert!(bm.chunk_flagged(w as u64 / CHUNK_WORDS), "word {w}");
            }
        }
    }

    #[test]
    fn geometry() {
        let bm = DirtyBitmap::new(10 * 65536 + 1, 16).unwrap();
        assert_eq!(bm.size(), 10 * 65536 + 1);
        assert_eq!(bm.granularity(), 65536);
        assert_eq!(bm.granularity_bits(), 16);
        assert_eq!(bm.bit_count(), 11);
        assert_eq!(bm.serialized_len(), 2);
        assert!(DirtyBitmap::new(1, 8).is_err());
        assert!(DirtyBitmap::new(1, 32).is_err());
        // Unaddressable sizes fail cleanly instead of aborting.
        assert!(DirtyBitmap::new(u64::MAX, 9).is_err());
    }

    #[test]
    fn empty_disk() {
        let bm = DirtyBitmap::new(0, 9).unwrap();
        assert_eq!(bm.bit_count(), 0);
        assert_eq!(bm.serialized_len(), 0);
        assert!(!bm.set_bits(0, 10));
        assert!(!bm.mark_bytes(0, 10));
        bm.fill_serialized_ones(0, 10);
        bm.write_serialized(0, &[0xff; 4]);
        bm.reset_bits(0, u64::MAX);
        bm.clear_all();
        assert!(!bm.get_bit(0));
        assert_eq!(bm.count_set_bits(), 0);
        assert_eq!(bm.next_set_run(0), None);
        assert_eq!(bm.next_dirty_extent(0), None);
        assert_eq!(bm.dirty_bytes(), 0);
        assert!(bm.serialized_range_is_clean(0, 100));
        let mut buf = [7; 4];
        bm.read_serialized(0, &mut buf);
        assert_eq!(buf, [0; 4]);
        assert!(!bm.is_modified());
    }

    #[test]
    fn lsb_first_serialization() {
        let bm = DirtyBitmap::new(1 << 30, 16).unwrap();
        bm.set_bits(0, 1);
        bm.set_bits(9, 1);
        bm.set_bits(63, 2);
        let bytes = serialized(&bm);
        assert_eq!(&bytes[..9], &[0x01, 0x02, 0, 0, 0, 0, 0, 0x80, 0x01]);
        let mut buf = [0; 3];
        bm.read_serialized(7, &mut buf);
        assert_eq!(buf, [0x80, 0x01, 0]);
    }

    #[test]
    fn fill_masks_bits_past_end() {
        // 13 bits: the second serialized byte has only 5 valid bits.
        let bm = DirtyBitmap::new(12 * 512 + 100, 9).unwrap();
        assert_eq!(bm.bit_count(), 13);
        bm.fill_serialized_ones(0, u64::MAX);
        assert_eq!(serialized(&bm), [0xff, 0x1f]);
        assert_eq!(bm.count_set_bits(), 13);
        assert_eq!(bm.next_set_run(0), Some((0, 13)));
        assert_eq!(bm.dirty_bytes(), bm.size());
        assert_eq!(bm.next_dirty_extent(700), Some((700, bm.size() - 700)));

        let other = DirtyBitmap::new(12 * 512 + 100, 9).unwrap();
        other.write_serialized(1, &[0xff, 0xff, 0xff]);
        assert_eq!(serialized(&other), [0, 0x1f]);
    }

    #[test]
    fn round_trip() {
        let a = DirtyBitmap::new(3 * CHUNK_BITS * 4096 + 12345, 12).unwrap();
        for (first, count) in [
            (0, 1),
            (5, 70),
            (4000, 9000),
            (20000, 3),
            (a.bit_count() - 1, 9),
        ] {
            a.set_bits(first, count);
        }
        let bytes = serialized(&a);
        let b = DirtyBitmap::new(a.size(), 12).unwrap();
        // Load in odd-sized pieces to cross word and chunk boundaries.
        for (i, piece) in bytes.chunks(333).enumerate() {
            b.write_serialized(i as u64 * 333, piece);
        }
        assert_eq!(serialized(&b), bytes);
        assert_eq!(runs(&a), runs(&b));
        assert_eq!(a.committed_bytes_estimate(), b.committed_bytes_estimate());
    }

    #[test]
    fn runs_and_extents() {
        let bm = DirtyBitmap::new(100_000 * 512 + 1, 9).unwrap();
        bm.set_bits(10, 3 * CHUNK_BITS); // crosses chunk boundaries
        bm.set_bits(20_000, 1);
        bm.set_bits(bm.bit_count() - 1, 1);
        assert_eq!(
            runs(&bm),
            [(10, 3 * CHUNK_BITS), (20_000, 1), (bm.bit_count() - 1, 1)]
        );
        assert_eq!(bm.next_set_run(100), Some((100, 3 * CHUNK_BITS - 90)));
        assert_eq!(
            bm.next_dirty_extent(10 * 512 + 7),
            Some((10 * 512 + 7, 3 * CHUNK_BITS * 512 - 7))
        );
        let last = bm.next_dirty_extent(20_001 * 512).unwrap();
        assert_eq!(last, ((bm.bit_count() - 1) * 512, 1));
        assert_eq!(bm.dirty_bytes(), (3 * CHUNK_BITS + 1) * 512 + 1);
        assert!(!bm.serialized_range_is_clean(2, 1));
        assert!(bm.serialized_range_is_clean(2 + 3 * CHUNK_BYTES, 100));
    }

    #[test]
    fn chunk_boundaries() {
        // Three chunks, the last one partial.
        let bm = DirtyBitmap::new((3 * CHUNK_BITS - 7) * 512, 9).unwrap();
        // A run ending exactly where a clean chunk starts.
        bm.set_bits(CHUNK_BITS - 5, 5);
        assert_eq!(runs(&bm), [(CHUNK_BITS - 5, 5)]);
        bm.set_bits(2 * CHUNK_BITS, 3);
        assert_eq!(runs(&bm), [(CHUNK_BITS - 5, 5), (2 * CHUNK_BITS, 3)]);
        // Resetting all but the last bit of a chunk keeps that bit.
        bm.set_bits(0, CHUNK_BITS);
        bm.reset_bits(0, CHUNK_BITS - 1);
        assert_eq!(runs(&bm), [(CHUNK_BITS - 1, 1), (2 * CHUNK_BITS, 3)]);
        bm.set_bits(0, CHUNK_BITS);
        bm.reset_bits(1, CHUNK_BITS);
        assert_eq!(runs(&bm), [(0, 1), (2 * CHUNK_BITS, 3)]);
        // Resetting up to bit_count covers the partial last chunk entirely.
        let flagged_before = bm.committed_bytes_estimate();
        bm.reset_bits(2 * CHUNK_BITS, u64::MAX);
        assert_eq!(bm.committed_bytes_estimate(), flagged_before - CHUNK_BYTES);
        assert_eq!(runs(&bm), [(0, 1)]);
    }

    #[test]
    fn reset_drops_summary_of_whole_chunks() {
        let bm = DirtyBitmap::new(3 * CHUNK_BITS * 512, 9).unwrap();
        bm.set_bits(0, u64::MAX);
        assert_eq!(bm.committed_bytes_estimate(), 3 * CHUNK_BYTES + 8);
        bm.reset_bits(100, 2 * CHUNK_BITS);
        assert_eq!(bm.count_set_bits(), CHUNK_BITS);
        // Chunk 1 was covered entirely; chunks 0 and 2 keep their flag.
        assert_eq!(bm.committed_bytes_estimate(), 2 * CHUNK_BYTES + 8);
        bm.clear_all();
        assert_eq!(bm.committed_bytes_estimate(), 8);
        assert_eq!(bm.next_set_run(0), None);
    }

    #[test]
    fn modified_flag() {
        let bm = DirtyBitmap::new(1 << 20, 16).unwrap();
        assert!(!bm.take_modified());
        assert!(bm.set_bits(3, 1));
        assert!(bm.is_modified());
        assert!(bm.take_modified());
        assert!(!bm.set_bits(3, 1)); // no change, no flag
        assert!(!bm.is_modified());
        bm.reset_bits(4, 1);
        assert!(!bm.is_modified());
        bm.reset_bits(3, 1);
        assert!(bm.take_modified());
        bm.clear_all();
        assert!(!bm.is_modified());
        bm.set_modified();
        assert!(bm.take_modified());
    }

    #[test]
    fn merge() {
        let a = DirtyBitmap::new(1 << 24, 16).unwrap();
        let b = DirtyBitmap::new(1 << 24, 16).unwrap();
        let fine = DirtyBitmap::new(1 << 24, 9).unwrap();
        a.set_bits(1, 2);
        b.set_bits(2, 2);
        assert!(a.merge_from(&b));
        assert!(!a.merge_from(&b));
        assert!(!a.merge_from(&a));
        assert_eq!(runs(&a), [(1, 3)]);
        fine.mark_bytes(100 * 65536 + 5, 1);
        assert!(a.merge_from(&fine));
        assert_eq!(runs(&a), [(1, 3), (100, 1)]);
        assert!(fine.merge_from(&a));
        assert_eq!(fine.dirty_bytes(), 4 * 65536);
        // Bits of a larger source past our end are dropped.
        let small = DirtyBitmap::new(65536 + 1, 16).unwrap();
        let big = DirtyBitmap::new(1 << 20, 16).unwrap();
        big.set_bits(0, u64::MAX);
        assert!(small.merge_from(&big));
        assert_eq!(serialized(&small), [0x03]);
    }

    #[test]
    fn extreme_arguments_do_not_panic() {
        let bm = DirtyBitmap::new(1000 * 512 + 3, 9).unwrap();
        let mut buf = [1; 16];
        for x in [
            0,
            1,
            63,
            64,
            999,
            1000,
            1001,
            u64::MAX / 8,
            u64::MAX / 8 + 1,
            u64::MAX - 1,
            u64::MAX,
        ] {
            for y in [0, 1, 1000, u64::MAX - 1, u64::MAX] {
                bm.set_bits(x, y);
                bm.reset_bits(x, y);
                bm.mark_bytes(x, y);
                bm.fill_serialized_ones(x, y);
                bm.serialized_range_is_clean(x, y);
            }
            bm.get_bit(x);
            bm.next_set_run(x);
            bm.next_dirty_extent(x);
            bm.read_serialized(x, &mut buf);
            bm.write_serialized(x, &buf);
        }
        assert_eq!(bm.count_set_bits(), bm.bit_count());
        assert_eq!(bm.dirty_bytes(), bm.size());
    }

    #[test]
    fn concurrent_marks() {
        let bm = DirtyBitmap::new(1 << 34, 16).unwrap(); // 2^18 bits
        let newly_set: u64 = thread::scope(|s| {
            let handles: Vec<_> = (0..4u64)
                .map(|t| {
                    let bm = &bm;
                    s.spawn(move || {
                        let mut n = 0;
                        // Stride 3 per thread overlaps with the other threads' bits.
                        for i in 0..20_000 {
                            n += u64::from(bm.set_bits(t * 10_000 + i * 3, 1));
                        }
                        n
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let mut expected = std::collections::BTreeSet::new();
        for t in 0..4u64 {
            expected.extend((0..20_000).map(|i| t * 10_000 + i * 3));
        }
        assert_eq!(newly_set, expected.len() as u64); // each bit won exactly once
        assert_eq!(bm.count_set_bits(), expected.len() as u64);
        assert!(expected.iter().all(|&b| bm.get_bit(b)));
        assert_summary_covers(&bm);
    }

    #[test]
    fn clear_all_racing_marks_keeps_summary_invariant() {
        let bm = DirtyBitmap::new(1 << 30, 9).unwrap(); // 2^21 bits
        let deadline = Instant::now() + Duration::from_millis(200);
        thread::scope(|s| {
            for t in 0..3u64 {
                let bm = &bm;
                s.spawn(move || {
                    let mut i = t;
                    while Instant::now() < deadline {
                        bm.set_bits(i.wrapping_mul(0x9e37_79b9) % bm.bit_count(), 70);
                        i += 3;
                    }
                });
            }
            while Instant::now() < deadline {
                bm.clear_all();
            }
        });
        assert_summary_covers(&bm);
    }

    #[test]
    fn lazy_for_huge_disks() {
        // 16 TiB at 64 KiB granularity: 2^28 bits, a 32 MiB word map.
        let bm = DirtyBitmap::new(1 << 44, 16).unwrap();
        assert_eq!(bm.bit_count(), 1 << 28);
        let start = Instant::now();
        assert_eq!(bm.next_set_run(0), None);
        assert_eq!(bm.next_dirty_extent(0), None);
        assert!(start.elapsed() < Duration::from_millis(20));
        assert_eq!(bm.committed_bytes_estimate(), 8192);

        // 10,000 set bits scattered as 1,250 random 512 KiB guest writes.
        // (10,000 uniformly random single bits would flag ~9,300 chunks, about
        // 4.6 MiB by this estimate, and dirty ~70% of the map's 4 KiB pages.)
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..1250 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bm.set_bits(x % (1 << 28), 8);
        }
        assert!(bm.count_set_bits() <= 10_000);
        assert!(bm.committed_bytes_estimate() < 4 << 20);
        let mut buf = vec![0; 1 << 20];
        bm.read_serialized(0, &mut buf);
        let ones: u64 = buf.iter().map(|b| u64::from(b.count_ones())).sum();
        assert!(ones > 0);
        bm.clear_all();
        assert_eq!(bm.committed_bytes_estimate(), 8192);
    }
}
