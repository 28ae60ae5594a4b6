//! Bitmaps for raw disks: a qcow2 companion whose guest data lives in an
//! existing raw file (external data file, data-file-raw). QEMU is the oracle:
//! it must see the data file and our bitmaps, write guest data through the
//! companion into the raw file (dirtying our enabled bitmaps), and export
//! exactly our extents.

mod common;

use common::*;
use qbm::image::{CreateOptions, Image, OpenOptions};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

/// A raw file of `size` bytes with a recognisable pattern at a few places.
fn raw_disk(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    for (i, at) in [0, 3 * MIB, size - 4096].into_iter().enumerate() {
        write_bytes(&p, at, &vec![0x40 + i as u8; 4096]);
    }
    p
}

fn companion(path: &Path, raw: &Path, size: u64, cluster_size: u64) -> Image {
    Image::create(
        path,
        &CreateOptions {
            size,
            cluster_size,
            data_file: Some(raw.to_path_buf()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("create companion: {e}"))
}

fn extents(path: &Path, name: &str) -> Vec<(u64, u64)> {
    let img = Image::open(path, OpenOptions::read_only()).unwrap();
    let v = img.extents(name).unwrap().collect();
    img.close().unwrap();
    v
}

/// Our companion for a raw disk is what QEMU expects: the raw file is left
/// untouched, QEMU reads the data through it, writes through it land in the
/// raw file and dirty our enabled bitmap, and qemu-nbd exports our extents.
#[test]
fn companion_works_with_qemu() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("raw-companion");
    for (cluster_size, size) in [
        (65536, 64 * MIB),
        (4096, 10 * MIB + 512),
        (2 * MIB, 100 * MIB),
    ] {
        let raw = raw_disk(&dir, &format!("disk-{cluster_size}.raw"), size);
        let before = fs::read(&raw).unwrap();
        let img_path = dir.join(&format!("disk-{cluster_size}.qcow2"));
        let img = companion(&img_path, &raw, 0, cluster_size);
        assert_eq!(img.size(), size, "the virtual size is the raw file's");
        img.add_bitmap("on", Some(65536), true).unwrap();
        img.add_bitmap("off", None, false).unwrap();
        img.mark_dirty(5 * MIB, 100).unwrap();
        img.close().unwrap();
        assert!(
            fs::read(&raw).unwrap() == before,
            "libqbm wrote to the raw file"
        );

        let info = qemu_img_info(&img_path, false);
        let data = info
            .get("format-specific")
            .and_then(|f| f.get("data"))
            .unwrap();
        assert_eq!(
            data.get("data-file").and_then(Json::as_str),
            Some(raw.to_str().unwrap())
        );
        assert_eq!(
            data.get("data-file-raw").and_then(Json::as_bool),
            Some(true)
        );
        let names: Vec<String> = qemu_img_info_bitmaps(&img_path)
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert_eq!(names, ["on", "off"]);
        qemu_img_check(&img_path);

        // QEMU reads the raw data through the companion, and its writes go
        // to the raw file and into our enabled bitmap.
        qemu_io(
            &img_path,
            &[
                "read -P 0x40 0 4096".to_string(),
                "read -P 0x41 3M 4096".to_string(),
                "write -P 0x77 7M 8192".to_string(),
            ],
        );
        assert_eq!(read_bytes(&raw, 7 * MIB, 8192), vec![0x77; 8192]);
        let want = vec![(5 * MIB, 65536), (7 * MIB, 65536)];
        assert_eq!(extents(&img_path, "on"), want);
        assert_eq!(extents(&img_path, "off"), []);
        assert_eq!(nbd_dirty_extents(&img_path, "on"), want);
        qemu_img_check(&img_path);
    }
}

/// The same companion made from the CLI, size given explicitly.
#[test]
fn cli_creates_a_companion() {
    if !have_tools(&["qemu-img"]) {
        return;
    }
    let dir = TempDir::new("raw-companion-cli");
    let raw = raw_disk(&dir, "d.raw", 32 * MIB);
    let img = dir.join("d.qcow2");
    let qbm = env!("CARGO_BIN_EXE_qbm");
    run(Command::new(qbm)
        .args(["create", "--data-file"])
        .arg(&raw)
        .arg(&img)
        .arg("16M"));
    run(Command::new(qbm).args(["add"]).arg(&img).arg("b"));
    let info = qemu_img_info(&img, false);
    assert_eq!(
        info.get("virtual-size").and_then(Json::as_u64),
        Some(16 * MIB)
    );
    qemu_img_check(&img);
}

/// A data file that is missing, not a file, or too small is refused with a
/// message naming it, and no image is left behind.
#[test]
fn bad_data_files_are_refused() {
    let dir = TempDir::new("raw-companion-bad");
    let small = raw_disk(&dir, "small.raw", 8 * MIB);
    let cases: Vec<(PathBuf, u64, i32, &str)> = vec![
        (dir.join("missing.raw"), 0, libc::ENOENT, "cannot open"),
        (
            dir.path().to_path_buf(),
            0,
            libc::EINVAL,
            "not a regular file or block device",
        ),
        (
            small.clone(),
            16 * MIB,
            libc::EINVAL,
            "smaller than the virtual size",
        ),
        (
            small.clone(),
            8 * MIB + 1,
            libc::EINVAL,
            "smaller than the virtual size",
        ),
    ];
    for (i, (raw, size, errno, text)) in cases.into_iter().enumerate() {
        let img = dir.join(&format!("bad{i}.qcow2"));
        let err = Image::create(
            &img,
            &CreateOptions {
                size,
                data_file: Some(raw.clone()),
                ..Default::default()
            },
        )
        .err()
        .unwrap_or_else(|| panic!("case {i}: {} accepted", raw.display()));
        assert_eq!(err.errno(), errno, "case {i}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains(text) && msg.contains(raw.to_str().unwrap()),
            "case {i}: {msg}"
        );
        assert!(!img.exists(), "case {i}: an image was left behind");
    }
    // A raw file whose size is not whole sectors: the companion covers the
    // whole sectors.
    let odd = dir.join("odd.raw");
    fs::File::create(&odd)
        .unwrap()
        .set_len(4 * MIB + 700)
        .unwrap();
    let img = Image::create(
        dir.join("odd.qcow2"),
        &CreateOptions {
            data_file: Some(odd),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(img.size(), 4 * MIB + 512);
    img.close().unwrap();
    // The raw file was never written.
    assert_eq!(read_bytes(&small, 0, 4096), vec![0x40; 4096]);
}

/// The companion reports its data file, and both files are locked as QEMU
/// locks them: while we hold the companion read-write, QEMU can write
/// neither; while QEMU writes the raw file, we cannot open the companion
/// read-write, and the refused open changes nothing. Force-share reads work
/// throughout.
#[test]
fn companion_and_data_file_are_locked() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("raw-companion-locks");
    let raw = raw_disk(&dir, "l.raw", 16 * MIB);
    let img_path = dir.join("l.qcow2");
    let img = companion(&img_path, &raw, 0, 65536);
    img.add_bitmap("b", None, true).unwrap();
    img.flush().unwrap();
    assert_eq!(
        img.info().unwrap().data_file.as_deref(),
        Some(raw.to_str().unwrap())
    );
    let lock_error = |out: std::process::Output| {
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Failed to get") && text.contains("lock"),
            "{text}"
        );
    };
    lock_error(run_output(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 4k"])
            .arg(&raw),
    ));
    lock_error(run_output(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write 0 4k"])
            .arg(&img_path),
    ));
    run(Command::new("qemu-img").args(["info", "-U"]).arg(&img_path));
    let shared = Image::open(
        &img_path,
        OpenOptions {
            writable: false,
            force_share: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(shared.bitmaps().unwrap().len(), 1);
    shared.close().unwrap();
    img.close().unwrap();

    // QEMU holds the raw disk read-write: our read-write open is refused.
    let before = fs::read(&img_path).unwrap();
    let mut qemu = QemuIoSession::open_format(&raw, "raw", false);
    let err = Image::open(&img_path, OpenOptions::read_write())
        .err()
        .expect("opened while QEMU writes the data file");
    assert_eq!(err.errno(), libc::EBUSY, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("data file") && msg.contains("another process"),
        "{msg}"
    );
    assert!(
        fs::read(&img_path).unwrap() == before,
        "the refused open wrote"
    );
    qemu.cmd("write -P 3 0 4k", "wrote");
    qemu.quit();
    // Free again: QEMU's own write through the companion works too.
    qemu_io(&img_path, &["write 0 4k".to_string()]);
}
