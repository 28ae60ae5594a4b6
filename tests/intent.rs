//! Write-intent mode (docs/write-intent.md): durable marks, group commit,
//! recovery after a crash, no recovery after another writer, crash
//! injection at every write and flush, and real SIGKILLs of a child process.

mod common;

use common::fault_storage::{for_each_cut, Cut, FailingStorage, Op, RecordingStorage};
use common::*;
use qbm::image::{CreateOptions, Image, OpenOptions, AUTOCLEAR_WRITE_INTENT, RECORD_MAGIC};
use qbm::storage::{MemoryStorage, Storage};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

fn wi() -> OpenOptions {
    OpenOptions {
        write_intent: true,
        ..OpenOptions::read_write()
    }
}

/// A memory storage shared with the test, counting writes and flushes;
/// `flush_delay` makes flushes slow like a disk's.
#[derive(Clone)]
struct Counting {
    inner: Arc<MemoryStorage>,
    writes: Arc<AtomicUsize>,
    flushes: Arc<AtomicUsize>,
    flush_delay: Duration,
}

impl Counting {
    /// What the storage holds now, opened anew (after a crash).
    fn reopen(&self, options: OpenOptions) -> Image {
        Image::open_storage(
            Box::new(MemoryStorage::new(self.inner.contents())),
            "after",
            options,
        )
        .unwrap()
    }

    fn new(bytes: Vec<u8>, flush_delay: Duration) -> Counting {
        Counting {
            inner: Arc::new(MemoryStorage::new(bytes)),
            writes: Arc::default(),
            flushes: Arc::default(),
            flush_delay,
        }
    }
    fn counts(&self) -> (usize, usize) {
        (
            self.writes.load(Ordering::SeqCst),
            self.flushes.load(Ordering::SeqCst),
        )
    }
}

impl Storage for Counting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.flush_delay);
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

