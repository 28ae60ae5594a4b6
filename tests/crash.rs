//! Crash consistency at every write: each scenario runs on a storage that
//! records every write and flush; then, for the crash right after each
//! write, the images a crash could leave (unflushed writes lost, kept, the
//! last one torn at sector boundaries, random sector subsets) must open,
//! pass `qemu-img check` without corruption, and show every bitmap in its
//! old state, its new state, or flagged in_use.
//!
//! `cargo test --release --test crash -- --nocapture` prints a summary:
//! per scenario the writes cut after, the distinct images checked, how many
//! of them had leaked clusters and the most clusters one leaked, how many
//! showed a bitmap in_use, and how many failed.

mod common;

use common::cut_check::{
    snapshot_of, snapshot_of_bytes, verify_cut_image, BitmapState, Expected, Snapshot,
};
use common::fault_storage::{for_each_cut, Cut, CutPoint, RecordingStorage};
use common::*;
use qbm::image::{Image, OpenOptions};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// A scenario's actions; returns the states it made durable on the way.
type RunFn = Box<dyn Fn(&Image) -> Vec<Snapshot> + Send + Sync>;

/// One recorded run and what it must lead to.
struct Scenario {
    name: &'static str,
    base: Vec<u8>,
    /// Runs on an image opened read-write on the recording storage; the
    /// harness closes it afterwards. Returns the states it made durable on
    /// the way (with flushes), besides the old and the new one.
    run: RunFn,
    /// The bitmaps once the run is complete.
    new: Snapshot,
    /// Random-subset images tried per cut point.
    random_per_cut: u64,
}

/// A run that makes no durable state of its own before the close.
fn plain(f: impl Fn(&Image) + Send + Sync + 'static) -> RunFn {
    Box::new(move |img| {
        f(img);
        Vec::new()
    })
}

fn model_state(m: &Model, enabled: bool) -> BitmapState {
    BitmapState {
        granularity: m.granularity,
        enabled,
        in_use: false,
        extents: m.extents(),
    }
}

/// The bitmaps of `s` on a disk resized to `new_size`: bits past the end dropped.
fn resized(s: &Snapshot, new_size: u64) -> Snapshot {
    s.iter()
        .map(|(name, b)| {
            let mut m = Model::new(new_size, b.granularity);
            for &(o, l) in b.extents.iter().filter(|e| e.0 < new_size) {
                m.mark(o, l.min(new_size - o));
            }
            (name.clone(), model_state(&m, b.enabled))
        })
        .collect()
}

fn model_of(size: u64, s: &BitmapState) -> Model {
    let mut m = Model::new(size, s.granularity);
    for &(o, l) in &s.extents {
        m.mark(o, l);
    }
    m
}

/// 1 GiB, 64 KiB clusters, made by QEMU: "a" (64 KiB granularity) and "b"
/// (4 KiB) enabled, "c" disabled after the first writes.
fn base_std(dir: &TempDir) -> (Vec<u8>, Snapshot) {
    let f = dir.join("std.qcow2");
    let size = GIB;
    qemu_img_create(&f, size, 65536, 16);
    qemu_bitmap_add(&f, "a", Some(65536), true);
    qemu_bitmap_add(&f, "b", Some(4096), true);
    qemu_bitmap_add(&f, "c", Some(65536), true);
    let w1 = [(0, 4096), (MIB + 512, 70000), (500 * MIB, 3 * MIB)];
    qemu_io(&f, &write_cmds(&w1));
    qemu_bitmap(&f, &["--disable"], "c");
    let w2 = [(200 * MIB, MIB), (GIB - 4096, 4096)];
    qemu_io(&f, &write_cmds(&w2));
    let mut a = Model::new(size, 65536);
    let mut b = Model::new(size, 4096);
    let mut c = Model::new(size, 65536);
    for &(o, l) in &w1 {
        a.mark(o, l);
        b.mark(o, l);
        c.mark(o, l);
    }
    for &(o, l) in &w2 {
        a.mark(o, l);
        b.mark(o, l);
    }
    let want: Snapshot = [
        ("a".to_string(), model_state(&a, true)),
        ("b".to_string(), model_state(&b, true)),
        ("c".to_string(), model_state(&c, false)),
    ]
    .into();
    let bytes = std::fs::read(&f).unwrap();
    assert_eq!(
        snapshot_of_bytes(&bytes),
        want,
        "base image as QEMU wrote it"
    );
    (bytes, want)
}

