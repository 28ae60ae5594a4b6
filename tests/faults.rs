//! Full disks and I/O errors: for every write (and every flush) of a run,
//! a storage fails it with ENOSPC or EIO. The call must return that errno
//! with a message saying what failed; the image must stay usable in memory;
//! the bytes on disk at that moment must be a valid image with every bitmap
//! old, new or in_use; and once the storage recovers, a retry must persist
//! exactly the expected result.

mod common;

use common::cut_check::{snapshot_of, snapshot_of_bytes, verify_cut_image, Expected, Snapshot};
use common::fault_storage::FailingStorage;
use common::*;
use qbm::image::{Image, OpenOptions};
use qbm::Error;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// One management call after the open, then a flush (or the close).
struct Step {
    what: &'static str,
    /// Changes the bitmaps in memory (no I/O).
    change: Box<dyn Fn(&Image)>,
}

struct Run {
    name: &'static str,
    base: Vec<u8>,
    steps: Vec<Step>,
    backing_file: Option<String>,
}

/// What failed, for the summary.
#[derive(Default)]
struct Tally {
    runs: usize,
    failed_calls: usize,
    in_open: usize,
    in_flush: usize,
    in_close: usize,
    max_leaks: u64,
    /// Runs whose failed open left the bitmaps flagged in_use.
    lost_in_use: usize,
    /// Faults in freeing after a durable store: no error, clusters leaked.
    absorbed: usize,
}

fn std_run(dir: &TempDir) -> Run {
    let f = dir.join("std.qcow2");
    qemu_img_create(&f, 256 * MIB, 65536, 16);
    qemu_bitmap_add(&f, "a", Some(65536), true);
    qemu_bitmap_add(&f, "b", Some(4096), true);
    qemu_bitmap_add(&f, "c", Some(65536), false);
    qemu_io(&f, &write_cmds(&[(0, 4096), (10 * MIB + 3, 300 * KIB)]));
    Run {
        name: "add/merge/remove",
        base: std::fs::read(&f).unwrap(),
        steps: vec![
            Step {
                what: "add + set_range",
                change: Box::new(|img| {
                    img.add_bitmap("n", Some(4096), true).unwrap();
                    img.set_range("n", 5 * MIB, 3 * MIB).unwrap();
                    img.set_range("c", 100 * MIB, 1).unwrap();
                }),
            },
            Step {
                what: "merge",
                change: Box::new(|img| {
                    img.merge_bitmap("n", img, "a").unwrap();
                    img.mark_dirty(200 * MIB, 64 * KIB).unwrap();
                }),
            },
            Step {
                what: "remove + rename + disable",
                change: Box::new(|img| {
                    img.remove_bitmap("b").unwrap();
                    img.rename_bitmap("c", "c2").unwrap();
                    img.disable_bitmap("a").unwrap();
                }),
            },
            Step {
                what: "remove all",
                change: Box::new(|img| {
                    for n in ["a", "c2", "n"] {
                        img.remove_bitmap(n).unwrap();
                    }
                }),
            },
            Step {
                what: "first add again",
                change: Box::new(|img| {
                    img.add_bitmap("z", Some(65536), false).unwrap();
                    img.set_range("z", 0, 1).unwrap();
                }),
            },
        ],
        backing_file: None,
    }
}

/// An overlay whose backing file name sits right after the extensions:
/// the first bitmap moves it.
fn backing_run(dir: &TempDir) -> Run {
    let back = dir.join("back.qcow2");
    qemu_img_create(&back, 64 * MIB, 65536, 16);
    let f = dir.join("overlay.qcow2");
    run(std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg("back.qcow2")
        .arg(&f)
        .current_dir(dir.path()));
    Run {
        name: "backing, first add",
        base: std::fs::read(&f).unwrap(),
        steps: vec![Step {
            what: "add",
            change: Box::new(|img| {
                img.add_bitmap("first", None, true).unwrap();
                img.set_range("first", 0, MIB).unwrap();
            }),
        }],
        backing_file: Some("back.qcow2".into()),
    }
}

