//! Lazy opens (`OpenOptions::lazy`, `QBM_OPEN_LAZY`, every CLI command):
//! bitmap data stays on disk and is read a chunk at a time. What a lazy
//! open reads must equal what a loading open reads, bit for bit, on images
//! written by QEMU and by us; what a lazy open changes must equal what a
//! loading open changes, and QEMU must read it back the same.

mod common;

use common::*;
use qbm::image::{CreateOptions, Image, OpenOptions};
use qbm::Error;
use std::fs;
use std::path::{Path, PathBuf};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// The memory test measures this process: the others wait for it.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every extent, walked with `next_extent` (the lazy, chunked way).
fn walk(img: &Image, name: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((s, l)) = img.next_extent(name, at).unwrap() {
        assert!(l > 0 && s >= at, "{name}: extent ({s}, {l}) from {at}");
        out.push((s, l));
        at = s + l;
    }
    out
}

/// Writes that make every kind of table entry: scattered granules (data
/// clusters), a run covering whole bitmap clusters (all-ones clusters when
/// we store them), clean clusters, and the very last granule (the bitmap's
/// last byte). `per_cluster`: guest bytes one bitmap cluster covers.
fn writes(size: u64, per_cluster: u64, rng: &mut Rng) -> Vec<(u64, u64)> {
    let mut w = vec![(0, 1), (size - 512, 512)];
    let at = size / 3 / per_cluster * per_cluster;
    w.push((at, (2 * per_cluster).min(33 * GIB).min(size - at)));
    for _ in 0..60 {
        let off = rng.below(size / 512) * 512;
        w.push((off, rng.range(1, 20_000).min(size - off)));
    }
    w
}

/// qemu-io commands for `w`: data for short writes, zero writes (which
/// allocate nothing but still dirty the bitmap) in 1 GiB pieces for long ones.
fn qemu_cmds(w: &[(u64, u64)]) -> Vec<String> {
    let mut out = Vec::new();
    for &(o, l) in w {
        if l <= MIB {
            out.push(format!("write -P 1 {o} {l}"));
            continue;
        }
        let mut at = o;
        while at < o + l {
            let n = (o + l - at).min(GIB);
            out.push(format!("write -z {at} {n}"));
            at += n;
        }
    }
    out
}

/// (cluster size, granularity, disk size): many bitmap clusters, a bitmap
/// whose last byte is partial, chunks of one and of many clusters.
const GEOMETRIES: [(u64, u64, u64); 4] = [
    (512, 512, 96 * MIB + 7 * 512),
    (4096, 4096, 3 * GIB + 5 * 4096),
    (65536, 512, 40 * GIB),
    (65536, 65536, 2048 * GIB + 65536),
];

