//! Write-intent mode: durable marks and crash recovery (docs/write-intent.md).
//!
//! In write-intent mode every usable bitmap lives at fixed, fully allocated
//! clusters (every table entry a data cluster). Each bitmap carries a
//! `durable` shadow (`DirtyBitmap::durable`): exactly the bits on disk at
//! that place, for the sectors libqbm wrote. A mark sets its bits in memory
//! and, when the shadow lacks any of them, has the 512-byte sectors holding
//! them written in place and flushed before it returns. Concurrent marks
//! share one round of writes and one flush (group commit); a mark whose bits
//! the shadow already holds does no I/O, takes no lock and makes no syscall.
//!
//! Recovery: cluster 0 carries a record (header extension `RECORD_MAGIC`)
//! naming the bitmap directory and the tables it was written for, and the
//! autoclear bit `AUTOCLEAR_WRITE_INTENT`, set only once the record and
//! everything it names is durable. QEMU keeps unknown extensions but clears
//! unknown autoclear bits when it opens the image read-write, so a bitmap
//! is recovered only when nothing else wrote the image since.
//!
//! Invariants (the proof that a returned mark is on disk after a crash):
//! - shadow ⊆ disk: a shadow sector is set only to bytes that were written
//!   and flushed at the bitmap's current place, under the state lock; a
//!   sector whose write removes bits (clear, reset) is emptied in the
//!   shadow before its bytes are read, so no mark trusts a removed bit;
//! - a published bitmap never moves while in write-intent mode (its content
//!   changes are written in place; only bitmaps nobody marks yet, at open or
//!   add, are stored into new clusters, and their shadow is set after);
//! - the record names the directory cluster 0 names, and each bitmap's
//!   table; both change in one `commit_cluster0`, and any disagreement
//!   (torn cluster 0, another writer) means no recovery.

use super::bitmaps::Slot;
use super::{Image, State};
use crate::bitmap::{ByteRange, DirtyBitmap};
use crate::error::{Error, Result};
use crate::format::bitmap_dir::DirEntry;
use crate::format::bitmap_table::TableEntry;
use crate::format::extension::{BitmapsExtension, Extension};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// Header extension magic of the write-intent record ("qbmW").
pub const RECORD_MAGIC: u32 = 0x7162_6d57;
/// Autoclear bit saying the record is valid: QEMU clears it (as any
/// program that does not know it must) when it opens the image read-write.
pub const AUTOCLEAR_WRITE_INTENT: u64 = 1 << 63;
const RECORD_VERSION: u32 = 1;
const RECORD_HEAD: usize = 32;
const RECORD_ENTRY: usize = 16;

/// Unit of in-place writes: a mark waits for the sectors holding its bits.
pub(crate) const SECTOR: u64 = 512;
const SECTOR_BITS: u64 = SECTOR * 8;