/// 512-byte clusters, 64-bit refcounts, a file just below the 4096
/// clusters the first refcount table covers: the stores grow it.
fn growth_run(dir: &TempDir) -> Run {
    let f = dir.join("growth.qcow2");
    let size = 64 * MIB;
    qemu_img_create(&f, size, 512, 64);
    qemu_io(&f, &write_cmds(&[(0, 1900 * KIB)]));
    let steps = (0..3)
        .map(|i| Step {
            what: "add two dense bitmaps",
            change: Box::new(move |img: &Image| {
                let mut rng = Rng::new(0x90 + i);
                for j in 0..2 {
                    let name = format!("g{i}{j}");
                    img.add_bitmap(&name, Some(512), true).unwrap();
                    for _ in 0..100 {
                        let o = rng.below(size);
                        img.set_range(&name, o, rng.range(1, 8 * KIB).min(size - o))
                            .unwrap();
                    }
                }
            }) as Box<dyn Fn(&Image)>,
        })
        .collect();
    Run {
        name: "refcount growth",
        base: std::fs::read(&f).unwrap(),
        steps,
        backing_file: None,
    }
}

fn open_rw(st: &FailingStorage) -> qbm::Result<Image> {
    Image::open_storage(Box::new(st.clone()), "disk", OpenOptions::read_write())
}

/// The in-memory states after each step, from a run without faults; and
/// the number of writes and flushes that run makes.
fn dry_run(run: &Run) -> (Vec<Snapshot>, usize, usize) {
    let st = FailingStorage::new(run.base.clone());
    let mut states = vec![snapshot_of_bytes(&run.base)];
    let img = open_rw(&st).unwrap();
    for s in &run.steps {
        (s.change)(&img);
        img.flush().unwrap();
        states.push(snapshot_of(&img));
    }
    img.close().unwrap();
    assert_eq!(&snapshot_of_bytes(&st.contents()), states.last().unwrap());
    (states, st.control().writes(), st.control().flushes())
}

/// Checks an error from a failing storage and the disk it left.
fn check_failure(
    e: &Error,
    errno: i32,
    st: &FailingStorage,
    expected: &Expected,
    scratch: &std::path::Path,
    ctx: &str,
) -> u64 {
    assert_eq!(e.errno(), errno, "{ctx}: errno of {e}");
    let msg = e.to_string();
    assert!(
        ["writing", "flushing", "pointing"]
            .iter()
            .any(|w| msg.contains(w))
            && msg.starts_with("disk: "),
        "{ctx}: the message should say what failed: {msg}"
    );
    let os = std::io::Error::from_raw_os_error(errno).to_string();
    assert!(
        msg.contains(&os),
        "{ctx}: the message should carry '{os}': {msg}"
    );
    verify_cut_image(&st.contents(), expected, scratch, ctx).leaks
}

/// Which operation fails, and how.
#[derive(Clone, Copy)]
struct Fault {
    /// A flush rather than a write.
    flush: bool,
    /// 1-based index among the writes (or flushes) of the run.
    n: usize,
    errno: i32,
    /// Keep failing until the storage recovers.
    sticky: bool,
}