/// A fresh image in memory with bitmaps (name, granularity), all enabled.
fn base(size: u64, cluster_size: u64, bitmaps: &[(&str, u64)]) -> Vec<u8> {
    let s = Counting::new(Vec::new(), Duration::ZERO);
    let img = Image::create_storage(
        Box::new(s.clone()),
        "base",
        &CreateOptions {
            size,
            cluster_size,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    for (name, g) in bitmaps {
        img.add_bitmap(name, Some(*g), true).unwrap();
    }
    img.close().unwrap();
    s.inner.contents()
}

/// Does `extents` cover every byte of `[off, off+len)`?
fn covers(extents: &[(u64, u64)], off: u64, len: u64) -> bool {
    let mut at = off;
    let end = off + len;
    for &(s, l) in extents {
        if s <= at && at < s + l {
            at = s + l;
        }
        if at >= end {
            return true;
        }
    }
    at >= end
}

/// "Crashes" an image: it is never closed nor dropped.
fn crash(img: Image) {
    std::mem::forget(img);
}

#[test]
fn fast_path_does_no_io_and_marks_wait_for_durability() {
    let bytes = base(GIB, 64 * KIB, &[("a", 64 * KIB), ("b", 4 * KIB)]);
    let s = Counting::new(bytes, Duration::ZERO);
    let img = Image::open_storage(Box::new(s.clone()), "wi", wi()).unwrap();
    assert!(img.is_write_intent());
    let before = s.counts();
    img.mark_dirty(0, 4096).unwrap();
    let after = s.counts();
    assert!(
        after.0 > before.0 && after.1 == before.1 + 1,
        "{before:?} {after:?}"
    );
    // Already durable: no write, no flush, no round.
    let rounds = img.intent_stats().rounds;
    for i in 0..1000 {
        img.mark_dirty(i % 4096, 1).unwrap();
    }
    assert_eq!(s.counts(), after);
    assert_eq!(img.intent_stats().rounds, rounds);
    // The split form: already durable -> 0; a new sector -> needs sync.
    assert!(!img.mark_dirty_nowait(0, 512).unwrap());
    assert!(img.mark_dirty_nowait(512 * MIB, 4096).unwrap());
    assert_eq!(s.counts(), after);
    img.sync().unwrap();
    let synced = s.counts();
    assert_eq!(synced.1, after.1 + 1);
    assert!(!img.mark_dirty_nowait(512 * MIB, 4096).unwrap());
    img.sync().unwrap();
    assert_eq!(s.counts(), synced);
    crash(img);
    // What the crash left: both bitmaps recovered with every mark.
    let img = s.reopen(OpenOptions::read_write());
    for b in img.bitmaps().unwrap() {
        assert!(b.recovered && b.usable && !b.in_use, "{b:?}");
        let e: Vec<_> = img.extents(&b.name).unwrap().collect();
        assert!(covers(&e, 0, 4096) && covers(&e, 512 * MIB, 4096), "{e:?}");
    }
}

#[test]
fn group_commit_shares_flushes() {
    let bytes = base(256 * GIB, 64 * KIB, &[("a", 64 * KIB)]);
    let s = Counting::new(bytes, Duration::from_millis(2));
    let img = Image::open_storage(Box::new(s.clone()), "wi", wi()).unwrap();
    let (_, f0) = s.counts();
    let threads = 16u64;
    let per = 40u64;
    std::thread::scope(|sc| {
        for t in 0..threads {
            let img = &img;
            sc.spawn(move || {
                for i in 0..per {
                    // A distinct 512-byte sector of the bitmap per mark.
                    let sector = t * per + i;
                    img.mark_dirty(sector * 4096 * 64 * KIB, 4096).unwrap();
                }
            });
        }
    });
    let flushes = (s.counts().1 - f0) as u64;
    let marks = threads * per;
    eprintln!("group commit: {marks} marks needing I/O, {flushes} flushes");
    assert!(flushes * 4 <= marks, "{flushes} flushes for {marks} marks");
    let e: Vec<_> = img.extents("a").unwrap().collect();
    assert_eq!(e.len() as u64, marks);
}

#[test]
fn a_batch_of_marks_is_made_durable_in_one_round() {
    let bytes = base(256 * GIB, 64 * KIB, &[("a", 64 * KIB)]);
    let s = Counting::new(bytes, Duration::ZERO);
    let img = Image::open_storage(Box::new(s.clone()), "wi", wi()).unwrap();
    // 32 writes, each in a distinct 512-byte sector of the bitmap.
    let batch: Vec<qbm::ByteRange> = (0..32u64)
        .map(|k| qbm::ByteRange {
            offset: k * 4096 * 64 * KIB,
            length: 4096,
        })
        .collect();
    let (rounds, (_, f0)) = (img.intent_stats().rounds, s.counts());
    img.mark_dirty_many(&batch).unwrap();
    assert_eq!(img.intent_stats().rounds, rounds + 1);
    assert_eq!(s.counts().1, f0 + 1, "one flush for the batch");
    // Durable already: nothing left to sync for any of them.
    for r in &batch {
        assert!(!img.mark_dirty_nowait(r.offset, r.length).unwrap());
    }
    crash(img);
    let img = s.reopen(OpenOptions::read_write());
    let e: Vec<_> = img.extents("a").unwrap().collect();
    assert_eq!(e.len(), batch.len(), "{e:?}");
    for r in &batch {
        assert!(covers(&e, r.offset, r.length), "{r:?} lost: {e:?}");
    }
}

#[test]
fn management_changes_are_durable_at_once() {
    let bytes = base(GIB, 64 * KIB, &[("a", 64 * KIB)]);
    let s = Counting::new(bytes, Duration::ZERO);
    let img = Image::open_storage(Box::new(s.clone()), "wi", wi()).unwrap();
    img.mark_dirty(0, 1).unwrap();
    img.add_bitmap("b", Some(4096), true).unwrap();
    img.mark_dirty(MIB, 1).unwrap();
    img.disable_bitmap("a").unwrap();
    img.mark_dirty(2 * MIB, 1).unwrap();
    img.set_range("a", 3 * MIB, 1).unwrap();
    crash(img);
    let img = s.reopen(OpenOptions::read_write());
    let a = img.bitmap_info("a").unwrap();
    let b = img.bitmap_info("b").unwrap();
    assert!(a.recovered && b.recovered && !a.enabled && b.enabled);
    let ea: Vec<_> = img.extents("a").unwrap().collect();
    let eb: Vec<_> = img.extents("b").unwrap().collect();
    assert!(covers(&ea, 0, 1) && covers(&ea, MIB, 1) && covers(&ea, 3 * MIB, 1));
    assert!(!covers(&ea, 2 * MIB, 1));
    assert!(covers(&eb, MIB, 1) && covers(&eb, 2 * MIB, 1));
    img.close().unwrap();
}

#[test]
fn clean_close_leaves_no_record() {
    let bytes = base(GIB, 64 * KIB, &[("a", 64 * KIB)]);
    let s = Counting::new(bytes, Duration::ZERO);
    let img = Image::open_storage(Box::new(s.clone()), "wi", wi()).unwrap();
    img.mark_dirty(0, 1).unwrap();
    let c0 = s.inner.contents();
    assert_ne!(be_u64(&c0, 88) & AUTOCLEAR_WRITE_INTENT, 0);
    assert!(raw_extensions(&c0)
        .0
        .iter()
        .any(|e| e.magic == RECORD_MAGIC));
    img.close().unwrap();
    let c0 = s.inner.contents();
    assert_eq!(be_u64(&c0, 88) & AUTOCLEAR_WRITE_INTENT, 0);
    assert!(!raw_extensions(&c0)
        .0
        .iter()
        .any(|e| e.magic == RECORD_MAGIC));
    let img = Image::open_storage(
        Box::new(MemoryStorage::new(c0)),
        "after",
        OpenOptions::read_write(),
    )
    .unwrap();
    let a = img.bitmap_info("a").unwrap();
    assert!(a.usable && !a.recovered && a.dirty_bytes == Some(64 * KIB));
}

#[test]
fn io_errors_reach_every_waiter_and_the_image_stays_usable() {
    let bytes = base(GIB, 64 * KIB, &[("a", 64 * KIB)]);
    let s = FailingStorage::new(bytes);
    let img = Image::open_storage(Box::new(s.clone()), "wi", wi()).unwrap();
    let ctl = s.control();
    ctl.fail_flush(ctl.flushes() + 1, 5, true);
    let e = img.mark_dirty(0, 1).unwrap_err();
    assert_eq!(e.errno(), 5, "{e}");
    // Still failing: the same bits are not durable, so it waits and fails again.
    assert_eq!(img.mark_dirty(0, 1).unwrap_err().errno(), 5);
    assert!(img.mark_dirty_nowait(MIB, 1).unwrap());
    assert_eq!(img.sync().unwrap_err().errno(), 5);
    ctl.recover();
    // The failed sectors stay pending: a sync now makes them durable.
    let (w, f) = (ctl.writes(), ctl.flushes());
    img.sync().unwrap();
    assert!(ctl.writes() > w && ctl.flushes() == f + 1);
    assert!(!img.mark_dirty_nowait(MIB, 1).unwrap());
    img.mark_dirty(0, 1).unwrap();
    assert_eq!(ctl.flushes(), f + 1);
    crash(img);
    let img = Image::open_storage(
        Box::new(MemoryStorage::new(s.contents())),
        "after",
        OpenOptions::read_write(),
    )
    .unwrap();
    let e: Vec<_> = img.extents("a").unwrap().collect();
    assert!(covers(&e, 0, 1) && covers(&e, MIB, 1), "{e:?}");
}

#[test]
fn resize_is_refused_and_write_intent_needs_read_write() {
    let bytes = base(GIB, 64 * KIB, &[("a", 64 * KIB)]);
    let img = Image::open_storage(Box::new(MemoryStorage::new(bytes.clone())), "wi", wi()).unwrap();
    assert_eq!(img.resize(2 * GIB).unwrap_err().errno(), 95);
    let ro = OpenOptions {
        write_intent: true,
        ..OpenOptions::read_only()
    };
    let e = Image::open_storage(Box::new(MemoryStorage::new(bytes)), "ro", ro)
        .err()
        .unwrap();
    assert_eq!(e.errno(), 22);
}

/// Clears racing with marks: once every mark returned, the disk holds at
/// least what memory holds (a mark that lands after a clear's read of a
/// sector must not trust a shadow bit the clear's write removes). The marks
/// stop as soon as the clear returns, so no later round repairs a loss.
#[test]
fn clears_racing_with_marks_lose_no_returned_mark() {
    let bytes = base(GIB, 64 * KIB, &[("a", 64 * KIB)]);
    let s = Counting::new(bytes, Duration::from_micros(100));
    let img = Image::open_storage(Box::new(s.clone()), "wi", wi()).unwrap();
    for round in 0..150u64 {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            for t in 0..3u64 {
                let (img, stop) = (&img, &stop);
                sc.spawn(move || {
                    let mut rng = Rng::new(round * 10 + t + 1);
                    while !stop.load(Ordering::Relaxed) {
                        img.mark_dirty(rng.below(16) * 64 * KIB, 1).unwrap();
                    }
                });
            }
            std::thread::sleep(Duration::from_micros(200));
            if round % 2 == 0 {
                img.clear_bitmap("a").unwrap();
            } else {
                img.reset_range("a", 0, 8 * 64 * KIB).unwrap();
            }
            stop.store(true, Ordering::Relaxed);
        });
        let mem: Vec<_> = img.extents("a").unwrap().collect();
        let after = s.reopen(OpenOptions::read_only());
        assert!(after.bitmap_info("a").unwrap().recovered);
        let disk: Vec<_> = after.extents("a").unwrap().collect();
        for &(o, l) in &mem {
            assert!(
                covers(&disk, o, l),
                "round {round}: {o}+{l} in memory, not on disk"
            );
        }
    }
}

