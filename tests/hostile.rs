//! Hostile images (issue 4, point 2). Base images are built here, by QEMU's
//! tools and by libqbm itself; each case then breaks ONE field of FORMAT.md
//! and asserts what a read-only and a read-write open do:
//! - refused: the specific errno and a message naming the field, and a
//!   refused read-write open leaves the file byte for byte unchanged;
//! - accepted: the bitmaps read back, and when `qemu-img check` found the
//!   mutated image free of corruption, a read-write session (add a bitmap,
//!   mark, flush, close) leaves it free of corruption.
//!
//! Never a panic: each case runs under `catch_unwind` and a panic fails it.
//! Allocation bounds: the huge-field cases run the `qbm` CLI under
//! `prlimit --as` (see `huge_fields_fail_within_an_address_space_limit`).
//!
//! Run: `cargo test --release --test hostile`.

mod common;

use common::*;
use qbm::image::{check_file, CreateOptions, Image, OpenOptions};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const EINVAL: i32 = libc::EINVAL;
const EUCLEAN: i32 = libc::EUCLEAN;
const ENOTSUP: i32 = libc::ENOTSUP;

const BITMAPS_MAGIC: u32 = 0x2385_2875;
const FAR: u64 = 0x7fff_0000;

// ---------------------------------------------------------------------------
// Where things are in a base image, parsed from the file

#[derive(Clone, Debug)]
struct Ent {
    /// File offset of the directory entry.
    at: u64,
    table_offset: u64,
    name: Vec<u8>,
    /// Raw table entries.
    table: Vec<u64>,
}

#[derive(Clone, Debug)]
struct Fx {
    cs: u64,
    len: u64,
    header_length: u64,
    /// File offset of the end-of-extensions marker.
    ext_end: u64,
    /// File offset of the bitmaps extension (its magic).
    bm_ext: u64,
    /// File offset of the first extension.
    first_ext: u64,
    dir_off: u64,
    dir_size: u64,
    ents: Vec<Ent>,
    rt_off: u64,
    rt0: u64,
    refcount_order: u32,
    l1_off: u64,
    /// The first L2 table the active L1 names.
    l2: u64,
}

impl Fx {
    fn parse(path: &Path) -> Fx {
        let c0 = cluster0(path);
        let cs = c0.len() as u64;
        let len = fs::metadata(path).unwrap().len();
        let (exts, ext_end) = raw_extensions(&c0);
        let bm = exts.iter().find(|e| e.magic == BITMAPS_MAGIC).unwrap();
        let nb = be_u32(&bm.data, 0);
        let dir_size = be_u64(&bm.data, 8);
        let dir_off = be_u64(&bm.data, 16);
        let dir = read_bytes(path, dir_off, dir_size as usize);
        let mut ents = Vec::new();
        let mut at = 0usize;
        for _ in 0..nb {
            let table_offset = be_u64(&dir, at);
            let table_size = be_u32(&dir, at + 8);
            let name_size = u16::from_be_bytes([dir[at + 18], dir[at + 19]]) as usize;
            let extra = be_u32(&dir, at + 20) as usize;
            let name = dir[at + 24 + extra..at + 24 + extra + name_size].to_vec();
            let t = read_bytes(path, table_offset, table_size as usize * 8);
            let table = (0..table_size as usize)
                .map(|i| be_u64(&t, i * 8))
                .collect();
            ents.push(Ent {
                at: dir_off + at as u64,
                table_offset,
                name,
                table,
            });
            at += (24 + extra + name_size).div_ceil(8) * 8;
        }
        let rt_off = be_u64(&c0, 48);
        let l1_off = be_u64(&c0, 40);
        let l1_size = be_u32(&c0, 36);
        let l1 = read_bytes(path, l1_off, l1_size as usize * 8);
        let l2 = (0..l1_size as usize)
            .map(|i| be_u64(&l1, i * 8) & 0x00ff_ffff_ffff_fe00)
            .find(|&o| o != 0)
            .expect("the base image has guest data");
        Fx {
            cs,
            len,
            header_length: u64::from(be_u32(&c0, 100)),
            ext_end: ext_end as u64,
            bm_ext: bm.offset as u64,
            first_ext: exts[0].offset as u64,
            dir_off,
            dir_size,
            ents,
            rt_off,
            rt0: be_u64(&read_bytes(path, rt_off, 8), 0),
            refcount_order: be_u32(&c0, 96),
            l1_off,
            l2,
        }
    }

    /// Offset of the data cluster of table entry `i` of bitmap `b`.
    fn data(&self, b: usize, i: usize) -> u64 {
        let d = self.ents[b].table[i] & 0x00ff_ffff_ffff_fe00;
        assert_ne!(d, 0, "base image: bitmap {b} entry {i} has data");
        d
    }

    /// File offset of table entry `i` of bitmap `b`.
    fn entry_at(&self, b: usize, i: usize) -> u64 {
        self.ents[b].table_offset + i as u64 * 8
    }

    /// File offset and width of the refcount of the cluster at `offset`
    /// (the cluster must be covered by refcount block 0).
    fn refcount_at(&self, offset: u64) -> (u64, usize) {
        assert!(self.refcount_order >= 3);
        let width = 1usize << (self.refcount_order - 3);
        let c = offset / self.cs;
        assert!(c < self.cs / width as u64, "covered by block 0");
        (self.rt0 + c * width as u64, width)
    }

    fn name(&self, b: usize) -> String {
        String::from_utf8_lossy(&self.ents[b].name).into_owned()
    }
}

