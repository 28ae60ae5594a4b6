//! Batched marking (`Image::mark_dirty_many`, `qbm_mark_dirty_many`): a
//! batch must set exactly the bits that one `mark_dirty` per range sets,
//! in sparse and flat bitmaps of several granularities, and a batch with
//! one bad range must set nothing. What a batch marked, QEMU reads back.

mod common;

use common::*;
use qbm::image::{Image, OpenOptions};
use qbm::ByteRange;
use std::path::Path;

const GIB: u64 = 1 << 30;
const GRANULARITIES: [(&str, u64); 3] = [("g64k", 64 << 10), ("g512", 512), ("g2m", 2 << 20)];

fn new_image(path: &Path, size: u64) -> Image {
    let img = create_image(path, size);
    for (name, g) in GRANULARITIES {
        img.add_bitmap(name, Some(g), true).unwrap();
    }
    img.add_bitmap("disabled", None, false).unwrap();
    img
}

/// A guest write: mostly 4 KiB at random, some spanning granules, some
/// empty, some ending exactly at the end of the disk.
fn random_range(rng: &mut Rng, size: u64) -> ByteRange {
    match rng.below(10) {
        0 => ByteRange {
            offset: rng.below(size),
            length: 0,
        },
        1 => {
            let length = 1 + rng.below(256 << 10);
            ByteRange {
                offset: size - length,
                length,
            }
        }
        2 | 3 => {
            let offset = rng.below(size);
            ByteRange {
                offset,
                length: 1 + rng.below((size - offset).min(256 << 10)),
            }
        }
        _ => ByteRange {
            offset: rng.below(size / 4096) * 4096,
            length: 4096,
        },
    }
}

fn extents(img: &Image, name: &str) -> Vec<(u64, u64)> {
    img.extents(name).unwrap().collect()
}

/// The dirty runs a bitmap of granularity `g` must hold after `ranges`,
/// computed without the library.
fn model_runs(ranges: &[ByteRange], g: u64, size: u64) -> Vec<(u64, u64)> {
    let mut model = Model::new(size, g);
    for r in ranges {
        model.mark(r.offset, r.length);
    }
    model.extents()
}

#[test]
fn a_batch_sets_what_single_marks_set() {
    let size = GIB + 12345 * 512; // a disk that ends inside a granule
    let dir = TempDir::new("many");
    let (pa, pb) = (dir.join("batch.qcow2"), dir.join("single.qcow2"));
    let (mut batched, mut single) = (new_image(&pa, size), new_image(&pb, size));
    let mut rng = Rng::new(0x2545F4914F6CDD1D);
    let mut all = Vec::new();
    for round in 0..300 {
        let n = rng.below(80) as usize;
        let batch: Vec<ByteRange> = (0..n).map(|_| random_range(&mut rng, size)).collect();
        batched.mark_dirty_many(&batch).unwrap();
        for r in &batch {
            single.mark_dirty(r.offset, r.length).unwrap();
        }
        all.extend_from_slice(&batch);
        if round == 149 {
            // Dense bitmaps load in the flat layout: the later rounds run
            // the flat (prefetching) batch path, the earlier the sparse one.
            batched.close().unwrap();
            single.close().unwrap();
            batched = Image::open(&pa, OpenOptions::read_write()).unwrap();
            single = Image::open(&pb, OpenOptions::read_write()).unwrap();
        }
    }
    for (name, g) in GRANULARITIES {
        let want = model_runs(&all, g, size);
        // Dense enough to go flat, scattered enough to compare many runs
        // (the 2 MiB bitmap ends up fully dirty).
        assert!(
            want.len() > 100 || g == 2 << 20,
            "{name}: {} runs",
            want.len()
        );
        assert_eq!(extents(&batched, name), want, "{name}: batched marks");
        assert_eq!(extents(&single, name), want, "{name}: single marks");
    }
    assert!(extents(&batched, "disabled").is_empty());
    batched.close().unwrap();
    single.close().unwrap();

    // Stored as marked: our reopen and QEMU's export see the same runs.
    let img = Image::open(&pa, OpenOptions::default()).unwrap();
    for (name, g) in GRANULARITIES {
        assert_eq!(
            extents(&img, name),
            model_runs(&all, g, size),
            "{name} reopened"
        );
    }
    drop(img);
    if have_tools(&["qemu-img", "qemu-nbd", "nbdinfo"]) {
        qemu_img_check(&pa); // panics unless clean
        for (name, g) in GRANULARITIES {
            let theirs = merge_runs(nbd_dirty_extents(&pa, name));
            assert_eq!(theirs, model_runs(&all, g, size), "{name} through qemu-nbd");
        }
    }
}

#[test]
fn a_batch_with_a_bad_range_marks_nothing() {
    let size = 64 << 20;
    let dir = TempDir::new("many-bad");
    let path = dir.join("disk.qcow2");
    let img = new_image(&path, size);
    let good = ByteRange {
        offset: 4096,
        length: 4096,
    };
    let bad_batches = [
        (
            vec![
                good,
                good,
                ByteRange {
                    offset: size - 512,
                    length: 1024,
                },
            ],
            "range 2 of 3",
        ),
        (
            vec![
                good,
                ByteRange {
                    offset: u64::MAX - 1,
                    length: 4,
                },
            ],
            "range 1 of 2",
        ),
        (
            vec![ByteRange {
                offset: size,
                length: 1,
            }],
            "range 0 of 1",
        ),
    ];
    for (batch, which) in bad_batches {
        let e = img.mark_dirty_many(&batch).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "{which}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(which) && msg.contains("past the end"), "{msg}");
        for (name, _) in GRANULARITIES {
            assert!(extents(&img, name).is_empty(), "{which}: {name} marked");
        }
    }
    // An empty batch marks nothing and succeeds.
    img.mark_dirty_many(&[]).unwrap();
    assert!(extents(&img, "g64k").is_empty());
    img.mark_dirty_many(&[good]).unwrap();
    assert_eq!(extents(&img, "g64k"), vec![(0, 64 << 10)]);
    img.close().unwrap();

    // Read-only and lazy opens track nothing: refused with their reason.
    let ro = Image::open(&path, OpenOptions::read_only()).unwrap();
    assert_eq!(
        ro.mark_dirty_many(&[good]).unwrap_err().errno(),
        libc::EROFS
    );
    drop(ro);
    let lazy = Image::open(&path, lazy(true)).unwrap();
    let e = lazy.mark_dirty_many(&[good]).unwrap_err();
    assert!(e.to_string().contains("lazily"), "{e}");
}