#[test]
fn record_too_large_for_cluster_0_is_refused_cleanly() {
    let bytes = base(GIB, 512, &[("a", 64 * KIB)]);
    let s = Counting::new(bytes, Duration::ZERO);
    let img = Image::open_storage(Box::new(s.clone()), "wi", wi()).unwrap();
    let mut added = 0;
    let err = loop {
        match img.add_bitmap(&format!("b{added}"), Some(64 * KIB), true) {
            Ok(()) => added += 1,
            Err(e) => break e,
        }
        assert!(added < 100);
    };
    assert_eq!(err.errno(), libc_enospc(), "{err}");
    assert!(added >= 5, "{added}");
    assert_eq!(img.bitmap_count().unwrap(), added + 1);
    img.mark_dirty(0, 1).unwrap();
    crash(img);
    let img = s.reopen(OpenOptions::read_write());
    let bitmaps = img.bitmaps().unwrap();
    assert_eq!(bitmaps.len(), added + 1);
    assert!(bitmaps
        .iter()
        .all(|b| b.recovered && b.dirty_bytes == Some(64 * KIB)));
}

fn libc_enospc() -> i32 {
    28
}

/// A crashed write-intent session in a file; returns the marks it made.
fn crashed_file(path: &Path, cluster_size: u64) -> Vec<(u64, u64)> {
    let bytes = base(GIB, cluster_size, &[("a", 64 * KIB), ("b", 512)]);
    let s = Counting::new(bytes, Duration::ZERO);
    let img = Image::open_storage(Box::new(s.clone()), "wi", wi()).unwrap();
    let marks = vec![(0, 4096), (100 * MIB + 7, 70_000), (GIB - 512, 512)];
    for &(o, l) in &marks {
        img.mark_dirty(o, l).unwrap();
    }
    crash(img);
    std::fs::write(path, s.inner.contents()).unwrap();
    marks
}