/// One run with one fault.
fn faulty_run(
    run: &Run,
    states: &[Snapshot],
    fault: Fault,
    scratch: &std::path::Path,
    tally: &mut Tally,
) {
    let Fault {
        flush,
        n,
        errno,
        sticky,
    } = fault;
    let what = if flush { "flush" } else { "write" };
    let ctx = format!(
        "{}: {what} {n} fails with errno {errno} (sticky {sticky})",
        run.name
    );
    let expected = Expected {
        states: states.to_vec(),
        backing_file: run.backing_file.clone(),
    };
    let st = FailingStorage::new(run.base.clone());
    if flush {
        st.control().fail_flush(n, errno, sticky);
    } else {
        st.control().fail_write(n, errno, sticky);
    }
    tally.runs += 1;
    let failed_before = tally.failed_calls;
    let img = match open_rw(&st) {
        Ok(img) => img,
        Err(e) => {
            let ctx = format!("{ctx}, in open");
            tally.failed_calls += 1;
            tally.in_open += 1;
            let leaks = check_failure(&e, errno, &st, &expected, scratch, &ctx);
            tally.max_leaks = tally.max_leaks.max(leaks);
            st.control().recover();
            let img = open_rw(&st).unwrap_or_else(|e| panic!("{ctx}: open after recovery: {e}"));
            if img.bitmaps().unwrap().iter().any(|b| b.in_use) {
                // The flag reached the disk and the failing disk kept it
                // from being cleared: the bitmaps are lost, as with a crash.
                tally.lost_in_use += 1;
                return;
            }
            img
        }
    };
    for (i, s) in run.steps.iter().enumerate() {
        (s.change)(&img);
        if let Err(e) = img.flush() {
            let ctx = format!("{ctx}, in the flush after step {} ({})", i + 1, s.what);
            tally.failed_calls += 1;
            tally.in_flush += 1;
            let leaks = check_failure(&e, errno, &st, &expected, scratch, &ctx);
            tally.max_leaks = tally.max_leaks.max(leaks);
            assert_eq!(
                snapshot_of(&img),
                states[i + 1],
                "{ctx}: the bitmaps in memory after the failure"
            );
            st.control().recover();
            img.flush()
                .unwrap_or_else(|e| panic!("{ctx}: flush after recovery: {e}"));
        }
        assert_eq!(
            snapshot_of(&img),
            states[i + 1],
            "{ctx}: after step {}",
            i + 1
        );
    }
    let last = states.last().unwrap();
    match img.close() {
        Ok(()) => {
            assert!(st.control().failures() > 0, "{ctx}: nothing failed");
            let bytes = st.contents();
            assert_eq!(
                &snapshot_of_bytes(&bytes),
                last,
                "{ctx}: the persisted result"
            );
            let v = verify_cut_image(&bytes, &expected, scratch, &ctx);
            tally.max_leaks = tally.max_leaks.max(v.leaks);
            if tally.failed_calls == failed_before {
                // Only a failure to free clusters after a durable store is
                // absorbed: the store succeeded, the clusters leak.
                assert!(v.leaks > 0, "{ctx}: a fault vanished without a trace");
                tally.absorbed += 1;
            }
        }
        Err(e) => {
            let ctx = format!("{ctx}, in close");
            tally.failed_calls += 1;
            tally.in_close += 1;
            let leaks = check_failure(&e, errno, &st, &expected, scratch, &ctx);
            tally.max_leaks = tally.max_leaks.max(leaks);
            // The handle is gone; the image opens again once the disk works.
            st.control().recover();
            let img = open_rw(&st).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
            img.close().unwrap();
            verify_cut_image(&st.contents(), &expected, scratch, &ctx);
        }
    }
}

#[test]
fn every_write_and_flush_fails_once() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("faults");
    let scratch = dir.join("at-failure.qcow2");
    eprintln!(
        "\n{:<18} {:>6} {:>7} {:>5} {:>7} {:>6} {:>6} {:>6} {:>9} {:>10}",
        "run",
        "writes",
        "flushes",
        "runs",
        "errors",
        "open",
        "flush",
        "close",
        "absorbed",
        "max leaks"
    );
    eprintln!("(in_use after a failed open: the count in parentheses)");
    for run in [std_run(&dir), growth_run(&dir), backing_run(&dir)] {
        let (states, writes, flushes) = dry_run(&run);
        let mut tally = Tally::default();
        for (errno, sticky) in [(libc::ENOSPC, true), (libc::EIO, false)] {
            let faults = (1..=writes)
                .map(|n| (false, n))
                .chain((1..=flushes).map(|n| (true, n)));
            for (flush, n) in faults {
                let fault = Fault {
                    flush,
                    n,
                    errno,
                    sticky,
                };
                faulty_run(&run, &states, fault, &scratch, &mut tally);
            }
        }
        eprintln!(
            "{:<18} {:>6} {:>7} {:>5} {:>7} {:>6} {:>6} {:>6} {:>9} {:>10}",
            run.name,
            writes,
            flushes,
            tally.runs,
            tally.failed_calls,
            format!("{}({})", tally.in_open, tally.lost_in_use),
            tally.in_flush,
            tally.in_close,
            tally.absorbed,
            tally.max_leaks
        );
        assert_eq!(
            tally.failed_calls + tally.absorbed,
            tally.runs,
            "{}: every injected fault surfaces as an error or a leak",
            run.name
        );
    }
}
