//! Storages for crash and fault tests.
//!
//! `RecordingStorage` keeps every write, flush and set_len in a shared log;
//! `for_each_cut` replays the log and builds the disk images a crash right
//! after each write could leave: flushes are barriers (everything before a
//! completed flush is durable), and what came after the last flush may be
//! lost, kept, torn at 512-byte sector boundaries, or kept in part.
//!
//! `FailingStorage` fails the n-th write or flush with a chosen errno,
//! once or until told to recover.
#![allow(dead_code)]

use super::Rng;
use qbm::storage::{MemoryStorage, Storage};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub const SECTOR: u64 = 512;

/// One recorded operation.
#[derive(Clone, Debug)]
pub enum Op {
    Write { offset: u64, data: Vec<u8> },
    Flush,
    SetLen(u64),
}

struct RecInner {
    data: Vec<u8>,
    ops: Vec<Op>,
}

/// A storage in memory that logs every change. Clones of the handle share
/// the log (the image owns one, the test keeps another).
#[derive(Clone)]
pub struct RecordingStorage {
    initial: Arc<Vec<u8>>,
    inner: Arc<Mutex<RecInner>>,
}

impl RecordingStorage {
    pub fn new(initial: Vec<u8>) -> RecordingStorage {
        RecordingStorage {
            inner: Arc::new(Mutex::new(RecInner {
                data: initial.clone(),
                ops: Vec::new(),
            })),
            initial: Arc::new(initial),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The image before the first recorded operation (durable).
    pub fn initial(&self) -> &[u8] {
        &self.initial
    }

    /// Every operation so far.
    pub fn ops(&self) -> Vec<Op> {
        self.lock().ops.clone()
    }

    /// What the file holds now (every write applied).
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    pub fn write_count(&self) -> usize {
        self.lock()
            .ops
            .iter()
            .filter(|o| matches!(o, Op::Write { .. }))
            .count()
    }
}

impl Storage for RecordingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.lock();
        let start = offset as usize;
        let end = start
            .checked_add(buf.len())
            .filter(|&e| e <= g.data.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&g.data[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = self.lock();
        apply_write(&mut g.data, offset, buf);
        g.ops.push(Op::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.lock().ops.push(Op::Flush);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().data.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut g = self.lock();
        g.data.resize(len as usize, 0);
        g.ops.push(Op::SetLen(len));
        Ok(())
    }
}

fn apply_write(data: &mut Vec<u8>, offset: u64, buf: &[u8]) {
    let start = offset as usize;
    let end = start + buf.len();
    if end > data.len() {
        data.resize(end, 0);
    }
    data[start..end].copy_from_slice(buf);
}

fn apply(data: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, data: buf } => apply_write(data, *offset, buf),
        Op::SetLen(len) => data.resize(*len as usize, 0),
        Op::Flush => {}
    }
}

/// The sector-aligned pieces a write may tear into: (start, end) in file
/// offsets, split at every 512-byte boundary strictly inside the write.
pub fn sector_pieces(offset: u64, len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let next = ((at / SECTOR) + 1) * SECTOR;
        let stop = next.min(end);
        out.push((at, stop));
        at = stop;
    }
    out
}

/// How the writes after the last flush reach the disk in a cut image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// (a) Every write since the last flush is lost.
    DropUnflushed,
    /// (b) Every write up to the cut is kept.
    KeepAll,
    /// (c) Every write before the cut kept; the cut write keeps only its
    /// first `sectors` sector pieces.
    Torn { sectors: usize },
    /// (d) Each sector piece of each unflushed write (and each set_len) kept
    /// or lost at random; kept pieces land in issue order.
    Random { seed: u64 },
}

/// The durable image at a cut point and the operations since the last flush.
pub struct CutPoint<'a> {
    /// 1-based index of the write the crash follows.
    pub n: usize,
    pub durable: &'a [u8],
    pub unflushed: &'a [Op],
}

impl CutPoint<'_> {
    /// Sector pieces of the last (cut) write.
    pub fn last_write_pieces(&self) -> usize {
        match self.unflushed.last() {
            Some(Op::Write { offset, data }) => sector_pieces(*offset, data.len() as u64).len(),
            _ => 0,
        }
    }

    /// The disk image `cut` leaves.
    pub fn image(&self, cut: Cut) -> Vec<u8> {
        let mut img = self.durable.to_vec();
        let last = self.unflushed.len().saturating_sub(1);
        let mut rng = match cut {
            Cut::Random { seed } => Some(Rng::new(seed)),
            _ => None,
        };
        for (i, op) in self.unflushed.iter().enumerate() {
            match cut {
                Cut::DropUnflushed => {}
                Cut::KeepAll => apply(&mut img, op),
                Cut::Torn { sectors } => match op {
                    Op::Write { offset, data } if i == last => {
                        let pieces = sector_pieces(*offset, data.len() as u64);
                        if let Some(&(_, end)) =
                            pieces.get(sectors.min(pieces.len()).wrapping_sub(1))
                        {
                            let keep = (end - offset) as usize;
                            apply_write(&mut img, *offset, &data[..keep]);
                        }
                    }
                    _ => apply(&mut img, op),
                },
                Cut::Random { .. } => {
                    let rng = rng.as_mut().expect("seeded");
                    match op {
                        Op::Write { offset, data } => {
                            for (s, e) in sector_pieces(*offset, data.len() as u64) {
                                if rng.chance(50) {
                                    let from = (s - offset) as usize;
                                    let to = (e - offset) as usize;
                                    apply_write(&mut img, s, &data[from..to]);
                                }
                            }
                        }
                        other => {
                            if rng.chance(50) {
                                apply(&mut img, other)
                            }
                        }
                    }
                }
            }
        }
        img
    }
}

