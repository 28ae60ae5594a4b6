//! The set of enabled bitmaps that `mark_dirty` walks.
//!
//! Marking threads never lock, never write shared memory to read the list,
//! and never allocate: a mark costs a handful of acquire loads of data that
//! stays in every core's cache. Management calls (serialised by the image's
//! state lock) publish a whole new list under the next index of an
//! append-only store and then move `current` to it. Old lists, and the
//! bitmaps they name, stay alive until the image is dropped, so a marker that
//! read an older index can never touch freed memory, without the per-mark
//! reference counting or hazard-pointer stores (and their full fences) that
//! reclaiming them earlier would need. A removed bitmap gives its memory back
//! with `DirtyBitmap::release_memory`; what stays is its address range and a
//! few words per published list. (It replaces arc-swap, whose per-load debt
//! slot costs two fenced atomic operations: more than the mark itself.)
//!
//! The C marking path does not even walk the list when it can help it: the
//! first few bitmaps' marking pointers are also copied inline into
//! [`HotSet`] (sequence-locked; see there), so that a mark goes from the
//! image straight to the bitmap words.
//!
//! Bitmaps replaced by a copy in another layout (image/densify.rs) are
//! `retire`d here: their memory goes back once nobody but the published
//! lists holds them (an `Extents` iterator may still be reading one).

use crate::bitmap::{ByteRange, DirtyBitmap, HotSet, Marker};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

type List = Vec<Marker>;

/// Segment `k` holds lists `2^k - 1 .. 2^(k+1) - 1`; 48 segments hold more
/// lists than any process can publish.
const SEGMENTS: usize = 48;

pub struct EnabledSet {
    /// The current list again, inline, when it is short.
    hot: HotSet,
    /// Index of the list markers use.
    current: AtomicUsize,
    /// Number of lists published (the next index); written under the lock.
    published: AtomicUsize,
    segments: [OnceLock<Box<[OnceLock<List>]>>; SEGMENTS],
    /// Replaced bitmaps whose memory is not released yet (see `retire`).
    retired: Mutex<Vec<Arc<DirtyBitmap>>>,
}

impl Default for EnabledSet {
    fn default() -> EnabledSet {
        let set = EnabledSet {
            hot: HotSet::default(),
            current: AtomicUsize::new(0),
            published: AtomicUsize::new(0),
            segments: [const { OnceLock::new() }; SEGMENTS],
            retired: Mutex::new(Vec::new()),
        };
        set.publish(Vec::new());
        set
    }
}

/// Segment and slot of list `i`.
#[inline]
fn locate(i: usize) -> (usize, usize) {
    let j = i + 1;
    let k = j.ilog2() as usize;
    (k, j - (1 << k))
}

impl EnabledSet {
    /// Publishes a new list. Callers serialise publishes (the image's state lock).
    pub fn publish(&self, bitmaps: Vec<Arc<DirtyBitmap>>) {
        self.hot.publish(&bitmaps);
        let bitmaps: List = bitmaps.into_iter().map(Marker::new).collect();
        let i = self.published.load(Ordering::Relaxed);
        let (k, slot) = locate(i);
        let segment =
            self.segments[k].get_or_init(|| (0..1usize << k).map(|_| OnceLock::new()).collect());
        // Only the publisher writes slot i, once: set cannot fail.
        let _ = segment[slot].set(bitmaps);
        self.published.store(i + 1, Ordering::Relaxed);
        // Release: a marker that reads index i sees the list stored above.
        self.current.store(i, Ordering::Release);
        self.sweep();
    }

    /// [`crate::bitmap::Marker::mark_fast`] on every enabled bitmap: true
    /// when all took the mark. Same guarantees as `all`.
    #[inline(always)]
    pub fn mark_fast(&self, offset: u64, last: u64) -> bool {
        match self.hot.mark_fast(offset, last) {
            Some(done) => done,
            None => self.all(|m| m.mark_fast(offset, last)),
        }
    }