#[test]
fn recovery_interop_with_qemu() {
    if !have_tools(&["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("intent-interop");
    for cs in [512, 64 * KIB] {
        let path = dir.join(&format!("img-{cs}.qcow2"));
        let marks = crashed_file(&path, cs);
        // QEMU sees a clean image whose bitmaps are in use.
        let chk = qemu_img_check(&path);
        assert_eq!(chk.corruptions, 0, "{}", chk.raw);
        assert!(qemu_img_info_bitmaps(&path).iter().all(|b| b.in_use()));
        // libqbm recovers them.
        let img = Image::open(&path, OpenOptions::read_write()).unwrap();
        for b in img.bitmaps().unwrap() {
            assert!(b.recovered, "{b:?}");
            let e: Vec<_> = img.extents(&b.name).unwrap().collect();
            for &(o, l) in &marks {
                assert!(covers(&e, o, l), "{} {o} {l}", b.name);
            }
        }
        img.close().unwrap();
        let chk = qemu_img_check(&path);
        assert_eq!((chk.corruptions, chk.leaks), (0, 0), "{}", chk.raw);
        let info = qemu_img_info_bitmaps(&path);
        assert_eq!(info.len(), 2);
        assert!(info.iter().all(|b| !b.in_use()));
        for name in ["a", "b"] {
            let e = nbd_dirty_extents(&path, name);
            for &(o, l) in &marks {
                assert!(covers(&e, o, l), "nbd {name} {o} {l}: {e:?}");
            }
        }
    }
}

#[test]
fn no_recovery_after_qemu_wrote_the_image() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("intent-negative");
    let path = dir.join("img.qcow2");
    crashed_file(&path, 64 * KIB);
    let c0 = cluster0(&path);
    assert_ne!(be_u64(&c0, 88) & AUTOCLEAR_WRITE_INTENT, 0);
    qemu_io(&path, &write_cmds(&[(0, 4096)]));
    // Measured with QEMU 10: the unknown extension is kept, the unknown
    // autoclear bit cleared.
    let c0 = cluster0(&path);
    assert_eq!(be_u64(&c0, 88) & AUTOCLEAR_WRITE_INTENT, 0);
    assert!(raw_extensions(&c0)
        .0
        .iter()
        .any(|e| e.magic == RECORD_MAGIC));
    let img = Image::open(&path, OpenOptions::read_write()).unwrap();
    for b in img.bitmaps().unwrap() {
        assert!(b.in_use && !b.usable && !b.recovered, "{b:?}");
    }
    img.close().unwrap();
    // The same with qemu-img bitmap (a header rewrite of its own).
    crashed_file(&path, 64 * KIB);
    qemu_img(&["bitmap", "--add", path.to_str().unwrap(), "fresh"]);
    let c0 = cluster0(&path);
    assert_eq!(be_u64(&c0, 88) & AUTOCLEAR_WRITE_INTENT, 0);
    assert!(raw_extensions(&c0)
        .0
        .iter()
        .any(|e| e.magic == RECORD_MAGIC));
    let img = Image::open(&path, OpenOptions::read_write()).unwrap();
    for b in img.bitmaps().unwrap() {
        assert!(!b.recovered, "{b:?}");
        assert_eq!(b.in_use, b.name != "fresh", "{b:?}");
    }
}

#[test]
fn plain_open_recovers_then_disowns_the_record() {
    let dir = TempDir::new("intent-plain");
    let path = dir.join("img.qcow2");
    let marks = crashed_file(&path, 64 * KIB);
    let img = Image::open(&path, OpenOptions::read_write()).unwrap();
    assert!(img.bitmaps().unwrap().iter().all(|b| b.recovered));
    // Open without write intent: the record's bit is gone at once.
    assert_eq!(be_u64(&cluster0(&path), 88) & AUTOCLEAR_WRITE_INTENT, 0);
    crash(img);
    let img = Image::open(&path, OpenOptions::read_write());
    // Our own locks are still held by the forgotten handle: read the bytes.
    drop(img);
    let bytes = std::fs::read(&path).unwrap();
    let img = Image::open_storage(
        Box::new(MemoryStorage::new(bytes)),
        "again",
        OpenOptions::read_write(),
    )
    .unwrap();
    // A plain session crashed: nothing to recover, as today.
    assert!(img
        .bitmaps()
        .unwrap()
        .iter()
        .all(|b| b.in_use && !b.recovered));
    let _ = marks;
}

/// Crash injection: a write-intent session on a recording storage, cut
/// after every write; in every image a cut can leave, every bitmap that
/// libqbm opens is usable and holds every mark that had returned.
#[test]
fn crash_at_every_write_and_flush() {
    let mut images = 0usize;
    let mut recovered = 0usize;
    // The last two start from an image a crashed write-intent session left:
    // the recording session's open recovers it and moves it in place.
    for (cs, g, precrash) in [
        (512u64, 512u64, false),
        (64 * KIB, 64 * KIB, false),
        (512, 64 * KIB, false),
        (64 * KIB, 4 * KIB, true),
        (512, 512, true),
    ] {
        let mut bytes = base(256 * MIB, cs, &[("a", g)]);
        // (op count when the mark returned, offset, length)
        let mut returned: Vec<(usize, u64, u64)> = Vec::new();
        if precrash {
            let s = Counting::new(bytes, Duration::ZERO);
            let img = Image::open_storage(Box::new(s.clone()), "pre", wi()).unwrap();
            for i in 0..5 {
                img.mark_dirty(i * 50 * MIB + 12345, 70_000).unwrap();
                returned.push((0, i * 50 * MIB + 12345, 70_000));
            }
            crash(img);
            bytes = s.inner.contents();
        }
        let rec = RecordingStorage::new(bytes);
        let img = Image::open_storage(Box::new(rec.clone()), "wi", wi()).unwrap();
        if precrash {
            assert!(img.bitmap_info("a").unwrap().recovered);
        }
        let mut rng = Rng::new(cs ^ g);
        // Op counts when the clear of "a" started and returned.
        let mut clear_ops = (usize::MAX, usize::MAX);
        for i in 0..40 {
            let off = rng.below(256 * MIB - 200_000);
            let len = rng.range(1, 200_000);
            img.mark_dirty(off, len).unwrap();
            returned.push((rec.ops().len(), off, len));
            if i == 20 {
                img.add_bitmap("b", Some(4096), true).unwrap();
            }
            if i == 30 {
                img.flush().unwrap();
            }
            if i == 34 {
                clear_ops.0 = rec.ops().len();
                img.clear_bitmap("a").unwrap();
                clear_ops.1 = rec.ops().len();
            }
        }
        img.close().unwrap();
        let ops = rec.ops();
        // Op index of each write, to place a cut in the op log.
        let write_at: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Op::Write { .. }))
            .map(|(i, _)| i)
            .collect();
        let b_added = returned[returned.len() - 40 + 21].0;
        for_each_cut(rec.initial(), &ops, |cut| {
            let at = write_at[cut.n - 1];
            let must: Vec<_> = returned.iter().filter(|r| r.0 <= at).collect();
            let mut kinds = vec![Cut::DropUnflushed, Cut::KeepAll];
            for s in 1..cut.last_write_pieces() {
                kinds.push(Cut::Torn { sectors: s });
            }
            kinds.push(Cut::Random { seed: cut.n as u64 });
            for kind in kinds {
                let bytes = cut.image(kind);
                images += 1;
                let img = Image::open_storage(
                    Box::new(MemoryStorage::new(bytes)),
                    "cut",
                    OpenOptions::read_write(),
                )
                .unwrap_or_else(|e| panic!("cut {} {kind:?}: {e}", cut.n));
                for b in img.bitmaps().unwrap() {
                    if b.recovered {
                        recovered += 1;
                        // Never wrong data: nothing outside what was marked.
                        let mut m = Model::new(256 * MIB, b.granularity);
                        for r in &returned {
                            m.mark(r.1, r.2);
                        }
                        let all = m.extents();
                        for (o, l) in img.extents(&b.name).unwrap() {
                            assert!(covers(&all, o, l), "{} holds {o}+{l}, never marked", b.name);
                        }
                    }
                    let from = if b.name == "b" { b_added } else { 0 };
                    // Marks of "a" before its clear count only while the
                    // clear has not started at the cut.
                    let relevant: Vec<_> = must
                        .iter()
                        .filter(|r| r.0 > from)
                        .filter(|r| b.name != "a" || r.0 > clear_ops.1 || at < clear_ops.0)
                        .collect();
                    if relevant.is_empty() {
                        continue;
                    }
                    assert!(
                        b.usable,
                        "cs {cs} g {g} cut {} {kind:?}: bitmap {} unusable with {} returned marks",
                        cut.n,
                        b.name,
                        relevant.len()
                    );
                    let e: Vec<_> = img.extents(&b.name).unwrap().collect();
                    for r in relevant {
                        assert!(
                            covers(&e, r.1, r.2),
                            "cs {cs} g {g} cut {} {kind:?}: {} misses mark {r:?}",
                            cut.n,
                            b.name
                        );
                    }
                }
                crash(img);
            }
        });
    }
    eprintln!("crash injection: {images} cut images, {recovered} bitmaps recovered");
    assert!(recovered > 100);
}