/// 64 GiB, one bitmap "big" at 4 KiB granularity: 2 MiB of bitmap data,
/// 32 clusters of 64 KiB.
fn base_big(dir: &TempDir) -> (Vec<u8>, Snapshot) {
    let f = dir.join("big.qcow2");
    let size = 64 * GIB;
    qemu_img_create(&f, size, 65536, 16);
    qemu_bitmap_add(&f, "big", Some(4096), true);
    let w = [(7 * GIB, 64 * KIB), (33 * GIB + 4096, 1)];
    qemu_io(&f, &write_cmds(&w));
    let mut m = Model::new(size, 4096);
    for &(o, l) in &w {
        m.mark(o, l);
    }
    let want: Snapshot = [("big".to_string(), model_state(&m, true))].into();
    let bytes = std::fs::read(&f).unwrap();
    assert_eq!(snapshot_of_bytes(&bytes), want);
    (bytes, want)
}

fn scenarios(dir: &TempDir) -> Vec<(Scenario, Snapshot)> {
    let mut out = Vec::new();
    let (std_base, std_old) = base_std(dir);
    let size = GIB;
    let with = |f: &dyn Fn(&mut Snapshot)| {
        let mut s = std_old.clone();
        f(&mut s);
        s
    };

    out.push(Scenario {
        name: "open+close",
        base: std_base.clone(),
        run: plain(|_| {}),
        new: std_old.clone(),
        random_per_cut: 24,
    });

    let added = [(3 * MIB, 5000), (700 * MIB + 1, 65536 * 3)];
    out.push(Scenario {
        name: "add",
        base: std_base.clone(),
        run: plain(move |img| {
            img.add_bitmap("new", Some(65536), true).unwrap();
            for &(o, l) in &added {
                img.set_range("new", o, l).unwrap();
            }
        }),
        new: with(&|s| {
            let mut m = Model::new(size, 65536);
            for &(o, l) in &added {
                m.mark(o, l);
            }
            s.insert("new".into(), model_state(&m, true));
        }),
        random_per_cut: 24,
    });

    out.push(Scenario {
        name: "remove",
        base: std_base.clone(),
        run: plain(|img| img.remove_bitmap("b").unwrap()),
        new: with(&|s| {
            s.remove("b");
        }),
        random_per_cut: 24,
    });

    out.push(Scenario {
        name: "clear",
        base: std_base.clone(),
        run: plain(|img| img.clear_bitmap("b").unwrap()),
        new: with(&|s| s.get_mut("b").unwrap().extents.clear()),
        random_per_cut: 24,
    });

    out.push(Scenario {
        name: "merge",
        base: std_base.clone(),
        run: plain(|img| {
            img.set_range("c", 900 * MIB, 5 * MIB).unwrap();
            img.merge_bitmap("a", img, "c").unwrap();
            img.merge_bitmap("b", img, "a").unwrap();
        }),
        new: with(&|s| {
            let mut c = model_of(size, &s["c"]);
            c.mark(900 * MIB, 5 * MIB);
            let mut a = model_of(size, &s["a"]);
            a.merge(&c);
            let mut b = model_of(size, &s["b"]);
            b.merge(&a);
            s.get_mut("a").unwrap().extents = a.extents();
            s.get_mut("b").unwrap().extents = b.extents();
            s.get_mut("c").unwrap().extents = c.extents();
        }),
        random_per_cut: 24,
    });

    // Lazy opens: a streamed merge (new data clusters and table written
    // beside the old ones) and the clear of a bitmap never loaded.
    out.push(Scenario {
        name: "lazy merge+clear",
        base: std_base.clone(),
        run: plain(|img| {
            img.merge_bitmap("a", img, "c").unwrap();
            img.merge_bitmap("c", img, "a").unwrap();
            img.clear_bitmap("b").unwrap();
        }),
        new: with(&|s| {
            let a = s["a"].extents.clone();
            s.get_mut("c").unwrap().extents = a;
            s.get_mut("b").unwrap().extents.clear();
        }),
        random_per_cut: 24,
    });

    out.push(Scenario {
        name: "rename",
        base: std_base.clone(),
        run: plain(|img| img.rename_bitmap("a", "a-renamed-longer").unwrap()),
        new: with(&|s| {
            let a = s.remove("a").unwrap();
            s.insert("a-renamed-longer".into(), a);
        }),
        random_per_cut: 24,
    });

    out.push(Scenario {
        name: "disable+enable",
        base: std_base.clone(),
        run: plain(|img| {
            img.disable_bitmap("b").unwrap();
            img.enable_bitmap("c").unwrap();
        }),
        new: with(&|s| {
            s.get_mut("b").unwrap().enabled = false;
            s.get_mut("c").unwrap().enabled = true;
        }),
        random_per_cut: 24,
    });

    // Several stores in one session: freed clusters are reused while the
    // frees before them may still be unflushed.
    out.push(Scenario {
        name: "flush cycles",
        base: std_base.clone(),
        run: Box::new(|img| {
            let mut between = Vec::new();
            img.set_range("a", 5 * MIB, 1).unwrap();
            img.flush().unwrap();
            between.push(snapshot_of(img));
            img.remove_bitmap("b").unwrap();
            img.flush().unwrap();
            between.push(snapshot_of(img));
            img.add_bitmap("b2", Some(4096), false).unwrap();
            img.set_range("b2", 0, 10 * MIB).unwrap();
            img.flush().unwrap();
            between.push(snapshot_of(img));
            img.clear_bitmap("c").unwrap();
            img.merge_bitmap("a", img, "b2").unwrap();
            between
        }),
        new: with(&|s| {
            s.remove("b");
            let mut b2 = Model::new(size, 4096);
            b2.mark(0, 10 * MIB);
            let mut a = model_of(size, &s["a"]);
            a.mark(5 * MIB, 1);
            a.merge(&b2);
            s.get_mut("a").unwrap().extents = a.extents();
            s.get_mut("c").unwrap().extents.clear();
            s.insert("b2".into(), model_state(&b2, false));
        }),
        random_per_cut: 24,
    });

    // A bitmap left in_use by a crash can only be removed; its clusters
    // are freed from its table.
    {
        let st = qbm::storage::MemoryStorage::new(std_base.clone());
        let shared = std::sync::Arc::new(st);
        let img = Image::open_storage(
            Box::new(shared.clone()),
            "crashed",
            OpenOptions::read_write(),
        )
        .unwrap();
        // A crash: the handle is never closed, the bitmaps stay in_use.
        std::mem::forget(img);
        let base = shared.contents();
        let mut new = snapshot_of_bytes(&base);
        assert!(new.values().all(|b| b.in_use), "setup: bitmaps in_use");
        new.remove("b");
        out.push(Scenario {
            name: "remove in_use",
            base,
            run: plain(|img| img.remove_bitmap("b").unwrap()),
            new,
            random_per_cut: 24,
        });
    }

    // An unknown extension after the bitmaps extension (where QEMU puts
    // unknown ones): removing every bitmap leaves the bitmaps extension in
    // place, stale, rather than shifting the unknown one; a new bitmap
    // reuses it in place.
    {
        let mut base = std_base.clone();
        let (exts, end) = raw_extensions(&base);
        assert_eq!(
            exts.last().unwrap().magic,
            0x2385_2875,
            "setup: bitmaps last"
        );
        let unknown = [
            0x12u8, 0x34, 0x56, 0x78, 0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o', 0, 0, 0,
        ];
        base[end..end + 16].copy_from_slice(&unknown);
        base[end + 16..end + 24].fill(0);
        let mut again = Model::new(size, 65536);
        again.mark(77 * MIB, 3);
        out.push(Scenario {
            name: "unknown ext after",
            base,
            run: Box::new(|img| {
                for n in ["a", "b", "c"] {
                    img.remove_bitmap(n).unwrap();
                }
                img.flush().unwrap();
                let between = vec![snapshot_of(img)];
                img.add_bitmap("again", Some(65536), true).unwrap();
                img.set_range("again", 77 * MIB, 3).unwrap();
                between
            }),
            new: [("again".to_string(), model_state(&again, true))].into(),
            random_per_cut: 24,
        });
    }

    // The last bitmap goes: the extension and autoclear bit 0 go with it.
    out.push(Scenario {
        name: "remove all",
        base: std_base.clone(),
        run: plain(|img| {
            for n in ["a", "b", "c"] {
                img.remove_bitmap(n).unwrap();
            }
        }),
        new: Snapshot::new(),
        random_per_cut: 24,
    });

    // The first bitmap of an image: the extension and autoclear bit 0 appear.
    {
        let f = dir.join("plain.qcow2");
        qemu_img_create(&f, size, 65536, 16);
        qemu_io(&f, &write_cmds(&[(0, MIB)]));
        let mut m = Model::new(size, 4096);
        m.mark(12345, 678);
        let base = std::fs::read(&f).unwrap();
        out.push(Scenario {
            name: "first add",
            base,
            run: plain(|img| {
                img.add_bitmap("first", Some(4096), true).unwrap();
                img.set_range("first", 12345, 678).unwrap();
            }),
            new: [("first".to_string(), model_state(&m, true))].into(),
            random_per_cut: 24,
        });
    }

    // The same with a backing file whose name sits right after the extensions.
    {
        let back = dir.join("back.qcow2");
        qemu_img_create(&back, size, 65536, 16);
        let f = dir.join("overlay.qcow2");
        run(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg("back.qcow2")
            .arg(&f)
            .current_dir(dir.path()));
        let mut m = Model::new(size, 65536);
        m.mark(GIB - 1, 1);
        let base = std::fs::read(&f).unwrap();
        out.push(Scenario {
            name: "first add, backing",
            base,
            run: plain(|img| {
                img.add_bitmap("first", None, true).unwrap();
                img.set_range("first", GIB - 1, 1).unwrap();
            }),
            new: [("first".to_string(), model_state(&m, true))].into(),
            random_per_cut: 24,
        });
    }

    // Big bitmaps: dense (every data cluster written) and sparse (a few
    // data clusters, an all-ones cluster, the rest zero entries).
    let (big_base, big_old) = base_big(dir);
    let big = 64 * GIB;
    {
        let mut rng = Rng::new(0xC0FFEE);
        let ranges: Vec<(u64, u64)> = (0..3000)
            .map(|_| {
                let o = rng.below(big);
                (o, rng.range(1, 40 * KIB).min(big - o))
            })
            .collect();
        let mut m = model_of(big, &big_old["big"]);
        for &(o, l) in &ranges {
            m.mark(o, l);
        }
        out.push(Scenario {
            name: "dense store",
            base: big_base.clone(),
            run: plain(move |img| {
                for &(o, l) in &ranges[..2000] {
                    img.set_range("big", o, l).unwrap();
                }
                img.flush().unwrap();
                for &(o, l) in &ranges[2000..] {
                    img.set_range("big", o, l).unwrap();
                }
            }),
            new: [("big".to_string(), model_state(&m, true))].into(),
            random_per_cut: 6,
        });
    }
    {
        let ranges = [(2 * GIB, 2 * GIB), (10 * GIB, 4096), (40 * GIB + 5, 1)];
        out.push(Scenario {
            name: "sparse store",
            base: big_base.clone(),
            run: plain(move |img| {
                img.reset_range("big", 0, big).unwrap();
                for &(o, l) in &ranges {
                    img.set_range("big", o, l).unwrap();
                }
            }),
            new: [("big".to_string(), {
                let mut m = Model::new(big, 4096);
                for &(o, l) in &ranges {
                    m.mark(o, l);
                }
                model_state(&m, true)
            })]
            .into(),
            random_per_cut: 6,
        });
    }

    // Refcount growth: 512-byte clusters with 64-bit refcounts put 64
    // clusters under a block and 4096 under the first table; the base file
    // is just below 4096 clusters, so the store needs new blocks and a
    // bigger table.
    {
        let f = dir.join("growth.qcow2");
        let gsize = 64 * MIB;
        qemu_img_create(&f, gsize, 512, 64);
        qemu_io(&f, &write_cmds(&[(0, 1900 * KIB)]));
        let mut rng = Rng::new(0x6F);
        let mut new = Snapshot::new();
        let mut plan = Vec::new();
        for i in 0..5 {
            let name = format!("g{i}");
            let mut m = Model::new(gsize, 512);
            let ranges: Vec<(u64, u64)> = (0..150)
                .map(|_| {
                    let o = rng.below(gsize);
                    (o, rng.range(1, 8 * KIB).min(gsize - o))
                })
                .collect();
            for &(o, l) in &ranges {
                m.mark(o, l);
            }
            new.insert(name.clone(), model_state(&m, true));
            plan.push((name, ranges));
        }
        out.push(Scenario {
            name: "refcount growth",
            base: std::fs::read(&f).unwrap(),
            run: plain(move |img| {
                for (name, ranges) in &plan {
                    img.add_bitmap(name, Some(512), true).unwrap();
                    for &(o, l) in ranges {
                        img.set_range(name, o, l).unwrap();
                    }
                }
            }),
            new,
            random_per_cut: 4,
        });
    }

    // Resizing: the header's size and L1 change in one sector; the bitmaps,
    // in_use on disk meanwhile, are stored at the new size afterwards.
    for (name, new_size) in [("resize shrink", 300 * MIB + 512), ("resize grow", 3 * GIB)] {
        out.push(Scenario {
            name,
            base: std_base.clone(),
            run: plain(move |img| img.resize(new_size).unwrap()),
            new: resized(&std_old, new_size),
            random_per_cut: 24,
        });
    }

    out.into_iter()
        .map(|s| {
            let old = snapshot_of_bytes(&s.base);
            (s, old)
        })
        .collect()
}

