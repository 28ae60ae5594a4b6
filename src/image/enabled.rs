//! The set of enabled bitmaps that `mark_dirty` walks. Marking threads never
//! lock: management calls publish a whole new list, and arc-swap keeps the old
//! one alive until no marking thread can still see it. (arc-swap instead of a
//! hand-written crossbeam-epoch pointer: the same lock-free read, no `unsafe`.)

use crate::bitmap::DirtyBitmap;
use arc_swap::ArcSwap;
use std::sync::Arc;

#[derive(Default)]
pub struct EnabledSet {
    current: ArcSwap<Vec<Arc<DirtyBitmap>>>,
}

impl EnabledSet {
    /// Replaces the list and returns the previous one. Callers serialise
    /// publishes (the image's state lock). arc-swap pays the readers' debts
    /// on the swap, so the previous list's strong count then counts the
    /// marking threads still walking it.
    pub fn publish(&self, bitmaps: Vec<Arc<DirtyBitmap>>) -> Arc<Vec<Arc<DirtyBitmap>>> {
        self.current.swap(Arc::new(bitmaps))
    }

    /// Calls `f` on every enabled bitmap, without locking or allocating.
    pub fn for_each(&self, mut f: impl FnMut(&DirtyBitmap)) {
        for b in self.current.load().iter() {
            f(b);
        }
    }
}