/// The record: which directory and which tables were in write-intent mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub directory_offset: u64,
    pub directory_size: u64,
    /// (table_offset, table_size) of each bitmap stored in place.
    pub tables: Vec<(u64, u32)>,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Record {
    /// version u32, count u32, directory offset u64, directory size u64,
    /// checksum u64 (FNV-1a 64 of every other byte of the record), then per
    /// bitmap: table offset u64, table size u32, reserved u32 (zero).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(RECORD_HEAD + RECORD_ENTRY * self.tables.len());
        b.extend_from_slice(&RECORD_VERSION.to_be_bytes());
        b.extend_from_slice(&(self.tables.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.directory_offset.to_be_bytes());
        b.extend_from_slice(&self.directory_size.to_be_bytes());
        b.extend_from_slice(&[0; 8]);
        for &(off, size) in &self.tables {
            b.extend_from_slice(&off.to_be_bytes());
            b.extend_from_slice(&size.to_be_bytes());
            b.extend_from_slice(&[0; 4]);
        }
        let sum = fnv1a(&[&b[..24], &b[32..]].concat());
        b[24..32].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// None for anything but an intact record of a known version.
    pub fn parse(b: &[u8]) -> Option<Record> {
        if b.len() < RECORD_HEAD {
            return None;
        }
        let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4"));
        let be64 = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8"));
        let n = be32(4) as usize;
        if be32(0) != RECORD_VERSION || b.len() != RECORD_HEAD + n * RECORD_ENTRY {
            return None;
        }
        if fnv1a(&[&b[..24], &b[32..]].concat()) != be64(24) {
            return None;
        }
        let tables = (0..n)
            .map(|i| {
                let at = RECORD_HEAD + i * RECORD_ENTRY;
                (be64(at), be32(at + 8))
            })
            .collect();
        Some(Record {
            directory_offset: be64(8),
            directory_size: be64(16),
            tables,
        })
    }
}

/// The (table_offset, table_size) pairs a crash may be recovered for: the
/// autoclear bit is set, the record is intact and names the directory the
/// bitmaps extension names. Each bitmap must still match one of them and
/// have a fully allocated table.
pub(crate) fn recoverable(
    autoclear: u64,
    extensions: &[Extension],
    ext: &BitmapsExtension,
) -> HashSet<(u64, u32)> {
    if autoclear & AUTOCLEAR_WRITE_INTENT == 0 {
        return HashSet::new();
    }
    let Some(rec) = extensions
        .iter()
        .find(|e| e.magic == RECORD_MAGIC)
        .and_then(|e| Record::parse(&e.data))
    else {
        return HashSet::new();
    };
    if rec.directory_offset != ext.directory_offset || rec.directory_size != ext.directory_size {
        return HashSet::new();
    }
    rec.tables.into_iter().collect()
}

/// True when every entry names a data cluster (no zero or one flags).
pub(crate) fn fully_allocated(table: &[TableEntry]) -> bool {
    table.iter().all(|t| matches!(t, TableEntry::Data(_)))
}

/// Per-image write-intent state: the group commit. parking_lot's Mutex and
/// Condvar rather than std's: theirs are compiled with the crate graph, so
/// ThreadSanitizer (make check-tsan) sees their synchronisation, where std's
/// precompiled contended paths are invisible to it.
#[derive(Default)]
pub(crate) struct Intent {
    commit: Mutex<Commit>,
    /// Signalled (under `commit`) each time a round ends.
    round_done: Condvar,
}

#[derive(Default)]
struct Commit {
    /// (bitmap, sector) waiting for the next round; `queued` dedups them.
    pending: Vec<(Arc<DirtyBitmap>, u64)>,
    queued: HashSet<(usize, u64)>,
    leader: bool,
    /// Rounds started and finished; round r takes what was pending when it
    /// started, so a mark queued while round r-1 runs waits for round r.
    started: u64,
    finished: u64,
    /// Rounds that failed, with the errno and message (the last few).
    failed: VecDeque<(u64, i32, String)>,
    /// Rounds and flushes done (for tests and `make bench`).
    rounds: u64,
}

/// Counters of the group commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntentStats {
    /// Rounds of in-place writes (each ends with one flush).
    pub rounds: u64,
}

/// True when `d` holds every bit of `[first, last]`.
#[inline]
fn holds(d: &DirtyBitmap, first: u64, last: u64) -> bool {
    if first == last {
        return d.get_bit(first);
    }
    d.get_bit(first) && matches!(d.next_set_run(first), Some((s, l)) if s == first && s + l > last)
}

/// Bit range `[first, last]` a byte range touches in `bm`, None if empty.
#[inline]
fn bit_range(bm: &DirtyBitmap, offset: u64, len: u64) -> Option<(u64, u64)> {
    let end = offset.saturating_add(len).min(bm.size());
    if offset >= end {
        return None;
    }
    let g = bm.granularity_bits();
    Some((offset >> g, (end - 1) >> g))
}

