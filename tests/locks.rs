//! QEMU-compatible image locking against real QEMU processes: a
//! qemu-storage-daemon exporting the image writable, and QEMU's tools while
//! we hold it. Force-share reads work throughout.

mod common;

use common::*;
use qbm::image::{Image, OpenOptions};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// True if another open file description holds a lock on `byte` of `path`
/// (probed without taking a lock ourselves).
fn lock_held(path: &Path, byte: i64) -> bool {
    use nix::fcntl::{fcntl, FcntlArg};
    let f = fs::File::open(path).unwrap();
    let mut probe = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    };
    fcntl(&f, FcntlArg::F_OFD_GETLK(&mut probe)).unwrap();
    probe.l_type != libc::F_UNLCK as libc::c_short
}

fn stderr_of(cmd: &mut Command) -> String {
    let out = run_output(cmd);
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded while the image was locked"
    );
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}

#[test]
fn storage_daemon_and_tools_see_our_locks_and_we_see_theirs() {
    if !have_tools(&["qemu-img", "qemu-io", "qemu-storage-daemon"]) {
        return;
    }
    let dir = TempDir::new("locks");
    let img = dir.join("l.qcow2");
    qemu_img_create(&img, 64 * MIB, 65536, 16);
    qemu_bitmap_add(&img, "b", None, true);
    let sock = dir.join("nbd.sock");

    // qemu-storage-daemon exports the image writable over NBD.
    let mut qsd = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=file0",
            img.display()
        ))
        .args(["--blockdev", "driver=qcow2,file=file0,node-name=disk0"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .args(["--export", "type=nbd,id=e0,node-name=disk0,writable=on"])
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon");
    let start = Instant::now();
    let shared = || {
        Image::open(
            &img,
            OpenOptions {
                writable: false,
                force_share: true,
                ..Default::default()
            },
        )
    };
    // Ready once it holds the write lock and has flagged the bitmap in use:
    // its own write must come before our snapshot of the file.
    let in_use = || shared().is_ok_and(|s| s.bitmap_info("b").is_ok_and(|b| b.in_use));
    while !(lock_held(&img, 101) && in_use()) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "qsd never took the image"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = fs::read(&img).unwrap();
    for options in [OpenOptions::read_write(), OpenOptions::read_only()] {
        let err = Image::open(&img, options)
            .err()
            .expect("opened while QEMU writes it");
        assert_eq!(err.errno(), libc::EBUSY, "{err}");
        assert!(
            err.to_string()
                .contains("another process has the image open"),
            "{err}"
        );
    }
    assert!(fs::read(&img).unwrap() == before, "a refused open wrote");
    let shared = shared().unwrap();
    let b = shared.bitmap_info("b").unwrap();
    assert!(
        b.in_use,
        "QEMU holds it read-write: the bitmap is in use on disk"
    );
    shared.close().unwrap();
    qsd.kill().unwrap();
    qsd.wait().unwrap();

    // Now we hold it: QEMU's tools fail with their lock error.
    let ours = Image::open(&img, OpenOptions::read_write()).unwrap();
    for text in [
        stderr_of(
            Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "write 0 4k"])
                .arg(&img),
        ),
        stderr_of(
            Command::new("qemu-img")
                .args(["bitmap", "--add"])
                .arg(&img)
                .arg("q"),
        ),
        stderr_of(Command::new("qemu-img").arg("info").arg(&img)),
    ] {
        assert!(
            text.contains("Failed to get") && text.contains("lock"),
            "{text}"
        );
    }
    let info = run(Command::new("qemu-img").args(["info", "-U"]).arg(&img));
    assert!(info.contains("virtual size: 64 MiB"), "{info}");
    ours.close().unwrap();
    qemu_img_check(&img);
}