#[derive(Debug, Default, Clone)]
struct Row {
    name: &'static str,
    cut_points: usize,
    images: usize,
    with_leaks: usize,
    max_leaked: u64,
    with_in_use: usize,
    secs: f64,
    /// The first few failures (all cut points are still tried).
    failures: Vec<String>,
    failed: usize,
}

/// Variants tried at one cut point.
fn variants(cp: &CutPoint<'_>, random: u64) -> Vec<Cut> {
    let mut v = vec![Cut::DropUnflushed, Cut::KeepAll];
    let p = cp.last_write_pieces();
    if p > 1 {
        let mut ks = vec![1, 2, p / 2, p - 1];
        ks.retain(|&k| k >= 1 && k < p);
        ks.sort_unstable();
        ks.dedup();
        v.extend(ks.into_iter().map(|k| Cut::Torn { sectors: k }));
    }
    if cp.unflushed.len() > 1 || p > 1 {
        v.extend((0..random).map(|i| Cut::Random {
            seed: (cp.n as u64) << 8 | i,
        }));
    }
    v
}

fn run_scenario(s: &Scenario, old: &Snapshot, scratch: &Path) -> Row {
    let t = Instant::now();
    let rec = RecordingStorage::new(s.base.clone());
    let options = OpenOptions {
        lazy: s.name.starts_with("lazy"),
        ..OpenOptions::read_write()
    };
    let img = Image::open_storage(Box::new(rec.clone()), s.name, options)
        .unwrap_or_else(|e| panic!("{}: open: {e}", s.name));
    let between = (s.run)(&img);
    img.close()
        .unwrap_or_else(|e| panic!("{}: close: {e}", s.name));
    let final_bytes = rec.contents();
    assert_eq!(
        &snapshot_of_bytes(&final_bytes),
        &s.new,
        "{}: the completed run",
        s.name
    );
    let backing_file = Image::open_storage(
        Box::new(qbm::storage::MemoryStorage::new(s.base.clone())),
        "base",
        OpenOptions::read_only(),
    )
    .unwrap()
    .info()
    .unwrap()
    .backing_file;
    let mut states = vec![old.clone(), s.new.clone()];
    states.extend(between);
    let states = Expected {
        states,
        backing_file,
    };
    let v = verify_cut_image(&final_bytes, &states, scratch, s.name);
    assert_eq!(
        (v.leaks, v.in_use),
        (0, s.new.values().filter(|b| b.in_use).count()),
        "{}: the completed run leaks or leaves bitmaps in use",
        s.name
    );

    if s.name == "unknown ext after" {
        let (exts, _) = raw_extensions(&final_bytes);
        assert!(
            exts.iter()
                .any(|e| e.magic == 0x1234_5678 && e.data == b"hello"),
            "the unknown extension survives: {exts:?}"
        );
    }
    if s.name == "refcount growth" {
        let fields = |b: &[u8]| (be_u64(b, 48), be_u32(b, 56));
        assert_ne!(
            fields(&s.base),
            fields(&final_bytes),
            "the refcount table did not move: the scenario does not exercise growth"
        );
    }
    let ops = rec.ops();
    let mut row = Row {
        name: s.name,
        ..Row::default()
    };
    let mut seen = HashSet::new();
    for_each_cut(rec.initial(), &ops, |cp| {
        row.cut_points += 1;
        for cut in variants(cp, s.random_per_cut) {
            let image = cp.image(cut);
            let mut h = DefaultHasher::new();
            image.hash(&mut h);
            if !seen.insert(h.finish()) {
                continue;
            }
            let ctx = format!("{}: crash after write {} ({cut:?})", s.name, cp.n);
            row.images += 1;
            let v =
                match std::panic::catch_unwind(|| verify_cut_image(&image, &states, scratch, &ctx))
                {
                    Ok(v) => v,
                    Err(e) => {
                        row.failed += 1;
                        if row.failures.len() < 4 {
                            let m = panic_message(&e);
                            row.failures.push(if m.starts_with(s.name) {
                                m
                            } else {
                                format!("{ctx}: {m}")
                            });
                        }
                        continue;
                    }
                };
            if v.leaks > 0 {
                row.with_leaks += 1;
                row.max_leaked = row.max_leaked.max(v.leaks);
            }
            if v.in_use > 0 {
                row.with_in_use += 1;
            }
        }
    });
    row.secs = t.elapsed().as_secs_f64();
    row
}