impl Image {
    /// True when every bit a mark of `[offset, offset+length)` set is known
    /// durable (or no bitmap is in write-intent mode). No lock, no syscall.
    #[inline]
    pub(crate) fn marks_durable(&self, offset: u64, length: u64) -> bool {
        // Orders our bit updates before the shadow loads, against a store
        // that empties a shadow before reading the bits (see intent.rs).
        fence(Ordering::SeqCst);
        let mut all = true;
        self.enabled.for_each(|m| {
            if all {
                if let (Some(d), Some((first, last))) =
                    (m.bitmap().durable(), bit_range(m.bitmap(), offset, length))
                {
                    all = holds(d, first, last);
                }
            }
        });
        all
    }

    /// Queues the sectors whose bits the shadows lack; true if any.
    fn queue_missing(&self, c: &mut Commit, offset: u64, length: u64) -> bool {
        let mut any = false;
        self.enabled.for_each(|m| {
            let bm = m.bitmap();
            let (Some(d), Some((first, last))) = (bm.durable(), bit_range(bm, offset, length))
            else {
                return;
            };
            for sector in first / SECTOR_BITS..=last / SECTOR_BITS {
                let lo = first.max(sector * SECTOR_BITS);
                let hi = last.min((sector + 1) * SECTOR_BITS - 1);
                if !holds(d, lo, hi) {
                    any = true;
                    let key = (Arc::as_ptr(bm) as usize, sector);
                    if c.queued.insert(key) {
                        c.pending.push((bm.clone(), sector));
                    }
                }
            }
        });
        any
    }

    /// Write-intent part of a mark (or of a batch of marks): returns once
    /// the marked bits are durable, after one shared round however many
    /// ranges lack them.
    pub(crate) fn mark_durable(&self, intent: &Intent, ranges: &[ByteRange]) -> Result<()> {
        if ranges
            .iter()
            .all(|r| self.marks_durable(r.offset, r.length))
        {
            return Ok(());
        }
        let mut c = self.commit_lock(intent)?;
        let mut any = false;
        for r in ranges {
            any |= self.queue_missing(&mut c, r.offset, r.length);
        }
        if !any {
            return Ok(());
        }
        let round = c.started + 1;
        drop(c);
        self.wait_round(intent, round)
    }

    /// Non-blocking mark: true when `sync` must run before the marked bits
    /// are durable.
    pub fn mark_dirty_nowait(&self, offset: u64, length: u64) -> Result<bool> {
        self.mark_dirty_plain(offset, length)?;
        let Some(intent) = &self.intent else {
            return Ok(false);
        };
        if self.marks_durable(offset, length) {
            return Ok(false);
        }
        let mut c = self.commit_lock(intent)?;
        Ok(self.queue_missing(&mut c, offset, length))
    }

    /// Makes every mark queued before this call durable (one round of
    /// writes and one flush, shared with concurrent marks). A no-op outside
    /// write-intent mode.
    pub fn sync(&self) -> Result<()> {
        let Some(intent) = &self.intent else {
            return Ok(());
        };
        let c = self.commit_lock(intent)?;
        if c.pending.is_empty() && !c.leader {
            return Ok(());
        }
        let round = c.started + 1;
        drop(c);
        self.wait_round(intent, round)
    }

    /// Group-commit counters; zeros outside write-intent mode.
    pub fn intent_stats(&self) -> IntentStats {
        match &self.intent {
            Some(i) => IntentStats {
                rounds: i.commit.lock().rounds,
            },
            None => IntentStats::default(),
        }
    }

    /// True when the image was opened in write-intent mode.
    pub fn is_write_intent(&self) -> bool {
        self.intent.is_some()
    }

