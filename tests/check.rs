//! Our full check against `qemu-img check --output=json` on the same images:
//! images QEMU made with every feature that adds references (snapshots,
//! compression, extended L2, external data file, LUKS, backing files,
//! bitmaps, every refcount width), then the same images with one structure
//! broken at a time. Every counter qemu-img reports must match ours.

mod common;

use common::*;
use qbm::image::{check_file, CheckOptions, CheckReport, Image, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

const SECRET: &str = "secret,id=sec0,data=check-passphrase";

/// qemu-img's counters, or None when it could not check the image at all.
fn qemu_counts(path: &Path) -> Option<Json> {
    let check = |image_opts: Option<String>| {
        let mut c = Command::new("qemu-img");
        c.args(["check", "--output=json", "--object", SECRET]);
        match image_opts {
            Some(opts) => c.args(["--image-opts", &opts]),
            None => c.arg(path),
        };
        run_output(&mut c)
    };
    let mut out = check(None);
    if out.status.code() == Some(1) {
        // An encrypted image opens only with its key.
        let opts = format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            path.display()
        );
        out = check(Some(opts));
    }
    if out.status.code() == Some(1) {
        return None;
    }
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    Some(Json::parse(&raw).unwrap_or_else(|e| panic!("qemu-img check JSON: {e}\n{raw}")))
}

const COUNTERS: [&str; 8] = [
    "corruptions",
    "leaks",
    "check-errors",
    "image-end-offset",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
];

fn ours(r: &CheckReport) -> [u64; 8] {
    [
        r.corruptions,
        r.leaks,
        r.check_errors,
        r.image_end_offset,
        r.total_clusters,
        r.allocated_clusters,
        r.fragmented_clusters,
        r.compressed_clusters,
    ]
}

/// Asserts that our check and qemu-img's report the same counters; returns
/// our report.
fn same_as_qemu(path: &Path, label: &str) -> CheckReport {
    let report =
        check_file(path, true).unwrap_or_else(|e| panic!("{label}: our check failed: {e}"));
    let qemu = qemu_counts(path).unwrap_or_else(|| panic!("{label}: qemu-img could not check"));
    let theirs: Vec<u64> = COUNTERS
        .iter()
        .map(|k| qemu.get(k).and_then(Json::as_u64).unwrap_or(0))
        .collect();
    let mismatches: Vec<String> = COUNTERS
        .iter()
        .zip(ours(&report).iter().zip(&theirs))
        .filter(|(_, (a, b))| a != b)
        .map(|(k, (a, b))| format!("{k}: ours {a}, qemu-img {b}"))
        .collect();
    assert!(
        mismatches.is_empty(),
        "{label}: {}\nour messages: {:#?}\nqemu-img: {}",
        mismatches.join("; "),
        report.messages,
        String::from_utf8_lossy(
            &run_output(
                Command::new("qemu-img")
                    .args(["check", "--object", SECRET])
                    .arg(path)
            )
            .stdout
        )
    );
    report
}

fn qemu_io_cmds(path: &Path, fmt_opts: &[&str], cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(fmt_opts);
    for x in cmds {
        c.args(["-c", x]);
    }
    run(c.arg(path));
}

fn create(path: &Path, opts: &str, size: &str) {
    run(Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "--object", SECRET, "-o", opts,
        ])
        .arg(path)
        .arg(size));
}

/// The images of the corpus, each made by QEMU's tools.
fn qemu_images(dir: &TempDir) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut add = |name: &str| {
        let p = dir.join(&format!("{name}.qcow2"));
        out.push((name.to_string(), p.clone()));
        p
    };
    let writes = [
        "write -P 1 0 200k",
        "write -P 2 1M 64k",
        "write -z 2M 64k",
        "write -P 3 5M 3k",
    ];

    for (cs, rb) in [(65536, 16), (512, 1), (4096, 64), (2 << 20, 8)] {
        let p = add(&format!("plain-{cs}-{rb}"));
        create(&p, &format!("cluster_size={cs},refcount_bits={rb}"), "16M");
        qemu_bitmap_add(&p, "b-one", Some(4096), true);
        qemu_bitmap_add(&p, "b-two", Some(65536), true);
        qemu_io_cmds(&p, &[], &writes);
        qemu_bitmap(&p, &["--disable"], "b-two");
    }

    let p = add("snapshots");
    create(&p, "cluster_size=4096", "8M");
    qemu_io_cmds(&p, &[], &["write -P 1 0 100k"]);
    run(Command::new("qemu-img")
        .args(["snapshot", "-c", "s1"])
        .arg(&p));
    qemu_io_cmds(&p, &[], &["write -P 2 8k 16k", "write -P 3 4M 8k"]);
    run(Command::new("qemu-img")
        .args(["snapshot", "-c", "s2"])
        .arg(&p));
    qemu_bitmap_add(&p, "b", None, true);
    qemu_io_cmds(&p, &[], &["write -P 4 0 4k"]);

    let raw = dir.join("source.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&raw)
        .arg("4M"));
    qemu_io_cmds(
        &raw,
        &["-f", "raw"],
        &["write -P 7 0 1M", "write -P 9 2M 300k"],
    );
    let p = add("compressed");
    run(Command::new("qemu-img")
        .args([
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
        ])
        .arg(&raw)
        .arg(&p));
    qemu_io_cmds(&p, &[], &["write -P 1 64k 8k"]);

    let p = add("extended-l2");
    create(&p, "extended_l2=on,cluster_size=65536", "8M");
    qemu_io_cmds(
        &p,
        &[],
        &["write -P 1 0 2k", "write -P 2 1M 100k", "write -z 3M 4k"],
    );

    let p = add("data-file");
    let data = dir.join("data-file.raw");
    create(&p, &format!("data_file={}", data.display()), "8M");
    qemu_io_cmds(&p, &[], &["write -P 1 0 300k"]);
    qemu_bitmap_add(&p, "b", None, true);

    let p = add("luks");
    create(
        &p,
        "encrypt.format=luks,encrypt.key-secret=sec0,cluster_size=4096",
        "4M",
    );

    let p = add("backing");
    let base = dir.join("base.qcow2");
    create(&base, "cluster_size=65536", "8M");
    qemu_io_cmds(&base, &[], &["write -P 1 0 1M"]);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&p));
    qemu_io_cmds(&p, &[], &["write -P 2 64k 64k"]);

    let p = add("prealloc-metadata");
    create(&p, "preallocation=metadata,cluster_size=65536", "4M");

    let p = add("v2");
    create(&p, "compat=0.10,cluster_size=4096", "4M");
    qemu_io_cmds(&p, &[], &["write -P 1 0 64k"]);
    out
}

#[test]
fn qemu_made_images_agree() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("check-qemu");
    for (name, path) in qemu_images(&dir) {
        let r = same_as_qemu(&path, &name);
        assert!(r.is_consistent() && r.leaks == 0, "{name}: {r:?}");
    }
}
