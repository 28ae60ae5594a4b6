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
    // Exit status 1 with JSON: the check ran but hit errors it counts.
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    Json::parse(&raw).ok()
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
    let Some(qemu) = qemu_counts(path) else {
        // qemu-img refused to open it at all: the verdict is "broken", and
        // ours must say so too.
        assert!(
            !report.is_consistent(),
            "{label}: qemu-img cannot open it, our check finds it sound: {report:?}"
        );
        return report;
    };
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

/// Where the structures of a 16-bit-refcount image lie, read from the file.
struct Layout {
    path: PathBuf,
    cs: u64,
    l1: u64,
    rc_table: u64,
    /// (table offset, first data offset) of each bitmap.
    bitmaps: Vec<(u64, Option<u64>)>,
    dir: Option<u64>,
}

impl Layout {
    fn read(path: &Path) -> Layout {
        let c0 = cluster0(path);
        let (exts, _) = raw_extensions(&c0);
        let cs = 1u64 << be_u32(&c0, 20);
        assert_eq!(be_u32(&c0, 96), 4, "mutations assume 16-bit refcounts");
        let dir = exts
            .iter()
            .find(|e| e.magic == 0x2385_2875)
            .map(|e| be_u64(&e.data, 16));
        let mut bitmaps = Vec::new();
        if let Some(d) = dir {
            let nb = be_u32(
                &exts.iter().find(|e| e.magic == 0x2385_2875).unwrap().data,
                0,
            );
            let mut at = d;
            for _ in 0..nb {
                let entry = read_bytes(path, at, 24);
                let table = be_u64(&entry, 0);
                let n = be_u32(&entry, 8) as usize;
                let raw = read_bytes(path, table, n * 8);
                let data = (0..n)
                    .map(|i| be_u64(&raw, i * 8) & 0x00ff_ffff_ffff_fe00)
                    .find(|&o| o != 0);
                bitmaps.push((table, data));
                let len = 24
                    + be_u32(&entry, 20) as u64
                    + u64::from(u16::from_be_bytes([entry[18], entry[19]]));
                at += len.div_ceil(8) * 8;
            }
        }
        Layout {
            path: path.to_path_buf(),
            cs,
            l1: be_u64(&c0, 40),
            rc_table: be_u64(&c0, 48),
            bitmaps,
            dir,
        }
    }

    fn u64_at(&self, at: u64) -> u64 {
        be_u64(&read_bytes(&self.path, at, 8), 0)
    }

    fn put_u64(&self, at: u64, v: u64) {
        write_bytes(&self.path, at, &v.to_be_bytes());
    }

    /// Host offset of L2 entry `i` of the first L2 table and the entry's address.
    fn l2_entry(&self, i: u64) -> (u64, u64) {
        let l2 = self.u64_at(self.l1) & 0x00ff_ffff_ffff_fe00;
        let at = l2 + i * 8;
        (self.u64_at(at), at)
    }

    fn refcount_addr(&self, offset: u64) -> u64 {
        let c = offset / self.cs;
        let per = self.cs / 2;
        let block = self.u64_at(self.rc_table + (c / per) * 8) & !0x1ff;
        block + (c % per) * 2
    }

    fn refcount(&self, offset: u64) -> u16 {
        let b = read_bytes(&self.path, self.refcount_addr(offset), 2);
        u16::from_be_bytes([b[0], b[1]])
    }

    fn set_refcount(&self, offset: u64, v: u16) {
        write_bytes(&self.path, self.refcount_addr(offset), &v.to_be_bytes());
    }
}