/// Calls `f` for the crash right after each write of `ops`, in order.
pub fn for_each_cut(initial: &[u8], ops: &[Op], mut f: impl FnMut(&CutPoint<'_>)) {
    let mut durable = initial.to_vec();
    let mut since_flush = 0usize; // index of the first op after the last flush
    let mut n = 0;
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Flush => {
                for op in &ops[since_flush..i] {
                    apply(&mut durable, op);
                }
                since_flush = i + 1;
            }
            Op::Write { .. } => {
                n += 1;
                f(&CutPoint {
                    n,
                    durable: &durable,
                    unflushed: &ops[since_flush..=i],
                });
            }
            Op::SetLen(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------

/// Which operation fails and how.
pub struct FaultControl {
    writes: AtomicUsize,
    flushes: AtomicUsize,
    /// 1-based index of the write (or flush) to fail; 0 = none.
    fail_write: AtomicUsize,
    fail_flush: AtomicUsize,
    errno: AtomicI32,
    /// Once failed, keep failing the same kind of operation until `recover`.
    sticky: AtomicBool,
    failing_writes: AtomicBool,
    failing_flushes: AtomicBool,
    failures: AtomicUsize,
}

impl FaultControl {
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    pub fn flushes(&self) -> usize {
        self.flushes.load(Ordering::SeqCst)
    }

    /// How many operations failed so far.
    pub fn failures(&self) -> usize {
        self.failures.load(Ordering::SeqCst)
    }

    /// Fails write number `n` (1-based, counted from the start) with `errno`.
    pub fn fail_write(&self, n: usize, errno: i32, sticky: bool) {
        self.errno.store(errno, Ordering::SeqCst);
        self.sticky.store(sticky, Ordering::SeqCst);
        self.fail_write.store(n, Ordering::SeqCst);
    }

    pub fn fail_flush(&self, n: usize, errno: i32, sticky: bool) {
        self.errno.store(errno, Ordering::SeqCst);
        self.sticky.store(sticky, Ordering::SeqCst);
        self.fail_flush.store(n, Ordering::SeqCst);
    }

    /// The disk works again (space was freed, the cable reseated).
    pub fn recover(&self) {
        self.fail_write.store(0, Ordering::SeqCst);
        self.fail_flush.store(0, Ordering::SeqCst);
        self.failing_writes.store(false, Ordering::SeqCst);
        self.failing_flushes.store(false, Ordering::SeqCst);
    }

    fn check(&self, count: &AtomicUsize, at: &AtomicUsize, failing: &AtomicBool) -> io::Result<()> {
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        let hit = failing.load(Ordering::SeqCst) || at.load(Ordering::SeqCst) == n;
        if hit {
            if self.sticky.load(Ordering::SeqCst) {
                failing.store(true, Ordering::SeqCst);
            }
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(
                self.errno.load(Ordering::SeqCst),
            ));
        }
        Ok(())
    }
}

/// A memory storage whose n-th write or flush fails. A failed write changes
/// nothing; a failed flush leaves the writes before it in place.
#[derive(Clone)]
pub struct FailingStorage {
    mem: Arc<MemoryStorage>,
    ctl: Arc<FaultControl>,
}

impl FailingStorage {
    pub fn new(initial: Vec<u8>) -> FailingStorage {
        FailingStorage {
            mem: Arc::new(MemoryStorage::new(initial)),
            ctl: Arc::new(FaultControl {
                writes: AtomicUsize::new(0),
                flushes: AtomicUsize::new(0),
                fail_write: AtomicUsize::new(0),
                fail_flush: AtomicUsize::new(0),
                errno: AtomicI32::new(0),
                sticky: AtomicBool::new(false),
                failing_writes: AtomicBool::new(false),
                failing_flushes: AtomicBool::new(false),
                failures: AtomicUsize::new(0),
            }),
        }
    }

    pub fn control(&self) -> &FaultControl {
        &self.ctl
    }

    /// The bytes on "disk" now.
    pub fn contents(&self) -> Vec<u8> {
        self.mem.contents()
    }
}

impl Storage for FailingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let c = &self.ctl;
        c.check(&c.writes, &c.fail_write, &c.failing_writes)?;
        self.mem.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        let c = &self.ctl;
        c.check(&c.flushes, &c.fail_flush, &c.failing_flushes)
    }

    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let c = &self.ctl;
        c.check(&c.writes, &c.fail_write, &c.failing_writes)?;
        self.mem.set_len(len)
    }
}