// ---- real crashes: a child process killed with SIGKILL ----

const CHILD_ENV: &str = "QBM_INTENT_CHILD";

/// The child: opens the image named by $QBM_INTENT_CHILD in write-intent
/// mode, says so in `<image>.ready`, then marks from 8 threads forever,
/// logging each mark that returned to `<image>.log.<thread>`.
#[test]
fn sigkill_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let img = Image::open(&path, wi()).unwrap();
    let size = img.size();
    std::fs::write(format!("{path}.ready"), b"1").unwrap();
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let img = &img;
            let path = &path;
            s.spawn(move || {
                let mut log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(format!("{path}.log.{t}"))
                    .unwrap();
                let mut rng = Rng::new(t ^ std::process::id() as u64);
                loop {
                    let len = rng.range(1, 3 * 65536);
                    let off = rng.below(size - len);
                    if let Err(e) = img.mark_dirty(off, len) {
                        // Abort, not panic: unwinding would close the image
                        // cleanly and hide the failure from the parent.
                        eprintln!("mark_dirty({off}, {len}) failed: {e}");
                        std::process::abort();
                    }
                    log.write_all(format!("{off} {len}\n").as_bytes()).unwrap();
                }
            });
        }
    });
}

/// Every mark the children logged, and drops a line the last kill cut from
/// its log: the next child appends to the same file, and its first line
/// would otherwise join the cut one into a mark nobody made.
fn logged_marks(path: &Path) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for t in 0..8 {
        let log = format!("{}.log.{t}", path.display());
        let Ok(text) = std::fs::read_to_string(&log) else {
            continue;
        };
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
            f.set_len(complete as u64).unwrap();
        }
        let text = &text[..complete];
        for line in text.lines() {
            // A line cut by the kill is not a returned-and-logged mark.
            let mut it = line.split(' ');
            if let (Some(a), Some(b), None) = (it.next(), it.next(), it.next()) {
                if let (Ok(o), Ok(l)) = (a.parse(), b.parse()) {
                    out.push((o, l));
                }
            }
        }
    }
    out
}