type Mutation = (&'static str, fn(&Layout));

/// One structure broken at a time; each leaves qemu-img able to check.
fn mutations() -> Vec<Mutation> {
    vec![
        ("leak: a cluster past the data with refcount 1", |l| {
            let len = std::fs::metadata(&l.path).unwrap().len();
            write_bytes(
                &l.path,
                len.div_ceil(l.cs) * l.cs,
                &vec![0u8; l.cs as usize],
            );
            l.set_refcount(len.div_ceil(l.cs) * l.cs, 1);
        }),
        ("leak: refcount 0 -> 5 on the header", |l| {
            l.set_refcount(0, 5)
        }),
        ("corruption: data cluster refcount 0", |l| {
            let (e, _) = l.l2_entry(0);
            l.set_refcount(e & 0x00ff_ffff_ffff_fe00, 0);
        }),
        (
            "corruption+leak: data cluster refcount 2 with COPIED set",
            |l| {
                let (e, _) = l.l2_entry(0);
                l.set_refcount(e & 0x00ff_ffff_ffff_fe00, 2);
            },
        ),
        ("corruption: L2 table refcount 0", |l| {
            l.set_refcount(l.u64_at(l.l1) & 0x00ff_ffff_ffff_fe00, 0)
        }),
        ("corruption: L1 entry COPIED cleared", |l| {
            let e = l.u64_at(l.l1);
            l.put_u64(l.l1, e & !(1 << 63));
        }),
        ("corruption: L2 data entry COPIED cleared", |l| {
            let (e, at) = l.l2_entry(0);
            l.put_u64(at, e & !(1 << 63));
        }),
        ("corruption: L2 entry unaligned", |l| {
            let (e, at) = l.l2_entry(0);
            l.put_u64(at, e + 512);
        }),
        (
            "corruption+leak: L2 entry points into the refcount table (its old cluster leaks)",
            |l| {
                let (_, at) = l.l2_entry(1);
                l.put_u64(at, l.rc_table | 1 << 63);
            },
        ),
        (
            "corruption+leak: L2 entry points past the end of the file (its old cluster leaks)",
            |l| {
                let (_, at) = l.l2_entry(1);
                let len = std::fs::metadata(&l.path).unwrap().len();
                l.put_u64(at, ((len.div_ceil(l.cs) + 10) * l.cs) | (1 << 63));
            },
        ),
        ("corruption: L1 entry points at the header", |l| {
            l.put_u64(l.l1 + 8, 1 << 63);
            l.put_u64(l.l1 + 16, l.cs | 1 << 63);
        }),
        (
            "corruption+leak: bitmap table entry points into the L1 table (its data leaks)",
            |l| {
                let (table, _) = l.bitmaps[0];
                l.put_u64(table, l.l1);
            },
        ),
        ("corruption: two bitmaps share a data cluster", |l| {
            let (table, _) = l.bitmaps[1];
            l.put_u64(table, l.bitmaps[0].1.unwrap());
        }),
        ("corruption: bitmap directory refcount 0", |l| {
            l.set_refcount(l.dir.unwrap(), 0)
        }),
        ("corruption: bitmap table refcount 0", |l| {
            l.set_refcount(l.bitmaps[0].0, 0)
        }),
        ("corruption: bitmap data refcount 0", |l| {
            l.set_refcount(l.bitmaps[0].1.unwrap(), 0)
        }),
        ("corruption: refcount table refcount 0", |l| {
            l.set_refcount(l.rc_table, 0)
        }),
        ("corruption: refcount block unaligned", |l| {
            let b = l.u64_at(l.rc_table);
            l.put_u64(l.rc_table, b + 512);
        }),
        (
            "truncated: the last cluster (the bitmap directory) cut off, so its tables leak",
            |l| {
                let len = std::fs::metadata(&l.path).unwrap().len();
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&l.path)
                    .unwrap();
                f.set_len((len - 1) / l.cs * l.cs).unwrap();
            },
        ),
    ]
}

#[test]
fn broken_images_agree() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("check-broken");
    let base = dir.join("base.qcow2");
    create(&base, "cluster_size=4096", "16M");
    qemu_bitmap_add(&base, "b-one", Some(4096), true);
    qemu_io_cmds(&base, &[], &["write -P 1 0 200k", "write -P 2 1M 64k"]);
    qemu_bitmap_add(&base, "b-two", Some(65536), true);
    let mut seen = Vec::new();
    for (i, (name, mutate)) in mutations().into_iter().enumerate() {
        let path = dir.join(&format!("m{i}.qcow2"));
        std::fs::copy(&base, &path).unwrap();
        mutate(&Layout::read(&path));
        let r = same_as_qemu(&path, name);
        let want_corrupt = name.starts_with("corruption") || name.starts_with("truncated");
        let want_leak = name.contains("leak");
        assert_eq!(r.corruptions > 0, want_corrupt, "{name}: {r:?}");
        assert_eq!(r.leaks > 0, want_leak, "{name}: {r:?}");
        seen.push(format!(
            "{name}: {} corruptions, {} leaks",
            r.corruptions, r.leaks
        ));
    }
    eprintln!("{}", seen.join("\n"));
}

/// --repair (the library's check with both options) fixes leaks and removes
/// in-use bitmaps; qemu-img then finds nothing, and the other bitmap's bits
/// are kept.
#[test]
fn repair_fixes_leaks_and_removes_inconsistent_bitmaps() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("check-repair");
    let path = dir.join("r.qcow2");
    create(&path, "cluster_size=4096", "16M");
    qemu_bitmap_add(&path, "crashed", None, true);
    qemu_bitmap_add(&path, "kept", None, false);
    {
        let img = Image::open(&path, OpenOptions::read_write()).unwrap();
        img.set_range("kept", 8192, 4096).unwrap();
        img.close().unwrap();
    }
    let l = Layout::read(&path);
    // "crashed" is first in the directory: set its in_use flag (bit 0 of flags).
    let d = l.dir.unwrap();
    let flags = be_u32(&read_bytes(&path, d + 12, 4), 0);
    write_bytes(&path, d + 12, &(flags | 1).to_be_bytes());
    l.set_refcount(0, 3);
    let before = same_as_qemu(&path, "before repair");
    assert_eq!((before.leaks, before.corruptions), (1, 0));
    assert_eq!(before.inconsistent_bitmaps, ["crashed"]);

    let img = Image::open(&path, OpenOptions::read_write()).unwrap();
    let ro = img.check(CheckOptions::default()).unwrap();
    assert_eq!(ro.leaks, 1, "a plain check repairs nothing");
    let r = img
        .check(CheckOptions {
            repair_leaks: true,
            remove_inconsistent: true,
        })
        .unwrap();
    assert_eq!((r.leaks_fixed, r.leaks, r.corruptions), (1, 0, 0), "{r:?}");
    assert_eq!(r.removed_bitmaps, ["crashed"]);
    img.close().unwrap();
    let after = same_as_qemu(&path, "after repair");
    assert_eq!((after.leaks, after.corruptions), (0, 0));
    assert!(after.inconsistent_bitmaps.is_empty());
    assert_eq!(l.refcount(0), 1);
    let img = Image::open(&path, OpenOptions::read_only()).unwrap();
    assert_eq!(
        img.extents("kept").unwrap().collect::<Vec<_>>(),
        [(8192, 4096)]
    );
}