    fn commit_lock<'a>(&self, intent: &'a Intent) -> Result<MutexGuard<'a, Commit>> {
        Ok(intent.commit.lock())
    }

    /// Waits until round `round` is finished, leading rounds while no one
    /// else does.
    fn wait_round(&self, intent: &Intent, round: u64) -> Result<()> {
        let mut c = self.commit_lock(intent)?;
        loop {
            if c.finished >= round {
                return match c.failed.iter().find(|f| f.0 == round) {
                    Some((_, errno, msg)) => Err(Error::io(
                        msg.clone(),
                        std::io::Error::from_raw_os_error(*errno),
                    )),
                    None => Ok(()),
                };
            }
            if c.leader {
                // The leader signals under the lock when its round ends, so
                // a wake-up cannot be missed.
                intent.round_done.wait(&mut c);
                continue;
            }
            c.leader = true;
            c.started += 1;
            let this = c.started;
            let items = std::mem::take(&mut c.pending);
            c.queued.clear();
            drop(c);
            // A panic must not leave the round open forever (every later
            // mark would wait for it): it fails the round instead.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_round(&items)))
                    .unwrap_or_else(|_| {
                        Err(Error::io(
                            format!("{}: internal error writing marks in place", self.name),
                            std::io::Error::from_raw_os_error(libc::EIO),
                        ))
                    });
            c = self.commit_lock(intent)?;
            c.leader = false;
            c.finished = this;
            c.rounds += 1;
            if let Err(e) = result {
                // The sectors stay pending: the next round (a later mark
                // or `sync`) tries them again.
                for (bm, sector) in items {
                    if c.queued.insert((Arc::as_ptr(&bm) as usize, sector)) {
                        c.pending.push((bm, sector));
                    }
                }
                c.failed.push_back((this, e.errno(), e.to_string()));
                if c.failed.len() > 64 {
                    c.failed.pop_front();
                }
            }
            intent.round_done.notify_all();
        }
    }

    fn run_round(&self, items: &[(Arc<DirtyBitmap>, u64)]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let st = self.lock()?;
        st.write_sectors(items).map_err(|e| e.context(&self.name))
    }
}

impl State {
    /// Writes the given sectors of bitmaps stored in place with their
    /// in-memory bytes, flushes once, then records them in the shadows.
    /// Sectors of bitmaps no longer stored in place (removed) are skipped.
    pub(crate) fn write_sectors(&self, items: &[(Arc<DirtyBitmap>, u64)]) -> Result<()> {
        let cs = self.cluster_size();
        let mut done: Vec<(&Arc<DirtyBitmap>, u64, Vec<u8>)> = Vec::with_capacity(items.len());
        for (bm, sector) in items {
            let Some(slot) = self
                .slots
                .iter()
                .find(|s| s.data.as_ref().is_some_and(|d| Arc::ptr_eq(d, bm)))
            else {
                continue;
            };
            let Some(table) = slot.in_place_table() else {
                continue;
            };
            let start = sector * SECTOR;
            let total = bm.serialized_len();
            if start >= total {
                continue;
            }
            let n = SECTOR.min(total - start) as usize;
            let TableEntry::Data(cluster) = table[(start / cs) as usize] else {
                continue;
            };
            let d = bm.durable().expect("in-place bitmaps have a shadow");
            let mut buf = vec![0u8; n];
            bm.read_serialized(start, &mut buf);
            let mut held = vec![0u8; n];
            d.read_serialized(start, &mut held);
            if held.iter().zip(&buf).any(|(h, m)| h & !m != 0) {
                // The sector loses bits (clear, reset): the shadow must stop
                // claiming them before the bits are read, or a mark racing
                // with this write could trust a bit the write removes. A
                // mark that saw the shadow before this set its bit before
                // the read below (both sides fence).
                d.reset_bits(sector * SECTOR_BITS, SECTOR_BITS);
                fence(Ordering::SeqCst);
                bm.read_serialized(start, &mut buf);
            }
            let at = cluster + start % cs;
            self.storage.write_at(&buf, at).map_err(|e| {
                Error::io(
                    format!(
                        "writing bitmap '{}' data in place at {at:#x}",
                        slot.entry.name
                    ),
                    e,
                )
            })?;
            done.push((bm, *sector, buf));
        }
        if done.is_empty() {
            return Ok(());
        }
        self.flush_storage()?;
        for (bm, sector, buf) in done {
            let d = bm.durable().expect("in-place bitmaps have a shadow");
            // The shadow held a subset of `buf` (see above): now it says
            // exactly what the sector holds.
            d.write_serialized(sector * SECTOR, &buf);
        }
        Ok(())
    }