/// 220 SIGKILLs of a child marking from many threads: after each, the
/// bitmap is recovered and holds every mark whose call returned; QEMU finds
/// the image clean before and after we close it, shows the bitmap without
/// in-use, and exports every returned mark.
#[test]
fn sigkill_recovery() {
    let tools = have_tools(&["qemu-img", "nbdinfo", "qemu-nbd"]);
    let exe = std::env::current_exe().unwrap();
    let dir = TempDir::new("intent-kill");
    let configs = [
        (512u64, 512u64),
        (512, 64 * KIB),
        (64 * KIB, 4 * KIB),
        (64 * KIB, 64 * KIB),
    ];
    let per_config = 55;
    let mut kills = 0;
    let mut checked_marks = 0usize;
    let start = Instant::now();
    for (ci, &(cs, g)) in configs.iter().enumerate() {
        let path = dir.join(&format!("kill-{cs}-{g}.qcow2"));
        let img = Image::create(
            &path,
            &CreateOptions {
                size: 2 * GIB,
                cluster_size: cs,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        img.add_bitmap("a", Some(g), true).unwrap();
        img.close().unwrap();
        let mut rng = Rng::new(ci as u64 + 1);
        for round in 0..per_config {
            let ready = format!("{}.ready", path.display());
            let _ = std::fs::remove_file(&ready);
            let mut child = Command::new(&exe)
                .args([
                    "--exact",
                    "sigkill_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, &path)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(format!("{}.stderr", path.display())).unwrap())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !Path::new(&ready).exists() {
                assert!(Instant::now() < deadline, "child never became ready");
                if let Some(st) = child.try_wait().unwrap() {
                    panic!("child exited early: {st}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_micros(rng.below(40_000)));
            child.kill().unwrap(); // SIGKILL
            let status = child.wait().unwrap();
            {
                use std::os::unix::process::ExitStatusExt;
                // A child that ended by itself did not test a crash.
                assert_eq!(
                    status.signal(),
                    Some(libc::SIGKILL),
                    "cs {cs} g {g} round {round}: the child ended before the kill ({status}): {}",
                    std::fs::read_to_string(format!("{}.stderr", path.display()))
                        .unwrap_or_default()
                );
            }
            kills += 1;
            let marks = logged_marks(&path);
            let full_check = tools;
            if full_check {
                // What the kill left: QEMU sees a clean image.
                let chk = qemu_img_check(&path);
                assert_eq!(chk.corruptions, 0, "{}", chk.raw);
            }
            let img = Image::open(&path, OpenOptions::read_write()).unwrap();
            let b = img.bitmap_info("a").unwrap();
            assert!(b.recovered, "cs {cs} g {g} round {round}: {b:?}");
            let e: Vec<_> = img.extents("a").unwrap().collect();
            for &(o, l) in &marks {
                assert!(
                    covers(&e, o, l),
                    "cs {cs} g {g} round {round}: mark {o}+{l} lost"
                );
            }
            checked_marks += marks.len();
            img.close().unwrap();
            if full_check {
                let chk = qemu_img_check(&path);
                assert_eq!((chk.corruptions, chk.leaks), (0, 0), "{}", chk.raw);
                assert!(qemu_img_info_bitmaps(&path).iter().all(|b| !b.in_use()));
                let e = nbd_dirty_extents(&path, "a");
                for &(o, l) in &marks {
                    assert!(covers(&e, o, l), "nbd: mark {o}+{l} missing");
                }
            }
        }
    }
    eprintln!(
        "sigkill: {kills} kills, {checked_marks} logged marks checked, {:.1} s",
        start.elapsed().as_secs_f64()
    );
    assert!(kills >= 200);
}
