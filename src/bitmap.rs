//! In-memory dirty bitmap: lock-free marking, memory committed only where
//! bits are set, and a summary level so walks skip clean regions.
//!
//! Bit `k` covers guest bytes `[k * granularity, (k + 1) * granularity)` and
//! lives in word `k / 64` at bit `k % 64`. The little-endian bytes of the words
//! in order are therefore exactly the on-disk (QEMU) serialization, in which
//! bit `k` is bit `k % 8` of byte `k / 8`.
//!
//! Layout: words are grouped in blocks of 16 (1024 bits, 128 serialized
//! bytes, two cache lines). A block exists only once a bit in it has been
//! set: a table of `u32` block numbers (0 = no block, reads as zeros) points
//! into an arena of blocks, handed out in the order they are first touched.
//! A disk with scattered dirty granules therefore costs one 128-byte block
//! per granule, packed densely, instead of one 4 KiB page per granule as a
//! flat map would (10,000 scattered granules on a 16 TiB disk at 64 KiB:
//! about 2.3 MiB instead of 23 MiB). The arena, the table and the summary
//! live in one anonymous mapping that the kernel commits page by page on
//! first write, so nothing is allocated on the marking path.
//!
//! A dense bitmap is better off flat: block `b` at arena block `b + 1`, so
//! the arena is the serialized bitmap and a mark needs no table load (a
//! cache and TLB miss at random over a large disk). A bitmap is created or
//! loaded in the flat layout when it is known to be dense, and a sparse one
//! asks for a flat copy (`wants_flat`) when it becomes dense; see
//! `flat_is_better` for when, and image/densify.rs for the swap.
//!
//! Installing a block is lock-free: the first marker of a block takes a free
//! block (from a stack of returned blocks, else the next arena block) and
//! installs it with a compare-and-swap; a thread that loses the race returns
//! its block to the stack and uses the winner's. Blocks stay installed until
//! the bitmap is dropped; clearing zeroes them.
//!
//! Each block has one summary bit meaning "may hold set bits": a clear summary
//! bit guarantees an all-zero block, so walks, clears and serialization skip
//! it without touching its memory.
//!
//! Memory ordering: reads that only observe (walks, counts, serialization) are
//! `Relaxed`; consistency with a store to disk comes from the caller's locks,
//! and marks racing a store raise `modified` again. Every read-modify-write and
//! the load that follows it are `SeqCst`: setting does RMW(data) then
//! load(summary) while clearing does RMW(summary) then load(data), a
//! store-buffering pattern in which weaker orderings could leave a set data bit
//! under a clear summary bit (likewise RMW(data) then load(modified) against
//! `take_modified`). On x86 these compile to the same instructions as `Relaxed`.
//! Block numbers are published with release/acquire, so a block's zeroed (or
//! pre-filled) words are visible to whoever finds it in the table.

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize,
};
use std::sync::{Arc, Mutex, OnceLock};

use memmap2::{MmapMut, UncheckedAdvice};

const WORD_BITS: u64 = 64;
const BLOCK_WORDS: u64 = 16;
const BLOCK_BITS: u64 = WORD_BITS * BLOCK_WORDS;
const BLOCK_BYTES: u64 = BLOCK_BITS / 8;
const SUMMARY_BITS: u64 = 64;
/// Arena blocks beyond one per block of the bitmap. A block is taken from the
/// arena's end only when the free stack is empty, so the arena runs short
/// only if more than this many threads install blocks at the same instant;
/// a thread that finds it exhausted yields until a racing loser returns one.
const SPARE_BLOCKS: u64 = 1024;
/// Table value of a block that does not exist (reads as zeros).
const NO_BLOCK: u32 = 0;
/// `DirtyBitmap::state` bits: changed since the last `take_modified`.
const MODIFIED: u8 = 1;
/// `DirtyBitmap::state` bits: `successor` is set, marks are forwarded.
const FORWARD: u8 = 2;
/// A flat map commits memory by the page: 32 blocks.
const PAGE_BYTES: u64 = 4096;
const PAGE_BLOCKS: u64 = PAGE_BYTES / BLOCK_BYTES;
/// Table entries per page of the sparse layout's table.
const TABLE_PAGE_BLOCKS: u64 = PAGE_BYTES / 4;
/// A sparse bitmap weighs the layouts every this many block installs (a
/// scan of the summary: 32 KiB for 16 TiB at 64 KiB, once per 128 KiB of
/// blocks installed).
const DENSITY_CHECK_EVERY: u64 = 1024;

/// Asks the CPU to bring the line at `p` into the cache, to be written.
/// A hint: it never faults, so any address will do.
#[inline(always)]
fn prefetch_for_write(p: *const AtomicU64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch only hints the cache; it reads nothing and cannot
    // fault, whatever the address (SSE is part of x86_64).
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Guest bytes `[offset, offset + length)`: one write of a batch
/// ([`HotSet::mark_many_fast`], `Image::mark_dirty_many`). `repr(C)`: the
/// C API hands its `struct qbm_range` arrays over as slices of these.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
}

/// A dirty bitmap over a virtual disk; all methods take `&self` and are safe to
/// call concurrently.
pub struct DirtyBitmap {
    /// Arena, summary and table (in that order); only ever accessed through
    /// [`DirtyBitmap::arena`], [`DirtyBitmap::summary`], [`DirtyBitmap::table`].
    map: MmapMut,
    /// `map`'s first byte (the mapping never moves while `map` lives).
    base: *const u8,
    /// The marking path's pointers into `map`.
    hot: Hot,
    /// Blocks the arena can hold (`block_count + SPARE_BLOCKS`).
    arena_blocks: u64,
    /// Byte offsets of the summary and the table in `map`.
    summary_off: usize,
    summary_words: u64,
    table_off: usize,
    /// Number of data words (`ceil(bit_count / 64)`).
    word_count: u64,
    /// Number of blocks covering the words (`ceil(word_count / 16)`).
    block_count: u64,
    /// Flat layout: block `b` is arena block `b + 1` (the arena is the
    /// serialized bitmap itself, every block present) and there is no
    /// table. Chosen for dense bitmaps, where it costs no more memory and
    /// saves the table load on every mark (see `flat_is_better`).
    flat: bool,
    /// Sparse layout: set by a block install that found the flat layout no
    /// more costly; the image then swaps in a flat copy (image/densify.rs).
    wants_flat: AtomicBool,
    /// Flat layout, while loading: pages written by direct reads.
    loaded_pages: u64,
    /// Arena blocks handed out from the end so far (may overshoot `arena_blocks`).
    next_block: AtomicU64,
    /// Stack of returned blocks: low 32 bits the top block number (0 = empty),
    /// high 32 bits a tag bumped on every change (against ABA). A free
    /// block's word 0 holds the number of the block below it.
    free_head: AtomicU64,
    size: u64,
    granularity_bits: u32,
    bit_count: u64,
    /// `MODIFIED | FORWARD` bits, in one byte so that the marking path
    /// checks both with one load (`== MODIFIED`: nothing to do).
    state: AtomicU8,
    /// Set when a resize replaces this bitmap: marks that still reach it
    /// (through a list published before the replacement) go on to the new
    /// one too, so none is lost however late it lands.
    successor: OnceLock<Arc<DirtyBitmap>>,
    /// Write-intent mode (image/intent.rs): the bits known to be on disk
    /// where the bitmap lives now. Set once, when the bitmap is first
    /// stored in place; the marking path reads it without a lock.
    durable: OnceLock<Arc<DirtyBitmap>>,
}