    /// Writes in place every sector of every bitmap stored in place whose
    /// memory differs from its shadow (set, reset, clear, merge, flush).
    pub(crate) fn sync_in_place(&self) -> Result<()> {
        let mut items = Vec::new();
        let mut a = vec![0u8; SECTOR as usize];
        let mut b = vec![0u8; SECTOR as usize];
        for slot in &self.slots {
            let (Some(bm), Some(_)) = (&slot.data, slot.in_place_table()) else {
                continue;
            };
            let Some(d) = bm.durable() else { continue };
            let total = bm.serialized_len();
            let mut start = 0;
            while start < total {
                let n = SECTOR.min(total - start);
                if !(bm.serialized_range_is_clean(start, n)
                    && d.serialized_range_is_clean(start, n))
                {
                    bm.read_serialized(start, &mut a);
                    d.read_serialized(start, &mut b);
                    if a != b {
                        items.push((bm.clone(), start / SECTOR));
                    }
                }
                start += SECTOR;
            }
        }
        self.write_sectors(&items)
    }

    /// Removes the record and clears its bit (write-intent mode, at close).
    pub(crate) fn drop_intent_record(&mut self) -> Result<()> {
        if !self.intent {
            return Ok(());
        }
        let mut exts = self.extensions.clone();
        let mut autoclear = self.header.autoclear_features;
        let intent = std::mem::replace(&mut self.intent, false);
        self.intent_record(&mut exts, &mut autoclear, None, &[], &[], false);
        self.intent = intent;
        if exts != self.extensions || autoclear != self.header.autoclear_features {
            self.commit_cluster0(exts, autoclear)?;
        }
        Ok(())
    }

    /// Write-intent mode: a directory change (add, remove, rename, enable,
    /// disable) is stored at once, so a crash keeps it.
    pub(crate) fn commit_intent(&mut self) -> Result<()> {
        if self.intent {
            self.persist_intent()
        } else {
            Ok(())
        }
    }

    /// Write-intent mode: a content change (set, reset, clear, merge) is
    /// written in place at once.
    pub(crate) fn sync_intent(&self) -> Result<()> {
        if self.intent {
            self.sync_in_place()
        } else {
            Ok(())
        }
    }

