//! Resize against `qemu-img resize` as the oracle: the same image resized by
//! QEMU and by us must end up with the same virtual size, the same guest
//! content (`qemu-img compare`), the same bitmaps with the same bits (through
//! `qemu-nbd` + `nbdinfo`), and both must check clean.

mod common;

use common::*;
use qbm::image::{CreateOptions, Image, OpenOptions};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

fn extents(path: &Path, name: &str) -> Vec<(u64, u64)> {
    let img = Image::open(path, OpenOptions::read_only()).unwrap();
    let v = img.extents(name).unwrap().collect();
    img.close().unwrap();
    v
}

/// A QEMU-made image with three bitmaps and data near both ends.
fn base(dir: &TempDir, cluster_size: u64, size: u64) -> (PathBuf, Vec<(u64, u64)>) {
    let p = dir.join(&format!("base-{cluster_size}.qcow2"));
    qemu_img_create(&p, size, cluster_size, 16);
    qemu_bitmap_add(&p, "g64k", Some(65536), true);
    qemu_bitmap_add(&p, "g512", Some(512), true);
    qemu_bitmap_add(&p, "off", Some(4096), true);
    let writes = vec![
        (0, 4096),
        (3 * MIB + 512, 70000),
        (size / 2 - 512, 1024),
        (size - 3 * MIB, 2 * MIB),
        (size - 4096, 4096),
    ];
    qemu_io(&p, &write_cmds(&writes));
    qemu_bitmap(&p, &["--disable"], "off");
    (p, writes)
}

fn resize_with_qemu(path: &Path, size: u64) {
    run(Command::new("qemu-img")
        .args(["resize", "-q", "--shrink", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string()));
}

fn resize_with_qbm(path: &Path, size: u64) {
    let img = Image::open(path, OpenOptions::read_write()).unwrap();
    img.resize(size)
        .unwrap_or_else(|e| panic!("resize to {size}: {e}"));
    assert_eq!(img.size(), size);
    img.close().unwrap();
}

fn assert_same(ours: &Path, theirs: &Path, ctx: &str) {
    let a = qemu_img_info(ours, false);
    let b = qemu_img_info(theirs, false);
    assert_eq!(
        a.get("virtual-size").and_then(Json::as_u64),
        b.get("virtual-size").and_then(Json::as_u64),
        "{ctx}: virtual size"
    );
    assert_eq!(
        bitmaps_of(&a),
        bitmaps_of(&b),
        "{ctx}: bitmap list and flags"
    );
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
        .arg(ours)
        .arg(theirs));
    for name in ["g64k", "g512", "off"] {
        let want = nbd_dirty_extents(theirs, name);
        assert_eq!(
            nbd_dirty_extents(ours, name),
            want,
            "{ctx}: '{name}' via qemu-nbd"
        );
        assert_eq!(extents(ours, name), want, "{ctx}: '{name}' as we read it");
        assert_eq!(
            extents(theirs, name),
            want,
            "{ctx}: '{name}' of QEMU's image as we read it"
        );
    }
    qemu_img_check(ours);
    qemu_img_check(theirs);
}

/// Shrink (to sizes that cut through granules and L2 tables), then grow past
/// the original size, by QEMU and by us, step by step.
#[test]
fn resize_matches_qemu_img() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("resize");
    for (cluster_size, size) in [(65536, 64 * MIB), (512, 8 * MIB), (2 * MIB, 100 * MIB)] {
        let (base, _) = base(&dir, cluster_size, size);
        let ours = dir.join(&format!("ours-{cluster_size}.qcow2"));
        let theirs = dir.join(&format!("theirs-{cluster_size}.qcow2"));
        fs::copy(&base, &ours).unwrap();
        fs::copy(&base, &theirs).unwrap();
        for new_size in [
            size / 2 + 1536,
            3 * MIB + 1024,
            size * 3 + 512,
            size - 2 * MIB,
        ] {
            let ctx = format!("cluster {cluster_size}: {size} -> {new_size}");
            resize_with_qemu(&theirs, new_size);
            resize_with_qbm(&ours, new_size);
            assert_same(&ours, &theirs, &ctx);
        }
        // Space that came back after a shrink reads as zeros in both.
        qemu_io(&ours, &["read -P 0 4M 1M".to_string()]);
    }
}

