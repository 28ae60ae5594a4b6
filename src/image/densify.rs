//! Switching a bitmap that became dense to the flat layout (see `flat` in
//! src/bitmap.rs), which saves a dependent load, often a cache and TLB
//! miss, on every mark.
//!
//! A bitmap cannot change layout in place while threads mark it without
//! locks, so it is replaced, the way a resize replaces bitmaps: a flat copy
//! is made, the old bitmap forwards every later mark to it, the marks that
//! landed during the copy are ORed in again, the slot takes the copy and the
//! enabled list is republished. The old bitmap is retired (enabled.rs): its
//! memory goes back once nobody holds it.
//!
//! When: a block install that finds the bitmap dense raises its
//! `wants_flat`; the next `flush` switches it. Never on a marking thread:
//! the copy costs milliseconds (about 23 ms for a 16 TiB disk at 64 KiB)
//! and an allocation, and a mark takes no lock and allocates nothing, so a
//! VMM sees the switch in its periodic flush (the checkpoint it calls
//! anyway), not as a stall of a guest write. Write-intent images never
//! switch: their bitmaps' durable shadows and in-place tables belong to the
//! bitmap object; lazy opens track no writes.

use super::{Image, State};
use std::sync::Arc;

impl Image {
    /// Replaces every bitmap that asked for the flat layout by a flat copy,
    /// and releases the memory of those replaced before that nobody reads
    /// any more.
    pub(super) fn densify(&self, st: &mut State) {
        self.enabled.sweep();
        if self.intent.is_some() || !self.tracking {
            return;
        }
        let mut retired = Vec::new();
        for slot in &mut st.slots {
            let Some(old) = &slot.data else { continue };
            if !old.wants_flat() || old.is_flat() {
                continue;
            }
            // Every mark raises the flag, even of bits already set (see
            // `DirtyBitmap::set_bits`), before it looks for a successor: with
            // the flag cleared first, a flag still clear once marks are
            // forwarded proves that no mark landed in `old` alone during the
            // copy. Flushes, which also clear it, wait for the state lock.
            let was_modified = old.take_modified();
            let new = match old.flat_copy() {
                Ok(new) => Arc::new(new),
                Err(_) => {
                    if was_modified {
                        old.set_modified();
                    }
                    // Out of memory: stay sparse until a later install asks again.
                    old.drop_flat_request();
                    continue;
                }
            };
            // From here every mark of `old` also marks `new`.
            old.forward_to(new.clone());
            let marked = old.is_modified();
            if marked {
                // Marks landed during the copy: OR them in (a second pass
                // over the bitmap, as long as the copy).
                new.absorb(old);
            }
            if was_modified || marked {
                new.set_modified();
            }
            retired.extend(slot.data.replace(new));
        }
        if !retired.is_empty() {
            self.publish_enabled(st);
            for old in retired {
                self.enabled.retire(old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::CreateOptions;
    use crate::storage::MemoryStorage;
    use crate::DirtyBitmap;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::thread;

    // 1 GiB at 512 B: 2^21 granules, 2048 blocks (enough installs for the
    // density checks), 64 flat pages.
    const SIZE: u64 = 1 << 30;
    const GRAN: u64 = 512;

    fn image() -> Image {
        let options = CreateOptions {
            size: SIZE,
            cluster_size: 65536,
            refcount_bits: 16,
            ..Default::default()
        };
        let img = Image::create_storage(Box::new(MemoryStorage::default()), "t", &options).unwrap();
        img.add_bitmap("a", Some(GRAN), true).unwrap();
        img.add_bitmap("b", Some(GRAN), true).unwrap();
        img
    }

    fn data(img: &Image, i: usize) -> Arc<DirtyBitmap> {
        img.lock().unwrap().slots[i].data.clone().unwrap()
    }

    /// Every granule is marked exactly once, by one of three threads, in
    /// scrambled order, through the C fast path or the ordinary one, while
    /// a fourth flushes over and over; the bitmaps switch to flat in one of
    /// those flushes. A mark lost to the switch would leave a hole.
    #[test]
    fn marks_racing_the_switch_are_kept() {
        for _ in 0..3 {
            let img = image();
            let before = [data(&img, 0), data(&img, 1)];
            let granules = SIZE / GRAN;
            let next = AtomicU64::new(0);
            let done = std::sync::atomic::AtomicBool::new(false);
            thread::scope(|s| {
                let markers: Vec<_> = (0..3)
                    .map(|t| {
                        let (img, next) = (&img, &next);
                        s.spawn(move || loop {
                            let i = next.fetch_add(1, Relaxed);
                            if i >= granules {
                                break;
                            }
                            let off = i.wrapping_mul(7919) % granules * GRAN;
                            if t == 0 || !img.mark_dirty_fast(off, GRAN) {
                                img.mark_dirty(off, GRAN).unwrap();
                            }
                        })
                    })
                    .collect();
                let (img, done_ref) = (&img, &done);
                s.spawn(move || {
                    while !done_ref.load(Relaxed) {
                        img.flush().unwrap();
                    }
                });
                for m in markers {
                    m.join().unwrap();
                }
                done.store(true, Relaxed);
            });
            img.flush().unwrap();
            for (i, old) in before.iter().enumerate() {
                let new = data(&img, i);
                assert!(new.is_flat() && !old.is_flat());
                assert!(old.wants_flat());
                assert_eq!(new.count_set_bits(), granules);
            }
            assert_eq!(img.extents("a").unwrap().collect::<Vec<_>>(), [(0, SIZE)]);
            // Nothing else held the old bitmaps: their memory went back.
            drop(before);
            img.flush().unwrap();
            assert_eq!(img.enabled.retired_count(), 0);
            img.close().unwrap();
        }
    }

    /// A reader holding the bitmap from before the switch (an extent walk)
    /// keeps reading its bits: the memory goes back only once it lets go.
    #[test]
    fn retired_bitmap_lives_while_read() {
        let img = image();
        img.mark_dirty(0, GRAN).unwrap();
        img.flush().unwrap();
        let mut walk = img.extents("a").unwrap();
        let old = Arc::downgrade(&data(&img, 0));
        img.mark_dirty(GRAN, SIZE - GRAN).unwrap();
        assert!(!data(&img, 0).is_flat(), "a mark switched the layout");
        img.flush().unwrap();
        assert!(data(&img, 0).is_flat());
        assert_eq!(img.enabled.retired_count(), 1);
        assert_eq!(walk.next(), Some((0, SIZE)));
        drop(walk);
        // The next publish sweeps.
        img.disable_bitmap("b").unwrap();
        assert_eq!(img.enabled.retired_count(), 0);
        assert_eq!(old.upgrade().unwrap().count_set_bits(), 0);
        // The copy was stored with its bits, and reloads flat.
        img.flush().unwrap();
        assert!(!data(&img, 0).is_modified());
        img.mark_dirty(0, GRAN).unwrap();
        assert!(data(&img, 0).is_modified());
    }

    /// Marks never switch a bitmap (no lock, no allocation, no copy on a
    /// guest write); the next flush does.
    #[test]
    fn pending_switch_happens_at_flush() {
        let img = image();
        img.mark_dirty(0, SIZE).unwrap();
        assert!(!data(&img, 0).is_flat() && data(&img, 0).wants_flat());
        img.flush().unwrap();
        assert!(data(&img, 0).is_flat() && data(&img, 1).is_flat());
        assert_eq!(img.dirty_bytes("b").unwrap(), SIZE);
    }
}