// SAFETY: `base` points into `map`, which the bitmap owns and which is only
// ever accessed through atomic views; sharing those between threads is what
// atomics are for, and moving the bitmap does not move the mapping.
unsafe impl Send for DirtyBitmap {}
// SAFETY: as for Send: every access through `base` is atomic.
unsafe impl Sync for DirtyBitmap {}

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
        DirtyBitmap::with_layout(size, granularity_bits, false)
    }

    /// [`DirtyBitmap::new`] in the flat layout (see `flat`): for bitmaps
    /// known to be dense.
    pub fn new_flat(size: u64, granularity_bits: u32) -> io::Result<DirtyBitmap> {
        DirtyBitmap::with_layout(size, granularity_bits, true)
    }

    /// An empty bitmap about to be loaded with [`DirtyBitmap::load_with`]
    /// from stored data of which `present_bytes` are in data or all-ones
    /// clusters: flat when most of it is, since a dense bitmap then loads
    /// by reading straight into place. [`DirtyBitmap::finish_load`] settles
    /// the layout once the bits are known.
    pub fn for_load(
        size: u64,
        granularity_bits: u32,
        present_bytes: u64,
    ) -> io::Result<DirtyBitmap> {
        let serialized = size.div_ceil(1 << granularity_bits.min(63)).div_ceil(8);
        let dense = present_bytes.saturating_mul(4) >= serialized.saturating_mul(3);
        DirtyBitmap::with_layout(size, granularity_bits, dense && serialized > 0)
    }

    fn with_layout(size: u64, granularity_bits: u32, flat: bool) -> io::Result<DirtyBitmap> {
        if !(9..=31).contains(&granularity_bits) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "dirty bitmap granularity must be between 2^9 and 2^31 bytes",
            ));
        }
        let too_big = || io::Error::new(io::ErrorKind::OutOfMemory, "dirty bitmap too large");
        let bit_count = size.div_ceil(1 << granularity_bits);
        let word_count = bit_count.div_ceil(WORD_BITS);
        let block_count = word_count.div_ceil(BLOCK_WORDS);
        // Flat: one arena block per block, nothing else is ever handed out.
        let arena_blocks = if flat {
            block_count.max(1)
        } else {
            block_count + SPARE_BLOCKS
        };
        // Block numbers are u32 and 0 means "none".
        if arena_blocks >= u64::from(u32::MAX) {
            return Err(too_big());
        }
        let summary_words = block_count.div_ceil(SUMMARY_BITS);
        let arena_len = arena_blocks * BLOCK_BYTES;
        let summary_off = arena_len;
        let table_off = summary_off + summary_words * 8;
        let table_len = if flat { 0 } else { block_count };
        let map_len = table_off + table_len * 4;
        let map_len = usize::try_from(map_len).map_err(|_| too_big())?;
        let map = MmapMut::map_anon(map_len)?;
        if flat {
            // Dense by construction: huge pages cost little more memory and
            // spare random marks most TLB misses (best effort; THP may be off).
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        let base = map.as_ptr();
        let hot = Hot {
            arena: base.cast(),
            summary: base.wrapping_add(summary_off as usize).cast(),
            table: if flat {
                std::ptr::null()
            } else {
                base.wrapping_add(table_off as usize).cast()
            },
        };
        Ok(DirtyBitmap {
            base,
            hot,
            map,
            arena_blocks,
            summary_off: summary_off as usize,
            summary_words,
            table_off: table_off as usize,
            word_count,
            block_count,
            flat,
            wants_flat: AtomicBool::new(false),
            loaded_pages: 0,
            next_block: AtomicU64::new(0),
            free_head: AtomicU64::new(0),
            size,
            granularity_bits,
            bit_count,
            state: AtomicU8::new(0),
            successor: OnceLock::new(),
            durable: OnceLock::new(),
        })
    }

    /// Makes every later mark of this bitmap also mark `next` (see
    /// `successor`). Callers then merge this bitmap into `next`: a mark that
    /// saw no successor landed before that merge reads it.
    pub fn forward_to(&self, next: Arc<DirtyBitmap>) {
        let _ = self.successor.set(next);
        // Release: a marker that sees FORWARD sees the successor. SeqCst, and
        // the fence: orders FORWARD before the merge's reads, against the
        // markers' bit update followed by their (SeqCst) load of `state`.
        self.state.fetch_or(FORWARD, SeqCst);
        std::sync::atomic::fence(SeqCst);
    }

    /// The write-intent shadow of this bitmap (see `durable`), if any.
    #[inline]
    pub fn durable(&self) -> Option<&Arc<DirtyBitmap>> {
        self.durable.get()
    }

    /// Attaches the write-intent shadow; false if one is already attached.
    pub fn set_durable(&self, shadow: Arc<DirtyBitmap>) -> bool {
        self.durable.set(shadow).is_ok()
    }

    #[inline]
    fn forward(&self, offset: u64, len: u64) {
        if self.state.load(SeqCst) & FORWARD != 0 {
            self.forward_slow(offset, len);
        }
    }

    #[cold]
    #[inline(never)]
    fn forward_slow(&self, offset: u64, len: u64) {
        if let Some(next) = self.successor.get() {
            next.mark_bytes(offset, len);
        }
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
    ///
    /// Raises `modified` even when every bit was already set: the bits may have
    /// been set by another thread's call that has not raised `modified` yet, and
    /// a store that starts after this call returns must still write them (the
    /// `qbm_flush` checkpoint guarantee). The cost is that a store after marks
    /// which changed nothing rewrites the bitmap.
    #[inline]
    pub fn set_bits(&self, first: u64, count: u64) -> bool {
        let end = first.saturating_add(count).min(self.bit_count);
        if first >= end {
            return false;
        }
        let changed = if count == 1 {
            // Common case (a write within one granule): skip the range math.
            self.or_word(first / WORD_BITS, 1 << (first % WORD_BITS))
        } else {
            self.set_range(first, count)
        };
        self.note_modified();
        changed
    }

    fn set_range(&self, first: u64, count: u64) -> bool {
        let end = first.saturating_add(count).min(self.bit_count);
        let mut changed = false;
        if first < end {
            for w in first / WORD_BITS..=(end - 1) / WORD_BITS {
                changed |= self.or_word(w, word_mask(w, first, end));
            }
        }
        changed
    }

    /// Clears bits `[first, first + count)` (clamped).
    pub fn reset_bits(&self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.bit_count);
        if first >= end {
            return;
        }
        let mut changed = false;
        for b in self.flagged_blocks(first / BLOCK_BITS, (end - 1) / BLOCK_BITS) {
            let block_end = ((b + 1) * BLOCK_BITS).min(self.bit_count);
            if first <= b * BLOCK_BITS && end >= block_end {
                // Whole block: also drop its summary bit so it stops costing walks.
                changed |= self.clear_block(b);
                continue;
            }
            let Some(blk) = self.block(b) else { continue };
            for w in self.block_words_in(b, first, end) {
                let mask = word_mask(w, first, end);
                let word = &blk[(w % BLOCK_WORDS) as usize];
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
        bit < self.bit_count && self.word(bit / WORD_BITS) >> (bit % WORD_BITS) & 1 != 0
    }

    /// Clears every bit, visiting only flagged blocks. Blocks stay allocated.
    pub fn clear_all(&self) {
        let mut changed = false;
        for b in self.flagged_blocks(0, u64::MAX) {
            changed |= self.clear_block(b);
        }
        if changed {
            self.note_modified();
        }
    }

    /// Number of set bits.
    pub fn count_set_bits(&self) -> u64 {
        self.flagged_blocks(0, u64::MAX)
            .filter_map(|b| self.block(b))
            .flat_map(|blk| blk.iter())
            .map(|w| u64::from(w.load(Relaxed).count_ones()))
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
        let changed = self.mark_bytes_here(offset, len);
        self.forward(offset, len);
        changed
    }

    fn mark_bytes_here(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return false;
        }
        let first = offset >> self.granularity_bits;
        let last = (end - 1) >> self.granularity_bits;
        if first == last {
            // first < bit_count because offset < size.
            let changed = self.set_bit_fast(first);
            // Even when already set: see `set_bits`.
            self.note_modified();
            return changed;
        }
        self.set_bits(first, last - first + 1)
    }

    /// Sets bit `bit` (`< bit_count`): the per-write path.
    #[inline]
    fn set_bit_fast(&self, bit: u64) -> bool {
        self.hot().set_bit(bit, self)
    }

    /// The raw pointers of the marking path.
    #[inline(always)]
    fn hot(&self) -> Hot {
        self.hot
    }

    /// See [`Marker::mark_fast`].
    #[inline(always)]
    fn mark_fast(&self, offset: u64, last: u64) -> bool {
        // After the bit (see `set_bits` and `forward_to`): one load decides
        // that `modified` is raised and nothing is forwarded.
        self.set_granule_fast(offset, last) && self.state.load(SeqCst) == MODIFIED
    }

    /// Sets the bit of guest bytes `[offset, last]` when they lie in one
    /// granule of an installed block inside the disk; false (nothing set)
    /// otherwise. Does not raise `modified`.
    #[inline(always)]
    fn set_granule_fast(&self, offset: u64, last: u64) -> bool {
        let g = self.granularity_bits;
        // One granule (so `offset <= last`, no wrap) inside the disk.
        if last >= self.size || (offset ^ last).wrapping_shr(g) != 0 {
            return false;
        }
        // SAFETY: `hot` points into `self`'s mapping, and
        // `offset >> g == last >> g < bit_count` since `last < size`.
        unsafe { self.hot.set_installed_bit(offset.wrapping_shr(g)) }.is_some()
    }

    /// [`DirtyBitmap::mark_fast`] over a batch, one bitmap at a time: the
    /// loop is small enough that the cache misses of many writes overlap.
    /// Empty ranges are skipped; false at the first range that is not the
    /// common case (some ranges may be marked by then).
    #[inline(always)]
    fn mark_many_fast(&self, ranges: &[ByteRange]) -> bool {
        if self.hot.table.is_null() {
            // Flat: start every word's cache miss before the first one is
            // waited for (a prefetch never faults, whatever the address).
            for r in ranges {
                let w = (r.offset.wrapping_shr(self.granularity_bits) / WORD_BITS) as usize;
                prefetch_for_write(self.hot.arena.wrapping_add(w));
            }
        }
        ranges.iter().all(|r| {
            r.length == 0 || self.set_granule_fast(r.offset, r.offset.wrapping_add(r.length - 1))
        }) && self.state.load(SeqCst) == MODIFIED
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
    /// Same granularity ORs blocks directly (bits past `self.bit_count()` are
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
        let (changed, any) = self.or_blocks_of(other);
        // As in `set_bits`: raised even when nothing changed.
        if any {
            self.note_modified();
        }
        changed
    }

    /// ORs every block of `other` (same granularity) into `self`, dropping
    /// bits past `self.bit_count()`; (any bit changed, any bit was set).
    fn or_blocks_of(&self, other: &DirtyBitmap) -> (bool, bool) {
        let mut changed = false;
        let mut any = false;
        other.for_each_flagged_block(|b, src| {
            if b >= self.block_count {
                return;
            }
            let mut words = [0u64; BLOCK_WORDS as usize];
            for (i, (d, s)) in words.iter_mut().zip(src).enumerate() {
                let w = b * BLOCK_WORDS + i as u64;
                if w < self.word_count {
                    *d = s.load(Relaxed) & word_mask(w, 0, self.bit_count);
                    any |= *d != 0;
                }
            }
            changed |= self.or_block(b, &words);
        });
        (changed, any)
    }

    /// Calls `f(b, words)` on every flagged block, in the order the blocks
    /// lie in memory: for a sparse bitmap that is arena order, since a walk
    /// by block number jumps around the arena (a cache and TLB miss per
    /// block, which made copying a full 16 TiB bitmap take ~70 ms instead
    /// of a few). A block installed during the walk may be missed.
    fn for_each_flagged_block(&self, mut f: impl FnMut(u64, &[AtomicU64])) {
        if self.flat {
            for b in self.flagged_blocks(0, u64::MAX) {
                f(b, self.block_at(b as u32 + 1));
            }
            return;
        }
        let handed_out = self.next_block.load(Relaxed).min(self.arena_blocks);
        if handed_out < 64 {
            // A few blocks: not worth the map.
            for b in self.flagged_blocks(0, u64::MAX) {
                if let Some(blk) = self.block(b) {
                    f(b, blk);
                }
            }
            return;
        }
        // The block each arena block holds.
        let mut owner = vec![u32::MAX; handed_out as usize];
        for (b, t) in self.table().iter().enumerate() {
            let id = t.load(Acquire);
            if let Some(o) = owner.get_mut((id as usize).wrapping_sub(1)) {
                *o = b as u32;
            }
        }
        for (i, &b) in owner.iter().enumerate() {
            if b != u32::MAX && self.block_flagged(u64::from(b)) {
                f(u64::from(b), self.block_at(i as u32 + 1));
            }
        }
    }

    // ---- serialization ----

    /// Copies serialized bytes `[byte_offset, byte_offset + buf.len())` into
    /// `buf`; bytes past `serialized_len()` read as 0. Clean blocks are not read.
    pub fn read_serialized(&self, byte_offset: u64, buf: &mut [u8]) {
        let Some(n) = self.serialized_span(byte_offset, buf.len()) else {
            buf.fill(0);
            return;
        };
        buf[n..].fill(0);
        let mut pos = 0;
        while pos < n {
            let byte = byte_offset + pos as u64;
            let b = byte / BLOCK_BYTES;
            let in_block = (byte % BLOCK_BYTES) as usize;
            let take = (n - pos).min(BLOCK_BYTES as usize - in_block);
            let out = &mut buf[pos..pos + take];
            match self.flagged_block(b) {
                None => out.fill(0),
                Some(blk) => {
                    let mut bytes = [0u8; BLOCK_BYTES as usize];
                    for (chunk, w) in bytes.chunks_exact_mut(8).zip(blk) {
                        chunk.copy_from_slice(&w.load(Relaxed).to_le_bytes());
                    }
                    out.copy_from_slice(&bytes[in_block..in_block + take]);
                }
            }
            pos += take;
        }
    }

    /// ORs serialized bytes into the bitmap at `byte_offset` (loading from
    /// disk). All-zero blocks are skipped and allocate nothing; bits past
    /// `bit_count()` are dropped.
    pub fn write_serialized(&self, byte_offset: u64, data: &[u8]) {
        let Some(n) = self.serialized_span(byte_offset, data.len()) else {
            return;
        };
        let mut changed = false;
        let mut pos = 0;
        while pos < n {
            let byte = byte_offset + pos as u64;
            let b = byte / BLOCK_BYTES;
            let in_block = (byte % BLOCK_BYTES) as usize;
            let take = (n - pos).min(BLOCK_BYTES as usize - in_block);
            let src = &data[pos..pos + take];
            pos += take;
            if src.chunks(8).all(|c| c.iter().fold(0, |a, &x| a | x) == 0) {
                continue;
            }
            let mut bytes = [0u8; BLOCK_BYTES as usize];
            bytes[in_block..in_block + take].copy_from_slice(src);
            let mut words = [0u64; BLOCK_WORDS as usize];
            for (i, (w, chunk)) in words.iter_mut().zip(bytes.chunks_exact(8)).enumerate() {
                let wi = b * BLOCK_WORDS + i as u64;
                if wi < self.word_count {
                    *w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"))
                        & word_mask(wi, 0, self.bit_count);
                }
            }
            changed |= self.or_block(b, &words);
        }
        if changed {
            self.note_modified();
        }
    }

    /// [`DirtyBitmap::write_serialized`] for a bitmap nobody else can see
    /// yet (being loaded): whole blocks are copied in with plain stores, no
    /// compare-and-swap or locked OR per block. All-zero blocks allocate
    /// nothing.
    pub fn load_serialized(&mut self, byte_offset: u64, data: &[u8]) {
        let Some(n) = self.serialized_span(byte_offset, data.len()) else {
            return;
        };
        let data = &data[..n];
        // Whole blocks that end before the last word (which needs masking).
        let head = ((BLOCK_BYTES - byte_offset % BLOCK_BYTES) % BLOCK_BYTES) as usize;
        let last_full_block = (self.word_count.saturating_sub(1)) / BLOCK_WORDS;
        if head >= data.len() {
            self.write_serialized(byte_offset, data);
            return;
        }
        self.write_serialized(byte_offset, &data[..head]);
        self.populate_for(&data[head..]);
        let mut pos = head;
        let mut changed = false;
        while pos + BLOCK_BYTES as usize <= data.len() {
            let b = (byte_offset + pos as u64) / BLOCK_BYTES;
            if b >= last_full_block {
                break;
            }
            let src = &data[pos..pos + BLOCK_BYTES as usize];
            pos += BLOCK_BYTES as usize;
            let mut words = [0u64; BLOCK_WORDS as usize];
            let mut any = 0;
            for (w, chunk) in words.iter_mut().zip(src.chunks_exact(8)) {
                *w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                any |= *w;
            }
            if any == 0 {
                continue;
            }
            changed = true;
            if let Some(blk) = self.block(b) {
                for (word, v) in blk.iter().zip(&words) {
                    word.store(word.load(Relaxed) | v, Relaxed);
                }
            } else {
                let id = self.alloc_block();
                for (word, v) in self.block_at(id).iter().zip(&words) {
                    word.store(*v, Relaxed);
                }
                self.table()[b as usize].store(id, Relaxed);
            }
            let (sw, bit) = self.summary_slot(b);
            sw.store(sw.load(Relaxed) | bit, Relaxed);
        }
        if changed {
            self.note_modified();
        }
        self.write_serialized(byte_offset + pos as u64, &data[pos..]);
    }

    /// Commits, in one call, the arena pages the nonzero blocks of `data`
    /// are about to fill: one madvise instead of a page fault per 4 KiB.
    /// Pages for zero blocks are not touched, so sparse loads stay small.
    fn populate_for(&self, data: &[u8]) {
        if self.flat {
            return; // the pages fault in where the blocks go
        }
        let blocks = data
            .chunks_exact(BLOCK_BYTES as usize)
            .filter(|b| b.chunks_exact(8).any(|w| w != [0; 8]))
            .count() as u64;
        let first = self.next_block.load(Relaxed).min(self.arena_blocks);
        let end = (first + blocks).min(self.arena_blocks);
        if end - first < 64 {
            return; // a couple of pages: faulting them is as cheap
        }
        let page = 4096;
        let start = (first * BLOCK_BYTES) / page * page;
        let stop = (end * BLOCK_BYTES).div_ceil(page) * page;
        // Best effort: kernels before 5.14 refuse it, and the pages fault in.
        let _ = self.map.advise_range(
            memmap2::Advice::PopulateWrite,
            start as usize,
            (stop.min(self.summary_off as u64) - start) as usize,
        );
    }

    /// Sets every bit covered by serialized bytes `[byte_offset, byte_offset + len)`
    /// (an all-ones cluster on disk), masked to `bit_count()`.
    pub fn fill_serialized_ones(&self, byte_offset: u64, len: u64) {
        self.set_bits(byte_offset.saturating_mul(8), len.saturating_mul(8));
    }

    /// True if serialized bytes `[byte_offset, byte_offset + len)` are all zero.
    /// Blocks with a clear summary bit are decided without touching memory.
    pub fn serialized_range_is_clean(&self, byte_offset: u64, len: u64) -> bool {
        let first = byte_offset.saturating_mul(8);
        let end = byte_offset
            .saturating_add(len)
            .saturating_mul(8)
            .min(self.bit_count);
        if first >= end {
            return true;
        }
        !self
            .flagged_blocks(first / BLOCK_BITS, (end - 1) / BLOCK_BITS)
            .any(|b| {
                self.block(b).is_some_and(|blk| {
                    self.block_words_in(b, first, end).any(|w| {
                        blk[(w % BLOCK_WORDS) as usize].load(Relaxed) & word_mask(w, first, end)
                            != 0
                    })
                })
            })
    }

    // ---- modified flag ----

    /// Returns and clears the modified flag. Call before serializing, so that
    /// marks racing with the store raise the flag again.
    pub fn take_modified(&self) -> bool {
        let was = self.state.fetch_and(!MODIFIED, SeqCst) & MODIFIED != 0;
        // Orders the caller's following (Relaxed) reads of data words after the
        // swap, pairing with the SeqCst RMW(data) -> load(modified) of markers.
        fence(SeqCst);
        was
    }

    pub fn is_modified(&self) -> bool {
        self.state.load(Acquire) & MODIFIED != 0
    }

    pub fn set_modified(&self) {
        self.state.fetch_or(MODIFIED, Release);
    }

    /// Rough size of the bits in use: flagged blocks times 128 bytes plus
    /// the summary.
    pub fn committed_bytes_estimate(&self) -> u64 {
        let flagged: u64 = self
            .summary()
            .iter()
            .map(|s| u64::from(s.load(Relaxed).count_ones()))
            .sum();
        flagged * BLOCK_BYTES + self.summary_words * 8
    }

    /// Bytes of arena blocks handed out (they stay allocated until drop).
    pub fn allocated_block_bytes(&self) -> u64 {
        self.next_block.load(Relaxed).min(self.arena_blocks) * BLOCK_BYTES
    }

    /// Gives the memory of a bitmap that is no longer used back to the
    /// system, keeping its address range: a marker that still holds a
    /// reference (marking threads are never waited for) reads zeros and may
    /// touch a page again, nothing worse. The bitmap reads as clean after.
    pub fn release_memory(&self) {
        // Zero the bookkeeping first so no block number points past what the
        // arena (about to read as zeros) hands out.
        for s in self.summary() {
            s.store(0, SeqCst);
        }
        for t in self.table() {
            if t.load(Relaxed) != NO_BLOCK {
                t.store(NO_BLOCK, SeqCst);
            }
        }
        self.free_head.store(0, SeqCst);
        // SAFETY: MADV_DONTNEED on a private anonymous mapping makes its pages
        // read as zeros again; every access to the mapping goes through atomic
        // views of it, for which zeros are valid values, and the mapping itself
        // stays in place, so no reference into it dangles. Blocks handed out
        // before remain counted in `next_block`, so none is handed out twice.
        let _ = unsafe { self.map.unchecked_advise(UncheckedAdvice::DontNeed) };
    }

    // ---- layout (see `flat`) ----

    /// True in the flat layout.
    pub fn is_flat(&self) -> bool {
        self.flat
    }

    /// True when a block install of this sparse bitmap found the flat layout
    /// better (see `flat_is_better`): its owner swaps in a
    /// [`DirtyBitmap::flat_copy`] when it safely can.
    pub fn wants_flat(&self) -> bool {
        self.wants_flat.load(Relaxed)
    }

    /// Forgets a [`DirtyBitmap::wants_flat`] request (the copy failed); a
    /// later install asks again.
    pub fn drop_flat_request(&self) {
        self.wants_flat.store(false, Relaxed);
    }

    /// A flat bitmap of the same geometry holding the bits of `self`, not
    /// flagged modified. Bits set while it copies may be missed: callers
    /// forward marks to the copy, then [`DirtyBitmap::absorb`] `self` again.
    pub fn flat_copy(&self) -> io::Result<DirtyBitmap> {
        let flat = DirtyBitmap::new_flat(self.size, self.granularity_bits)?;
        if self.usage().pages * 2 >= flat.total_pages() {
            flat.populate(0, flat.summary_off);
        }
        self.for_each_flagged_block(|b, src| {
            // Plain stores: nobody else sees `flat` yet.
            for (d, s) in flat.block_at(b as u32 + 1).iter().zip(src) {
                d.store(s.load(Relaxed), Relaxed);
            }
        });
        // After the data: a block flagged since the walk above reads as
        // "may hold bits", which is all a summary bit promises.
        for (d, s) in flat.summary().iter().zip(self.summary()) {
            d.store(s.load(Relaxed), Relaxed);
        }
        Ok(flat)
    }

    /// ORs the bits of `other` (same geometry) into `self` without raising
    /// `modified`: the last step of a copy whose modified state the caller
    /// sets.
    pub fn absorb(&self, other: &DirtyBitmap) {
        if !std::ptr::eq(self, other) && self.granularity_bits == other.granularity_bits {
            self.or_blocks_of(other);
        }
    }

    /// Flagged blocks, the flat-map pages and the table pages they lie in,
    /// counted from the summary.
    fn usage(&self) -> Usage {
        let mut u = Usage::default();
        // 16 summary words: 1024 blocks, one 4 KiB page of table.
        let words_per_table_page = (TABLE_PAGE_BLOCKS / SUMMARY_BITS) as usize;
        for group in self.summary().chunks(words_per_table_page) {
            let mut any = 0;
            for s in group {
                let v = s.load(Relaxed);
                u.blocks += u64::from(v.count_ones());
                u.pages += u64::from(v as u32 != 0) + u64::from(v >> 32 != 0);
                any |= v;
            }
            u.table_pages += u64::from(any != 0);
        }
        u
    }

    /// Pages of a flat map.
    fn total_pages(&self) -> u64 {
        self.block_count.div_ceil(PAGE_BLOCKS)
    }

    /// The install-time check of a sparse bitmap (see `DENSITY_CHECK_EVERY`).
    fn sparse_prefers_flat(&self) -> bool {
        let u = self.usage();
        let sparse = self.allocated_block_bytes() + u.table_pages * PAGE_BYTES;
        flat_is_better(u.pages * PAGE_BYTES, sparse, u.pages, self.total_pages())
    }

    /// Commits arena bytes `[start, end)` in one call (rounded out to pages;
    /// best effort: kernels before 5.14 refuse it, and the pages fault in).
    fn populate(&self, start: usize, end: usize) {
        let page = PAGE_BYTES as usize;
        let (start, end) = (start / page * page, end.div_ceil(page) * page);
        let end = end.min(self.summary_off);
        if start < end {
            let _ = self
                .map
                .advise_range(memmap2::Advice::PopulateWrite, start, end - start);
        }
    }

    /// Loads `len` stored bytes at serialized offset `byte_offset`, which
    /// `read` fills in. A flat bitmap reads them straight into place when
    /// that range holds no bits yet: the arena is the serialized bitmap, so
    /// loading is the read itself plus a scan for the summary. Otherwise they
    /// go through `buf` and [`DirtyBitmap::load_serialized`]. A flat bitmap
    /// whose data turn out sparse becomes sparse on the way. Call
    /// [`DirtyBitmap::finish_load`] after the last piece.
    pub fn load_with<E>(
        &mut self,
        byte_offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
        read: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if let Some(range) = self.direct_range(byte_offset, len) {
            self.populate(range.start, range.end);
            let dst = &mut self.map[range.clone()];
            if let Err(e) = read(dst) {
                // Keep "clear summary bit => zero block" true.
                dst.fill(0);
                return Err(e);
            }
            self.loaded_directly(range);
            return Ok(());
        }
        buf.resize(len, 0);
        read(buf)?;
        self.load_serialized(byte_offset, buf);
        Ok(())
    }

    /// How many stored bytes to read at once when loading: `default`, or
    /// for a flat bitmap (which reads straight into place) at most 512 KiB:
    /// the scan for the summary then finds the piece still in the cache,
    /// and the device's read-ahead runs on while it does (measured: larger
    /// pieces load slower from a cold cache).
    pub fn load_chunk(&self, default: u64) -> u64 {
        if self.flat {
            default.min(512 << 10)
        } else {
            default
        }
    }

    /// The arena bytes a direct load of `len` bytes at `byte_offset` would
    /// fill, if it may: flat, inside the bitmap, and no bit set there yet.
    fn direct_range(&self, byte_offset: u64, len: usize) -> Option<Range<usize>> {
        let end = byte_offset.checked_add(len as u64)?;
        if !self.flat || len == 0 || end > self.serialized_len() {
            return None;
        }
        let (first, last) = (byte_offset / BLOCK_BYTES, (end - 1) / BLOCK_BYTES);
        if self.next_flagged_block(first, last).is_some() {
            return None;
        }
        Some(usize::try_from(byte_offset).ok()?..usize::try_from(end).ok()?)
    }

    /// After a direct read into arena bytes `range`: drops bits past
    /// `bit_count` (on disk they should be 0), flags the blocks that hold
    /// bits, and turns a flat bitmap that proves sparse into a sparse one.
    fn loaded_directly(&mut self, range: Range<usize>) {
        let last_word = self.word_count - 1; // > 0 bytes were loaded
        if range.end as u64 > last_word * 8 {
            let w = &self.arena()[last_word as usize];
            w.store(
                w.load(Relaxed) & word_mask(last_word, 0, self.bit_count),
                Relaxed,
            );
        }
        let block = BLOCK_BYTES as usize;
        let (first, last) = (range.start / block, (range.end - 1) / block);
        let mut flags = 0u64;
        let mut flag_word = first as u64 / SUMMARY_BITS;
        for b in first..=last {
            let bytes = &self.map[b * block..(b + 1) * block];
            let any = bytes.chunks_exact(8).fold(0, |a, c| {
                a | u64::from_ne_bytes(c.try_into().expect("8 bytes"))
            });
            let b = b as u64;
            if b / SUMMARY_BITS != flag_word {
                self.summary()[flag_word as usize].fetch_or(flags, Relaxed);
                (flags, flag_word) = (0, b / SUMMARY_BITS);
            }
            flags |= u64::from(any != 0) << (b % SUMMARY_BITS);
        }
        self.summary()[flag_word as usize].fetch_or(flags, Relaxed);
        let page = PAGE_BYTES as usize;
        self.loaded_pages += (range.end.div_ceil(page) - range.start / page) as u64;
        self.note_modified();
        // Scattered bits: the flat map commits a page where sparse needs a
        // block. Give it up once it costs clearly more (the final choice is
        // made by `finish_load`).
        let u = self.usage();
        let sparse = u.blocks * BLOCK_BYTES + u.table_pages * PAGE_BYTES;
        if self.loaded_pages * PAGE_BYTES > sparse + sparse / 4 + (256 << 10) {
            self.relayout(false);
        }
    }

    /// Settles the layout of a freshly loaded bitmap by `flat_is_better`.
    pub fn finish_load(&mut self) {
        let u = self.usage();
        let sparse = u.blocks * BLOCK_BYTES + u.table_pages * PAGE_BYTES;
        let flat = self.loaded_pages.max(u.pages) * PAGE_BYTES;
        let want_flat = flat_is_better(flat, sparse, u.pages, self.total_pages());
        if want_flat != self.flat {
            self.relayout(want_flat);
        }
        self.loaded_pages = 0;
        self.drop_flat_request();
    }

    /// Replaces a bitmap nobody else sees by a copy in the other layout;
    /// keeps this one if memory for the copy runs out.
    fn relayout(&mut self, flat: bool) {
        let copy = if flat {
            self.flat_copy()
        } else {
            DirtyBitmap::new(self.size, self.granularity_bits).inspect(|c| c.absorb(self))
        };
        if let Ok(copy) = copy {
            if self.is_modified() {
                copy.set_modified();
            }
            *self = copy;
        }
    }

    // ---- private helpers ----

    fn arena(&self) -> &[AtomicU64] {
        // SAFETY: the anonymous map is page aligned (so aligned for AtomicU64),
        // zero-initialised and starts with `arena_blocks * 128` bytes of arena
        // (the map length was computed from them in `new`). It is owned by
        // `self`, so it outlives the returned borrow. AtomicU64 has the same
        // size and bit validity as u64, and these bytes are only ever accessed
        // through this atomic view.
        unsafe {
            std::slice::from_raw_parts(
                self.base.cast::<AtomicU64>(),
                (self.arena_blocks * BLOCK_WORDS) as usize,
            )
        }
    }

    fn summary(&self) -> &[AtomicU64] {
        // SAFETY: `summary_off` is a multiple of 128 (it follows the arena),
        // so the view is aligned; `summary_words * 8` bytes from it lie inside
        // the map (see `new`) and are accessed only through this atomic view.
        unsafe {
            std::slice::from_raw_parts(
                self.base.add(self.summary_off).cast::<AtomicU64>(),
                self.summary_words as usize,
            )
        }
    }

    /// The table (empty in the flat layout).
    fn table(&self) -> &[AtomicU32] {
        let len = if self.flat { 0 } else { self.block_count };
        // SAFETY: `table_off` is a multiple of 8 (it follows the summary words),
        // so aligned for AtomicU32; `len * 4` bytes from it end the map
        // (see `with_layout`) and are accessed only through this atomic view.
        unsafe {
            std::slice::from_raw_parts(
                self.base.add(self.table_off).cast::<AtomicU32>(),
                len as usize,
            )
        }
    }

    /// Words of arena block number `id` (1-based).
    #[inline]
    fn block_at(&self, id: u32) -> &[AtomicU64] {
        let start = (u64::from(id) - 1) * BLOCK_WORDS;
        &self.arena()[start as usize..(start + BLOCK_WORDS) as usize]
    }

    /// Words of block `b`, if it exists.
    #[inline]
    fn block(&self, b: u64) -> Option<&[AtomicU64]> {
        if self.flat {
            // b < block_count < u32::MAX (see `with_layout`).
            return Some(self.block_at(b as u32 + 1));
        }
        let id = self.table()[b as usize].load(Acquire);
        (id != NO_BLOCK).then(|| self.block_at(id))
    }

    /// Words of block `b` if its summary bit is set.
    fn flagged_block(&self, b: u64) -> Option<&[AtomicU64]> {
        if self.block_flagged(b) {
            self.block(b)
        } else {
            None
        }
    }

    /// Value of word `w` (0 for a missing block).
    fn word(&self, w: u64) -> u64 {
        self.block(w / BLOCK_WORDS)
            .map_or(0, |blk| blk[(w % BLOCK_WORDS) as usize].load(Relaxed))
    }

    /// Words of block `b`, installing an empty block if there is none.
    #[inline]
    fn block_or_install(&self, b: u64) -> &[AtomicU64] {
        match self.block(b) {
            Some(blk) => blk,
            None => self.install(b, None).0,
        }
    }

    /// Installs a block for `b` holding `init` (zeros if None). Returns the
    /// block now installed and whether it is ours (then it holds `init`);
    /// otherwise another thread installed one first and ours went back.
    #[cold]
    fn install(&self, b: u64, init: Option<&[u64; BLOCK_WORDS as usize]>) -> (&[AtomicU64], bool) {
        let id = self.alloc_block();
        let blk = self.block_at(id);
        if let Some(init) = init {
            for (w, v) in blk.iter().zip(init) {
                w.store(*v, Relaxed);
            }
        }
        match self.table()[b as usize].compare_exchange(NO_BLOCK, id, AcqRel, Acquire) {
            Ok(_) => {
                if u64::from(id) % DENSITY_CHECK_EVERY == 0 && self.sparse_prefers_flat() {
                    self.wants_flat.store(true, Relaxed);
                }
                (blk, true)
            }
            Err(winner) => {
                self.free_block(id);
                (self.block_at(winner), false)
            }
        }
    }

    /// A zeroed block nobody else holds. Never blocks unless more than
    /// `SPARE_BLOCKS` threads are installing blocks at once (see there).
    fn alloc_block(&self) -> u32 {
        loop {
            if let Some(id) = self.pop_free() {
                // Word 0 held the stack link.
                self.block_at(id)[0].store(0, Relaxed);
                return id;
            }
            let n = self.next_block.fetch_add(1, Relaxed);
            if n < self.arena_blocks {
                return (n + 1) as u32;
            }
            std::thread::yield_now();
        }
    }

    fn pop_free(&self) -> Option<u32> {
        let mut head = self.free_head.load(Acquire);
        loop {
            let id = head as u32;
            if id == NO_BLOCK {
                return None;
            }
            // May read a block another thread just popped and is writing:
            // then the tag has changed and the exchange below fails.
            let next = self.block_at(id)[0].load(Relaxed) & u64::from(u32::MAX);
            let new = next | ((head >> 32).wrapping_add(1) << 32);
            match self
                .free_head
                .compare_exchange_weak(head, new, Acquire, Acquire)
            {
                Ok(_) => return Some(id),
                Err(h) => head = h,
            }
        }
    }

    /// Returns a block that was never published (lost an install race).
    fn free_block(&self, id: u32) {
        let blk = self.block_at(id);
        for w in blk {
            w.store(0, Relaxed);
        }
        let mut head = self.free_head.load(Relaxed);
        loop {
            blk[0].store(head & u64::from(u32::MAX), Relaxed);
            let new = u64::from(id) | ((head >> 32).wrapping_add(1) << 32);
            match self
                .free_head
                .compare_exchange_weak(head, new, Release, Relaxed)
            {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    /// Raises the modified flag, skipping the store when already raised.
    #[inline]
    pub(crate) fn note_modified(&self) {
        if self.state.load(SeqCst) & MODIFIED == 0 {
            self.state.fetch_or(MODIFIED, SeqCst);
        }
    }

    /// ORs `mask` into word `w`, then flags its block; true if any bit went 0 -> 1.
    /// Loads before each RMW so already-set words (and summary bits) stay
    /// read-only and pages without set bits are never written.
    #[inline]
    fn or_word(&self, w: u64, mask: u64) -> bool {
        let b = w / BLOCK_WORDS;
        // SeqCst, not Relaxed: when the bits are already set by a racing
        // marker, this load is what orders them before our load of `modified`
        // (and so before a later `take_modified` and the store that follows).
        let word = &self.block_or_install(b)[(w % BLOCK_WORDS) as usize];
        let changed =
            word.load(SeqCst) & mask != mask && word.fetch_or(mask, SeqCst) & mask != mask;
        self.flag_block(b);
        changed
    }

    /// ORs `words` (already masked to `bit_count`) into block `b`. A missing
    /// block is installed already holding them, so loading costs plain
    /// stores. True if any bit went 0 -> 1.
    fn or_block(&self, b: u64, words: &[u64; BLOCK_WORDS as usize]) -> bool {
        if words.iter().all(|&w| w == 0) {
            return false;
        }
        let blk = match self.block(b) {
            Some(blk) => blk,
            None => match self.install(b, Some(words)) {
                (_, true) => {
                    self.flag_block(b);
                    return true;
                }
                (blk, false) => blk,
            },
        };
        let mut changed = false;
        for (word, &mask) in blk.iter().zip(words) {
            if mask != 0 && word.load(Relaxed) & mask != mask {
                changed |= word.fetch_or(mask, SeqCst) & mask != mask;
            }
        }
        self.flag_block(b);
        changed
    }

    /// Sets the summary bit of block `b` (after its data bits).
    #[inline]
    fn flag_block(&self, b: u64) {
        let (slot, bit) = self.summary_slot(b);
        if slot.load(SeqCst) & bit == 0 {
            slot.fetch_or(bit, SeqCst);
        }
    }

    /// Clears block `b`: summary bit first, then the nonzero words, so a racing
    /// `or_word` re-flags the block. True if any data bit was cleared.
    fn clear_block(&self, b: u64) -> bool {
        let (slot, bit) = self.summary_slot(b);
        if slot.fetch_and(!bit, SeqCst) & bit == 0 {
            return false; // a concurrent clear owns it
        }
        let Some(blk) = self.block(b) else {
            return false;
        };
        let mut changed = false;
        for word in blk {
            if word.load(SeqCst) != 0 {
                changed |= word.swap(0, SeqCst) != 0;
            }
        }
        changed
    }

    #[inline]
    fn summary_slot(&self, b: u64) -> (&AtomicU64, u64) {
        (
            &self.summary()[(b / SUMMARY_BITS) as usize],
            1 << (b % SUMMARY_BITS),
        )
    }

    fn block_flagged(&self, b: u64) -> bool {
        let (slot, bit) = self.summary_slot(b);
        slot.load(Relaxed) & bit != 0
    }

    /// First flagged block in `b..=last`. The scan stops at `last`: a walk
    /// over a small range of a big, clean bitmap must not read its whole summary.
    fn next_flagged_block(&self, b: u64, last: u64) -> Option<u64> {
        let summary = self.summary();
        let mut sw = b / SUMMARY_BITS;
        let mut v = summary.get(sw as usize)?.load(Relaxed) & (u64::MAX << (b % SUMMARY_BITS));
        loop {
            if v != 0 {
                let found = sw * SUMMARY_BITS + u64::from(v.trailing_zeros());
                return (found <= last).then_some(found);
            }
            sw += 1;
            if sw > last / SUMMARY_BITS {
                return None;
            }
            v = summary.get(sw as usize)?.load(Relaxed);
        }
    }

    /// Flagged blocks in `first..=last`, in order.
    fn flagged_blocks(&self, first: u64, last: u64) -> impl Iterator<Item = u64> + '_ {
        let mut next = first;
        std::iter::from_fn(move || {
            let b = self.next_flagged_block(next, last)?;
            next = b + 1;
            Some(b)
        })
    }

    /// Word indices of block `b`.
    fn block_words(&self, b: u64) -> Range<u64> {
        let start = b * BLOCK_WORDS;
        start..(start + BLOCK_WORDS).min(self.word_count)
    }

    /// Word indices of block `b` that overlap bits `[first, end)` (`first < end`).
    fn block_words_in(&self, b: u64, first: u64, end: u64) -> Range<u64> {
        let words = self.block_words(b);
        words.start.max(first / WORD_BITS)..words.end.min((end - 1) / WORD_BITS + 1)
    }

    /// First set bit at or after `from`, skipping clean blocks.
    fn find_set(&self, from: u64) -> Option<u64> {
        if from >= self.bit_count {
            return None;
        }
        let from_word = from / WORD_BITS;
        for b in self.flagged_blocks(from_word / BLOCK_WORDS, u64::MAX) {
            let Some(blk) = self.block(b) else { continue };
            for w in self.block_words(b).start.max(from_word)..self.block_words(b).end {
                let mut v = blk[(w % BLOCK_WORDS) as usize].load(Relaxed);
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
    /// block ends the run at its first bit without being read.
    fn find_clear(&self, from: u64) -> u64 {
        let from_word = from / WORD_BITS;
        for b in from_word / BLOCK_WORDS..self.block_count {
            let Some(blk) = self.flagged_block(b) else {
                return (b * BLOCK_BITS).max(from).min(self.bit_count);
            };
            let words = self.block_words(b);
            for w in words.start.max(from_word)..words.end {
                let mut v = blk[(w % BLOCK_WORDS) as usize].load(Relaxed);
                if w == from_word {
                    v |= !(u64::MAX << (from % WORD_BITS));
                }
                if v != u64::MAX {
                    let bit = w * WORD_BITS + u64::from(v.trailing_ones());
                    return bit.min(self.bit_count);
                }
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

/// What a bitmap's summary says about its memory (see `DirtyBitmap::usage`).
#[derive(Default)]
struct Usage {
    /// Flagged blocks.
    blocks: u64,
    /// 4 KiB pages of a flat map holding flagged blocks.
    pages: u64,
    /// 4 KiB pages of a sparse table naming flagged blocks.
    table_pages: u64,
}

/// Whether a bitmap should be flat: its flat map would commit `flat_bytes`
/// (`pages` of its `total_pages` pages), no more than the sparse layout's
/// `sparse_bytes`, and at least three quarters of the flat map is committed
/// already, so that later marks can never make it cost more than a third
/// above what the sparse layout would.
fn flat_is_better(flat_bytes: u64, sparse_bytes: u64, pages: u64, total_pages: u64) -> bool {
    pages > 0 && flat_bytes <= sparse_bytes && pages * 4 >= total_pages * 3
}

/// Pointers into a bitmap's mapping, for the marking path.
#[derive(Clone, Copy)]
struct Hot {
    arena: *const AtomicU64,
    summary: *const AtomicU64,
    table: *const AtomicU32,
}

impl Hot {
    /// Sets bit `bit` of `bm` (whose mapping `self` points into; `bit <
    /// bm.bit_count`) without bounds checks: a few loads when the bit is
    /// already set. Does not raise `modified`; true if the bit went 0 -> 1.
    #[inline(always)]
    fn set_bit(self, bit: u64, bm: &DirtyBitmap) -> bool {
        debug_assert!(bit < bm.bit_count);
        // SAFETY: as required by `set_installed_bit`.
        match unsafe { self.set_installed_bit(bit) } {
            Some(changed) => changed,
            None => bm.or_word(bit / WORD_BITS, 1 << (bit % WORD_BITS)),
        }
    }

    /// Sets bit `bit` if its block is installed (`Some(bit went 0 -> 1)`),
    /// else does nothing (`None`). No calls, no bounds checks, no panics:
    /// the core of the C marking path.
    ///
    /// # Safety
    /// `self` must point into a live bitmap's mapping and `bit` must be
    /// below that bitmap's `bit_count`.
    #[inline(always)]
    unsafe fn set_installed_bit(self, bit: u64) -> Option<bool> {
        let b = bit / BLOCK_BITS;
        let w = bit / WORD_BITS;
        let mask = 1u64 << (bit % WORD_BITS);
        let index = if self.table.is_null() {
            // Flat: block b is arena block b + 1, so word w is arena word w.
            w
        } else {
            // SAFETY: `bit < bit_count`, so `b < block_count`: the table entry
            // lies inside the map, which the caller keeps alive (see
            // `DirtyBitmap::with_layout`).
            let id = unsafe { &*self.table.add(b as usize) }.load(Acquire);
            if id == NO_BLOCK {
                return None;
            }
            u64::from(id)
                .wrapping_sub(1)
                .wrapping_mul(BLOCK_WORDS)
                .wrapping_add(w % BLOCK_WORDS)
        };
        // SAFETY: installed block numbers come from `alloc_block`, which hands
        // out 1..=arena_blocks only, so the word lies inside the arena; in the
        // flat layout `w < word_count <= 16 * arena_blocks`.
        let word = unsafe { &*self.arena.add(index as usize) };
        // SeqCst load: see `or_word` (a bit already set by a racing marker).
        let changed = word.load(SeqCst) & mask == 0 && word.fetch_or(mask, SeqCst) & mask == 0;
        // SAFETY: `b < block_count`, so its summary word lies inside the
        // summary (see `DirtyBitmap::new`).
        let slot = unsafe { &*self.summary.add((b / SUMMARY_BITS) as usize) };
        let sbit = 1u64 << (b % SUMMARY_BITS);
        if slot.load(SeqCst) & sbit == 0 {
            slot.fetch_or(sbit, SeqCst);
        }
        Some(changed)
    }
}

/// One enabled bitmap as the published lists hold it (image/enabled.rs).
pub struct Marker {
    bitmap: Arc<DirtyBitmap>,
}

impl Marker {
    pub fn new(bitmap: Arc<DirtyBitmap>) -> Marker {
        Marker { bitmap }
    }

    /// Marks guest bytes `[offset, last]` (`offset <= last`) when that is
    /// the common case: one granule, whose block exists, of a bitmap
    /// already flagged modified and not forwarding. Returns false, having
    /// done all, part or none of the mark, otherwise; the caller then marks
    /// the range through [`Marker::mark_bytes`] (marking twice is harmless).
    /// Makes no calls and cannot panic, so the C entry point needs neither
    /// a stack frame nor an unwind guard on this path.
    #[inline(always)]
    pub fn mark_fast(&self, offset: u64, last: u64) -> bool {
        self.bitmap.mark_fast(offset, last)
    }

    /// [`Marker::mark_fast`] for every range of a batch.
    #[inline]
    pub fn mark_many_fast(&self, ranges: &[ByteRange]) -> bool {
        self.bitmap.mark_many_fast(ranges)
    }

    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bitmap
    }

    /// [`DirtyBitmap::mark_bytes`].
    #[inline]
    pub fn mark_bytes(&self, offset: u64, len: u64) -> bool {
        self.bitmap.mark_bytes(offset, len)
    }
}

/// How many enabled bitmaps [`HotSet`] holds inline.
pub const HOT_MAX: usize = 4;

/// The first [`HOT_MAX`] enabled bitmaps, inline: a mark reads one pointer
/// per bitmap from the image's own memory and goes straight to the
/// bitmap's precomputed marking pointers (`DirtyBitmap::hot`), with no
/// list to find first.
///
/// Entries are written one by one while markers read them, so a marker may
/// see a mix of two sets. Each bitmap it marks was enabled at some moment
/// of its call, which marking allows; but a bitmap enabled throughout
/// could be missed (it moved to another entry), so the set is guarded by a
/// sequence number, odd while a writer changes entries: a marker whose
/// sequence changed reports it (`None`) and the caller marks again through
/// the published lists.
///
/// Every bitmap ever published here stays alive in `keep` until the set is
/// dropped, so a pointer read from an entry always points to a live bitmap.
pub struct HotSet {
    seq: AtomicU64,
    /// Entries in use; `usize::MAX` when more bitmaps are enabled than fit.
    len: AtomicUsize,
    entries: [AtomicPtr<DirtyBitmap>; HOT_MAX],
    keep: Mutex<Vec<Arc<DirtyBitmap>>>,
}

impl Default for HotSet {
    fn default() -> HotSet {
        HotSet {
            seq: AtomicU64::new(0),
            len: AtomicUsize::new(0),
            entries: Default::default(),
            keep: Mutex::new(Vec::new()),
        }
    }
}

impl HotSet {
    /// Makes `bitmaps` the set markers see (all of them, or none and
    /// `usize::MAX` as the length when there are more than [`HOT_MAX`]).
    pub fn publish(&self, bitmaps: &[Arc<DirtyBitmap>]) {
        let mut keep = self.keep.lock().unwrap_or_else(|e| e.into_inner());
        let fits = bitmaps.len() <= HOT_MAX;
        if fits {
            for bm in bitmaps {
                if !keep.iter().any(|k| Arc::ptr_eq(k, bm)) {
                    keep.push(bm.clone());
                }
            }
        }
        let seq = self.seq.load(Relaxed);
        self.seq.store(seq.wrapping_add(1), Relaxed);
        // Orders the odd sequence before the entries: a marker that reads
        // any entry written below then reads a sequence other than its first.
        fence(Release);
        if fits {
            for (e, bm) in self.entries.iter().zip(bitmaps) {
                // Release: a marker that reads the pointer sees the bitmap.
                e.store(Arc::as_ptr(bm).cast_mut(), Release);
            }
        }
        let len = if fits { bitmaps.len() } else { usize::MAX };
        // Release: a marker that reads `len` sees as many entries set.
        self.len.store(len, Release);
        self.seq.store(seq.wrapping_add(2), Release);
    }

    /// How many references to `bm` the set holds (0 or 1).
    pub fn holds(&self, bm: &Arc<DirtyBitmap>) -> usize {
        let keep = self.keep.lock().unwrap_or_else(|e| e.into_inner());
        keep.iter().filter(|k| Arc::ptr_eq(k, bm)).count()
    }

    /// [`Marker::mark_fast`] on every bitmap of the set: `Some(true)` when
    /// all took the mark, `Some(false)` when one did not (mark the ordinary
    /// way), `None` when the set changed under us or does not hold every
    /// enabled bitmap (use the published lists). No calls, no panics, no
    /// shared writes but the bits themselves.
    #[inline(always)]
    pub fn mark_fast(&self, offset: u64, last: u64) -> Option<bool> {
        self.all(|bm| bm.mark_fast(offset, last))
    }

    /// [`HotSet::mark_fast`] for a batch of writes: every range in every
    /// bitmap of the set, bitmap by bitmap.
    #[inline]
    pub fn mark_many_fast(&self, ranges: &[ByteRange]) -> Option<bool> {
        self.all(|bm| bm.mark_many_fast(ranges))
    }

    /// Calls `f` on every bitmap of the set until it returns false, under
    /// the sequence check the marking calls above describe.
    #[inline(always)]
    fn all(&self, mut f: impl FnMut(&DirtyBitmap) -> bool) -> Option<bool> {
        let seq = self.seq.load(Acquire);
        let len = self.len.load(Acquire);
        if seq & 1 != 0 || len > HOT_MAX {
            return None;
        }
        for e in self.entries.iter().take(len) {
            let p = e.load(Acquire);
            debug_assert!(!p.is_null());
            // SAFETY: entries below a published `len` were stored before it
            // (Release, read above with Acquire) and are never reset, so `p`
            // is non-null; every pointer stored in an entry is that of a
            // bitmap `keep` holds until `self` is dropped, and `self`
            // outlives this call.
            if !f(unsafe { &*p }) {
                return Some(false);
            }
        }
        // Orders the entry loads before the second sequence load (pairs
        // with the writer's fence).
        fence(Acquire);
        (self.seq.load(Relaxed) == seq).then_some(true)
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

    /// Every nonzero word must have its block flagged.
    fn assert_summary_covers(bm: &DirtyBitmap) {
        for w in 0..bm.word_count {
            if bm.word(w) != 0 {
                assert!(
                    bm.block_flagged(w / BLOCK_WORDS),
                    "word {w} = {:x}",
                    bm.word(w)
                );
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
        let a = DirtyBitmap::new(3 * BLOCK_BITS * 4096 + 12345, 12).unwrap();
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
        // Load in odd-sized pieces to cross word and block boundaries.
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
        bm.set_bits(10, 3 * BLOCK_BITS); // crosses block boundaries
        bm.set_bits(20_000, 1);
        bm.set_bits(bm.bit_count() - 1, 1);
        assert_eq!(
            runs(&bm),
            [(10, 3 * BLOCK_BITS), (20_000, 1), (bm.bit_count() - 1, 1)]
        );
        assert_eq!(bm.next_set_run(100), Some((100, 3 * BLOCK_BITS - 90)));
        assert_eq!(
            bm.next_dirty_extent(10 * 512 + 7),
            Some((10 * 512 + 7, 3 * BLOCK_BITS * 512 - 7))
        );
        let last = bm.next_dirty_extent(20_001 * 512).unwrap();
        assert_eq!(last, ((bm.bit_count() - 1) * 512, 1));
        assert_eq!(bm.dirty_bytes(), (3 * BLOCK_BITS + 1) * 512 + 1);
        assert!(!bm.serialized_range_is_clean(2, 1));
        assert!(bm.serialized_range_is_clean(2 + 3 * BLOCK_BYTES, 100));
    }

    #[test]
    fn chunk_boundaries() {
        // Three blocks, the last one partial.
        let bm = DirtyBitmap::new((3 * BLOCK_BITS - 7) * 512, 9).unwrap();
        // A run ending exactly where a clean block starts.
        bm.set_bits(BLOCK_BITS - 5, 5);
        assert_eq!(runs(&bm), [(BLOCK_BITS - 5, 5)]);
        bm.set_bits(2 * BLOCK_BITS, 3);
        assert_eq!(runs(&bm), [(BLOCK_BITS - 5, 5), (2 * BLOCK_BITS, 3)]);
        // Resetting all but the last bit of a block keeps that bit.
        bm.set_bits(0, BLOCK_BITS);
        bm.reset_bits(0, BLOCK_BITS - 1);
        assert_eq!(runs(&bm), [(BLOCK_BITS - 1, 1), (2 * BLOCK_BITS, 3)]);
        bm.set_bits(0, BLOCK_BITS);
        bm.reset_bits(1, BLOCK_BITS);
        assert_eq!(runs(&bm), [(0, 1), (2 * BLOCK_BITS, 3)]);
        // Resetting up to bit_count covers the partial last block entirely.
        let flagged_before = bm.committed_bytes_estimate();
        bm.reset_bits(2 * BLOCK_BITS, u64::MAX);
        assert_eq!(bm.committed_bytes_estimate(), flagged_before - BLOCK_BYTES);
        assert_eq!(runs(&bm), [(0, 1)]);
    }

    #[test]
    fn reset_drops_summary_of_whole_blocks() {
        let bm = DirtyBitmap::new(3 * BLOCK_BITS * 512, 9).unwrap();
        bm.set_bits(0, u64::MAX);
        assert_eq!(bm.committed_bytes_estimate(), 3 * BLOCK_BYTES + 8);
        bm.reset_bits(100, 2 * BLOCK_BITS);
        assert_eq!(bm.count_set_bits(), BLOCK_BITS);
        // Block 1 was covered entirely; blocks 0 and 2 keep their flag.
        assert_eq!(bm.committed_bytes_estimate(), 2 * BLOCK_BYTES + 8);
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
        // No change, but the flag goes up: see `marks_of_set_bits_raise_modified`.
        assert!(!bm.set_bits(3, 1));
        assert!(bm.take_modified());
        assert!(!bm.set_bits(1 << 20, 1)); // past the end: nothing touched, no flag
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

    /// A mark whose bits another thread has set but not yet flagged (that
    /// thread is between its `or_word` and its `note_modified`) must still
    /// leave `modified` raised when it returns; otherwise a flush called right
    /// after it would skip the bitmap and miss a mark that had returned.
    #[test]
    fn marks_of_set_bits_raise_modified() {
        let bm = DirtyBitmap::new(1 << 30, 16).unwrap();
        let other = DirtyBitmap::new(1 << 30, 16).unwrap();
        assert!(bm.or_word(0, 0b110)); // the racing thread, paused before note_modified
        assert!(!bm.set_bits(1, 2)); // our mark: nothing changes, and it returns
        assert!(bm.take_modified());
        assert!(bm.or_word(1, 1));
        assert!(!bm.mark_bytes(64 * 65536, 1));
        assert!(bm.take_modified());
        // A merge whose bits are all set already (bit 64), likewise.
        other.set_bits(64, 1);
        assert!(!bm.merge_from(&other));
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
        // 16 TiB at 64 KiB granularity: 2^28 bits, 2^18 blocks.
        let bm = DirtyBitmap::new(1 << 44, 16).unwrap();
        assert_eq!(bm.bit_count(), 1 << 28);
        let start = Instant::now();
        assert_eq!(bm.next_set_run(0), None);
        assert_eq!(bm.next_dirty_extent(0), None);
        assert!(start.elapsed() < Duration::from_millis(20));
        let summary_bytes = (1 << 18) / 8;
        assert_eq!(bm.committed_bytes_estimate(), summary_bytes);
        assert_eq!(bm.allocated_block_bytes(), 0);

        // 10,000 uniformly scattered granules: one 128-byte block each
        // (a flat map would dirty ~5,800 of its 8,192 pages, 23 MiB).
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bm.set_bits(x % (1 << 28), 1);
        }
        let n = bm.count_set_bits();
        assert!(n > 9_990 && n <= 10_000);
        assert!(bm.allocated_block_bytes() <= 10_000 * BLOCK_BYTES);
        // Blocks + the u32 table (1 MiB) + the summary stay well under 4 MiB.
        assert!(bm.allocated_block_bytes() + (1 << 20) + summary_bytes < 3 << 20);
        let mut buf = vec![0; 1 << 20];
        bm.read_serialized(0, &mut buf);
        let ones: u64 = buf.iter().map(|b| u64::from(b.count_ones())).sum();
        assert!(ones > 0);
        bm.clear_all();
        assert_eq!(bm.committed_bytes_estimate(), summary_bytes);
        assert_eq!(bm.next_set_run(0), None);
    }

    #[test]
    fn loading_zeros_allocates_nothing() {
        let bm = DirtyBitmap::new(1 << 40, 16).unwrap();
        bm.write_serialized(0, &vec![0; 1 << 20]);
        assert_eq!(bm.allocated_block_bytes(), 0);
        let mut data = vec![0; 1 << 20];
        data[5000] = 0x10;
        data[700_000] = 0x01;
        bm.write_serialized(0, &data);
        assert_eq!(bm.allocated_block_bytes(), 2 * BLOCK_BYTES);
        assert_eq!(runs(&bm), [(5000 * 8 + 4, 1), (700_000 * 8, 1)]);
    }

    #[test]
    fn load_serialized_matches_write_serialized() {
        for size in [
            1u64,
            1000 * 512 + 3,
            5 * BLOCK_BITS * 512,
            77 * BLOCK_BITS * 512 - 9,
        ] {
            let bytes = DirtyBitmap::new(size, 9).unwrap().serialized_len() as usize;
            let mut data = vec![0u8; bytes + 40];
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for (i, d) in data.iter_mut().enumerate() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Zero stretches, ones and random bytes.
                *d = match (i / 300) % 3 {
                    0 => 0,
                    1 => 0xff,
                    _ => x as u8,
                };
            }
            for start in [0usize, 1, 127, 128, 200] {
                let a = DirtyBitmap::new(size, 9).unwrap();
                let mut b = DirtyBitmap::new(size, 9).unwrap();
                b.set_bits(3, 1);
                a.set_bits(3, 1);
                let start = start.min(data.len());
                let end = data.len().min(start + bytes);
                a.write_serialized(start as u64, &data[start..end]);
                b.load_serialized(start as u64, &data[start..end]);
                assert_eq!(serialized(&a), serialized(&b), "size {size} start {start}");
                assert_eq!(runs(&a), runs(&b));
                assert_summary_covers(&b);
                assert_eq!(a.allocated_block_bytes(), b.allocated_block_bytes());
            }
        }
    }

    #[test]
    fn install_races_lose_no_bits_and_no_blocks() {
        // Every thread marks every bit of the same blocks in a different
        // order, so first touches race all the time.
        let bm = DirtyBitmap::new(64 * BLOCK_BITS * 512, 9).unwrap();
        thread::scope(|s| {
            for t in 0..4u64 {
                let bm = &bm;
                s.spawn(move || {
                    for i in 0..bm.bit_count() {
                        let bit = (i * 7919 + t * 1_000_003) % bm.bit_count();
                        bm.set_bits(bit, 1);
                    }
                });
            }
        });
        assert_eq!(bm.count_set_bits(), bm.bit_count());
        assert_summary_covers(&bm);
        // Losers' blocks went back to the free stack: at most one block per
        // racing thread beyond the 64 the bitmap needs was ever handed out.
        assert!(bm.allocated_block_bytes() <= (64 + 4) * BLOCK_BYTES);
        // A free block is reused before the arena grows.
        let before = bm.allocated_block_bytes();
        let extra = DirtyBitmap::new(bm.size(), 9).unwrap();
        let id = extra.alloc_block();
        extra.free_block(id);
        assert_eq!(extra.alloc_block(), id);
        assert!(extra.block_at(id).iter().all(|w| w.load(Relaxed) == 0));
        assert_eq!(bm.allocated_block_bytes(), before);
    }

    #[test]
    fn installs_ask_for_flat_only_when_dense() {
        // 16 TiB at 64 KiB: 2^18 blocks, 8192 flat pages.
        let bm = DirtyBitmap::new(1 << 44, 16).unwrap();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Scattered: a flat map would commit a page per granule.
        for _ in 0..20_000 {
            bm.set_bits(next() % (1 << 28), 1);
        }
        assert!(!bm.wants_flat());
        // Random marks until nearly every block exists: now flat costs no more.
        for _ in 0..4_000_000 {
            bm.set_bits(next() % (1 << 28), 1);
        }
        assert!(bm.wants_flat());
        // A sequential fill asks once three quarters of the pages are in use.
        let seq = DirtyBitmap::new(1 << 44, 16).unwrap();
        seq.set_bits(0, (1 << 28) / 2);
        assert!(!seq.wants_flat());
        seq.set_bits(0, (1 << 28) / 4 * 3 + BLOCK_BITS * DENSITY_CHECK_EVERY);
        assert!(seq.wants_flat());
        // Flat bitmaps never ask.
        let flat = DirtyBitmap::new_flat(1 << 44, 16).unwrap();
        flat.set_bits(0, u64::MAX);
        assert!(!flat.wants_flat());
        assert_eq!(flat.count_set_bits(), 1 << 28);
    }

    #[test]
    fn flat_copy_then_absorb_keeps_racing_marks() {
        // Marks race the copy the way they race the image's switch: the
        // source forwards to the copy once it is made, then is absorbed.
        for _ in 0..4 {
            let old = Arc::new(DirtyBitmap::new(1 << 30, 9).unwrap()); // 2^21 bits
            let stop = std::sync::atomic::AtomicBool::new(false);
            let next = AtomicU64::new(0);
            let new = thread::scope(|s| {
                for _ in 0..3 {
                    s.spawn(|| {
                        while !stop.load(Relaxed) {
                            let i = next.fetch_add(1, Relaxed);
                            if i >= old.bit_count() {
                                break;
                            }
                            // Scrambled, each bit once: a lost mark is a hole.
                            let bit = i.wrapping_mul(7919) % old.bit_count();
                            let m = Marker::new(old.clone());
                            if !m.mark_fast(bit << 9, (bit << 9) + 511) {
                                m.mark_bytes(bit << 9, 512);
                            }
                        }
                    });
                }
                while next.load(Relaxed) < old.bit_count() / 8 {
                    thread::yield_now();
                }
                let new = Arc::new(old.flat_copy().unwrap());
                old.forward_to(new.clone());
                new.absorb(&old);
                // Finish the marks (those of the threads are forwarded).
                while next.load(Relaxed) < old.bit_count() {
                    thread::yield_now();
                }
                stop.store(true, Relaxed);
                new
            });
            assert!(new.is_flat());
            assert_eq!(new.count_set_bits(), old.bit_count());
            assert_summary_covers(&new);
        }
    }

    #[test]
    fn hot_set_marks_like_markers_while_republished() {
        let set = HotSet::default();
        let a = Arc::new(DirtyBitmap::new(1 << 30, 16).unwrap());
        let b = Arc::new(DirtyBitmap::new_flat(1 << 30, 16).unwrap());
        // Nothing installed in `a` yet: the fast path declines.
        set.publish(&[a.clone(), b.clone()]);
        assert_eq!(set.mark_fast(0, 4095), Some(false));
        a.mark_bytes(0, 1);
        b.mark_bytes(0, 1);
        assert_eq!(set.mark_fast(65536, 65536 + 4095), Some(true));
        assert!(a.get_bit(1) && b.get_bit(1));
        // Two granules, or past the end: declined.
        assert_eq!(set.mark_fast(65535, 65536), Some(false));
        assert_eq!(set.mark_fast(1 << 30, 1 << 30), Some(false));
        // Too many bitmaps: the lists take over.
        let many: Vec<_> = (0..=HOT_MAX).map(|_| b.clone()).collect();
        set.publish(&many);
        assert_eq!(set.mark_fast(0, 0), None);
        set.publish(&[]);
        assert_eq!(set.mark_fast(0, 0), Some(true));
        assert_eq!(set.holds(&a), 1);

        // Republishing under markers: every mark lands in a bitmap of a
        // set published during it, and nothing tears.
        let c = Arc::new(DirtyBitmap::new_flat(1 << 40, 16).unwrap());
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (done, torn) = (AtomicU64::new(0), AtomicU64::new(0));
        thread::scope(|s| {
            for t in 0..2u64 {
                let (set, stop, done, torn) = (&set, &stop, &done, &torn);
                s.spawn(move || {
                    let mut i = t;
                    while !stop.load(Relaxed) {
                        let off = (i << 16) % (1 << 30);
                        match set.mark_fast(off, off + 4095) {
                            Some(_) => done.fetch_add(1, Relaxed),
                            None => torn.fetch_add(1, Relaxed),
                        };
                        i += 2;
                    }
                });
            }
            let mut i = 0;
            while i < 20_000 || done.load(Relaxed) < 100_000 {
                match i % 3 {
                    0 => set.publish(&[a.clone(), c.clone()]),
                    1 => set.publish(std::slice::from_ref(&c)),
                    _ => set.publish(&[b.clone(), a.clone(), c.clone()]),
                }
                i += 1;
            }
            stop.store(true, Relaxed);
        });
        assert!(c.count_set_bits() > 0);
        assert_summary_covers(&c);
    }

    #[test]
    fn released_bitmap_reads_clean_and_stays_usable() {
        let bm = DirtyBitmap::new(1 << 30, 9).unwrap();
        bm.set_bits(12345, 5000);
        bm.release_memory();
        assert_eq!(bm.count_set_bits(), 0);
        assert_eq!(bm.next_set_run(0), None);
        // A late marker still works and does not reuse handed-out blocks.
        let before = bm.allocated_block_bytes();
        assert!(bm.set_bits(7, 1));
        assert_eq!(runs(&bm), [(7, 1)]);
        assert_eq!(bm.allocated_block_bytes(), before + BLOCK_BYTES);
    }
}