/// A lazy open lists, counts and walks exactly what a loading open does, on
/// images QEMU wrote and images we wrote; from any starting offset.
#[test]
fn lazy_reads_equal_loaded_reads() {
    let _alone = alone();
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("lazy-read");
    let mut rng = Rng::new(11);
    for (cs, g, size) in GEOMETRIES {
        let w = writes(size, g * 8 * cs, &mut rng);
        // QEMU's image: QEMU writes the data and the bitmap.
        let q = dir.join(&format!("q-{cs}-{g}.qcow2"));
        qemu_img_create(&q, size, cs, 16);
        qemu_bitmap_add(&q, "b", Some(g), true);
        qemu_io(&q, &qemu_cmds(&w));
        // Ours: same marks, stored by us (all-ones clusters as flags).
        let o = dir.join(&format!("o-{cs}-{g}.qcow2"));
        let img = Image::create(
            &o,
            &CreateOptions {
                size,
                cluster_size: cs,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        img.add_bitmap("b", Some(g), true).unwrap();
        img.add_bitmap("off", Some(g * 2), false).unwrap();
        for &(off, len) in &w {
            img.mark_dirty(off, len).unwrap();
        }
        img.close().unwrap();
        for p in [&q, &o] {
            let ctx = format!("{} (cluster {cs}, granularity {g})", p.display());
            let loaded = Image::open(p, OpenOptions::read_only()).unwrap();
            let stored = Image::open(p, lazy(false)).unwrap();
            assert_eq!(
                stored.bitmaps().unwrap(),
                loaded.bitmaps().unwrap(),
                "{ctx}"
            );
            for b in loaded.bitmap_list().unwrap() {
                let want: Vec<_> = loaded.extents(&b.name).unwrap().collect();
                assert!(!want.is_empty() || b.name == "off", "{ctx}");
                assert_eq!(walk(&stored, &b.name), want, "{ctx}: bitmap {}", b.name);
                assert_eq!(
                    stored.dirty_bytes(&b.name).unwrap(),
                    loaded.dirty_bytes(&b.name).unwrap(),
                    "{ctx}"
                );
                // From offsets inside runs, in clean space, at the end.
                for _ in 0..40 {
                    let from = rng.below(size + 1);
                    assert_eq!(
                        stored.next_extent(&b.name, from).unwrap(),
                        loaded.next_extent(&b.name, from).unwrap(),
                        "{ctx}: bitmap {} from {from}",
                        b.name
                    );
                }
                for &(s, l) in want.iter().take(5) {
                    for from in [s, s + l / 2, s + l - 1, s + l] {
                        assert_eq!(
                            stored.next_extent(&b.name, from).unwrap(),
                            loaded.next_extent(&b.name, from).unwrap(),
                            "{ctx}: from {from}"
                        );
                    }
                }
            }
        }
    }
}

/// One management step, applied the same way to both copies.
#[derive(Debug, Clone)]
enum Op {
    Clear(&'static str),
    Merge(&'static str, &'static str),
    Set(&'static str, u64, u64),
    Reset(&'static str, u64, u64),
    Remove(&'static str),
    Add(&'static str, u64),
    Rename(&'static str, &'static str),
    Disable(&'static str),
    Enable(&'static str),
    Flush,
}

fn apply(img: &Image, op: &Op) -> Result<(), Error> {
    match *op {
        Op::Clear(b) => img.clear_bitmap(b),
        Op::Merge(d, s) => img.merge_bitmap(d, img, s),
        Op::Set(b, o, l) => img.set_range(b, o, l),
        Op::Reset(b, o, l) => img.reset_range(b, o, l),
        Op::Remove(b) => img.remove_bitmap(b),
        Op::Add(b, g) => img.add_bitmap(b, Some(g), true),
        Op::Rename(a, b) => img.rename_bitmap(a, b),
        Op::Disable(b) => img.disable_bitmap(b),
        Op::Enable(b) => img.enable_bitmap(b),
        Op::Flush => img.flush(),
    }
}

/// Name, granularity, enabled, extents.
type BitmapContents = (String, u64, bool, Vec<(u64, u64)>);

/// Every bitmap of the image at `p` with its extents, read by a loading open.
fn contents(p: &Path) -> Vec<BitmapContents> {
    let img = Image::open(p, OpenOptions::read_only()).unwrap();
    let out = img
        .bitmap_list()
        .unwrap()
        .into_iter()
        .map(|b| {
            let e = img.extents(&b.name).unwrap().collect();
            (b.name, b.granularity, b.enabled, e)
        })
        .collect();
    img.close().unwrap();
    out
}

/// The same steps through a lazy and through a loading read-write open
/// leave the same bitmaps; QEMU reads the lazy result as we do, and it
/// checks clean. Streamed merges (equal granularity), clears of unloaded
/// bitmaps, loads on demand (set, reset, merges across granularities).
#[test]
fn lazy_changes_equal_loaded_changes() {
    let _alone = alone();
    if !have_tools(&["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("lazy-change");
    let mut rng = Rng::new(5);
    for (cs, g, size) in GEOMETRIES {
        let base = dir.join(&format!("base-{cs}.qcow2"));
        qemu_img_create(&base, size, cs, 16);
        qemu_bitmap_add(&base, "a", Some(g), true);
        qemu_bitmap_add(&base, "b", Some(g), true);
        qemu_io(&base, &qemu_cmds(&writes(size, g * 8 * cs, &mut rng)));
        qemu_bitmap(&base, &["--disable"], "b");
        qemu_bitmap_add(&base, "c", Some(g), true);
        qemu_bitmap_add(&base, "fine", Some(g.max(1024) / 2), true);
        qemu_io(&base, &qemu_cmds(&writes(size, g * 8 * cs, &mut rng)));
        let steps: Vec<Vec<Op>> = vec![
            // Streamed: a gains nothing from b; c gains b; then the reverse.
            vec![
                Op::Merge("a", "b"),
                Op::Merge("c", "b"),
                Op::Merge("b", "c"),
            ],
            vec![
                Op::Clear("a"),
                Op::Merge("a", "c"),
                Op::Flush,
                Op::Merge("c", "a"),
            ],
            vec![Op::Merge("fine", "a"), Op::Merge("a", "fine")],
            vec![
                Op::Set("b", size / 2, 3 * g),
                Op::Merge("c", "b"),
                Op::Reset("a", 0, g),
                Op::Remove("fine"),
                Op::Add("new", g),
                Op::Merge("new", "c"),
                Op::Rename("b", "b2"),
                Op::Disable("a"),
                Op::Enable("b2"),
            ],
            vec![
                Op::Merge("a", "a"),
                Op::Clear("c"),
                Op::Clear("c"),
                Op::Merge("b", "c"),
            ],
        ];
        for (k, ops) in steps.iter().enumerate() {
            let ctx = format!("cluster {cs}, steps {k}: {ops:?}");
            let pl = dir.join("lazy.qcow2");
            let pn = dir.join("loaded.qcow2");
            fs::copy(&base, &pl).unwrap();
            fs::copy(&base, &pn).unwrap();
            let l = Image::open(&pl, lazy(true)).unwrap();
            let n = Image::open(&pn, OpenOptions::read_write()).unwrap();
            for op in ops {
                let (a, b) = (apply(&l, op), apply(&n, op));
                assert_eq!(a.is_ok(), b.is_ok(), "{ctx}: {op:?}: {a:?} vs {b:?}");
            }
            l.close().unwrap();
            n.close().unwrap();
            let want = contents(&pn);
            assert_eq!(contents(&pl), want, "{ctx}");
            let c = qemu_img_check(&pl);
            assert_eq!((c.corruptions, c.leaks), (0, 0), "{ctx}: {c:?}");
            let q = qemu_img_info_bitmaps(&pl);
            assert_eq!(q.len(), want.len(), "{ctx}");
            assert!(q.iter().all(|b| !b.in_use()), "{ctx}: {q:?}");
            // QEMU exports the streamed result bit for bit.
            for (name, _, _, extents) in &want {
                assert_eq!(
                    &nbd_dirty_extents(&pl, name),
                    extents,
                    "{ctx}: bitmap {name}"
                );
            }
        }
    }
}

/// A lazy read-write open changes nothing on disk until a call does (no
/// in_use flags: it tracks no writes), and QEMU sees the bitmaps as
/// consistent while it is open.
#[test]
fn lazy_open_leaves_the_image_as_it_is() {
    let _alone = alone();
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("lazy-untouched");
    let p = dir.join("i.qcow2");
    qemu_img_create(&p, 4 * GIB, 65536, 16);
    qemu_bitmap_add(&p, "a", Some(65536), true);
    qemu_io(&p, &write_cmds(&[(5 * MIB, 3 * MIB)]));
    let before = fs::read(&p).unwrap();
    let img = Image::open(&p, lazy(true)).unwrap();
    assert_eq!(walk(&img, "a"), vec![(5 * MIB, 3 * MIB)]);
    assert_eq!(fs::read(&p).unwrap(), before, "a lazy open wrote");
    img.rename_bitmap("a", "renamed").unwrap();
    img.flush().unwrap();
    let shared = qemu_img_info_bitmaps_shared(&p);
    assert_eq!(shared.len(), 1);
    assert!(!shared[0].in_use(), "{shared:?}");
    assert_eq!(shared[0].name, "renamed");
    img.close().unwrap();
    let img = Image::open(&p, lazy(true)).unwrap();
    img.close().unwrap();
    let after_rename = fs::read(&p).unwrap();
    let img = Image::open(&p, lazy(true)).unwrap();
    img.close().unwrap();
    assert_eq!(fs::read(&p).unwrap(), after_rename);
}

/// A lazy open tracks no writes: marks are refused with a reason, and lazy
/// write-intent is a contradiction.
#[test]
fn lazy_opens_refuse_marks() {
    let _alone = alone();
    let dir = TempDir::new("lazy-marks");
    let p = dir.join("i.qcow2");
    let img = Image::create(
        &p,
        &CreateOptions {
            size: GIB,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    img.add_bitmap("a", None, true).unwrap();
    img.close().unwrap();
    let before = fs::read(&p).unwrap();
    let img = Image::open(&p, lazy(true)).unwrap();
    let e = img.mark_dirty(0, 4096).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert!(e.to_string().contains("lazily"), "{e}");
    assert!(!img.mark_dirty_fast(0, 4096));
    img.close().unwrap();
    assert_eq!(fs::read(&p).unwrap(), before);
    let e = Image::open(
        &p,
        OpenOptions {
            writable: true,
            write_intent: true,
            lazy: true,
            ..OpenOptions::default()
        },
    )
    .err()
    .expect("lazy write-intent refused");
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert!(e.to_string().contains("lazy"), "{e}");
    assert_eq!(fs::read(&p).unwrap(), before);
}

/// Memory: walking, counting, merging and clearing dense 16 TiB bitmaps on
/// a lazy open never holds one in memory. Measured as the growth of this
/// process's anonymous memory, far below the 32 MiB a loaded bitmap takes.
#[test]
fn lazy_work_on_big_bitmaps_stays_small() {
    let _alone = alone();
    let dir = TempDir::new("lazy-mem");
    let p: PathBuf = dir.join("big.qcow2");
    let size = 16 << 40;
    let img = Image::create(
        &p,
        &CreateOptions {
            size,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    img.add_bitmap("a", Some(65536), true).unwrap();
    img.add_bitmap("b", Some(65536), false).unwrap();
    // Alternating 2 GiB runs: every bitmap cluster holds data.
    for k in (0..size).step_by(4 << 30) {
        img.mark_dirty(k, 2 << 30).unwrap();
    }
    img.set_range("b", (2 << 30) + 65536, 65536).unwrap();
    img.close().unwrap();
    let rss = || {
        let s = fs::read_to_string("/proc/self/status").unwrap();
        let line = s
            .lines()
            .find(|l| l.starts_with("RssAnon:"))
            .unwrap()
            .to_string();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * KIB
    };
    let start = rss();
    let img = Image::open(&p, lazy(true)).unwrap();
    assert_eq!(walk(&img, "a").len(), 4096);
    assert_eq!(img.dirty_bytes("a").unwrap(), size / 2);
    img.merge_bitmap("a", &img, "b").unwrap();
    img.clear_bitmap("b").unwrap();
    img.close().unwrap();
    let grown = rss().saturating_sub(start);
    assert!(grown < 8 * MIB, "a lazy session grew by {grown} bytes");
    let img = Image::open(&p, OpenOptions::read_only()).unwrap();
    assert_eq!(img.dirty_bytes("a").unwrap(), size / 2 + 65536);
    assert_eq!(img.dirty_bytes("b").unwrap(), 0);
}
