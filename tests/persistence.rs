//! Persistence rules of FORMAT.md section 5 that need hand-made images:
//! stale extensions, extra data, autoclear bit 0. QEMU's tools confirm the
//! results where they are installed.

use qbm::format::bitmap_dir::{self, FLAG_EXTRA_DATA_COMPATIBLE};
use qbm::format::extension::{self, BitmapsExtension};
use qbm::format::header::{self, Header};
use qbm::image::{CreateOptions, Image, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

fn temp_image(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qbm-persistence-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("disk.qcow2")
}

fn qemu_img_present() -> bool {
    let present = Command::new("qemu-img").arg("--version").output().is_ok();
    if !present {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "qemu-img is required under CI"
        );
        eprintln!("SKIPPED: qemu-img missing");
    }
    present
}

/// `qemu-img check` exit status: 0 clean, 2 corruption, 3 leaks only.
fn qemu_img_check(path: &Path) -> i32 {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(path)
        .output()
        .unwrap();
    out.status.code().unwrap()
}

fn read_cluster0(path: &Path) -> (Header, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let h = Header::parse(&bytes).unwrap();
    let c0 = bytes[..h.cluster_size() as usize].to_vec();
    (h, c0)
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// An image with one bitmap "b" (64 KiB granularity) dirty at [1 MiB, +64 KiB).
fn image_with_bitmap(path: &Path) {
    let img = Image::create(
        path,
        &CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    img.add_bitmap("b", Some(65536), true).unwrap();
    img.mark_dirty(1 << 20, 1).unwrap();
    img.close().unwrap();
}

fn extents(path: &Path, name: &str) -> Vec<(u64, u64)> {
    let img = Image::open(path, OpenOptions::read_only()).unwrap();
    let e = img.extents(name).unwrap().collect();
    img.close().unwrap();
    e
}

#[test]
fn stale_extension_is_ignored_and_dropped_by_a_writer() {
    let path = temp_image("stale");
    image_with_bitmap(&path);
    // An older program opened the image read-write: autoclear bit 0 is gone.
    let (mut h, _) = read_cluster0(&path);
    h.autoclear_features &= !header::AUTOCLEAR_BITMAPS;
    write_at(&path, 88, &h.autoclear_features.to_be_bytes());

    let ro = Image::open(&path, OpenOptions::read_only()).unwrap();
    assert!(
        ro.bitmaps().unwrap().is_empty(),
        "stale bitmaps must not be presented"
    );
    ro.close().unwrap();
    let (_, c0) = read_cluster0(&path);
    let exts = extension::parse_all(&c0, h.header_length as usize).unwrap();
    assert!(
        exts.iter().any(|e| e.magic == extension::BITMAPS),
        "a reader changes nothing"
    );

    Image::open(&path, OpenOptions::read_write())
        .unwrap()
        .close()
        .unwrap();
    let (h2, c0) = read_cluster0(&path);
    let exts = extension::parse_all(&c0, h2.header_length as usize).unwrap();
    assert!(
        !exts.iter().any(|e| e.magic == extension::BITMAPS),
        "a writer drops the stale extension"
    );
    assert_eq!(h2.autoclear_features & header::AUTOCLEAR_BITMAPS, 0);
    if qemu_img_present() {
        // The stale directory, table and data are leaks, never corruption.
        assert_eq!(
            qemu_img_check(&path),
            3,
            "stale clusters are counted as leaks"
        );
    }
}

/// Rewrites bitmap "b"'s directory entry in place with `extra` as extra data.
fn give_extra_data(path: &Path, extra: &[u8], compatible: bool) {
    let (h, c0) = read_cluster0(path);
    let exts = extension::parse_all(&c0, h.header_length as usize).unwrap();
    let pos = exts
        .iter()
        .position(|e| e.magic == extension::BITMAPS)
        .unwrap();
    let mut ext = BitmapsExtension::parse(&exts[pos].data, h.cluster_size()).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let at = ext.directory_offset as usize;
    let mut entries = bitmap_dir::parse(
        &bytes[at..at + ext.directory_size as usize],
        ext.nb_bitmaps,
        h.size,
        h.cluster_size(),
    )
    .unwrap();
    entries[0].extra_data = extra.to_vec();
    if compatible {
        entries[0].flags |= FLAG_EXTRA_DATA_COMPATIBLE;
    }
    let dir = bitmap_dir::encode(&entries);
    assert!(
        dir.len() as u64 <= h.cluster_size(),
        "the directory still fits its cluster"
    );
    write_at(path, ext.directory_offset, &dir);
    ext.directory_size = dir.len() as u64;
    // The extension's payload sits 8 bytes after its magic/length header.
    let mut ext_at = h.header_length as usize;
    for e in &exts[..pos] {
        ext_at += 8 + e.data.len().next_multiple_of(8);
    }
    write_at(path, ext_at as u64 + 8, &ext.encode());
}

#[test]
fn compatible_extra_data_survives_changes() {
    let path = temp_image("extra-compatible");
    image_with_bitmap(&path);
    give_extra_data(&path, b"\x01\x02\x03\x04\x05", true);

    let img = Image::open(&path, OpenOptions::read_write()).unwrap();
    let info = img.bitmap_info("b").unwrap();
    assert!(info.usable);
    assert_eq!(info.extra_data, b"\x01\x02\x03\x04\x05");
    img.mark_dirty(8 << 20, 4096).unwrap();
    img.rename_bitmap("b", "renamed").unwrap();
    img.add_bitmap("other", None, true).unwrap();
    img.close().unwrap();

    let img = Image::open(&path, OpenOptions::read_only()).unwrap();
    assert_eq!(
        img.bitmap_info("renamed").unwrap().extra_data,
        b"\x01\x02\x03\x04\x05"
    );
    img.close().unwrap();
    assert_eq!(
        extents(&path, "renamed"),
        vec![(1 << 20, 65536), (8 << 20, 65536)]
    );
    if qemu_img_present() {
        // Measured: QEMU 10 refuses any bitmap extra data, compatible or not
        // (FORMAT.md says only incompatible extra data blocks use).
        let out = Command::new("qemu-img")
            .arg("info")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("extra data is not supported"));
    }
}

#[test]
fn incompatible_extra_data_makes_a_bitmap_untouchable_but_kept() {
    let path = temp_image("extra-incompatible");
    image_with_bitmap(&path);
    give_extra_data(&path, b"future", false);

    let img = Image::open(&path, OpenOptions::read_write()).unwrap();
    let info = img.bitmap_info("b").unwrap();
    assert!(!info.usable && !info.in_use);
    for e in [
        img.clear_bitmap("b").unwrap_err(),
        img.set_range("b", 0, 1).unwrap_err(),
        img.enable_bitmap("b").unwrap_err(),
        img.extents("b").err().unwrap(),
    ] {
        assert_eq!(e.errno(), libc::ENOTSUP, "{e}");
        assert!(e.to_string().contains("'b'"), "{e}");
    }
    img.add_bitmap("other", None, true).unwrap();
    img.mark_dirty(0, 1).unwrap();
    img.close().unwrap();

    let img = Image::open(&path, OpenOptions::read_only()).unwrap();
    let kept = img.bitmap_info("b").unwrap();
    assert_eq!(kept.extra_data, b"future");
    assert!(!kept.usable);
    img.close().unwrap();
    // Preserved untouched: flipping the bit back shows the original bits.
    give_extra_data(&path, b"future", true);
    assert_eq!(extents(&path, "b"), vec![(1 << 20, 65536)]);
}

#[test]
fn autoclear_bit0_follows_the_extension() {
    let path = temp_image("autoclear");
    let img = Image::create(
        &path,
        &CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    img.close().unwrap();
    assert_eq!(
        read_cluster0(&path).0.autoclear_features & header::AUTOCLEAR_BITMAPS,
        0
    );
    let before = std::fs::read(&path).unwrap();
    // A read-write session that changes nothing writes nothing.
    Image::open(&path, OpenOptions::read_write())
        .unwrap()
        .close()
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);

    let img = Image::open(&path, OpenOptions::read_write()).unwrap();
    img.add_bitmap("b", None, true).unwrap();
    img.close().unwrap();
    assert_ne!(
        read_cluster0(&path).0.autoclear_features & header::AUTOCLEAR_BITMAPS,
        0
    );

    let img = Image::open(&path, OpenOptions::read_write()).unwrap();
    img.remove_bitmap("b").unwrap();
    img.close().unwrap();
    let (h, c0) = read_cluster0(&path);
    assert_eq!(
        h.autoclear_features & header::AUTOCLEAR_BITMAPS,
        0,
        "no bitmaps, no bit"
    );
    let exts = extension::parse_all(&c0, h.header_length as usize).unwrap();
    assert!(!exts.iter().any(|e| e.magic == extension::BITMAPS));
    if qemu_img_present() {
        assert_eq!(
            qemu_img_check(&path),
            0,
            "removing the last bitmap frees everything"
        );
    }
}

#[test]
fn in_use_while_open_read_write_and_cleared_at_close() {
    let path = temp_image("in-use");
    image_with_bitmap(&path);
    let flags_on_disk = |path: &Path| {
        let img = Image::open(
            path,
            OpenOptions {
                force_share: true,
                ..Default::default()
            },
        )
        .unwrap();
        let b = img.bitmap_info("b").unwrap();
        (b.in_use, b.usable)
    };
    assert_eq!(flags_on_disk(&path), (false, true));
    let img = Image::open(&path, OpenOptions::read_write()).unwrap();
    assert_eq!(
        flags_on_disk(&path),
        (true, false),
        "flagged in_use as soon as opened read-write"
    );
    img.mark_dirty(4 << 20, 1).unwrap();
    img.flush().unwrap();
    assert_eq!(
        flags_on_disk(&path),
        (true, false),
        "flush keeps in_use: marks keep coming"
    );
    img.close().unwrap();
    assert_eq!(flags_on_disk(&path), (false, true));
    assert_eq!(
        extents(&path, "b"),
        vec![(1 << 20, 65536), (4 << 20, 65536)]
    );
}