/// Refusals leave the image byte for byte as it was, and say why.
#[test]
fn refused_resizes_change_nothing() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("resize-refused");
    let (p, _) = base(&dir, 65536, 16 * MIB);
    let check = |img: &Image, size: u64, errno: i32, text: &str| {
        let before = fs::read(&p).unwrap();
        let err = img
            .resize(size)
            .err()
            .unwrap_or_else(|| panic!("resize to {size} accepted"));
        assert_eq!(err.errno(), errno, "{err}");
        assert!(err.to_string().contains(text), "{err}");
        assert_eq!(img.size(), 16 * MIB);
        assert!(
            fs::read(&p).unwrap() == before,
            "refused resize to {size} wrote"
        );
    };
    let img = Image::open(&p, OpenOptions::read_write()).unwrap();
    img.flush().unwrap();
    check(&img, 16 * MIB + 100, libc::EINVAL, "multiple of 512");
    check(&img, 0, libc::EINVAL, "0-byte");
    img.close().unwrap();
    let ro = Image::open(&p, OpenOptions::read_only()).unwrap();
    check(&ro, 32 * MIB, libc::EROFS, "read-only");
    ro.close().unwrap();

    // An inconsistent bitmap (QEMU killed while it held the image).
    let killed = dir.join("killed.qcow2");
    fs::copy(&p, &killed).unwrap();
    let mut qemu = QemuIoSession::open(&killed, false);
    qemu.cmd("write 0 4k", "wrote");
    drop(qemu); // SIGKILL: the bitmaps stay in use
    let img = Image::open(&killed, OpenOptions::read_write()).unwrap();
    img.flush().unwrap();
    let before = fs::read(&killed).unwrap();
    let err = img.resize(32 * MIB).unwrap_err();
    assert_eq!(err.errno(), libc::EBUSY, "{err}");
    assert!(err.to_string().contains("'g64k' is inconsistent"), "{err}");
    assert!(fs::read(&killed).unwrap() == before);
    // Removing the inconsistent bitmaps makes it possible, as with QEMU.
    for name in ["g64k", "g512", "off"] {
        img.remove_bitmap(name).unwrap();
    }
    img.resize(32 * MIB).unwrap();
    img.close().unwrap();
    qemu_img_check(&killed);

    // Snapshots.
    let snap = dir.join("snap.qcow2");
    fs::copy(&p, &snap).unwrap();
    run(Command::new("qemu-img")
        .args(["snapshot", "-c", "s1"])
        .arg(&snap));
    let img = Image::open(&snap, OpenOptions::read_write()).unwrap();
    let err = img.resize(32 * MIB).unwrap_err();
    assert_eq!(err.errno(), libc::ENOTSUP, "{err}");
    img.close().unwrap();
}

/// A raw-disk companion grows within its data file (the new clusters map
/// to the raw file, as QEMU expects) and shrinks without touching it.
#[test]
fn raw_companion_resizes() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("resize-raw");
    let raw = dir.join("d.raw");
    let f = fs::File::create(&raw).unwrap();
    f.set_len(64 * MIB).unwrap();
    write_bytes(&raw, 40 * MIB, &[0x33; 4096]);
    let before = fs::read(&raw).unwrap();
    let p = dir.join("d.qcow2");
    let img = Image::create(
        &p,
        &CreateOptions {
            size: 16 * MIB,
            data_file: Some(raw.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    img.add_bitmap("b", None, true).unwrap();
    img.mark_dirty(MIB, 1).unwrap();
    let err = img.resize(128 * MIB).unwrap_err();
    assert!(
        err.to_string().contains("smaller than the new size"),
        "{err}"
    );
    img.resize(64 * MIB).unwrap();
    img.mark_dirty(50 * MIB, 1).unwrap();
    img.close().unwrap();
    assert!(
        fs::read(&raw).unwrap() == before,
        "resize wrote to the raw file"
    );
    qemu_img_check(&p);
    qemu_io(&p, &["read -P 0x33 40M 4k".to_string()]);
    assert_eq!(
        nbd_dirty_extents(&p, "b"),
        [(MIB, 65536), (50 * MIB, 65536)]
    );

    let img = Image::open(&p, OpenOptions::read_write()).unwrap();
    img.resize(8 * MIB).unwrap();
    img.close().unwrap();
    qemu_img_check(&p);
    assert_eq!(extents(&p, "b"), [(MIB, 65536)]);
    assert!(fs::read(&raw).unwrap() == before);
}

/// Marks that race with a resize are not lost: every range marked below
/// the smaller size, before or during the resize, is in the bitmap.
#[test]
fn marks_racing_with_resize_are_kept() {
    let dir = TempDir::new("resize-race");
    let p = dir.join("r.qcow2");
    let img = create_image(&p, 256 * MIB);
    img.add_bitmap("b", Some(65536), true).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let marked: Vec<Vec<u64>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2u64)
            .map(|t| {
                let img = &img;
                let stop = &stop;
                s.spawn(move || {
                    let mut rng = Rng::new(t + 1);
                    let mut mine = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let g = rng.below(128 * MIB / 65536);
                        img.mark_dirty(g * 65536, 1).unwrap();
                        mine.push(g);
                    }
                    mine
                })
            })
            .collect();
        for size in [512 * MIB, 128 * MIB, 300 * MIB, 128 * MIB + 512] {
            std::thread::sleep(std::time::Duration::from_millis(20));
            img.resize(size).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut want = Model::new(128 * MIB + 512, 65536);
    for g in marked.iter().flatten() {
        want.mark(g * 65536, 1);
    }
    assert!(
        marked.iter().all(|m| m.len() > 100),
        "the markers barely ran"
    );
    assert_eq!(
        img.extents("b").unwrap().collect::<Vec<_>>(),
        want.extents()
    );
    img.close().unwrap();
    assert_eq!(extents(&p, "b"), want.extents());
}

/// A mark just past the end while resizes move the end back and forth:
/// each call succeeds or fails with EINVAL naming the size it was checked
/// against (one at which the range did not fit), never anything else.
#[test]
fn marks_past_a_moving_end_fail_cleanly() {
    let dir = TempDir::new("resize-end");
    let p = dir.join("e.qcow2");
    let (small, large) = (128 * MIB, 129 * MIB);
    let img = create_image(&p, small);
    img.add_bitmap("b", Some(65536), true).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (ok, refused) = std::thread::scope(|s| {
        let marker = s.spawn(|| {
            let (mut ok, mut refused) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match img.mark_dirty(small, 4096) {
                    Ok(()) => ok += 1,
                    Err(qbm::Error::InvalidArgument(m)) => {
                        assert!(
                            m.contains(&format!("past the end of the disk ({small} bytes)")),
                            "{m}"
                        );
                        refused += 1;
                    }
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            (ok, refused)
        });
        for i in 0..1000 {
            img.resize(if i % 2 == 0 { large } else { small }).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        marker.join().unwrap()
    });
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    img.close().unwrap();
}