    /// Persist in write-intent mode (not closing): content changes in place;
    /// bitmaps not yet stored in place (at open, after add) stored fully
    /// allocated into fresh clusters together with any directory change,
    /// the record naming them, then their shadows attached.
    pub(crate) fn persist_intent(&mut self) -> Result<()> {
        self.sync_in_place()?;
        let fresh: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].usable() && self.slots[i].in_place_table().is_none())
            .collect();
        let flags_change = self.slots.iter().any(|s| s.usable() && !s.entry.in_use());
        let record_stale = self.header.autoclear_features & AUTOCLEAR_WRITE_INTENT == 0;
        if fresh.is_empty()
            && !self.dir_changed
            && !flags_change
            && !record_stale
            && self.pending_free.is_empty()
        {
            return Ok(());
        }
        // Fail before writing anything if cluster 0 cannot hold the result
        // (the record grows with the number of bitmaps).
        let dir = (!self.slots.is_empty()).then_some((0, 0, 1));
        let (mut exts, mut autoclear) = self.bitmaps_extensions(dir);
        let entries: Vec<DirEntry> = self.slots.iter().map(|s| s.entry.clone()).collect();
        let all = vec![true; entries.len()];
        self.intent_record(&mut exts, &mut autoclear, dir, &entries, &all, true);
        self.encode_cluster0(&exts, autoclear)?;
        // The shadows are copied before the store reads the bits: marks
        // only add bits (clear and reset wait for the state lock we hold),
        // so what is stored holds at least the copy.
        let mut shadows = Vec::with_capacity(fresh.len());
        for &i in &fresh {
            let bm = self.slots[i].data.clone().expect("usable");
            let shadow = DirtyBitmap::new(bm.size(), bm.granularity_bits()).map_err(|e| {
                Error::io(
                    format!(
                        "allocating memory for bitmap '{}'",
                        self.slots[i].entry.name
                    ),
                    e,
                )
            })?;
            let total = bm.serialized_len();
            let mut buf = vec![0u8; (1 << 20).min(total) as usize];
            let mut at = 0;
            while at < total {
                let n = (buf.len() as u64).min(total - at) as usize;
                bm.read_serialized(at, &mut buf[..n]);
                shadow.write_serialized(at, &buf[..n]);
                at += n as u64;
            }
            shadows.push((i, shadow));
        }
        fence(Ordering::SeqCst);
        self.store_and_commit(&fresh, true)?;
        for (i, shadow) in shadows {
            let bm = self.slots[i].data.clone().expect("usable");
            if !bm.set_durable(Arc::new(shadow)) {
                // Stored in place once before (then moved by a non-intent
                // store): the old shadow no longer describes the disk.
                return Err(Error::io(
                    format!(
                        "bitmap '{}' moved in write-intent mode",
                        self.slots[i].entry.name
                    ),
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
        }
        Ok(())
    }

    /// The record and autoclear bit cluster 0 gets with directory `dir`
    /// and `entries`: in write-intent mode while open, the record of the
    /// bitmaps stored in place (`in_place[i]`) and the bit; otherwise the
    /// bit cleared and the record dropped if it is the last extension
    /// (a stale record elsewhere stays: without the bit it means nothing).
    pub(crate) fn intent_record(
        &self,
        exts: &mut Vec<Extension>,
        autoclear: &mut u64,
        dir: Option<(u64, u64, u32)>,
        entries: &[DirEntry],
        in_place: &[bool],
        keep: bool,
    ) {
        match dir {
            // Closing in write-intent mode keeps the record (with no
            // in-place tables) until `drop_intent_record`.
            Some((offset, size, _)) if self.intent => {
                let rec = Record {
                    directory_offset: offset,
                    directory_size: size,
                    tables: entries
                        .iter()
                        .zip(in_place)
                        .filter(|(_, &p)| p && keep)
                        .map(|(e, _)| (e.table_offset, e.table_size))
                        .collect(),
                };
                let ext = Extension {
                    magic: RECORD_MAGIC,
                    data: rec.encode(),
                };
                match exts.iter().position(|e| e.magic == RECORD_MAGIC) {
                    Some(p) => exts[p] = ext,
                    None => exts.push(ext),
                }
                *autoclear |= AUTOCLEAR_WRITE_INTENT;
            }
            _ => {
                *autoclear &= !AUTOCLEAR_WRITE_INTENT;
                if exts.last().is_some_and(|e| e.magic == RECORD_MAGIC) {
                    exts.pop();
                }
            }
        }
    }
}

impl Slot {
    /// The stored table when the bitmap lives in place (fully allocated
    /// and shadowed), as write-intent mode keeps it.
    pub(crate) fn in_place_table(&self) -> Option<&[TableEntry]> {
        let t = self.table.as_deref()?;
        let d = self.data.as_ref()?;
        (d.durable().is_some() && fully_allocated(t)).then_some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_tear_detection() {
        let r = Record {
            directory_offset: 0x30000,
            directory_size: 48,
            tables: vec![(0x10000, 2), (0x20000, 1)],
        };
        let b = r.encode();
        assert_eq!(Record::parse(&b), Some(r));
        for i in 0..b.len() {
            let mut t = b.clone();
            t[i] ^= 0x40;
            assert_eq!(Record::parse(&t), None, "byte {i}");
        }
        assert_eq!(Record::parse(&b[..b.len() - 16]), None);
    }
}