fn put8(p: &Path, at: u64, v: u8) {
    write_bytes(p, at, &[v]);
}
fn put16(p: &Path, at: u64, v: u16) {
    write_bytes(p, at, &v.to_be_bytes());
}
fn put32(p: &Path, at: u64, v: u32) {
    write_bytes(p, at, &v.to_be_bytes());
}
fn put64(p: &Path, at: u64, v: u64) {
    write_bytes(p, at, &v.to_be_bytes());
}
fn truncate(p: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Rewrites the directory in place with `edit` applied to its entries
/// (fields as (table_offset, table_size, flags, type, gran, extra, name)),
/// updating the bitmaps extension. The new directory must fit the clusters
/// of the old one.
type RawEntry = (u64, u32, u32, u8, u8, Vec<u8>, Vec<u8>);
fn rewrite_dir(p: &Path, fx: &Fx, edit: impl Fn(&mut Vec<RawEntry>)) {
    let dir = read_bytes(p, fx.dir_off, fx.dir_size as usize);
    let mut ents: Vec<RawEntry> = Vec::new();
    let mut at = 0usize;
    for _ in 0..fx.ents.len() {
        let ns = u16::from_be_bytes([dir[at + 18], dir[at + 19]]) as usize;
        let es = be_u32(&dir, at + 20) as usize;
        ents.push((
            be_u64(&dir, at),
            be_u32(&dir, at + 8),
            be_u32(&dir, at + 12),
            dir[at + 16],
            dir[at + 17],
            dir[at + 24..at + 24 + es].to_vec(),
            dir[at + 24 + es..at + 24 + es + ns].to_vec(),
        ));
        at += (24 + es + ns).div_ceil(8) * 8;
    }
    edit(&mut ents);
    let mut out = Vec::new();
    for (to, ts, fl, ty, g, extra, name) in &ents {
        let start = out.len();
        out.extend_from_slice(&to.to_be_bytes());
        out.extend_from_slice(&ts.to_be_bytes());
        out.extend_from_slice(&fl.to_be_bytes());
        out.push(*ty);
        out.push(*g);
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        out.extend_from_slice(extra);
        out.extend_from_slice(name);
        out.resize(start + (out.len() - start).div_ceil(8) * 8, 0);
    }
    assert!(
        (out.len() as u64).div_ceil(fx.cs) <= fx.dir_size.div_ceil(fx.cs),
        "the rewritten directory fits its clusters"
    );
    write_bytes(p, fx.dir_off, &out);
    put32(p, fx.bm_ext + 8, ents.len() as u32);
    put64(p, fx.bm_ext + 16, out.len() as u64);
}

// ---------------------------------------------------------------------------
// Base images

const SIZE: u64 = 1 << 30;
/// Guest writes: with 512-byte granularity one 64 KiB bitmap cluster covers
/// 256 MiB, so these give b1 and b2 four data clusters each.
const WRITES: [(u64, u64); 4] = [
    (0, 4096),
    (300 << 20, 4096),
    (600 << 20, 4096),
    (900 << 20, 4096),
];

/// QEMU-made: b1, b2 (512 B granularity, enabled, four data clusters each)
/// and b3 (64 KiB, disabled, empty).
fn qemu_base(dir: &Path) -> PathBuf {
    let p = dir.join("qemu-base.qcow2");
    qemu_img_create(&p, SIZE, 65536, 16);
    qemu_bitmap_add(&p, "b1", Some(512), true);
    qemu_bitmap_add(&p, "b2", Some(512), true);
    qemu_bitmap_add(&p, "b3", Some(65536), false);
    qemu_io(&p, &write_cmds(&WRITES));
    qemu_img_check(&p);
    p
}

/// libqbm-made, same bitmaps. Guest data comes from qemu-io (bitmaps
/// disabled then, so that only libqbm marks them).
fn own_base(dir: &Path) -> PathBuf {
    let p = dir.join("own-base.qcow2");
    let img = Image::create(
        &p,
        &CreateOptions {
            size: SIZE,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    img.close().unwrap();
    qemu_io(&p, &write_cmds(&WRITES[..1]));
    let img = Image::open(&p, OpenOptions::read_write()).unwrap();
    img.add_bitmap("b1", Some(512), true).unwrap();
    img.add_bitmap("b2", Some(512), true).unwrap();
    img.add_bitmap("b3", Some(65536), false).unwrap();
    for (o, l) in WRITES {
        img.mark_dirty(o, l).unwrap();
    }
    img.close().unwrap();
    qemu_img_check(&p);
    p
}

// ---------------------------------------------------------------------------
// Cases

#[derive(Clone, Debug)]
enum Want {
    Ok,
    Err(i32, String),
}

type Mutation = Box<dyn Fn(&Path, &Fx)>;

struct Case {
    name: String,
    mutate: Mutation,
    ro: Want,
    rw: Want,
}

fn e(errno: i32, sub: impl Into<String>) -> Want {
    Want::Err(errno, sub.into())
}

struct Cases(Vec<Case>);

impl Cases {
    fn add(
        &mut self,
        name: impl Into<String>,
        ro: Want,
        rw: Want,
        m: impl Fn(&Path, &Fx) + 'static,
    ) {
        self.0.push(Case {
            name: name.into(),
            mutate: Box::new(m),
            ro,
            rw,
        });
    }
    /// Refused by both opens with the same error.
    fn bad(
        &mut self,
        name: &str,
        errno: i32,
        sub: impl Into<String>,
        m: impl Fn(&Path, &Fx) + 'static,
    ) {
        let w = e(errno, sub);
        self.add(name, w.clone(), w, m);
    }
    /// Only a writer must refuse it (refcounts, dirty/corrupt bits).
    fn bad_rw(
        &mut self,
        name: &str,
        errno: i32,
        sub: impl Into<String>,
        m: impl Fn(&Path, &Fx) + 'static,
    ) {
        self.add(name, Want::Ok, e(errno, sub), m);
    }
    /// Legitimate: accepted by both.
    fn good(&mut self, name: &str, m: impl Fn(&Path, &Fx) + 'static) {
        self.add(name, Want::Ok, Want::Ok, m);
    }
}

fn header_cases(c: &mut Cases, fx: &Fx) {
    c.bad("magic", EINVAL, "magic 0x514649fa", |p, _| {
        put32(p, 0, 0x5146_49fa)
    });
    c.add(
        "version 4",
        e(ENOTSUP, "version 4"),
        e(ENOTSUP, "version 4"),
        |p, _| put32(p, 4, 4),
    );
    c.add(
        "version 1",
        e(ENOTSUP, "version 1"),
        e(ENOTSUP, "version 1"),
        |p, _| put32(p, 4, 1),
    );
    c.bad("cluster_bits 8", EUCLEAN, "cluster_bits 8", |p, _| {
        put32(p, 20, 8)
    });
    c.bad("cluster_bits 22", EUCLEAN, "cluster_bits 22", |p, _| {
        put32(p, 20, 22)
    });
    c.bad(
        "cluster_bits max",
        EUCLEAN,
        "cluster_bits 4294967295",
        |p, _| put32(p, 20, u32::MAX),
    );
    c.bad("size huge", EUCLEAN, "l1_size", |p, _| {
        put64(p, 24, 1 << 62)
    });
    c.bad(
        "size halved",
        EUCLEAN,
        "bitmap_table_size 4 does not match",
        |p, _| put64(p, 24, SIZE / 2),
    );
    c.bad("size 0", EUCLEAN, "disk of 0 bytes", |p, _| put64(p, 24, 0));
    c.bad("l1_size huge", EUCLEAN, "l1_size 4294967295", |p, _| {
        put32(p, 36, u32::MAX)
    });
    c.bad(
        "l1_table_offset unaligned",
        EUCLEAN,
        "l1_table_offset",
        |p, fx| put64(p, 40, fx.l1_off + 512),
    );
    c.bad(
        "l1_table_offset past end",
        EUCLEAN,
        format!("l1_table_offset {FAR:#x}"),
        |p, _| put64(p, 40, FAR),
    );
    c.bad(
        "l1_table_offset 0",
        EUCLEAN,
        "l1_table_offset is 0",
        |p, _| put64(p, 40, 0),
    );
    c.bad(
        "l1_table_offset into the refcount table",
        EUCLEAN,
        format!(
            "l1_table_offset {:#x} points into the refcount table",
            fx.rt_off
        ),
        |p, fx| put64(p, 40, fx.rt_off),
    );
    c.bad(
        "refcount_table_offset unaligned",
        EUCLEAN,
        "refcount_table_offset",
        |p, fx| put64(p, 48, fx.rt_off + 512),
    );
    c.bad(
        "refcount_table_offset 0",
        EUCLEAN,
        "refcount_table_offset 0x0",
        |p, _| put64(p, 48, 0),
    );
    c.bad_rw(
        "refcount_table_offset past end",
        EUCLEAN,
        format!("refcount_table_offset {FAR:#x}"),
        |p, _| put64(p, 48, FAR),
    );
    c.bad(
        "refcount_table_clusters huge",
        EUCLEAN,
        "refcount_table_clusters 4294967295",
        |p, _| put32(p, 56, u32::MAX),
    );
    c.bad(
        "refcount_table_clusters 0",
        EUCLEAN,
        "refcount_table_clusters 0",
        |p, _| put32(p, 56, 0),
    );
    c.bad(
        "nb_snapshots huge",
        EUCLEAN,
        "nb_snapshots 4294967295",
        |p, _| put32(p, 60, u32::MAX),
    );
    c.bad(
        "snapshots_offset unaligned",
        EUCLEAN,
        "snapshots_offset",
        |p, _| put64(p, 64, 512),
    );
    c.bad(
        "snapshot table past end",
        EUCLEAN,
        "snapshot table",
        |p, _| {
            put32(p, 60, 1);
            put64(p, 64, FAR);
        },
    );
    c.bad(
        "incompatible unknown bit",
        ENOTSUP,
        "incompatible feature bits 0x20",
        |p, _| put64(p, 72, 1 << 5),
    );
    c.bad_rw("incompatible dirty bit", EUCLEAN, "dirty bit", |p, _| {
        put64(p, 72, 1)
    });
    c.bad_rw(
        "incompatible corrupt bit",
        EUCLEAN,
        "marked corrupt",
        |p, _| put64(p, 72, 2),
    );
    c.good("compatible unknown bit", |p, _| put64(p, 80, 1 << 63));
    c.good("autoclear unknown bit", |p, _| put64(p, 88, 1 | 1 << 63));
    c.good("autoclear bitmaps bit clear (stale extension)", |p, _| {
        put64(p, 88, 0)
    });
    c.bad("refcount_order 7", EUCLEAN, "refcount_order 7", |p, _| {
        put32(p, 96, 7)
    });
    c.bad("header_length 100", EUCLEAN, "header_length 100", |p, _| {
        put32(p, 100, 100)
    });
    c.bad("header_length 108", EUCLEAN, "header_length 108", |p, _| {
        put32(p, 100, 108)
    });
    c.bad(
        "header_length past the cluster",
        EUCLEAN,
        "header_length 131072",
        |p, _| put32(p, 100, 131072),
    );
    // Extensions.
    c.bad(
        "bitmaps extension length overruns cluster 0",
        EUCLEAN,
        "runs past cluster 0",
        |p, fx| put32(p, fx.bm_ext + 4, 0xffff),
    );
    c.bad(
        "first extension length u32::MAX",
        EUCLEAN,
        "of length 4294967295 runs past cluster 0",
        |p, fx| put32(p, fx.first_ext + 4, u32::MAX),
    );
    c.bad(
        "bitmaps extension length 16",
        EUCLEAN,
        "bitmaps extension has length 16",
        |p, fx| put32(p, fx.bm_ext + 4, 16),
    );
    c.bad(
        "extension list without end marker (a 'loop' of empty extensions)",
        EUCLEAN,
        "no end marker",
        |p, fx| {
            let mut filler = Vec::new();
            while (fx.ext_end + filler.len() as u64) < fx.cs {
                filler.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                filler.extend_from_slice(&0u32.to_be_bytes());
            }
            write_bytes(p, fx.ext_end, &filler);
        },
    );
    c.bad(
        "bitmaps extension twice",
        EUCLEAN,
        "0x23852875 appears twice",
        |p, fx| {
            let copy = read_bytes(p, fx.bm_ext, 32);
            write_bytes(p, fx.ext_end, &copy);
            write_bytes(p, fx.ext_end + 32, &[0; 8]);
        },
    );
    c.good("unknown extension added", |p, fx| {
        let mut x = 0x0bad_cafeu32.to_be_bytes().to_vec();
        x.extend_from_slice(&5u32.to_be_bytes());
        x.extend_from_slice(b"hello\0\0\0");
        x.extend_from_slice(&[0; 8]);
        write_bytes(p, fx.ext_end, &x);
    });
    // Backing file name.
    c.bad(
        "backing_file_size 2000",
        EUCLEAN,
        "backing_file_size 2000",
        |p, fx| {
            put64(p, 8, fx.ext_end + 8);
            put32(p, 16, 2000);
        },
    );
    c.bad(
        "backing file name past cluster 0",
        EUCLEAN,
        "backing file name at 0x20000",
        |p, _| {
            put64(p, 8, 0x20000);
            put32(p, 16, 4);
        },
    );
    c.bad(
        "backing file name inside the header",
        EUCLEAN,
        "backing file name at 0x32",
        |p, _| {
            put64(p, 8, 50);
            put32(p, 16, 4);
        },
    );
    c.bad(
        "backing file name over the extensions",
        EUCLEAN,
        "runs into the backing file name",
        |p, fx| {
            put64(p, 8, fx.header_length + 8);
            put32(p, 16, 4);
        },
    );
    let _ = fx;
}

fn extension_cases(c: &mut Cases, fx: &Fx) {
    let nb = fx.ents.len() as u32;
    c.bad("nb_bitmaps 0", EUCLEAN, "nb_bitmaps 0", |p, fx| {
        put32(p, fx.bm_ext + 8, 0)
    });
    c.bad("nb_bitmaps 65536", EUCLEAN, "nb_bitmaps 65536", |p, fx| {
        put32(p, fx.bm_ext + 8, 65536)
    });
    c.bad(
        "nb_bitmaps one too many",
        EUCLEAN,
        format!("(nb_bitmaps {})", nb + 1),
        move |p, fx| put32(p, fx.bm_ext + 8, nb + 1),
    );
    c.bad(
        "nb_bitmaps one too few",
        EUCLEAN,
        format!("nb_bitmaps {} entries", nb - 1),
        move |p, fx| put32(p, fx.bm_ext + 8, nb - 1),
    );
    c.bad(
        "bitmaps extension reserved",
        EUCLEAN,
        "reserved field is 0x1",
        |p, fx| put32(p, fx.bm_ext + 12, 1),
    );
    c.bad(
        "bitmap_directory_size 0",
        EUCLEAN,
        "bitmap_directory_size 0",
        |p, fx| put64(p, fx.bm_ext + 16, 0),
    );
    c.bad(
        "bitmap_directory_size 64 MiB",
        EUCLEAN,
        "bitmap_directory_size 67108864",
        |p, fx| put64(p, fx.bm_ext + 16, 64 << 20),
    );
    c.bad(
        "bitmap_directory_size u64::MAX",
        EUCLEAN,
        format!("bitmap_directory_size {}", u64::MAX),
        |p, fx| put64(p, fx.bm_ext + 16, u64::MAX),
    );
    c.bad(
        "bitmap_directory_size 8 more",
        EUCLEAN,
        format!("bitmap_directory_size {}", fx.dir_size + 8),
        |p, fx| {
            // Keep the extra bytes inside the file.
            if fx.len < fx.dir_off + fx.dir_size + 8 {
                truncate(p, fx.dir_off + fx.dir_size + 8);
            }
            put64(p, fx.bm_ext + 16, fx.dir_size + 8)
        },
    );
    c.bad(
        "bitmap_directory_size 8 less",
        EUCLEAN,
        format!("bitmap_directory_size {}", fx.dir_size - 8),
        |p, fx| put64(p, fx.bm_ext + 16, fx.dir_size - 8),
    );
    c.bad(
        "bitmap_directory_offset unaligned",
        EUCLEAN,
        "bitmap_directory_offset",
        |p, fx| put64(p, fx.bm_ext + 24, fx.dir_off + 8),
    );
    c.bad(
        "bitmap_directory_offset 0",
        EUCLEAN,
        "bitmap_directory_offset 0x0",
        |p, fx| put64(p, fx.bm_ext + 24, 0),
    );
    c.bad(
        "bitmap_directory_offset past end",
        EUCLEAN,
        format!("bitmap_directory_offset {FAR:#x}"),
        |p, fx| put64(p, fx.bm_ext + 24, FAR),
    );
    // A refcount table placed over the directory: the directory now lies
    // inside the refcount table.
    c.add(
        "bitmap directory inside the refcount table",
        e(
            EUCLEAN,
            format!(
                "bitmap_directory_offset {:#x} points into the refcount table",
                fx.dir_off
            ),
        ),
        e(EUCLEAN, "refcount"),
        |p, fx| put64(p, 48, fx.dir_off),
    );
}

fn directory_cases(c: &mut Cases, fx: &Fx) {
    let e0 = fx.ents[0].at;
    let e1 = fx.ents[1].at;
    let b1 = fx.name(0);
    let b2 = fx.name(1);
    c.bad(
        "table offset unaligned",
        EUCLEAN,
        format!("bitmap '{b1}' (directory entry 0): bitmap_table_offset"),
        move |p, fx| put64(p, e0, fx.ents[0].table_offset + 512),
    );
    c.bad(
        "table offset 0",
        EUCLEAN,
        format!("bitmap '{b1}' (directory entry 0): bitmap_table_offset 0x0"),
        move |p, _| put64(p, e0, 0),
    );
    c.bad(
        "table offset past end",
        EUCLEAN,
        format!("bitmap '{b1}': bitmap_table_offset {FAR:#x}"),
        move |p, _| put64(p, e0, FAR),
    );
    c.bad(
        "table offset on the L1 table",
        EUCLEAN,
        format!("bitmap '{b1}': table entry 0 ("),
        move |p, fx| put64(p, e0, fx.l1_off),
    );
    // b3 (one entry) placed on the directory: its entry 0 is then the
    // directory's first u64, b1's table offset, a plausible data cluster.
    let b3 = fx.name(2);
    let t1 = fx.ents[0].table_offset;
    let want = if t1 < fx.dir_off {
        format!(
            "bitmap '{b3}': table entry 0 ({t1:#x}) points into the bitmap table of bitmap '{b1}'"
        )
    } else {
        format!(
            "bitmap '{b3}': bitmap_table_offset {:#x} points into the bitmap directory",
            fx.dir_off
        )
    };
    c.bad("table offset on the directory", EUCLEAN, want, |p, fx| {
        put64(p, fx.ents[2].at, fx.dir_off)
    });
    // b2 naming b1's table: the first clash is at the lowest cluster.
    let (i, lowest) = (0..fx.ents[0].table.len())
        .map(|i| (i, fx.data(0, i)))
        .min_by_key(|&(_, d)| d)
        .unwrap();
    let want = if lowest < t1 {
        format!("bitmap '{b2}': table entry {i} ({lowest:#x}) points into the data cluster of bitmap '{b1}' table entry {i}")
    } else {
        format!("bitmap '{b2}': bitmap_table_offset {t1:#x} points into the bitmap table of bitmap '{b1}'")
    };
    c.bad(
        "table shared by two bitmaps",
        EUCLEAN,
        want,
        move |p, fx| put64(p, e1, fx.ents[0].table_offset),
    );
    c.bad(
        "table size 5",
        EUCLEAN,
        "bitmap_table_size 5 does not match",
        move |p, _| put32(p, e0 + 8, 5),
    );
    c.bad(
        "table size u32::MAX",
        EUCLEAN,
        "bitmap_table_size 4294967295",
        move |p, _| put32(p, e0 + 8, u32::MAX),
    );
    c.bad(
        "reserved flag",
        EUCLEAN,
        "reserved flag bits 0x8",
        move |p, _| put32(p, e0 + 12, 2 | 8),
    );
    c.bad("type 2", EUCLEAN, "type 2", move |p, _| put8(p, e0 + 16, 2));
    c.bad("type 0", EUCLEAN, "type 0", move |p, _| put8(p, e0 + 16, 0));
    c.bad(
        "granularity_bits 8",
        EUCLEAN,
        "granularity_bits 8",
        move |p, _| put8(p, e0 + 17, 8),
    );
    c.bad(
        "granularity_bits 32",
        EUCLEAN,
        "granularity_bits 32",
        move |p, _| put8(p, e0 + 17, 32),
    );
    c.bad(
        "granularity_bits 10 (table size no longer matches)",
        EUCLEAN,
        "bitmap_table_size 4 does not match",
        move |p, _| put8(p, e0 + 17, 10),
    );
    c.bad("name_size 0", EUCLEAN, "name_size 0", move |p, _| {
        put16(p, e0 + 18, 0)
    });
    c.bad(
        "name_size running past the directory",
        EUCLEAN,
        "name_size 1024) runs past the bitmap_directory_size",
        move |p, _| put16(p, e0 + 18, 1024),
    );
    c.bad(
        "name_size 1024 (directory grown to hold it)",
        EUCLEAN,
        "name_size 1024 out of range",
        |p, fx| {
            rewrite_dir(p, fx, |v| v[0].6 = vec![b'n'; 1024]);
        },
    );
    c.good("name of 1023 bytes", |p, fx| {
        rewrite_dir(p, fx, |v| v[0].6 = vec![b'n'; 1023]);
    });
    c.bad(
        "extra_data_size huge",
        EUCLEAN,
        "extra_data_size 4294967280",
        move |p, _| put32(p, e0 + 20, 0xffff_fff0),
    );
    c.bad(
        "extra_data_size overrunning",
        EUCLEAN,
        "extra_data_size 200",
        move |p, _| put32(p, e0 + 20, 200),
    );
    c.bad(
        "extra_data_size 5 in place (name now NUL bytes)",
        EUCLEAN,
        "NUL",
        move |p, _| put32(p, e0 + 20, 5),
    );
    c.good(
        "extra data of 5 bytes, not extra_data_compatible",
        |p, fx| {
            rewrite_dir(p, fx, |v| v[0].5 = vec![1, 2, 3, 4, 5]);
        },
    );
    c.good("extra data of 5 bytes, extra_data_compatible", |p, fx| {
        rewrite_dir(p, fx, |v| {
            v[0].5 = vec![1, 2, 3, 4, 5];
            v[0].2 |= 4;
        });
    });
    c.good("in_use bitmap", move |p, _| put32(p, e0 + 12, 3));
    c.bad(
        "duplicate names",
        EUCLEAN,
        "duplicate bitmap name",
        |p, fx| {
            let n = fx.ents[0].name.clone();
            rewrite_dir(p, fx, |v| v[1].6 = n.clone());
        },
    );
    c.good("non-UTF-8 name", move |p, _| {
        write_bytes(p, e1 + 24, &[0xff, 0xfe])
    });
    c.bad("NUL in a name", EUCLEAN, "NUL byte", move |p, _| {
        write_bytes(p, e1 + 25, &[0])
    });
    c.good("entry padding not zero", move |p, _| {
        write_bytes(p, e0 + 26, &[0xaa; 6])
    });
}

fn table_cases(c: &mut Cases, fx: &Fx) {
    let b1 = fx.name(0);
    let b2 = fx.name(1);
    let t3 = fx.entry_at(0, 3);
    let d3 = fx.data(0, 3);
    let pre = format!("bitmap '{b1}': table entry 3");
    c.bad(
        "table entry reserved bit 63",
        EUCLEAN,
        format!("{pre} ({:#018x}) has reserved bits set", d3 | 1 << 63),
        move |p, _| put64(p, t3, d3 | 1 << 63),
    );
    c.bad(
        "table entry reserved bit 1",
        EUCLEAN,
        format!("{pre} ({:#018x}) has reserved bits set", d3 | 2),
        move |p, _| put64(p, t3, d3 | 2),
    );
    c.bad(
        "table entry offset and all-ones flag",
        EUCLEAN,
        format!("{pre} ({:#018x}) has both", d3 | 1),
        move |p, _| put64(p, t3, d3 | 1),
    );
    c.bad(
        "table entry unaligned",
        EUCLEAN,
        format!("{pre} ({:#018x}) points at", d3 + 512),
        move |p, _| put64(p, t3, d3 + 512),
    );
    c.bad(
        "table entry inside cluster 0",
        EUCLEAN,
        format!("{pre} (0x0000000000000200) points at 0x200, which is not cluster aligned"),
        move |p, _| put64(p, t3, 512),
    );
    c.bad(
        "table entry past end",
        EUCLEAN,
        format!("{pre} ({FAR:#x}) lies past the end of the file"),
        move |p, _| put64(p, t3, FAR),
    );
    c.good(
        "table entry 0: all zeros (data cluster leaks)",
        move |p, _| put64(p, t3, 0),
    );
    c.good(
        "table entry 1: all ones (data cluster leaks)",
        move |p, _| put64(p, t3, 1),
    );
    let into = |what: &str, off: u64| format!("{pre} ({off:#x}) points into {what}");
    c.bad(
        "table entry into the refcount table",
        EUCLEAN,
        into("the refcount table", fx.rt_off),
        move |p, fx| put64(p, t3, fx.rt_off),
    );
    c.bad_rw(
        "table entry into a refcount block",
        EUCLEAN,
        into("a refcount block (refcount table entry 0)", fx.rt0),
        move |p, fx| put64(p, t3, fx.rt0),
    );
    c.bad(
        "table entry into the L1 table",
        EUCLEAN,
        into("the L1 table", fx.l1_off),
        move |p, fx| put64(p, t3, fx.l1_off),
    );
    c.bad(
        "table entry into an L2 table",
        EUCLEAN,
        into("an L2 table (L1 entry 0)", fx.l2),
        move |p, fx| put64(p, t3, fx.l2),
    );
    c.bad(
        "table entry into the directory",
        EUCLEAN,
        into("the bitmap directory", fx.dir_off),
        move |p, fx| {
            // A whole cluster inside the file (QEMU writes only the
            // directory's bytes of its last cluster).
            if fx.len < fx.dir_off + fx.cs {
                truncate(p, fx.dir_off + fx.cs);
            }
            put64(p, t3, fx.dir_off)
        },
    );
    c.bad(
        "table entry into its own table",
        EUCLEAN,
        into(
            &format!("the bitmap table of bitmap '{b1}'"),
            fx.ents[0].table_offset,
        ),
        move |p, fx| put64(p, t3, fx.ents[0].table_offset),
    );
    c.bad(
        "table entry into another bitmap's table",
        EUCLEAN,
        into(
            &format!("the bitmap table of bitmap '{b2}'"),
            fx.ents[1].table_offset,
        ),
        move |p, fx| put64(p, t3, fx.ents[1].table_offset),
    );
    c.bad(
        "table entry into another entry of the same bitmap",
        EUCLEAN,
        into(
            &format!("the data cluster of bitmap '{b1}' table entry 2"),
            fx.data(0, 2),
        ),
        move |p, fx| put64(p, t3, fx.data(0, 2)),
    );
    c.bad(
        "two bitmaps sharing a data cluster",
        EUCLEAN,
        format!("bitmap '{b2}': table entry 0 ({:#x}) points into the data cluster of bitmap '{b1}' table entry 3", d3),
        move |p, fx| put64(p, fx.entry_at(1, 0), d3),
    );
}

fn refcount_cases(c: &mut Cases, fx: &Fx) {
    let rt = fx.rt_off;
    c.bad_rw(
        "refcount table entry unaligned",
        EUCLEAN,
        "refcount table entry 0: block offset",
        move |p, fx| put64(p, rt, fx.rt0 + 512),
    );
    c.bad_rw(
        "refcount table entry reserved bits",
        EUCLEAN,
        "refcount table entry 0",
        move |p, fx| put64(p, rt, fx.rt0 | 1),
    );
    c.bad_rw(
        "refcount table entry past end",
        EUCLEAN,
        format!("refcount table entry 0: refcount block at {FAR:#x} lies past the end"),
        move |p, _| put64(p, rt, FAR),
    );
    c.bad_rw(
        "refcount table entry 0 cleared (header unaccounted)",
        EUCLEAN,
        "cluster 0 (the header) has refcount 0",
        move |p, _| put64(p, rt, 0),
    );
    c.bad_rw(
        "refcount table pointing at itself as a block (loop)",
        EUCLEAN,
        format!("refcount table entry 0: refcount block at {rt:#x} points into the refcount table"),
        move |p, _| put64(p, rt, rt),
    );
    c.bad_rw(
        "refcount block on the L1 table",
        EUCLEAN,
        format!(
            "l1_table_offset {:#x} points into a refcount block (refcount table entry 1)",
            fx.l1_off
        ),
        move |p, fx| put64(p, rt + 8, fx.l1_off),
    );
    c.bad_rw(
        "refcount block on the bitmap directory",
        EUCLEAN,
        format!(
            "bitmap_directory_offset {:#x} points into a refcount block (refcount table entry 1)",
            fx.dir_off
        ),
        move |p, fx| {
            // The block must be a whole cluster inside the file.
            if fx.len < fx.dir_off + fx.cs {
                truncate(p, fx.dir_off + fx.cs);
            }
            put64(p, rt + 8, fx.dir_off)
        },
    );
    c.bad_rw(
        "two refcount table entries naming one block",
        EUCLEAN,
        "refcount table entry 1: refcount block at",
        move |p, fx| put64(p, rt + 8, fx.rt0),
    );
    let zero = |p: &Path, fx: &Fx, off: u64| {
        let (at, w) = fx.refcount_at(off);
        write_bytes(p, at, &vec![0; w]);
    };
    let b1 = fx.name(0);
    c.bad_rw(
        "refcount 0 for a bitmap data cluster",
        EUCLEAN,
        format!(
            "bitmap '{b1}': table entry 3 ({:#x}) has refcount 0",
            fx.data(0, 3)
        ),
        move |p, fx| zero(p, fx, fx.data(0, 3)),
    );
    c.bad_rw(
        "refcount 0 for a bitmap table",
        EUCLEAN,
        format!(
            "bitmap '{b1}': bitmap_table_offset {:#x} has refcount 0",
            fx.ents[0].table_offset
        ),
        move |p, fx| zero(p, fx, fx.ents[0].table_offset),
    );
    c.bad_rw(
        "refcount 0 for the directory",
        EUCLEAN,
        format!("bitmap_directory_offset {:#x} has refcount 0", fx.dir_off),
        move |p, fx| zero(p, fx, fx.dir_off),
    );
    c.bad_rw(
        "refcount 0 for the header",
        EUCLEAN,
        "cluster 0 (the header) has refcount 0",
        move |p, fx| zero(p, fx, 0),
    );
    c.bad_rw(
        "refcount 0 for the L1 table",
        EUCLEAN,
        format!("l1_table_offset {:#x} has refcount 0", fx.l1_off),
        move |p, fx| zero(p, fx, fx.l1_off),
    );
    c.bad_rw(
        "refcount 0 for the refcount table",
        EUCLEAN,
        format!("refcount_table_offset {rt:#x} has refcount 0"),
        move |p, fx| zero(p, fx, fx.rt_off),
    );
    c.good("refcount 2 for a bitmap data cluster", move |p, fx| {
        let (at, w) = fx.refcount_at(fx.data(0, 3));
        let mut v = vec![0; w];
        v[w - 1] = 2;
        write_bytes(p, at, &v);
    });
}

fn truncation_cases(c: &mut Cases, fx: &Fx) {
    let past = "past the end of the file";
    c.bad(
        "truncated to 0 bytes",
        EINVAL,
        "not a qcow2 image (0 bytes",
        |p, _| truncate(p, 0),
    );
    c.bad(
        "truncated to 3 bytes",
        EINVAL,
        "not a qcow2 image (3 bytes",
        |p, _| truncate(p, 3),
    );
    c.bad(
        "truncated inside the v2 header",
        EUCLEAN,
        "too short for a qcow2 header",
        |p, _| truncate(p, 50),
    );
    c.bad(
        "truncated inside the v3 header",
        EUCLEAN,
        "too short for a qcow2 v3 header",
        |p, _| truncate(p, 100),
    );
    c.bad(
        "truncated inside the header tail",
        EUCLEAN,
        "too short for its header_length",
        |p, _| truncate(p, 108),
    );
    let cuts = [
        (
            "inside the first extension",
            fx.first_ext + 4,
            "runs past cluster 0",
        ),
        (
            "inside the bitmaps extension",
            fx.bm_ext + 20,
            "runs past cluster 0",
        ),
        ("after the extensions", fx.ext_end + 16, past),
        ("inside the refcount table", fx.rt_off + 8, past),
        ("inside the L1 table", fx.l1_off + 8, past),
        ("inside the directory", fx.dir_off + 40, past),
        ("inside a bitmap table", fx.ents[0].table_offset + 12, past),
        ("inside a bitmap data cluster", fx.data(0, 3) + 100, past),
        (
            "inside another bitmap data cluster",
            fx.data(1, 0) + 4000,
            past,
        ),
    ];
    for (what, at, sub) in cuts {
        c.bad(
            &format!("truncated {what} (at {at:#x})"),
            EUCLEAN,
            sub,
            move |p, _| truncate(p, at),
        );
    }
}

fn all_cases(fx: &Fx) -> Vec<Case> {
    let mut c = Cases(Vec::new());
    header_cases(&mut c, fx);
    extension_cases(&mut c, fx);
    directory_cases(&mut c, fx);
    table_cases(&mut c, fx);
    refcount_cases(&mut c, fx);
    truncation_cases(&mut c, fx);
    c.0
}

// ---------------------------------------------------------------------------
// Running a case

/// `qemu-img check` finds no corruption (leaks are harmless). False also
/// when it cannot open the image at all.
fn qemu_sound(p: &Path) -> bool {
    let out = run_output(Command::new("qemu-img").args(["check", "-q"]).arg(p));
    matches!(out.status.code(), Some(0) | Some(3))
}

/// qemu-img check's verdict by its exit status: 0 clean, 3 leaks only,
/// 2 corruptions, 1 could not check (the image is broken beyond checking).
/// Ours (`check_file`) must be the same, with "broken" matched by
/// corruptions, check errors or a refusal to check.
fn same_verdict_as_qemu(ctx: &str, p: &Path) -> Result<(), String> {
    let out = run_output(Command::new("qemu-img").args(["check", "-q"]).arg(p));
    let qemu = out.status.code();
    let ours = check_file(p, true);
    let agree = match (&ours, qemu) {
        (Ok(r), Some(0)) => r.is_consistent() && r.leaks == 0,
        (Ok(r), Some(3)) => r.is_consistent() && r.leaks > 0,
        (Ok(r), Some(2)) => !r.is_consistent(),
        (Ok(r), Some(1)) => {
            // The one deliberate difference: QEMU refuses any bitmap extra
            // data; we keep it (FORMAT.md), and its clusters are sound.
            !r.is_consistent()
                || String::from_utf8_lossy(&out.stderr).contains("extra data is not supported")
        }
        // 63: qemu-img probed it as a raw image (bad magic), which has no check.
        (Err(_), Some(1) | Some(2) | Some(63)) => true,
        _ => false,
    };
    if agree {
        return Ok(());
    }
    Err(format!(
        "{ctx}: qemu-img check exits {qemu:?} ({}), our check says {:?}",
        String::from_utf8_lossy(&out.stderr).trim(),
        ours.map(|r| (r.corruptions, r.leaks, r.check_errors, r.messages))
    ))
}

fn check_err(
    ctx: &str,
    mode: &str,
    got: Result<Image, qbm::Error>,
    errno: i32,
    sub: &str,
) -> Result<(), String> {
    match got {
        Ok(img) => {
            drop(img);
            Err(format!(
                "{ctx}: {mode} open accepted; wanted errno {errno} with {sub:?}"
            ))
        }
        Err(err) => {
            let msg = err.to_string();
            if err.errno() != errno || !msg.contains(sub) {
                Err(format!(
                    "{ctx}: {mode} open: errno {} {msg:?}; wanted errno {errno} with {sub:?}",
                    err.errno()
                ))
            } else {
                Ok(())
            }
        }
    }
}

/// Every usable bitmap reads (extents walk to the end without panicking).
fn read_all(img: &Image) -> Result<usize, String> {
    let list = img.bitmaps().map_err(|e| e.to_string())?;
    for b in &list {
        if b.usable {
            let n = img.extents(&b.name).map_err(|e| e.to_string())?.count();
            let _ = n;
            img.dirty_bytes(&b.name).map_err(|e| e.to_string())?;
        }
    }
    Ok(list.len())
}

/// Ok(true) when a read-write session ran on an image qemu-img found sound.
fn run_case(case: &Case, base: &[u8], fx: &Fx, dir: &Path, idx: usize) -> Result<bool, String> {
    let ctx = format!("case {idx} '{}'", case.name);
    let p = dir.join(format!("case{idx}.qcow2"));
    fs::write(&p, base).unwrap();
    (case.mutate)(&p, fx);
    let before = fs::read(&p).unwrap();
    same_verdict_as_qemu(&ctx, &p)?;

    match &case.ro {
        Want::Ok => {
            let img = Image::open(&p, OpenOptions::read_only())
                .map_err(|e| format!("{ctx}: read-only open refused: {e}"))?;
            read_all(&img).map_err(|e| format!("{ctx}: reading: {e}"))?;
            img.close().map_err(|e| format!("{ctx}: close ro: {e}"))?;
        }
        Want::Err(errno, sub) => check_err(
            &ctx,
            "read-only",
            Image::open(&p, OpenOptions::read_only()),
            *errno,
            sub,
        )?,
    }
    if fs::read(&p).unwrap() != before {
        return Err(format!("{ctx}: a read-only open changed the file"));
    }

    let mut sessions = false;
    match &case.rw {
        Want::Err(errno, sub) => {
            check_err(
                &ctx,
                "read-write",
                Image::open(&p, OpenOptions::read_write()),
                *errno,
                sub,
            )?;
            if fs::read(&p).unwrap() != before {
                return Err(format!("{ctx}: a refused read-write open changed the file"));
            }
        }
        Want::Ok => {
            let sound = qemu_sound(&p);
            let img = Image::open(&p, OpenOptions::read_write())
                .map_err(|e| format!("{ctx}: read-write open refused: {e}"))?;
            let n = read_all(&img).map_err(|e| format!("{ctx}: reading rw: {e}"))?;
            img.add_bitmap("hostile-new", Some(65536), true)
                .map_err(|e| format!("{ctx}: add: {e}"))?;
            img.set_range("hostile-new", 1 << 20, 4096)
                .map_err(|e| format!("{ctx}: set_range: {e}"))?;
            img.mark_dirty(5 << 20, 512)
                .map_err(|e| format!("{ctx}: mark: {e}"))?;
            img.flush().map_err(|e| format!("{ctx}: flush: {e}"))?;
            img.close().map_err(|e| format!("{ctx}: close: {e}"))?;
            sessions = sound;
            if sound && !qemu_sound(&p) {
                let out = run_output(Command::new("qemu-img").arg("check").arg(&p));
                return Err(format!(
                    "{ctx}: qemu-img check found the image sound before our read-write session and corrupt after:\n{}",
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
            let img = Image::open(&p, OpenOptions::read_only())
                .map_err(|e| format!("{ctx}: reopen: {e}"))?;
            let m = read_all(&img).map_err(|e| format!("{ctx}: reading after: {e}"))?;
            if m != n + 1 {
                return Err(format!("{ctx}: {n} bitmaps before the session, {m} after"));
            }
            img.close().unwrap();
        }
    }
    Ok(sessions)
}

fn run_corpus(base: &Path, dir: &Path) -> usize {
    let fx = Fx::parse(base);
    assert!(fx.ents.len() >= 3 && fx.ents[0].table.len() >= 4, "{fx:?}");
    let bytes = fs::read(base).unwrap();
    let cases = all_cases(&fx);
    let mut failures = Vec::new();
    let mut sound_sessions = 0;
    for (i, case) in cases.iter().enumerate() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_case(case, &bytes, &fx, dir, i)
        }));
        match r {
            Ok(Ok(s)) => sound_sessions += usize::from(s),
            Ok(Err(m)) => failures.push(m),
            Err(_) => failures.push(format!("case {i} '{}': PANIC", case.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed on {}:\n{}",
        failures.len(),
        cases.len(),
        base.display(),
        failures.join("\n")
    );
    let refused = cases
        .iter()
        .filter(|c| matches!(c.rw, Want::Err(..)))
        .count();
    eprintln!(
        "{}: {} cases, {refused} refused read-write ({} of them accepted read-only), {sound_sessions} read-write sessions on images qemu-img found sound",
        base.display(),
        cases.len(),
        cases
            .iter()
            .filter(|c| matches!((&c.ro, &c.rw), (Want::Ok, Want::Err(..))))
            .count()
    );
    assert!(sound_sessions > 0);
    cases.len()
}

#[test]
fn corpus_on_a_qemu_made_image() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("hostile-qemu");
    let base = qemu_base(dir.path());
    let n = run_corpus(&base, dir.path());
    eprintln!("{n} hostile cases on a QEMU-made image");
}

#[test]
fn corpus_on_a_libqbm_made_image() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("hostile-own");
    let base = own_base(dir.path());
    let n = run_corpus(&base, dir.path());
    eprintln!("{n} hostile cases on a libqbm-made image");
}

/// Non-UTF-8 names are accepted as QEMU accepts them, read under a lossy
/// name, and written back byte for byte by a read-write session.
#[test]
fn non_utf8_name_survives_a_session() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("hostile-utf8");
    let p = qemu_base(dir.path());
    let fx = Fx::parse(&p);
    write_bytes(&p, fx.ents[1].at + 24, &[0xff, 0xfe]);
    let img = Image::open(&p, OpenOptions::read_write()).unwrap();
    let lossy = "\u{fffd}\u{fffd}";
    assert_eq!(img.bitmap_info(lossy).unwrap().dirty_bytes, Some(4 * 4096));
    img.set_range(lossy, 0, 1 << 20).unwrap();
    img.close().unwrap();
    qemu_img_check(&p);
    let fx = Fx::parse(&p);
    assert!(fx.ents.iter().any(|e| e.name == [0xff, 0xfe]), "{fx:?}");
}

// ---------------------------------------------------------------------------
// Allocation bounds

const AS_LIMIT: &str = "1073741824"; // 1 GiB of address space

fn qbm_limited(args: &[&str], image: &Path) -> (bool, String) {
    let out = run_output(
        Command::new("prlimit")
            .arg(format!("--as={AS_LIMIT}"))
            .arg(env!("CARGO_BIN_EXE_qbm"))
            .args(args)
            .arg(image),
    );
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Helper process for the test below: allocates and touches N bytes.
#[test]
fn alloc_probe() {
    if let Ok(n) = std::env::var("QBM_HOSTILE_ALLOC") {
        let n: usize = n.parse().unwrap();
        let v = vec![1u8; n];
        assert_eq!(v[n - 1], 1);
    }
}

/// Fields that would make a careless reader allocate gigabytes are refused
/// with the specific message by the CLI running under a 1 GiB address-space
/// limit, which (as checked here) is enough for the largest legitimate
/// bitmap (512 MiB) and kills a process that allocates 4 GiB.
#[test]
fn huge_fields_fail_within_an_address_space_limit() {
    if !have_tools(&["qemu-img", "qemu-io", "prlimit"]) {
        return;
    }
    let dir = TempDir::new("hostile-mem");
    // The limit bites: a 4 GiB allocation dies, a 64 MiB one lives.
    let probe = |n: u64| {
        run_output(
            Command::new("prlimit")
                .arg(format!("--as={AS_LIMIT}"))
                .arg(std::env::current_exe().unwrap())
                .args(["--exact", "alloc_probe", "--test-threads=1"])
                .env("QBM_HOSTILE_ALLOC", n.to_string()),
        )
        .status
        .success()
    };
    assert!(
        !probe(4 << 30),
        "a 4 GiB allocation must fail under the limit"
    );
    assert!(
        probe(64 << 20),
        "a 64 MiB allocation must succeed under the limit"
    );

    // The largest legitimate bitmap (512 MiB: 2 TiB at 512-byte granularity) loads.
    let big = dir.join("big.qcow2");
    qemu_img_create(&big, 2 << 40, 65536, 16);
    qemu_bitmap_add(&big, "max", Some(512), true);
    let (ok, out) = qbm_limited(&["info"], &big);
    assert!(ok, "a 512 MiB bitmap loads under the limit: {out}");
    assert!(out.contains("max"), "{out}");

    let base = qemu_base(dir.path());
    let fx = Fx::parse(&base);
    let e0 = fx.ents[0].at;
    type M = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, &str, M, String)> = vec![
        (
            "info",
            "nb_bitmaps",
            Box::new(move |p| put32(p, fx.bm_ext + 8, u32::MAX)),
            "nb_bitmaps 4294967295".into(),
        ),
        (
            "info",
            "directory size",
            Box::new(move |p| put64(p, fx.bm_ext + 16, u64::MAX)),
            format!("bitmap_directory_size {}", u64::MAX),
        ),
        (
            "info",
            "directory size 4 GiB",
            Box::new(move |p| put64(p, fx.bm_ext + 16, 4 << 30)),
            format!("bitmap_directory_size {}", 4u64 << 30),
        ),
        (
            "info",
            "table size",
            Box::new(move |p| put32(p, e0 + 8, u32::MAX)),
            "bitmap_table_size 4294967295".into(),
        ),
        (
            "info",
            "name size",
            Box::new(move |p| put16(p, e0 + 18, u16::MAX)),
            "name_size 65535".into(),
        ),
        (
            "info",
            "extra data size",
            Box::new(move |p| put32(p, e0 + 20, u32::MAX)),
            "extra_data_size 4294967295".into(),
        ),
        (
            "info",
            "l1_size",
            Box::new(|p| put32(p, 36, u32::MAX)),
            "l1_size 4294967295".into(),
        ),
        (
            "info",
            "refcount_table_clusters",
            Box::new(|p| put32(p, 56, u32::MAX)),
            "refcount_table_clusters 4294967295".into(),
        ),
        (
            "info",
            "disk size 2^62",
            Box::new(|p| {
                put64(p, 24, 1 << 62);
            }),
            "l1_size".into(),
        ),
        (
            "info",
            "disk size 16 TiB with a matching L1 (bitmap of 4 GiB)",
            Box::new(|p| {
                put64(p, 24, 16 << 40);
                put32(p, 36, 32768);
                // A new, larger L1 table at the end of the file.
                let at = fs::metadata(p).unwrap().len().next_multiple_of(65536);
                truncate(p, at + 32768 * 8);
                put64(p, 40, at);
            }),
            "more than QEMU's limit".into(),
        ),
        (
            "add",
            "refcount_table_clusters (read-write)",
            Box::new(|p| put32(p, 56, u32::MAX)),
            "refcount_table_clusters 4294967295".into(),
        ),
    ];
    for (i, (cmd, what, m, want)) in cases.into_iter().enumerate() {
        let p = dir.join(&format!("mem{i}.qcow2"));
        fs::copy(&base, &p).unwrap();
        m(&p);
        let args: Vec<&str> = if cmd == "add" {
            vec!["add"]
        } else {
            vec!["info"]
        };
        let mut cmdline = Command::new("prlimit");
        cmdline
            .arg(format!("--as={AS_LIMIT}"))
            .arg(env!("CARGO_BIN_EXE_qbm"))
            .args(&args)
            .arg(&p);
        if cmd == "add" {
            cmdline.arg("newbm");
        }
        let out = run_output(&mut cmdline);
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: exit {:?}: {text}",
            out.status
        );
        assert!(text.contains(&want), "{what}: {text:?} lacks {want:?}");
        assert!(!text.contains("memory allocation"), "{what}: {text}");
    }
}