fn panic_message(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(panic)".into())
}

#[test]
fn crash_at_every_write() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let t = Instant::now();
    let dir = TempDir::new("crash");
    let all = scenarios(&dir);
    // Failures are collected and reported together below.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let queue = Mutex::new(all.iter().collect::<Vec<_>>());
    let rows = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for w in 0..2 {
            let (queue, rows, dir) = (&queue, &rows, &dir);
            sc.spawn(move || {
                let scratch = dir.join(&format!("cut-{w}.qcow2"));
                loop {
                    let Some((s, old)) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let row = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_scenario(s, old, &scratch)
                    }))
                    .unwrap_or_else(|e| Row {
                        name: s.name,
                        failed: 1,
                        failures: vec![format!("{}: the run: {}", s.name, panic_message(&e))],
                        ..Row::default()
                    });
                    rows.lock().unwrap().push(row);
                }
            });
        }
    });
    std::panic::set_hook(hook);
    let mut rows = rows.into_inner().unwrap();
    rows.sort_by_key(|r| all.iter().position(|(s, _)| s.name == r.name));
    eprintln!(
        "\n{:<20} {:>10} {:>8} {:>11} {:>11} {:>10} {:>7} {:>7}",
        "scenario", "cut points", "images", "with leaks", "max leaked", "in_use", "failed", "secs"
    );
    for r in &rows {
        eprintln!(
            "{:<20} {:>10} {:>8} {:>11} {:>11} {:>10} {:>7} {:>7.1}",
            r.name,
            r.cut_points,
            r.images,
            r.with_leaks,
            r.max_leaked,
            r.with_in_use,
            r.failed,
            r.secs
        );
    }
    let total = |f: fn(&Row) -> usize| rows.iter().map(f).sum::<usize>();
    eprintln!(
        "{:<20} {:>10} {:>8} {:>11} {:>11} {:>10} {:>7} {:>7.1}\n",
        "total",
        total(|r| r.cut_points),
        total(|r| r.images),
        total(|r| r.with_leaks),
        rows.iter().map(|r| r.max_leaked).max().unwrap_or(0),
        total(|r| r.with_in_use),
        total(|r| r.failed),
        t.elapsed().as_secs_f64()
    );
    for r in &rows {
        for f in &r.failures {
            eprintln!("FAILED {f}\n");
        }
    }
    assert_eq!(rows.len(), all.len(), "a scenario's run itself failed");
    assert_eq!(total(|r| r.failed), 0, "cut images failed verification");
}