    /// [`crate::bitmap::Marker::mark_many_fast`] on every enabled bitmap:
    /// true when all took every range. Same guarantees as `all`.
    #[inline]
    pub fn mark_many_fast(&self, ranges: &[ByteRange]) -> bool {
        match self.hot.mark_many_fast(ranges) {
            Some(done) => done,
            None => self.all(|m| m.mark_many_fast(ranges)),
        }
    }

    /// Takes a bitmap that a copy replaced (after the list without it was
    /// published): its memory is released once only the published lists
    /// hold it, which may be at once. Callers serialise (the state lock).
    pub fn retire(&self, old: Arc<DirtyBitmap>) {
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(old);
        self.sweep();
    }

    /// Releases the memory of retired bitmaps nobody else holds any more.
    /// Nobody can take a new reference to one (it left its slot), so a
    /// count that reached the lists' own is final.
    pub fn sweep(&self) {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.retain(|bm| {
            let ours = 1 + self.hot.holds(bm) + self.references(bm);
            if Arc::strong_count(bm) > ours {
                return true;
            }
            bm.release_memory();
            false
        });
    }

    /// How many published lists hold `bm`.
    fn references(&self, bm: &Arc<DirtyBitmap>) -> usize {
        (0..self.published.load(Ordering::Relaxed))
            .filter_map(|i| {
                let (k, slot) = locate(i);
                self.segments[k].get()?.get(slot)?.get()
            })
            .flat_map(|list| list.iter())
            .filter(|m| Arc::ptr_eq(m.bitmap(), bm))
            .count()
    }

    /// Calls `f` on every enabled bitmap, without locking, writing shared
    /// memory or allocating.
    #[inline]
    pub fn for_each(&self, mut f: impl FnMut(&Marker)) {
        self.all(|m| {
            f(m);
            true
        });
    }

    /// Calls `f` on every enabled bitmap until it returns false; true if it
    /// never did. Like `for_each`: no locks, no shared writes, no calls but `f`.
    #[inline(always)]
    pub fn all(&self, f: impl FnMut(&Marker) -> bool) -> bool {
        let (k, slot) = locate(self.current.load(Ordering::Acquire));
        match self.segments[k]
            .get()
            .and_then(|s| s.get(slot))
            .and_then(OnceLock::get)
        {
            Some(list) => list.iter().all(f),
            None => true,
        }
    }

    /// Number of retired bitmaps not released yet (tests).
    #[cfg(test)]
    pub fn retired_count(&self) -> usize {
        self.retired.lock().unwrap().len()
    }

    /// Number of lists published so far (tests).
    #[cfg(test)]
    fn published(&self) -> usize {
        self.published.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn locate_covers_every_index_once() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000 {
            let (k, slot) = locate(i);
            assert!(slot < 1 << k);
            assert!(seen.insert((k, slot)));
        }
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(1), (1, 0));
        assert_eq!(locate(2), (1, 1));
        assert_eq!(locate(3), (2, 0));
    }

    #[test]
    fn markers_see_a_published_list_while_it_changes() {
        let set = EnabledSet::default();
        let a = Arc::new(DirtyBitmap::new(1 << 30, 16).unwrap());
        let b = Arc::new(DirtyBitmap::new(1 << 30, 16).unwrap());
        thread::scope(|s| {
            for t in 0..2u64 {
                let set = &set;
                s.spawn(move || {
                    for i in 0..200_000u64 {
                        set.for_each(|m| {
                            m.mark_bytes(((i * 2 + t) << 16) % m.bitmap().size(), 1);
                        });
                    }
                });
            }
            for i in 0..1000 {
                match i % 3 {
                    0 => set.publish(vec![a.clone()]),
                    1 => set.publish(vec![a.clone(), b.clone()]),
                    _ => set.publish(Vec::new()),
                }
            }
        });
        assert_eq!(set.published(), 1001);
        set.publish(vec![b.clone()]);
        let mut n = 0;
        set.for_each(|bm| {
            assert!(Arc::ptr_eq(bm.bitmap(), &b));
            n += 1;
        });
        assert_eq!(n, 1);
    }
}
