//! Interop with QEMU's tools, both ways: bitmaps QEMU writes are read by
//! libqbm exactly as QEMU reads them, and bitmaps libqbm writes are read
//! (and then changed) by QEMU. QEMU's tools are the oracle: `qemu-img info`
//! for the bitmap list, `qemu-img check` for refcount consistency and
//! `qemu-nbd -B` + `nbdinfo --map` for the dirty extents.
//!
//! Run: `cargo test --release --test interop`.

mod common;

use common::*;
use qbm::image::{BitmapInfo, CreateOptions, Image, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

const CLUSTER_SIZES: [u64; 4] = [512, 4096, 65536, 2 << 20];
const REFCOUNT_BITS: [u32; 7] = [1, 2, 4, 8, 16, 32, 64];
const GRANULARITIES: [u64; 4] = [512, 4096, 65536, 1 << 20];

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn ro() -> OpenOptions {
    OpenOptions::read_only()
}

fn rw() -> OpenOptions {
    OpenOptions::read_write()
}

/// `Image::open` (no retry: a lock that outlived close would fail here; t22
/// tests that case on purpose).
fn open_img(path: impl AsRef<Path>, opts: OpenOptions) -> qbm::Result<Image> {
    Image::open(path.as_ref(), opts)
}

/// Every (cluster size, refcount width) pair: 28 cases.
fn matrix() -> Vec<(usize, u64, u32)> {
    let mut v = Vec::new();
    for (ci, &cs) in CLUSTER_SIZES.iter().enumerate() {
        for (ri, &rb) in REFCOUNT_BITS.iter().enumerate() {
            v.push((ci * REFCOUNT_BITS.len() + ri, cs, rb));
        }
    }
    v
}

/// A disk size for a case: small when a 512-byte granularity is in play,
/// and never a multiple of the bigger granularities (a partial last granule).
fn disk_size(rng: &mut Rng, grans: &[u64]) -> u64 {
    let tail = 512 * rng.range(1, 127);
    if grans.contains(&512) {
        8 * MIB + tail
    } else if rng.chance(50) {
        64 * MIB + tail
    } else {
        1024 * MIB + tail
    }
}

fn ours(img: &Image, name: &str) -> Vec<(u64, u64)> {
    img.extents(name)
        .unwrap_or_else(|e| panic!("extents({name}): {e}"))
        .collect()
}

fn info_of<'a>(list: &'a [BitmapInfo], name: &str) -> &'a BitmapInfo {
    list.iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("libqbm lists no bitmap '{name}': {list:?}"))
}

/// libqbm's list (names, order, granularity, enabled, in_use) equals
/// what `qemu-img info` says.
fn assert_same_list(ctx: &str, ours: &[BitmapInfo], qemu: &[QemuBitmap]) {
    let a: Vec<(String, u64, bool, bool)> = ours
        .iter()
        .map(|b| (b.name.clone(), b.granularity, b.enabled, b.in_use))
        .collect();
    let b: Vec<(String, u64, bool, bool)> = qemu
        .iter()
        .map(|b| (b.name.clone(), b.granularity, b.auto(), b.in_use()))
        .collect();
    assert_eq!(
        a, b,
        "{ctx}: libqbm's bitmap list (left) differs from qemu-img info's (right)"
    );
}

/// What QEMU must list: (name, granularity, enabled), no in-use flags.
fn assert_qemu_list(ctx: &str, path: &Path, want: &[(&str, u64, bool)]) {
    let q = qemu_img_info_bitmaps(path);
    let got: Vec<(String, u64, Vec<String>)> = q
        .iter()
        .map(|b| (b.name.clone(), b.granularity, b.flags.clone()))
        .collect();
    let exp: Vec<(String, u64, Vec<String>)> = want
        .iter()
        .map(|&(n, g, e)| {
            (
                n.to_string(),
                g,
                if e { vec!["auto".to_string()] } else { vec![] },
            )
        })
        .collect();
    assert_eq!(
        got, exp,
        "{ctx}: qemu-img info bitmaps (left) differ from what libqbm stored (right)"
    );
}

/// Random qemu-io commands: small data writes (any byte alignment), larger
/// zero writes and discards (metadata only, keep images sparse), and a write
/// of the very last byte. Returns the commands and the byte ranges they dirty.
fn random_qemu_writes(
    rng: &mut Rng,
    size: u64,
    cs: u64,
    n: usize,
) -> (Vec<String>, Vec<(u64, u64)>) {
    let mut cmds = Vec::new();
    let mut ranges = Vec::new();
    for i in 0..n {
        let kind = rng.below(10);
        let (cmd, off, len) = if i == 0 {
            ("write -P 1", size - 1, 1)
        } else if kind < 5 {
            let off = rng.below(size);
            let len = rng.range(1, 200 * KIB).min(size - off);
            ("write -P 7", off, len)
        } else if kind < 8 {
            // Cluster-aligned zero writes stay metadata-only.
            let clusters = size / cs;
            if clusters < 2 {
                continue;
            }
            let c = rng.below(clusters - 1);
            let n = rng.range(1, (clusters - c).min(1 + (size / 8) / cs).max(1));
            ("write -z", c * cs, n * cs)
        } else {
            let off = rng.below(size / 512) * 512;
            let len = (rng.range(1, 64) * 512).min(size - off);
            ("discard", off, len)
        };
        cmds.push(format!("{cmd} {off} {len}"));
        ranges.push((off, len));
    }
    (cmds, ranges)
}

// ---------------------------------------------------------------------------
// 1. QEMU writes -> libqbm reads

#[test]
fn t1_qemu_writes_we_read() {
    if !have_tools(TOOLS) {
        return;
    }
    let mut summary = Vec::new();
    for (i, cs, rb) in matrix() {
        let mut rng = Rng::new(0x1000 + i as u64);
        let g1 = GRANULARITIES[i % 4];
        let g2 = GRANULARITIES[(i + 1) % 4];
        let g3 = GRANULARITIES[(i + 2) % 4];
        let size = disk_size(&mut rng, &[g1, g2, g3]);
        let ctx = format!(
            "t1 case {i}: cluster {cs}, refcount_bits {rb}, size {size}, grans {g1}/{g2}/{g3}"
        );
        summary.push(format!("cs={cs} rb={rb} g={g1}/{g2}/{g3} size={size}"));
        let dir = TempDir::new("t1");
        let f = dir.join("q.qcow2");
        qemu_img_create(&f, size, cs, rb);
        qemu_bitmap_add(&f, "b1", Some(g1), true);
        qemu_bitmap_add(&f, "b2", Some(g2), true);
        qemu_bitmap_add(&f, "frozen", Some(g3), true);
        qemu_bitmap_add(&f, "off", Some(g1), false);

        let mut m1 = Model::new(size, g1);
        let mut m2 = Model::new(size, g2);
        let mut m3 = Model::new(size, g3);
        let writes = if cs >= 2 * MIB { 6 } else { 12 };
        let (cmds, ranges) = random_qemu_writes(&mut rng, size, cs, writes);
        qemu_io(&f, &cmds);
        for &(o, l) in &ranges {
            m1.mark(o, l);
            m2.mark(o, l);
            m3.mark(o, l);
        }
        qemu_bitmap(&f, &["--disable"], "frozen");
        let (cmds, ranges) = random_qemu_writes(&mut rng, size, cs, writes);
        qemu_io(&f, &cmds);
        for &(o, l) in &ranges {
            m1.mark(o, l);
            m2.mark(o, l);
        }

        let q = qemu_img_info_bitmaps(&f);
        let truth: Vec<(&str, Vec<(u64, u64)>)> = ["b1", "b2", "frozen", "off"]
            .iter()
            .map(|&n| (n, nbd_dirty_extents(&f, n)))
            .collect();
        // The oracle agrees with the model (else the test, not the library, is wrong).
        assert_eq!(truth[0].1, m1.extents(), "{ctx}: QEMU b1 vs model");
        assert_eq!(truth[1].1, m2.extents(), "{ctx}: QEMU b2 vs model");
        assert_eq!(truth[2].1, m3.extents(), "{ctx}: QEMU frozen vs model");
        assert!(
            truth[3].1.is_empty(),
            "{ctx}: QEMU dirtied a disabled bitmap?"
        );

        {
            let img = open_img(&f, ro()).unwrap_or_else(|e| panic!("{ctx}: open ro: {e}"));
            let list = img.bitmaps().unwrap();
            assert_same_list(&ctx, &list, &q);
            for (name, want) in &truth {
                assert_eq!(
                    &ours(&img, name),
                    want,
                    "{ctx}: extents of '{name}' (left libqbm, right qemu-nbd)"
                );
                let total: u64 = want.iter().map(|r| r.1).sum();
                assert_eq!(
                    img.dirty_bytes(name).unwrap(),
                    total,
                    "{ctx}: dirty_bytes('{name}')"
                );
                assert_eq!(
                    info_of(&list, name).dirty_bytes,
                    Some(total),
                    "{ctx}: BitmapInfo.dirty_bytes of '{name}'"
                );
                assert!(info_of(&list, name).usable, "{ctx}: '{name}' not usable");
            }
            img.close().unwrap();
        }

        // A read-write open and close with no change must hand QEMU back
        // exactly the same bitmaps, in a consistent image.
        {
            let img = open_img(&f, rw()).unwrap_or_else(|e| panic!("{ctx}: open rw: {e}"));
            img.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
        }
        qemu_img_check(&f);
        assert_eq!(
            qemu_img_info_bitmaps(&f),
            q,
            "{ctx}: bitmap list changed by an idle rw open"
        );
        for (name, want) in &truth {
            assert_eq!(
                &nbd_dirty_extents(&f, name),
                want,
                "{ctx}: '{name}' changed by an idle rw open"
            );
        }
    }
    eprintln!(
        "t1 matrix ({} cases):\n  {}",
        summary.len(),
        summary.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// 2. libqbm writes -> QEMU reads, then QEMU changes them -> libqbm reads

struct Tracked {
    name: &'static str,
    model: Model,
    enabled: bool,
}

fn apply_random_ops(rng: &mut Rng, img: &Image, bms: &mut [Tracked], ops: usize, ctx: &str) {
    let size = img.size();
    for _ in 0..ops {
        let k = rng.below(100);
        let pick = rng.below(bms.len() as u64) as usize;
        if k < 45 {
            let off = rng.below(size);
            let len = rng.range(1, (size / 16).max(1)).min(size - off);
            img.mark_dirty(off, len)
                .unwrap_or_else(|e| panic!("{ctx}: mark_dirty: {e}"));
            for b in bms.iter_mut().filter(|b| b.enabled) {
                b.model.mark(off, len);
            }
        } else if k < 65 {
            let off = rng.below(size);
            let len = rng.range(1, (size / 8).max(1)).min(size - off);
            let b = &mut bms[pick];
            img.set_range(b.name, off, len)
                .unwrap_or_else(|e| panic!("{ctx}: set_range: {e}"));
            b.model.mark(off, len);
        } else if k < 88 {
            let b = &mut bms[pick];
            let g = b.model.granularity;
            let granules = size.div_ceil(g);
            let first = rng.below(granules);
            let n = rng.range(1, (granules - first).min(granules / 4 + 1));
            let off = first * g;
            let end = ((first + n) * g).min(size);
            img.reset_range(b.name, off, end - off).unwrap_or_else(|e| {
                panic!("{ctx}: reset_range({}, {off}, {}): {e}", b.name, end - off)
            });
            b.model.reset(off, end - off);
        } else if k < 92 {
            img.flush().unwrap_or_else(|e| panic!("{ctx}: flush: {e}"));
        } else if k < 95 {
            let b = &mut bms[pick];
            img.clear_bitmap(b.name).unwrap();
            b.model.clear();
        } else {
            let b = &mut bms[pick];
            if b.enabled {
                img.disable_bitmap(b.name).unwrap();
            } else {
                img.enable_bitmap(b.name).unwrap();
            }
            b.enabled = !b.enabled;
        }
    }
}

fn assert_models_match(ctx: &str, f: &Path, bms: &[Tracked]) {
    let want: Vec<(&str, u64, bool)> = bms
        .iter()
        .map(|b| (b.name, b.model.granularity, b.enabled))
        .collect();
    assert_qemu_list(ctx, f, &want);
    for b in bms {
        assert_eq!(
            nbd_dirty_extents(f, b.name),
            b.model.extents(),
            "{ctx}: '{}' as qemu-nbd exports it (left) vs what libqbm was told (right)",
            b.name
        );
    }
}

fn assert_ours_match(ctx: &str, f: &Path, bms: &[Tracked]) {
    let img = open_img(f, ro()).unwrap_or_else(|e| panic!("{ctx}: open ro: {e}"));
    let q = qemu_img_info_bitmaps(f);
    assert_same_list(ctx, &img.bitmaps().unwrap(), &q);
    for b in bms {
        let truth = nbd_dirty_extents(f, b.name);
        assert_eq!(
            truth,
            b.model.extents(),
            "{ctx}: '{}' qemu-nbd vs model",
            b.name
        );
        assert_eq!(
            ours(&img, b.name),
            truth,
            "{ctx}: '{}' libqbm (left) vs qemu-nbd (right)",
            b.name
        );
    }
    img.close().unwrap();
}

#[test]
fn t2_we_write_qemu_reads() {
    if !have_tools(TOOLS) {
        return;
    }
    let mut summary = Vec::new();
    for (i, cs, rb) in matrix() {
        let mut rng = Rng::new(0x2000 + i as u64);
        let g1 = GRANULARITIES[i % 4];
        let g2 = GRANULARITIES[(i + 3) % 4];
        let g3 = GRANULARITIES[(i + 1) % 4];
        let size = disk_size(&mut rng, &[g1, g2, g3]);
        let ctx = format!(
            "t2 case {i}: cluster {cs}, refcount_bits {rb}, size {size}, grans {g1}/{g2}/{g3}"
        );
        summary.push(format!("cs={cs} rb={rb} g={g1}/{g2}/{g3} size={size}"));
        let dir = TempDir::new("t2");
        let f = dir.join("ours.qcow2");

        let mut bms = vec![
            Tracked {
                name: "b1",
                model: Model::new(size, g1),
                enabled: true,
            },
            Tracked {
                name: "b2",
                model: Model::new(size, g2),
                enabled: true,
            },
            Tracked {
                name: "d",
                model: Model::new(size, g3),
                enabled: false,
            },
        ];
        {
            let img = Image::create(
                &f,
                &CreateOptions {
                    size,
                    cluster_size: cs,
                    refcount_bits: rb,
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{ctx}: create: {e}"));
            for b in &bms {
                img.add_bitmap(b.name, Some(b.model.granularity), b.enabled)
                    .unwrap_or_else(|e| panic!("{ctx}: add {}: {e}", b.name));
            }
            apply_random_ops(&mut rng, &img, &mut bms, 60, &ctx);
            img.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
        }
        qemu_img_check(&f);
        assert_models_match(&format!("{ctx} (after libqbm)"), &f, &bms);

        // QEMU changes them: merge d into b1, clear b2, write through qemu-io.
        qemu_bitmap(&f, &["--merge", "d"], "b1");
        let d_model = bms[2].model.clone();
        bms[0].model.merge(&d_model);
        qemu_bitmap(&f, &["--clear"], "b2");
        bms[1].model.clear();
        let (cmds, ranges) =
            random_qemu_writes(&mut rng, size, cs, if cs >= 2 * MIB { 5 } else { 10 });
        qemu_io(&f, &cmds);
        for b in bms.iter_mut().filter(|b| b.enabled) {
            for &(o, l) in &ranges {
                b.model.mark(o, l);
            }
        }
        qemu_img_check(&f);
        assert_ours_match(&format!("{ctx} (after QEMU changed them)"), &f, &bms);

        // One more round trip through libqbm, then QEMU reads again.
        {
            let img = open_img(&f, rw()).unwrap_or_else(|e| panic!("{ctx}: reopen rw: {e}"));
            apply_random_ops(&mut rng, &img, &mut bms, 30, &ctx);
            img.close()
                .unwrap_or_else(|e| panic!("{ctx}: close 2: {e}"));
        }
        qemu_img_check(&f);
        assert_models_match(&format!("{ctx} (after second libqbm session)"), &f, &bms);
    }
    eprintln!(
        "t2 matrix ({} cases):\n  {}",
        summary.len(),
        summary.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// 3. Backing file and unknown header extension survive libqbm

const UNKNOWN_MAGIC: u32 = 0x1234_5678;

/// Inserts extension 0x12345678 "hello" before the end marker of cluster 0,
/// moving the backing file name behind it and updating backing_file_offset.
fn insert_unknown_extension(path: &Path) {
    let c0 = cluster0(path);
    let (exts, end_marker) = raw_extensions(&c0);
    assert!(exts.iter().all(|e| e.magic != UNKNOWN_MAGIC));
    let name = raw_backing_name(&c0);
    let mut ext = Vec::new();
    ext.extend_from_slice(&UNKNOWN_MAGIC.to_be_bytes());
    ext.extend_from_slice(&5u32.to_be_bytes());
    ext.extend_from_slice(b"hello\0\0\0");
    let mut tail = vec![0u8; 8]; // end marker
    let name_at = end_marker + ext.len() + tail.len();
    if let Some(n) = &name {
        tail.extend_from_slice(n);
    }
    let mut region = ext;
    region.extend_from_slice(&tail);
    // Wipe from the old end marker to the end of the old name, then write.
    let old_end = match &name {
        Some(n) => (be_u64(&c0, 8) as usize + n.len()).max(end_marker + 8),
        None => end_marker + 8,
    };
    let wipe_len = old_end.max(end_marker + region.len()) - end_marker;
    let mut buf = vec![0u8; wipe_len];
    buf[..region.len()].copy_from_slice(&region);
    assert!(end_marker + buf.len() <= c0.len(), "no room in cluster 0");
    write_bytes(path, end_marker as u64, &buf);
    if name.is_some() {
        write_bytes(path, 8, &(name_at as u64).to_be_bytes());
    }
}

fn unknown_ext(path: &Path) -> Option<Vec<u8>> {
    let (exts, _) = raw_extensions(&cluster0(path));
    exts.into_iter()
        .find(|e| e.magic == UNKNOWN_MAGIC)
        .map(|e| e.data)
}

#[test]
fn t3_backing_file_and_unknown_extension() {
    if !have_tools(TOOLS) {
        return;
    }
    for (cs, with_backing) in [(65536u64, true), (512, true), (4096, false)] {
        let ctx = format!("t3 cluster {cs} backing {with_backing}");
        let dir = TempDir::new("t3");
        let base = dir.join("base.qcow2");
        let top = dir.join("top.qcow2");
        let size = 64 * MIB;
        if with_backing {
            qemu_img_create(&base, size, 65536, 16);
            qemu_io(&base, &write_cmds(&[(0, 64 * KIB)]));
            run(Command::new("qemu-img")
                .args([
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "base.qcow2",
                    "-F",
                    "qcow2",
                    "-o",
                ])
                .arg(format!("cluster_size={cs}"))
                .arg(&top)
                .current_dir(dir.path()));
        } else {
            qemu_img_create(&top, size, cs, 16);
        }
        insert_unknown_extension(&top);
        // Sanity: QEMU accepts the hand-made image.
        qemu_img_check(&top);
        let c0_before = cluster0(&top);
        let (exts_before, _) = raw_extensions(&c0_before);
        let order_before: Vec<u32> = exts_before.iter().map(|e| e.magic).collect();
        let name_before = raw_backing_name(&c0_before);
        assert_eq!(
            unknown_ext(&top).as_deref(),
            Some(&b"hello"[..]),
            "{ctx}: setup"
        );
        let info_before = qemu_img_info(&top, false);

        {
            let img = open_img(&top, rw()).unwrap_or_else(|e| panic!("{ctx}: open rw: {e}"));
            if with_backing {
                assert_eq!(
                    img.info().unwrap().backing_file.as_deref(),
                    Some("base.qcow2"),
                    "{ctx}"
                );
            }
            img.add_bitmap("ours", Some(65536), true).unwrap();
            img.mark_dirty(MIB + 5, 70 * KIB).unwrap();
            img.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
        }
        let c0 = cluster0(&top);
        assert_eq!(
            unknown_ext(&top).as_deref(),
            Some(&b"hello"[..]),
            "{ctx}: unknown extension lost or changed"
        );
        // Its padding bytes are zero, byte for byte as written.
        let (exts, _) = raw_extensions(&c0);
        let u = exts.iter().find(|e| e.magic == UNKNOWN_MAGIC).unwrap();
        assert_eq!(
            &c0[u.offset..u.offset + 16],
            b"\x12\x34\x56\x78\x00\x00\x00\x05hello\0\0\0",
            "{ctx}"
        );
        let order_after: Vec<u32> = exts
            .iter()
            .map(|e| e.magic)
            .filter(|&m| m != 0x2385_2875)
            .collect();
        assert_eq!(
            order_after, order_before,
            "{ctx}: extensions not ours were reordered or changed"
        );
        for e in &exts_before {
            let now = exts.iter().find(|x| x.magic == e.magic).unwrap();
            assert_eq!(now.data, e.data, "{ctx}: extension {:#x} changed", e.magic);
        }
        assert_eq!(
            raw_backing_name(&c0),
            name_before,
            "{ctx}: backing file name changed"
        );
        let info = qemu_img_info(&top, false);
        for key in [
            "backing-filename",
            "backing-filename-format",
            "full-backing-filename",
        ] {
            assert_eq!(
                info.get(key),
                info_before.get(key),
                "{ctx}: qemu-img info {key}"
            );
        }
        if with_backing {
            assert_eq!(
                info.get("backing-filename").and_then(Json::as_str),
                Some("base.qcow2"),
                "{ctx}"
            );
            assert_eq!(
                info.get("backing-filename-format").and_then(Json::as_str),
                Some("qcow2"),
                "{ctx}"
            );
        }
        qemu_img_check(&top);
        assert_qemu_list(&ctx, &top, &[("ours", 65536, true)]);
        assert_eq!(
            nbd_dirty_extents(&top, "ours"),
            vec![(MIB, 128 * KIB)],
            "{ctx}"
        );

        // QEMU read-write session keeps our extension and marks our bitmap.
        qemu_io(&top, &["write 0 4k".to_string()]);
        assert_eq!(
            unknown_ext(&top).as_deref(),
            Some(&b"hello"[..]),
            "{ctx}: QEMU dropped the extension"
        );
        assert_eq!(raw_backing_name(&cluster0(&top)), name_before, "{ctx}");
        qemu_img_check(&top);
        assert_eq!(
            nbd_dirty_extents(&top, "ours"),
            vec![(0, 64 * KIB), (MIB, 128 * KIB)],
            "{ctx}"
        );

        // And libqbm reads what QEMU left, then writes again.
        {
            let img = open_img(&top, rw()).unwrap();
            assert_eq!(
                ours(&img, "ours"),
                vec![(0, 64 * KIB), (MIB, 128 * KIB)],
                "{ctx}"
            );
            img.add_bitmap("second", None, false).unwrap();
            img.close().unwrap();
        }
        assert_eq!(unknown_ext(&top).as_deref(), Some(&b"hello"[..]), "{ctx}");
        assert_eq!(raw_backing_name(&cluster0(&top)), name_before, "{ctx}");
        qemu_img_check(&top);
        let q = qemu_img_info_bitmaps(&top);
        assert_eq!(
            q.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
            ["ours", "second"],
            "{ctx}"
        );
    }
}

// ---------------------------------------------------------------------------
// 4. The in_use protocol, both ways

/// Starts an interactive qemu-io on `path`, has it write, then kills it with
/// SIGKILL: its bitmaps stay flagged in_use on disk.
fn qemu_io_killed_after_write(path: &Path) {
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "write -P 1 0 64k").unwrap();
    stdin.flush().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "qemu-io ended before writing");
        if line.contains("wrote") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
}

fn flags_of(list: &[QemuBitmap]) -> Vec<(String, bool, bool)> {
    list.iter()
        .map(|b| (b.name.clone(), b.auto(), b.in_use()))
        .collect()
}

#[test]
fn t4_in_use_protocol() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t4");

    // (a) libqbm holds the image read-write: QEMU sees in-use; after close not.
    let f = dir.join("ours.qcow2");
    {
        let img = Image::create(
            &f,
            &CreateOptions {
                size: 64 * MIB,
                cluster_size: 65536,
                refcount_bits: 16,
                ..Default::default()
            },
        )
        .unwrap();
        img.add_bitmap("a", Some(65536), true).unwrap();
        img.add_bitmap("b", Some(4096), false).unwrap();
        img.flush().unwrap();
        let q = qemu_img_info_bitmaps_shared(&f);
        assert_eq!(
            flags_of(&q),
            [("a".into(), true, true), ("b".into(), false, true)],
            "while libqbm holds the image rw after flush: {q:?}"
        );
        img.close().unwrap();
    }
    assert_eq!(
        flags_of(&qemu_img_info_bitmaps(&f)),
        [("a".into(), true, false), ("b".into(), false, false)]
    );
    qemu_img_check(&f);
    {
        let img = open_img(&f, rw()).unwrap();
        let q = qemu_img_info_bitmaps_shared(&f);
        assert_eq!(
            flags_of(&q),
            [("a".into(), true, true), ("b".into(), false, true)],
            "right after a libqbm rw open: {q:?}"
        );
        img.close().unwrap();
    }
    assert_eq!(
        flags_of(&qemu_img_info_bitmaps(&f)),
        [("a".into(), true, false), ("b".into(), false, false)]
    );
    // A read-only open changes nothing.
    {
        let before = std::fs::read(&f).unwrap();
        let img = open_img(&f, ro()).unwrap();
        assert!(qemu_img_info_bitmaps_shared(&f).iter().all(|b| !b.in_use()));
        img.close().unwrap();
        assert!(
            std::fs::read(&f).unwrap() == before,
            "a read-only open changed the file"
        );
    }

    // (b) QEMU killed while holding the image: bitmaps in_use.
    let k = dir.join("killed.qcow2");
    qemu_img_create(&k, 64 * MIB, 65536, 16);
    qemu_bitmap_add(&k, "x", Some(65536), true);
    qemu_bitmap_add(&k, "y", Some(4096), false);
    qemu_io(&k, &write_cmds(&[(3 * MIB, 10)]));
    let src = dir.join("src.qcow2");
    qemu_img_create(&src, 64 * MIB, 65536, 16);
    qemu_bitmap_add(&src, "s", None, true);
    qemu_io_killed_after_write(&k);
    let q = qemu_img_info_bitmaps(&k);
    assert_eq!(
        flags_of(&q),
        [("x".into(), true, true), ("y".into(), false, true)],
        "setup: {q:?}"
    );
    qemu_img_check(&k);
    for opts in [ro(), rw()] {
        let img = open_img(&k, opts).unwrap_or_else(|e| panic!("open {opts:?}: {e}"));
        let list = img.bitmaps().unwrap();
        for name in ["x", "y"] {
            let b = info_of(&list, name);
            assert!(
                b.in_use && !b.usable,
                "{opts:?}: '{name}' should be in_use and unusable: {b:?}"
            );
        }
        assert_same_list("in_use image", &list, &q);
        assert!(
            img.extents("x").is_err(),
            "extents of an in_use bitmap must fail"
        );
        assert!(
            img.dirty_bytes("x").is_err(),
            "dirty_bytes of an in_use bitmap must fail"
        );
        img.close().unwrap();
    }
    {
        let img = open_img(&k, rw()).unwrap();
        let srcimg = open_img(&src, ro()).unwrap();
        let e = img.add_bitmap("x", Some(65536), true).unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST, "add over an in_use bitmap: {e}");
        let e = img.clear_bitmap("x").unwrap_err();
        assert_eq!(e.errno(), libc::EBUSY, "clear of an in_use bitmap: {e}");
        let e = img.merge_bitmap("x", &srcimg, "s").unwrap_err();
        assert_eq!(e.errno(), libc::EBUSY, "merge into an in_use bitmap: {e}");
        let e = img.merge_bitmap("x", &img, "y").unwrap_err();
        assert_eq!(e.errno(), libc::EBUSY, "merge from an in_use bitmap: {e}");
        assert!(
            img.set_range("x", 0, 512).is_err(),
            "set_range on an in_use bitmap"
        );
        assert!(
            img.reset_range("x", 0, 65536).is_err(),
            "reset_range on an in_use bitmap"
        );
        assert!(
            img.enable_bitmap("y").is_err(),
            "enable of an in_use bitmap"
        );
        assert!(
            img.disable_bitmap("x").is_err(),
            "disable of an in_use bitmap"
        );
        assert!(
            img.rename_bitmap("x", "z").is_err(),
            "rename of an in_use bitmap"
        );
        img.mark_dirty(0, 4096).unwrap();
        img.remove_bitmap("x")
            .unwrap_or_else(|e| panic!("remove of an in_use bitmap must work: {e}"));
        srcimg.close().unwrap();
        img.close().unwrap();
    }
    qemu_img_check(&k);
    // The untouched inconsistent bitmap stays flagged in_use: we never loaded it.
    assert_eq!(
        flags_of(&qemu_img_info_bitmaps(&k)),
        [("y".into(), false, true)]
    );
    {
        let img = open_img(&k, rw()).unwrap();
        img.remove_bitmap("y").unwrap();
        img.close().unwrap();
    }
    qemu_img_check(&k);
    assert!(qemu_img_info_bitmaps(&k).is_empty());
    // A fresh bitmap on the same image works for both.
    {
        let img = open_img(&k, rw()).unwrap();
        img.add_bitmap("x", Some(65536), true).unwrap();
        img.mark_dirty(5 * MIB, 1).unwrap();
        img.close().unwrap();
    }
    qemu_img_check(&k);
    assert_eq!(nbd_dirty_extents(&k, "x"), vec![(5 * MIB, 64 * KIB)]);

    // (c) in_use set by hand in the directory of a QEMU-made image.
    let h = dir.join("hand.qcow2");
    qemu_img_create(&h, 16 * MIB, 4096, 8);
    qemu_bitmap_add(&h, "h1", Some(4096), true);
    qemu_bitmap_add(&h, "h2", Some(4096), true);
    qemu_io(&h, &write_cmds(&[(0, 100 * KIB), (9 * MIB, 5)]));
    let c0 = cluster0(&h);
    let (exts, _) = raw_extensions(&c0);
    let bm = exts
        .iter()
        .find(|e| e.magic == 0x2385_2875)
        .expect("bitmaps extension");
    let dir_off = be_u64(&bm.data, 16);
    let entry = read_bytes(&h, dir_off, 24);
    let flags = be_u32(&entry, 12) | 1;
    write_bytes(&h, dir_off + 12, &flags.to_be_bytes());
    let q = qemu_img_info_bitmaps(&h);
    assert_eq!(
        flags_of(&q),
        [("h1".into(), true, true), ("h2".into(), true, false)],
        "setup"
    );
    {
        let img = open_img(&h, rw()).unwrap();
        let list = img.bitmaps().unwrap();
        assert!(info_of(&list, "h1").in_use && !info_of(&list, "h1").usable);
        assert!(!info_of(&list, "h2").in_use && info_of(&list, "h2").usable);
        img.mark_dirty(12 * MIB, 4096).unwrap();
        img.close().unwrap();
    }
    qemu_img_check(&h);
    assert_eq!(
        flags_of(&qemu_img_info_bitmaps(&h)),
        [("h1".into(), true, true), ("h2".into(), true, false)]
    );
    assert_eq!(
        nbd_dirty_extents(&h, "h2"),
        vec![(0, 100 * KIB), (9 * MIB, 4096), (12 * MIB, 4096)]
    );
    {
        let img = open_img(&h, rw()).unwrap();
        img.remove_bitmap("h1").unwrap();
        img.close().unwrap();
    }
    qemu_img_check(&h);
    assert_eq!(
        flags_of(&qemu_img_info_bitmaps(&h)),
        [("h2".into(), true, false)]
    );
}

// ---------------------------------------------------------------------------
// 5. Feature bits

#[test]
fn t5_feature_bits() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t5");
    let f = dir.join("f.qcow2");
    qemu_img_create(&f, 32 * MIB, 65536, 16);
    qemu_bitmap_add(&f, "b", Some(65536), true);
    qemu_io(&f, &write_cmds(&[(MIB, 1)]));
    let want = vec![(MIB, 64 * KIB)];

    // Unknown autoclear bit 63.
    let autoclear = be_u64(&read_bytes(&f, 88, 8), 0);
    assert_eq!(autoclear, 1, "setup: QEMU sets only the bitmaps bit");
    write_bytes(&f, 88, &(autoclear | 1 << 63).to_be_bytes());
    {
        let img = open_img(&f, ro()).unwrap();
        assert_eq!(
            ours(&img, "b"),
            want,
            "a bitmap under an unknown autoclear bit is still valid"
        );
        img.close().unwrap();
    }
    assert_eq!(
        be_u64(&read_bytes(&f, 88, 8), 0),
        1 | 1 << 63,
        "a read-only open must leave autoclear alone"
    );
    {
        let img = open_img(&f, rw()).unwrap();
        assert_eq!(
            be_u64(&read_bytes(&f, 88, 8), 0),
            1,
            "a read-write open must clear unknown autoclear bits at once"
        );
        assert_eq!(ours(&img, "b"), want);
        img.close().unwrap();
    }
    assert_eq!(be_u64(&read_bytes(&f, 88, 8), 0), 1, "after close");
    qemu_img_check(&f);
    assert_eq!(nbd_dirty_extents(&f, "b"), want);

    // Unknown autoclear bit on an image without bitmaps.
    let g = dir.join("g.qcow2");
    qemu_img_create(&g, 32 * MIB, 65536, 16);
    write_bytes(&g, 88, &(1u64 << 63).to_be_bytes());
    open_img(&g, rw()).unwrap().close().unwrap();
    assert_eq!(
        be_u64(&read_bytes(&g, 88, 8), 0),
        0,
        "bit 63 must be cleared without bitmaps too"
    );
    qemu_img_check(&g);

    // Unknown incompatible bit 63: refuse, with ENOTSUP, changing nothing.
    let incompat = be_u64(&read_bytes(&f, 72, 8), 0);
    write_bytes(&f, 72, &(incompat | 1 << 63).to_be_bytes());
    let before = std::fs::read(&f).unwrap();
    for opts in [ro(), rw()] {
        match open_img(&f, opts) {
            Ok(_) => panic!("{opts:?}: open succeeded despite unknown incompatible bit 63"),
            Err(e) => assert_eq!(e.errno(), libc::ENOTSUP, "{opts:?}: {e}"),
        }
    }
    assert!(
        std::fs::read(&f).unwrap() == before,
        "a refused open changed the file"
    );
    let out = run_output(Command::new("qemu-img").arg("info").arg(&f));
    assert!(!out.status.success(), "QEMU should refuse too");
    write_bytes(&f, 72, &incompat.to_be_bytes());

    // Corrupt bit (incompatible bit 1): read-only only, as for QEMU.
    write_bytes(&f, 72, &(incompat | 2).to_be_bytes());
    let before = std::fs::read(&f).unwrap();
    {
        let img = open_img(&f, ro())
            .unwrap_or_else(|e| panic!("read-only open of a corrupt-flagged image: {e}"));
        assert_eq!(ours(&img, "b"), want);
        img.close().unwrap();
    }
    match open_img(&f, rw()) {
        Ok(_) => panic!("read-write open of an image flagged corrupt succeeded"),
        Err(e) => assert_eq!(e.errno(), libc::EUCLEAN, "{e}"),
    }
    assert!(
        std::fs::read(&f).unwrap() == before,
        "a refused open changed the file"
    );
    let out = run_output(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "read 0 512"])
            .arg(&f),
    );
    assert!(
        !out.status.success(),
        "QEMU opens a corrupt image read-write?"
    );
    run(Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "read 0 512"])
        .arg(&f));
    write_bytes(&f, 72, &incompat.to_be_bytes());

    // Autoclear bit 0 clear: the bitmaps extension is stale for both.
    let s = dir.join("stale.qcow2");
    qemu_img_create(&s, 32 * MIB, 65536, 16);
    qemu_bitmap_add(&s, "old", None, true);
    write_bytes(&s, 88, &0u64.to_be_bytes());
    assert!(
        qemu_img_info_bitmaps(&s).is_empty(),
        "QEMU ignores a stale extension"
    );
    {
        let img = open_img(&s, ro()).unwrap();
        assert!(
            img.bitmaps().unwrap().is_empty(),
            "libqbm must ignore a stale extension"
        );
        img.close().unwrap();
    }
    {
        let img = open_img(&s, rw()).unwrap();
        img.add_bitmap("new", Some(4096), true).unwrap();
        img.mark_dirty(0, 1).unwrap();
        img.close().unwrap();
    }
    let c = qemu_img_check_raw(&s);
    assert_eq!(c.corruptions, 0, "{}", c.raw);
    assert_eq!(
        flags_of(&qemu_img_info_bitmaps(&s)),
        [("new".into(), true, false)]
    );
    assert_eq!(nbd_dirty_extents(&s, "new"), vec![(0, 4096)]);
}

// ---------------------------------------------------------------------------
// 6. Refcount table growth under many dense bitmaps

fn refcount_table_fields(path: &Path) -> (u64, u32) {
    let h = read_bytes(path, 48, 12);
    (be_u64(&h, 0), be_u32(&h, 8))
}

#[test]
fn t6_refcount_table_growth() {
    if !have_tools(TOOLS) {
        return;
    }
    let size = 256 * MIB;
    let nb = 40;
    let mut grew = Vec::new();
    for (variant, qemu_made) in [("created by libqbm", false), ("created by qemu-img", true)] {
        let ctx = format!("t6 {variant}");
        let dir = TempDir::new("t6");
        let f = dir.join("many.qcow2");
        let mut rng = Rng::new(0x6000 + qemu_made as u64);
        let mut models: Vec<Model> = Vec::new();
        let names: Vec<String> = (0..nb).map(|i| format!("bitmap-{i:02}")).collect();
        let img = if qemu_made {
            qemu_img_create(&f, size, 512, 64);
            open_img(&f, rw()).unwrap()
        } else {
            Image::create(
                &f,
                &CreateOptions {
                    size,
                    cluster_size: 512,
                    refcount_bits: 64,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let table_before = refcount_table_fields(&f);
        for (i, name) in names.iter().enumerate() {
            let g = if i % 4 == 3 { 4096 } else { 512 };
            img.add_bitmap(name, Some(g), true).unwrap();
            models.push(Model::new(size, g));
        }
        for round in 0..3 {
            for (name, m) in names.iter().zip(models.iter_mut()) {
                for _ in 0..400 {
                    let off = rng.below(size);
                    let len = rng.range(1, 64 * KIB).min(size - off);
                    img.set_range(name, off, len).unwrap();
                    m.mark(off, len);
                }
                for _ in 0..40 {
                    let g = m.granularity;
                    let first = rng.below(size / g);
                    let n = rng.range(1, 64).min(size / g - first);
                    img.reset_range(name, first * g, n * g).unwrap();
                    m.reset(first * g, n * g);
                }
            }
            for _ in 0..200 {
                let off = rng.below(size);
                let len = rng.range(1, 16 * KIB).min(size - off);
                img.mark_dirty(off, len).unwrap();
                models.iter_mut().for_each(|m| m.mark(off, len));
            }
            if round == 1 {
                // Drop a few and add them back: frees clusters in the middle.
                for name in names.iter().step_by(7) {
                    img.remove_bitmap(name).unwrap();
                }
                img.flush().unwrap();
                for (i, name) in names.iter().enumerate().step_by(7) {
                    img.add_bitmap(name, Some(models[i].granularity), true)
                        .unwrap();
                    models[i].clear();
                }
            }
            img.flush()
                .unwrap_or_else(|e| panic!("{ctx}: flush round {round}: {e}"));
        }
        img.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
        let table_after = refcount_table_fields(&f);
        if table_after != table_before {
            grew.push(format!("{variant}: {table_before:?} -> {table_after:?}"));
        }
        qemu_img_check(&f);
        let q = qemu_img_info_bitmaps(&f);
        let want: Vec<(String, u64, Vec<String>)> = names
            .iter()
            .zip(&models)
            .map(|(n, m)| (n.clone(), m.granularity, vec!["auto".to_string()]))
            .collect();
        let mut got: Vec<(String, u64, Vec<String>)> = q
            .iter()
            .map(|b| (b.name.clone(), b.granularity, b.flags.clone()))
            .collect();
        got.sort();
        assert_eq!(got, want, "{ctx}: qemu-img info");
        let img = open_img(&f, ro()).unwrap();
        for (name, m) in names.iter().zip(&models) {
            let truth = nbd_dirty_extents(&f, name);
            assert_eq!(truth, m.extents(), "{ctx}: '{name}' qemu-nbd vs model");
            assert_eq!(
                ours(&img, name),
                truth,
                "{ctx}: '{name}' libqbm vs qemu-nbd"
            );
        }
        img.close().unwrap();
    }
    eprintln!("t6 refcount table moves: {grew:?}");
    assert!(
        !grew.is_empty(),
        "the refcount table never grew: the test does not exercise growth"
    );
}

// ---------------------------------------------------------------------------
// 7. Management calls as QEMU sees them, and QEMU's as we see them

#[test]
fn t7_management_both_ways() {
    if !have_tools(TOOLS) {
        return;
    }
    for &(cs, rb) in &[(65536u64, 16u32), (512, 1), (4096, 64), (2 * MIB, 8)] {
        let ctx = format!("t7 cluster {cs} refcount_bits {rb}");
        let dir = TempDir::new("t7");
        let size = 128 * MIB + 1536;
        let f = dir.join("ours.qcow2");
        let q = dir.join("theirs.qcow2");
        qemu_img_create(&q, size, cs, rb);
        qemu_bitmap_add(&q, "qa", Some(4096), true);
        qemu_io(&q, &write_cmds(&[(7 * MIB + 3, 10000), (size - 100, 100)]));
        let mut qa = Model::new(size, 4096);
        qa.mark(7 * MIB + 3, 10000);
        qa.mark(size - 100, 100);
        assert_eq!(nbd_dirty_extents(&q, "qa"), qa.extents(), "{ctx}: setup");

        {
            let img = Image::create(
                &f,
                &CreateOptions {
                    size,
                    cluster_size: cs,
                    refcount_bits: rb,
                    ..Default::default()
                },
            )
            .unwrap();
            // Default granularity must be QEMU's for this cluster size.
            img.add_bitmap("dflt", None, true).unwrap();
            img.add_bitmap("m", Some(65536), true).unwrap();
            img.add_bitmap("gone", Some(4096), true).unwrap();
            img.mark_dirty(MIB, 1).unwrap();
            let other = open_img(&q, ro()).unwrap();
            img.merge_bitmap("m", &other, "qa").unwrap();
            other.close().unwrap();
            img.rename_bitmap("m", "merged").unwrap();
            img.disable_bitmap("dflt").unwrap();
            img.remove_bitmap("gone").unwrap();
            img.close().unwrap();
        }
        qemu_img_check(&f);
        let qemu_default = {
            let t = dir.join("default.qcow2");
            qemu_img_create(&t, size, cs, rb);
            qemu_bitmap_add(&t, "x", None, true);
            qemu_img_info_bitmaps(&t)[0].granularity
        };
        let mut merged = Model::new(size, 65536);
        merged.mark(MIB, 1);
        merged.merge(&qa);
        let mut dflt = Model::new(size, qemu_default);
        dflt.mark(MIB, 1);
        assert_qemu_list(
            &ctx,
            &f,
            &[("dflt", qemu_default, false), ("merged", 65536, true)],
        );
        assert_eq!(
            nbd_dirty_extents(&f, "merged"),
            merged.extents(),
            "{ctx}: merged"
        );
        assert_eq!(nbd_dirty_extents(&f, "dflt"), dflt.extents(), "{ctx}: dflt");

        // QEMU manages ours: enable, add, merge across files, remove.
        qemu_bitmap(&f, &["--enable"], "dflt");
        qemu_bitmap_add(&f, "qnew", Some(1 << 20), false);
        run(Command::new("qemu-img")
            .args(["bitmap", "--merge", "qa", "-b"])
            .arg(&q)
            .args(["-F", "qcow2"])
            .arg(&f)
            .arg("qnew"));
        qemu_bitmap(&f, &["--remove"], "merged");
        qemu_img_check(&f);
        let mut qnew = Model::new(size, 1 << 20);
        qnew.merge(&qa);
        let qlist = qemu_img_info_bitmaps(&f);
        {
            let img = open_img(&f, rw()).unwrap();
            let list = img.bitmaps().unwrap();
            assert_same_list(&ctx, &list, &qlist);
            assert_eq!(
                list.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
                ["dflt", "qnew"],
                "{ctx}"
            );
            assert!(
                info_of(&list, "dflt").enabled && !info_of(&list, "qnew").enabled,
                "{ctx}"
            );
            assert_eq!(ours(&img, "qnew"), qnew.extents(), "{ctx}: qnew");
            assert_eq!(ours(&img, "dflt"), dflt.extents(), "{ctx}: dflt");
            img.mark_dirty(size - 1, 1).unwrap();
            dflt.mark(size - 1, 1);
            img.close().unwrap();
        }
        qemu_img_check(&f);
        assert_qemu_list(
            &ctx,
            &f,
            &[("dflt", qemu_default, true), ("qnew", 1 << 20, false)],
        );
        assert_eq!(nbd_dirty_extents(&f, "dflt"), dflt.extents(), "{ctx}");
        assert_eq!(nbd_dirty_extents(&f, "qnew"), qnew.extents(), "{ctx}");
        // Removing everything through libqbm leaves a clean image without the extension.
        {
            let img = open_img(&f, rw()).unwrap();
            img.remove_bitmap("dflt").unwrap();
            img.remove_bitmap("qnew").unwrap();
            img.close().unwrap();
        }
        qemu_img_check(&f);
        assert!(qemu_img_info_bitmaps(&f).is_empty(), "{ctx}");
        let (exts, _) = raw_extensions(&cluster0(&f));
        assert!(
            exts.iter().all(|e| e.magic != 0x2385_2875),
            "{ctx}: bitmaps extension left behind"
        );
        assert_eq!(
            be_u64(&read_bytes(&f, 88, 8), 0) & 1,
            0,
            "{ctx}: autoclear bit 0 left set without bitmaps"
        );
    }
}

// ---------------------------------------------------------------------------
// 8. All-ones clusters and whole-disk ranges, on a big sparse disk

#[test]
fn t8_full_ranges_and_big_sparse_disk() {
    if !have_tools(TOOLS) {
        return;
    }
    // 1 TiB, 4 KiB clusters: a 4 KiB-granularity bitmap is 32 MiB serialized,
    // its table 8192 entries over 16 clusters.
    let size = 1 << 40;
    let cs = 4096;
    let dir = TempDir::new("t8");
    let f = dir.join("big.qcow2");
    qemu_img_create(&f, size, cs, 16);
    qemu_bitmap_add(&f, "fine", Some(4096), true);
    qemu_bitmap_add(&f, "coarse", Some(1 << 20), true);
    // 1 GiB zero write at a 128 MiB boundary: eight all-ones bitmap clusters.
    let writes = [(3 << 30, 1u64 << 30), (size - 4096, 4096), (700 << 30, 5)];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("write -z {o} {l}"))
        .collect();
    qemu_io(&f, &cmds);
    let mut fine = Model::new(size, 4096);
    let mut coarse = Model::new(size, 1 << 20);
    for &(o, l) in &writes {
        fine.mark(o, l);
        coarse.mark(o, l);
    }
    assert_eq!(nbd_dirty_extents(&f, "fine"), fine.extents(), "setup");
    {
        let img = open_img(&f, ro()).unwrap();
        assert_eq!(
            ours(&img, "fine"),
            fine.extents(),
            "QEMU-written 1 TiB bitmap"
        );
        assert_eq!(ours(&img, "coarse"), coarse.extents());
        img.close().unwrap();
    }
    {
        let img = open_img(&f, rw()).unwrap();
        img.add_bitmap("full", Some(65536), false).unwrap();
        img.set_range("full", 0, size).unwrap();
        img.reset_range("fine", (3 << 30) + (256 << 20), 128 << 20)
            .unwrap();
        fine.reset((3 << 30) + (256 << 20), 128 << 20);
        img.set_range("coarse", 10 << 30, 1 << 30).unwrap();
        coarse.mark(10 << 30, 1 << 30);
        img.close().unwrap();
    }
    qemu_img_check(&f);
    let mut full = Model::new(size, 65536);
    full.mark(0, size);
    assert_qemu_list(
        "t8",
        &f,
        &[
            ("fine", 4096, true),
            ("coarse", 1 << 20, true),
            ("full", 65536, false),
        ],
    );
    assert_eq!(
        nbd_dirty_extents(&f, "full"),
        full.extents(),
        "whole-disk bitmap"
    );
    assert_eq!(nbd_dirty_extents(&f, "fine"), fine.extents());
    assert_eq!(nbd_dirty_extents(&f, "coarse"), coarse.extents());
    // QEMU loads all-ones table entries, changes and stores them.
    qemu_io(&f, &["write -P 3 5000 3".to_string()]);
    fine.mark(5000, 3);
    coarse.mark(5000, 3);
    qemu_bitmap(&f, &["--merge", "full"], "fine");
    fine.merge(&full);
    qemu_img_check(&f);
    {
        let img = open_img(&f, rw()).unwrap();
        assert_eq!(ours(&img, "fine"), vec![(0, size)]);
        assert_eq!(ours(&img, "coarse"), coarse.extents());
        assert_eq!(ours(&img, "full"), vec![(0, size)]);
        img.reset_range("full", 0, size).unwrap();
        img.clear_bitmap("fine").unwrap();
        img.close().unwrap();
    }
    qemu_img_check(&f);
    assert!(nbd_dirty_extents(&f, "full").is_empty());
    assert!(nbd_dirty_extents(&f, "fine").is_empty());
    assert_eq!(nbd_dirty_extents(&f, "coarse"), coarse.extents());

    // Small disks: whole-disk set_range for every cluster size, read by QEMU.
    for (i, &cs) in CLUSTER_SIZES.iter().enumerate() {
        let size = 16 * MIB + 512 * (2 * i as u64 + 1);
        let f = dir.join(&format!("full{cs}.qcow2"));
        {
            let img = Image::create(
                &f,
                &CreateOptions {
                    size,
                    cluster_size: cs,
                    refcount_bits: 16,
                    ..Default::default()
                },
            )
            .unwrap();
            for &g in &GRANULARITIES {
                img.add_bitmap(&format!("g{g}"), Some(g), true).unwrap();
                img.set_range(&format!("g{g}"), 0, size).unwrap();
            }
            img.close().unwrap();
        }
        qemu_img_check(&f);
        for &g in &GRANULARITIES {
            assert_eq!(
                nbd_dirty_extents(&f, &format!("g{g}")),
                vec![(0, size)],
                "cluster {cs} gran {g}"
            );
        }
        qemu_io(&f, &["write 0 512".to_string()]);
        qemu_img_check(&f);
        for &g in &GRANULARITIES {
            assert_eq!(
                nbd_dirty_extents(&f, &format!("g{g}")),
                vec![(0, size)],
                "after QEMU, cluster {cs} gran {g}"
            );
        }
        // QEMU removes bitmaps whose tables hold all-ones entries.
        qemu_bitmap(&f, &["--remove"], "g512");
        qemu_bitmap(&f, &["--remove"], "g1048576");
        qemu_img_check(&f);
        let img = open_img(&f, ro()).unwrap();
        assert_eq!(img.bitmaps().unwrap().len(), 2);
        assert_eq!(ours(&img, "g4096"), vec![(0, size)]);
        img.close().unwrap();
    }
}

// ---------------------------------------------------------------------------
// 9. qcow2 features around the bitmaps: extended L2, zstd, external data
//    file, lazy refcounts, preallocation, internal snapshots, v2 images

/// The common dance: libqbm adds and marks a bitmap, QEMU checks and writes,
/// libqbm reads back exactly what qemu-nbd exports.
fn roundtrip_on(ctx: &str, f: &Path) {
    let size = open_img(f, ro())
        .unwrap_or_else(|e| panic!("{ctx}: open ro: {e}"))
        .size();
    {
        let img = open_img(f, rw()).unwrap_or_else(|e| panic!("{ctx}: open rw: {e}"));
        img.add_bitmap("lq", Some(65536), true)
            .unwrap_or_else(|e| panic!("{ctx}: add: {e}"));
        img.mark_dirty(2 * MIB + 1, 3).unwrap();
        img.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
    }
    qemu_img_check(f);
    assert_eq!(
        nbd_dirty_extents(f, "lq"),
        vec![(2 * MIB, 64 * KIB)],
        "{ctx}"
    );
    qemu_io(f, &["write -P 9 5M 4k".to_string()]);
    qemu_img_check(f);
    let want = vec![(2 * MIB, 64 * KIB), (5 * MIB, 64 * KIB)];
    assert_eq!(nbd_dirty_extents(f, "lq"), want, "{ctx}");
    let img = open_img(f, ro()).unwrap();
    assert_eq!(ours(&img, "lq"), want, "{ctx}");
    assert_eq!(img.size(), size, "{ctx}");
    img.close().unwrap();
}

#[test]
fn t9_image_features() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t9");
    let create = |name: &str, opts: &str| {
        let f = dir.join(name);
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", opts])
            .arg(&f)
            .arg("64M")
            .current_dir(dir.path()));
        f
    };

    let f = create("extl2.qcow2", "extended_l2=on,cluster_size=65536");
    qemu_io(&f, &write_cmds(&[(0, 100 * KIB)]));
    roundtrip_on("extended_l2", &f);

    let f = create("zstd.qcow2", "compression_type=zstd");
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -c -P 5 0 64k"])
        .arg(&f));
    roundtrip_on("zstd", &f);

    // QEMU 10 resolves a relative data file name against its working
    // directory, not the image's folder: use an absolute one.
    let data_raw = dir.join("data.raw");
    let f = create(
        "meta.qcow2",
        &format!("data_file={},data_file_raw=on", data_raw.display()),
    );
    let c0_before = cluster0(&f);
    roundtrip_on("external data file", &f);
    let c0 = cluster0(&f);
    assert_eq!(
        be_u64(&c0, 72),
        be_u64(&c0_before, 72),
        "incompatible bits changed"
    );
    assert_eq!(
        be_u64(&c0, 88),
        3,
        "autoclear: bitmaps + data_file_raw must both be set"
    );
    let ext = |c: &[u8]| {
        raw_extensions(c)
            .0
            .into_iter()
            .find(|e| e.magic == 0x4441_5441)
            .map(|e| e.data)
    };
    assert_eq!(ext(&c0), ext(&c0_before), "data file name changed");
    let info = qemu_img_info(&f, false);
    let data_file = info
        .get("format-specific")
        .and_then(|x| x.get("data"))
        .and_then(|x| x.get("data-file"));
    assert_eq!(
        data_file.and_then(Json::as_str),
        data_raw.to_str(),
        "qemu-img info data-file"
    );

    let f = create(
        "prealloc.qcow2",
        "preallocation=metadata,cluster_size=4096,refcount_bits=4",
    );
    roundtrip_on("preallocation=metadata", &f);

    let f = create("snap.qcow2", "cluster_size=4096");
    qemu_io(&f, &write_cmds(&[(0, 256 * KIB), (10 * MIB, 4096)]));
    qemu_img(&["snapshot", "-c", "s1", f.to_str().unwrap()]);
    qemu_io(&f, &write_cmds(&[(0, 256 * KIB)]));
    qemu_img(&["snapshot", "-c", "s2", f.to_str().unwrap()]);
    qemu_io(&f, &write_cmds(&[(0, 64 * KIB)]));
    // Deleting s1 frees its old data clusters: holes libqbm allocates into.
    qemu_img(&["snapshot", "-d", "s1", f.to_str().unwrap()]);
    qemu_img_check(&f);
    roundtrip_on("internal snapshots", &f);
    {
        let img = open_img(&f, rw()).unwrap();
        for i in 0..20 {
            img.add_bitmap(&format!("fill{i}"), Some(512), true)
                .unwrap();
        }
        for k in (0..64 * MIB).step_by(8192) {
            img.mark_dirty(k, 512).unwrap();
        }
        img.close().unwrap();
    }
    qemu_img_check(&f);
    let want: Vec<(u64, u64)> = (0..64 * MIB).step_by(8192).map(|k| (k, 512)).collect();
    assert_eq!(nbd_dirty_extents(&f, "fill19"), want);
    qemu_img(&["snapshot", "-d", "s2", f.to_str().unwrap()]);
    qemu_img_check(&f);
    run(Command::new("qemu-img").args(["snapshot", "-l"]).arg(&f));

    // Lazy refcounts, QEMU killed: dirty bit set. libqbm reads, refuses to
    // write until `qemu-img check -r all` repaired it.
    let f = create("lazy.qcow2", "lazy_refcounts=on");
    qemu_bitmap_add(&f, "b", None, true);
    qemu_io_killed_after_write(&f);
    assert_eq!(be_u64(&read_bytes(&f, 72, 8), 0) & 1, 1, "setup: dirty bit");
    {
        let img = open_img(&f, ro()).unwrap();
        assert!(img.bitmaps().unwrap()[0].in_use);
        img.close().unwrap();
    }
    let before = std::fs::read(&f).unwrap();
    match open_img(&f, rw()) {
        Ok(_) => panic!("read-write open of an image with stale refcounts must fail"),
        Err(e) => assert_eq!(e.errno(), libc::EUCLEAN, "{e}"),
    }
    assert!(
        std::fs::read(&f).unwrap() == before,
        "a refused open changed the file"
    );
    run_output(
        Command::new("qemu-img")
            .args(["check", "-q", "-r", "all"])
            .arg(&f),
    );
    {
        let img = open_img(&f, rw()).unwrap();
        img.remove_bitmap("b").unwrap();
        img.close().unwrap();
    }
    roundtrip_on("lazy refcounts after repair", &f);

    // v2: no bitmaps; a read-write open changes nothing.
    let f = create("v2.qcow2", "compat=0.10");
    qemu_io(&f, &write_cmds(&[(0, 4096)]));
    let before = std::fs::read(&f).unwrap();
    {
        let img = open_img(&f, rw()).unwrap();
        let e = img.add_bitmap("b", None, true).unwrap_err();
        assert_eq!(e.errno(), libc::ENOTSUP, "v2 add: {e}");
        img.mark_dirty(0, 10).unwrap();
        img.close().unwrap();
    }
    assert!(
        std::fs::read(&f).unwrap() == before,
        "v2 image changed by libqbm"
    );
    qemu_img_check(&f);
}

// ---------------------------------------------------------------------------
// 10. Names, granularities and sizes at the limits

#[test]
fn t10_limits_and_names() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t10");
    let long: String = "n".repeat(1023);
    let uni = "диск ☃ \"quoted\" back\\slash";
    let f = dir.join("names.qcow2");
    {
        let img = Image::create(
            &f,
            &CreateOptions {
                size: 32 * MIB,
                cluster_size: 512,
                refcount_bits: 16,
                ..Default::default()
            },
        )
        .unwrap();
        img.add_bitmap(&long, Some(4096), true).unwrap();
        img.add_bitmap(uni, Some(1 << 31), true).unwrap();
        let e = img.add_bitmap(&"x".repeat(1024), None, true).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "1024-byte name: {e}");
        let e = img.add_bitmap("", None, true).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "empty name: {e}");
        for g in [256u64, 3 << 12, 1 << 32] {
            let e = img.add_bitmap("g", Some(g), true).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "granularity {g}: {e}");
        }
        img.mark_dirty(MIB, 1).unwrap();
        img.close().unwrap();
    }
    qemu_img_check(&f);
    let q = qemu_img_info_bitmaps(&f);
    let got: Vec<(String, u64)> = q.iter().map(|b| (b.name.clone(), b.granularity)).collect();
    assert_eq!(got, [(long.clone(), 4096), (uni.to_string(), 1 << 31)]);
    assert_eq!(nbd_dirty_extents(&f, uni), vec![(0, 32 * MIB)]);
    // QEMU adds a long-named one too; both sides list the same.
    let long2 = "q".repeat(1023);
    qemu_bitmap_add(&f, &long2, Some(512), true);
    qemu_io(&f, &write_cmds(&[(7 * MIB, 1)]));
    qemu_img_check(&f);
    {
        let img = open_img(&f, ro()).unwrap();
        assert_same_list(
            "long names",
            &img.bitmaps().unwrap(),
            &qemu_img_info_bitmaps(&f),
        );
        assert_eq!(ours(&img, &long2), vec![(7 * MIB, 512)]);
        assert_eq!(ours(&img, &long), vec![(MIB, 4096), (7 * MIB, 4096)]);
        img.close().unwrap();
    }
}

#[test]
fn t10b_nul_in_name() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t10b");
    // A name with a NUL byte is not a valid qcow2 bitmap name.
    let n = dir.join("nul.qcow2");
    {
        let img = Image::create(
            &n,
            &CreateOptions {
                size: MIB,
                cluster_size: 65536,
                refcount_bits: 16,
                ..Default::default()
            },
        )
        .unwrap();
        img.add_bitmap("a", None, true).unwrap();
        let r = img.add_bitmap("a\0b", None, true);
        let accepted = r.is_ok();
        if let Err(e) = r {
            assert_eq!(e.errno(), libc::EINVAL, "NUL in a name: {e}");
        }
        img.close().unwrap();
        if accepted {
            let info = run_output(
                Command::new("qemu-img")
                    .args(["info", "--output=json"])
                    .arg(&n),
            );
            panic!(
                "bitmap name \"a\\0b\" (with a NUL byte) was accepted next to \"a\"; qemu-img info then says: {}{}",
                String::from_utf8_lossy(&info.stderr).trim(),
                if info.status.success() { "(opened)" } else { "" }
            );
        }
    }
}

#[test]
fn t10c_odd_disk_sizes() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t10c");
    // A size that is not a multiple of 512: qemu-img create rounds it up
    // (1000 -> 1024); QEMU reads a header size of 1000 as 512 bytes. Either
    // libqbm refuses such a size, or QEMU and libqbm must agree on the disk
    // and its bits. 2 MiB + 100 with 512-byte clusters and granularity puts
    // the extra bit into a second bitmap cluster, so the table sizes differ.
    let mut failures = Vec::new();
    for (size, cs) in [(1000u64, 65536u64), (2 * MIB + 100, 512)] {
        let p = dir.join(&format!("size{size}.qcow2"));
        let Ok(img) = Image::create(
            &p,
            &CreateOptions {
                size,
                cluster_size: cs,
                refcount_bits: 16,
                ..Default::default()
            },
        ) else {
            continue;
        };
        img.add_bitmap("b", Some(512), true).unwrap();
        let size = img.size();
        img.mark_dirty(size - 1, 1).unwrap();
        img.close().unwrap();
        let info = run_output(
            Command::new("qemu-img")
                .args(["info", "--output=json"])
                .arg(&p),
        );
        if !info.status.success() {
            failures.push(format!(
                "size {size}, cluster {cs}: QEMU cannot open the image: {}",
                String::from_utf8_lossy(&info.stderr).trim()
            ));
            continue;
        }
        qemu_img_check(&p);
        let qemu_size = qemu_img_info(&p, false)
            .get("virtual-size")
            .and_then(Json::as_u64)
            .unwrap();
        let img = open_img(&p, ro()).unwrap();
        let ours_ext = ours(&img, "b");
        img.close().unwrap();
        let theirs = (qemu_size, nbd_dirty_extents(&p, "b"));
        if (size, ours_ext.clone()) != theirs {
            failures.push(format!(
                "size {size}, cluster {cs}: libqbm's (size, extents after marking the last byte) {:?} != QEMU's {theirs:?}",
                (size, ours_ext)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "disk sizes not a multiple of 512:\n{}",
        failures.join("\n")
    );
}

#[test]
fn t10d_zero_size_disk() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t10d");
    // A zero-size disk: QEMU refuses `bitmap --add` there; a bitmap libqbm
    // stores must still let QEMU open the image.
    let p = dir.join("size0.qcow2");
    let img = Image::create(
        &p,
        &CreateOptions {
            size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            ..Default::default()
        },
    )
    .unwrap();
    let added = img.add_bitmap("b", None, true);
    img.close().unwrap();
    let out = run_output(
        Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(&p),
    );
    assert!(
        out.status.success(),
        "libqbm made a 0-byte image (bitmap added: {}) that QEMU cannot open: {}{}",
        added.is_ok(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

// ---------------------------------------------------------------------------
// 11. Cluster 0 full: the bitmaps extension does not fit

#[test]
fn t11_cluster0_full() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t11");
    for room in [24usize, 32] {
        let f = dir.join(&format!("full{room}.qcow2"));
        qemu_img_create(&f, 16 * MIB, 512, 16);
        let c0 = cluster0(&f);
        let (_, end) = raw_extensions(&c0);
        // Leave exactly `room` bytes after the end marker.
        let data_len = 512 - room - end - 8 - 8;
        let mut ext = Vec::new();
        ext.extend_from_slice(&UNKNOWN_MAGIC.to_be_bytes());
        ext.extend_from_slice(&(data_len as u32).to_be_bytes());
        ext.extend((0..data_len).map(|i| (i % 251) as u8 + 1));
        ext.extend_from_slice(&[0u8; 8]);
        write_bytes(&f, end as u64, &ext);
        qemu_img_check(&f);
        let before = std::fs::read(&f).unwrap();
        let img = open_img(&f, rw()).unwrap();
        let r = img.add_bitmap("b", None, true);
        if room < 32 {
            let e = r.expect_err("no room for the bitmaps extension, add must fail");
            assert_eq!(e.errno(), libc::ENOSPC, "{e}");
            img.close().unwrap();
            assert!(
                std::fs::read(&f).unwrap() == before,
                "a failed add changed the file"
            );
            qemu_img_check(&f);
        } else {
            r.unwrap();
            img.mark_dirty(0, 1).unwrap();
            img.close().unwrap();
            qemu_img_check(&f);
            assert_eq!(nbd_dirty_extents(&f, "b"), vec![(0, 4096)]);
            let (exts, _) = raw_extensions(&cluster0(&f));
            assert!(exts
                .iter()
                .any(|e| e.magic == UNKNOWN_MAGIC && e.data.len() == data_len));
        }
    }
}

// ---------------------------------------------------------------------------
// 12. Marks from many threads while flushing, and a crash image

#[test]
fn t12_concurrent_marks_and_crash_copy() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t12");
    let f = dir.join("c.qcow2");
    let size = 256 * MIB;
    let img = Image::create(
        &f,
        &CreateOptions {
            size,
            cluster_size: 4096,
            refcount_bits: 16,
            ..Default::default()
        },
    )
    .unwrap();
    img.add_bitmap("a", Some(4096), true).unwrap();
    img.add_bitmap("b", Some(65536), true).unwrap();
    let marks: Vec<Vec<(u64, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|t| {
                let img = &img;
                s.spawn(move || {
                    let mut rng = Rng::new(0x1200 + t);
                    let mut done = Vec::new();
                    for _ in 0..20000 {
                        let off = rng.below(size);
                        let len = rng.range(1, 8192).min(size - off);
                        img.mark_dirty(off, len).unwrap();
                        done.push((off, len));
                    }
                    done
                })
            })
            .collect();
        for _ in 0..20 {
            img.flush().unwrap();
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    img.flush().unwrap();
    // A copy taken now is what a crash leaves: QEMU sees in-use bitmaps in a
    // consistent image; libqbm sees them unusable.
    let crash = dir.join("crash.qcow2");
    std::fs::copy(&f, &crash).unwrap();
    img.close().unwrap();

    let mut a = Model::new(size, 4096);
    let mut b = Model::new(size, 65536);
    for (o, l) in marks.iter().flatten() {
        a.mark(*o, *l);
        b.mark(*o, *l);
    }
    qemu_img_check(&f);
    assert_eq!(
        nbd_dirty_extents(&f, "a"),
        a.extents(),
        "marks racing with flushes were lost"
    );
    assert_eq!(
        nbd_dirty_extents(&f, "b"),
        b.extents(),
        "marks racing with flushes were lost"
    );

    let c = qemu_img_check_raw(&crash);
    assert_eq!(c.corruptions, 0, "crash copy: {}", c.raw);
    assert_eq!(
        flags_of(&qemu_img_info_bitmaps(&crash)),
        [("a".into(), true, true), ("b".into(), true, true)]
    );
    {
        let img = open_img(&crash, rw()).unwrap();
        assert!(img.bitmaps().unwrap().iter().all(|b| b.in_use && !b.usable));
        img.remove_bitmap("a").unwrap();
        img.remove_bitmap("b").unwrap();
        img.close().unwrap();
    }
    let c = qemu_img_check_raw(&crash);
    assert_eq!(c.corruptions, 0, "crash copy after removal: {}", c.raw);
    assert_eq!(c.leaks, 0, "crash copy after removal leaks: {}", c.raw);
}

// ---------------------------------------------------------------------------
// 13. Random management sequences (add/remove/rename/enable/disable/clear,
//     with and without flushes): QEMU's list and check agree after each session

#[test]
fn t13_management_fuzz() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t13");
    for (case, &(cs, rb)) in [(512u64, 8u32), (65536, 16), (4096, 1), (2 * MIB, 64)]
        .iter()
        .enumerate()
    {
        let mut rng = Rng::new(0x1300 + case as u64);
        let size = 32 * MIB + 512 * rng.range(1, 100);
        let f = dir.join(&format!("m{case}.qcow2"));
        // name -> (model, enabled)
        let mut live: Vec<(String, Model, bool)> = Vec::new();
        let mut serial = 0;
        let mut removed: Vec<String> = Vec::new();
        Image::create(
            &f,
            &CreateOptions {
                size,
                cluster_size: cs,
                refcount_bits: rb,
                ..Default::default()
            },
        )
        .unwrap()
        .close()
        .unwrap();
        for session in 0..6 {
            let ctx = format!("t13 cluster {cs} rb {rb} session {session}");
            let img = open_img(&f, rw()).unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
            for _ in 0..25 {
                let k = rng.below(100);
                if live.is_empty() || k < 25 {
                    serial += 1;
                    // Sometimes reuse a name removed earlier (maybe in this session).
                    let name = match removed.pop() {
                        Some(n) if rng.chance(50) => n,
                        Some(n) => {
                            removed.push(n);
                            format!("bm{serial}")
                        }
                        None => format!("bm{serial}"),
                    };
                    let g = GRANULARITIES[rng.below(4) as usize];
                    let en = rng.chance(70);
                    img.add_bitmap(&name, Some(g), en)
                        .unwrap_or_else(|e| panic!("{ctx}: add: {e}"));
                    live.push((name, Model::new(size, g), en));
                    continue;
                }
                let i = rng.below(live.len() as u64) as usize;
                if k < 40 {
                    let (name, _, _) = live.remove(i);
                    img.remove_bitmap(&name)
                        .unwrap_or_else(|e| panic!("{ctx}: remove: {e}"));
                    removed.push(name);
                } else if k < 50 {
                    serial += 1;
                    let new = removed.pop().unwrap_or_else(|| format!("rn{serial}"));
                    img.rename_bitmap(&live[i].0, &new)
                        .unwrap_or_else(|e| panic!("{ctx}: rename: {e}"));
                    removed.push(std::mem::replace(&mut live[i].0, new));
                } else if k < 60 {
                    let en = !live[i].2;
                    if en {
                        img.enable_bitmap(&live[i].0).unwrap();
                    } else {
                        img.disable_bitmap(&live[i].0).unwrap();
                    }
                    live[i].2 = en;
                } else if k < 65 {
                    img.clear_bitmap(&live[i].0).unwrap();
                    live[i].1.clear();
                } else if k < 75 {
                    img.flush().unwrap_or_else(|e| panic!("{ctx}: flush: {e}"));
                } else if k < 85 {
                    let j = rng.below(live.len() as u64) as usize;
                    img.merge_bitmap(&live[i].0, &img, &live[j].0)
                        .unwrap_or_else(|e| panic!("{ctx}: merge: {e}"));
                    let src = live[j].1.clone();
                    live[i].1.merge(&src);
                } else {
                    let off = rng.below(size);
                    let len = rng.range(1, 4 * MIB).min(size - off);
                    img.mark_dirty(off, len).unwrap();
                    for (_, m, en) in live.iter_mut() {
                        if *en {
                            m.mark(off, len);
                        }
                    }
                }
            }
            img.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
            qemu_img_check(&f);
            let want: Vec<(&str, u64, bool)> = live
                .iter()
                .map(|(n, m, e)| (n.as_str(), m.granularity, *e))
                .collect();
            assert_qemu_list(&ctx, &f, &want);
            for (name, m, _) in &live {
                assert_eq!(nbd_dirty_extents(&f, name), m.extents(), "{ctx}: '{name}'");
            }
            let (exts, _) = raw_extensions(&cluster0(&f));
            let has_ext = exts.iter().any(|e| e.magic == 0x2385_2875);
            assert_eq!(
                has_ext,
                !live.is_empty(),
                "{ctx}: bitmaps extension present iff bitmaps exist"
            );
            assert_eq!(
                be_u64(&read_bytes(&f, 88, 8), 0) & 1 == 1,
                !live.is_empty(),
                "{ctx}: autoclear bit 0"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 14. Bitmap extra data: QEMU refuses such images ("Bitmap extra data is not
//     supported"); libqbm keeps the bytes, and removing the bitmap through
//     libqbm gives QEMU a clean image back.

/// Rewrites the directory of `path` (16-bit refcounts) with 5 bytes of extra
/// data on the first entry, at a fresh cluster at the end of the file.
fn add_extra_data(path: &Path, compatible: bool) -> Vec<u8> {
    let c0 = cluster0(path);
    let cs = 1u64 << be_u32(&c0, 20);
    assert_eq!(be_u32(&c0, 96), 4, "helper needs refcount_bits=16");
    let (exts, _) = raw_extensions(&c0);
    let bm = exts
        .iter()
        .find(|e| e.magic == 0x2385_2875)
        .expect("bitmaps extension");
    let nb = be_u32(&bm.data, 0);
    let (dsz, doff) = (be_u64(&bm.data, 8), be_u64(&bm.data, 16));
    let d = read_bytes(path, doff, dsz as usize);
    let mut out = Vec::new();
    let mut p = 0;
    let mut first_entry = Vec::new();
    for i in 0..nb {
        let esz = be_u32(&d, p + 20) as usize;
        let nsz = u16::from_be_bytes([d[p + 18], d[p + 19]]) as usize;
        let len = (24 + esz + nsz).div_ceil(8) * 8;
        let mut e = if i == 0 {
            let mut e = d[p..p + 24].to_vec();
            if compatible {
                let flags = be_u32(&e, 12) | 4;
                e[12..16].copy_from_slice(&flags.to_be_bytes());
            }
            e[20..24].copy_from_slice(&5u32.to_be_bytes());
            e.extend_from_slice(b"XTRA!");
            e.extend_from_slice(&d[p + 24 + esz..p + 24 + esz + nsz]);
            e
        } else {
            d[p..p + len].to_vec()
        };
        e.resize(e.len().div_ceil(8) * 8, 0);
        if i == 0 {
            first_entry = e.clone();
        }
        out.extend_from_slice(&e);
        p += len;
    }
    let end = std::fs::metadata(path).unwrap().len().div_ceil(cs) * cs;
    let mut buf = out.clone();
    buf.resize((out.len() as u64).div_ceil(cs) as usize * cs as usize, 0);
    write_bytes(path, end, &buf);
    let rt = be_u64(&c0, 48);
    let block0 = be_u64(&read_bytes(path, rt, 8), 0);
    write_bytes(path, block0 + 2 * (end / cs), &1u16.to_be_bytes());
    write_bytes(path, block0 + 2 * (doff / cs), &0u16.to_be_bytes());
    let mut ext = Vec::new();
    ext.extend_from_slice(&nb.to_be_bytes());
    ext.extend_from_slice(&0u32.to_be_bytes());
    ext.extend_from_slice(&(out.len() as u64).to_be_bytes());
    ext.extend_from_slice(&end.to_be_bytes());
    write_bytes(path, bm.offset as u64 + 8, &ext);
    first_entry
}

/// The directory entry of `name` (offset fields zeroed: they move).
fn dir_entry_bytes(path: &Path, name: &str) -> Option<Vec<u8>> {
    let (exts, _) = raw_extensions(&cluster0(path));
    let bm = exts.into_iter().find(|e| e.magic == 0x2385_2875)?;
    let nb = be_u32(&bm.data, 0);
    let d = read_bytes(path, be_u64(&bm.data, 16), be_u64(&bm.data, 8) as usize);
    let mut p = 0;
    for _ in 0..nb {
        let esz = be_u32(&d, p + 20) as usize;
        let nsz = u16::from_be_bytes([d[p + 18], d[p + 19]]) as usize;
        let len = (24 + esz + nsz).div_ceil(8) * 8;
        if &d[p + 24 + esz..p + 24 + esz + nsz] == name.as_bytes() {
            let mut e = d[p..p + len].to_vec();
            e[..8].fill(0);
            return Some(e);
        }
        p += len;
    }
    None
}

#[test]
fn t14_extra_data_preserved_and_removable() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t14");
    for compatible in [false, true] {
        let ctx = format!("t14 extra_data_compatible={compatible}");
        let f = dir.join(&format!("x{compatible}.qcow2"));
        qemu_img_create(&f, 64 * MIB, 65536, 16);
        qemu_bitmap_add(&f, "x", None, true);
        qemu_bitmap_add(&f, "plain", None, true);
        qemu_io(&f, &write_cmds(&[(MIB, 1)]));
        let mut want = add_extra_data(&f, compatible);
        want[..8].fill(0);
        assert_eq!(
            dir_entry_bytes(&f, "x").as_deref(),
            Some(&want[..]),
            "{ctx}: setup"
        );
        {
            let img = open_img(&f, rw()).unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
            let list = img.bitmaps().unwrap();
            let x = info_of(&list, "x");
            assert_eq!(x.extra_data, b"XTRA!", "{ctx}");
            assert_eq!(
                x.usable, compatible,
                "{ctx}: usable iff extra_data_compatible: {x:?}"
            );
            if compatible {
                assert_eq!(ours(&img, "x"), vec![(MIB, 64 * KIB)], "{ctx}");
            } else {
                let e = img.clear_bitmap("x").unwrap_err();
                assert_eq!(
                    e.errno(),
                    libc::ENOTSUP,
                    "{ctx}: clear of a bitmap with unknown extra data: {e}"
                );
            }
            img.mark_dirty(3 * MIB, 1).unwrap();
            img.close().unwrap();
        }
        let mut now = dir_entry_bytes(&f, "x").expect("bitmap x kept");
        if compatible {
            // Table size and flags may be rewritten; the extra data may not.
            assert_eq!(&now[20..], &want[20..], "{ctx}: extra data or name changed");
            now[8..20].copy_from_slice(&want[8..20]);
        }
        assert_eq!(now, want, "{ctx}: directory entry changed");
        {
            let img = open_img(&f, rw()).unwrap();
            img.remove_bitmap("x").unwrap();
            img.close().unwrap();
        }
        qemu_img_check(&f);
        assert_qemu_list(&ctx, &f, &[("plain", 65536, true)]);
        assert_eq!(
            nbd_dirty_extents(&f, "plain"),
            vec![(MIB, 64 * KIB), (3 * MIB, 64 * KIB)],
            "{ctx}"
        );
    }
}

// ---------------------------------------------------------------------------
// 15. Unusual cluster 0 layouts: header_length 104 and 120, a backing file
//     name that leaves no room for the bitmaps extension

/// Changes header_length of a fresh qemu-img image (no backing file) from
/// 112 to `new_len`, shifting the extensions.
fn set_header_length(path: &Path, new_len: usize) {
    let c0 = cluster0(path);
    let old = be_u32(&c0, 100) as usize;
    assert_eq!(old, 112);
    assert_eq!(be_u64(&c0, 8), 0);
    let (_, end) = raw_extensions(&c0);
    let exts = c0[old..end + 8].to_vec();
    let mut buf = vec![0u8; end + 8 + 16 - 104];
    buf[new_len - 104..new_len - 104 + exts.len()].copy_from_slice(&exts);
    write_bytes(path, 104, &buf);
    write_bytes(path, 100, &(new_len as u32).to_be_bytes());
}

#[test]
fn t15_cluster0_layouts() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t15");
    for hl in [104usize, 120] {
        let ctx = format!("t15 header_length {hl}");
        let f = dir.join(&format!("h{hl}.qcow2"));
        qemu_img_create(&f, 16 * MIB, 65536, 16);
        qemu_bitmap_add(&f, "q", Some(4096), true);
        set_header_length(&f, hl);
        qemu_img_check(&f);
        assert_eq!(qemu_img_info_bitmaps(&f).len(), 1, "{ctx}: setup");
        let (exts_before, _) = raw_extensions(&cluster0(&f));
        {
            let img = open_img(&f, rw()).unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
            img.add_bitmap("l", Some(65536), true).unwrap();
            img.mark_dirty(MIB, 1).unwrap();
            img.close().unwrap();
        }
        let c0 = cluster0(&f);
        assert_eq!(
            be_u32(&c0, 100) as usize,
            hl,
            "{ctx}: header_length changed"
        );
        let (exts, _) = raw_extensions(&c0);
        let other = |v: &[RawExt]| -> Vec<(u32, Vec<u8>)> {
            v.iter()
                .filter(|e| e.magic != 0x2385_2875)
                .map(|e| (e.magic, e.data.clone()))
                .collect()
        };
        assert_eq!(
            other(&exts),
            other(&exts_before),
            "{ctx}: extensions changed"
        );
        qemu_img_check(&f);
        assert_qemu_list(&ctx, &f, &[("q", 4096, true), ("l", 65536, true)]);
        assert_eq!(nbd_dirty_extents(&f, "l"), vec![(MIB, 64 * KIB)], "{ctx}");
        assert_eq!(nbd_dirty_extents(&f, "q"), vec![(MIB, 4096)], "{ctx}");
    }

    // 512-byte clusters and a long backing file name: exactly enough room
    // (the name must move behind the new extension), and 8 bytes too few.
    // Cluster 0 holds: 112 header + 16 backing format extension + 8 end
    // marker + name; adding the bitmaps extension needs 32 more bytes.
    for (room, fits) in [(32usize, true), (24, false)] {
        let ctx = format!("t15 backing name, {room} bytes free");
        let sub = dir.join(&format!("r{room}"));
        std::fs::create_dir_all(&sub).unwrap();
        let name_len = 512 - 112 - 16 - 8 - room;
        // A relative name of exactly name_len bytes: "d/d/.../base.qcow2".
        let mut rel = String::new();
        while rel.len() + 2 + "base.qcow2".len() <= name_len {
            rel.push_str("d/");
        }
        let pad = name_len - rel.len() - "base.qcow2".len();
        let rel = format!("{rel}{}base.qcow2", "b".repeat(pad));
        assert_eq!(rel.len(), name_len);
        let base = sub.join(&rel);
        std::fs::create_dir_all(base.parent().unwrap()).unwrap();
        qemu_img_create(&base, 16 * MIB, 65536, 16);
        let top = sub.join("top.qcow2");
        run(Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                "-F",
                "qcow2",
                "-b",
            ])
            .arg(&rel)
            .arg(&top)
            .current_dir(&sub));
        let c0 = cluster0(&top);
        assert_eq!(
            raw_backing_name(&c0).unwrap(),
            rel.as_bytes(),
            "{ctx}: setup"
        );
        let (_, end) = raw_extensions(&c0);
        assert_eq!(end + 8 + name_len + room, 512, "{ctx}: setup layout");
        let before = std::fs::read(&top).unwrap();
        let img = open_img(&top, rw()).unwrap();
        let r = img.add_bitmap("b", None, true);
        if fits {
            r.unwrap_or_else(|e| panic!("{ctx}: add: {e}"));
            img.mark_dirty(0, 1).unwrap();
            img.close().unwrap();
            assert_eq!(
                raw_backing_name(&cluster0(&top)).unwrap(),
                rel.as_bytes(),
                "{ctx}: name"
            );
            qemu_img_check(&top);
            let info = qemu_img_info(&top, false);
            assert_eq!(
                info.get("backing-filename").and_then(Json::as_str),
                Some(rel.as_str()),
                "{ctx}"
            );
            assert_eq!(nbd_dirty_extents(&top, "b"), vec![(0, 4096)], "{ctx}");
        } else {
            let e = r.expect_err("the bitmaps extension cannot fit: add must fail");
            assert_eq!(e.errno(), libc::ENOSPC, "{ctx}: {e}");
            img.close().unwrap();
            assert!(
                std::fs::read(&top).unwrap() == before,
                "{ctx}: a failed add changed the file"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 16. Image locking (FORMAT.md section 8): libqbm and QEMU refuse each other
//     exactly as two QEMU processes do

/// Can QEMU open `path` now? (`qemu-io [-r] -c 'read 0 512'`)
fn qemu_can_open(path: &Path, writable: bool) -> bool {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    if !writable {
        cmd.arg("-r");
    }
    let out = run_output(cmd.args(["-c", "read 0 512"]).arg(path));
    let err = String::from_utf8_lossy(&out.stderr);
    let ok = out.status.success() && !err.contains("lock");
    if !ok {
        assert!(
            err.contains("lock"),
            "qemu-io failed for another reason than locking: {err}"
        );
    }
    ok
}

/// `qemu_can_open`, retried for a while when success is expected (a lock of
/// a closed libqbm handle can linger while other test threads fork: t22).
fn qemu_can_open_if(path: &Path, writable: bool, expect_ok: bool) -> bool {
    for _ in 0..50 {
        if qemu_can_open(path, writable) {
            return true;
        }
        if !expect_ok {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

#[test]
fn t16_locking_with_qemu() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t16");
    let f = dir.join("l.qcow2");
    qemu_img_create(&f, 16 * MIB, 65536, 16);
    qemu_bitmap_add(&f, "b", None, true);
    let f2 = dir.join("oracle.qcow2");

    // QEMU holds the image: libqbm gets exactly what a second QEMU gets.
    for qemu_rw in [true, false] {
        let s = QemuIoSession::open(&f, !qemu_rw);
        for lib_rw in [false, true] {
            let qemu_ok = qemu_can_open(&f, lib_rw);
            let opts = OpenOptions {
                writable: lib_rw,
                ..Default::default()
            };
            // Where success is expected, tolerate the lingering lock of t22.
            let ours = if qemu_ok {
                open_img(&f, opts)
            } else {
                Image::open(&f, opts)
            };
            let ctx = format!(
                "QEMU holds it {}, libqbm opens {}",
                if qemu_rw { "rw" } else { "ro" },
                if lib_rw { "rw" } else { "ro" }
            );
            match ours {
                Ok(img) => {
                    assert!(
                        qemu_ok,
                        "{ctx}: libqbm opened the image although a second QEMU could not"
                    );
                    img.close().unwrap();
                }
                Err(e) => {
                    assert!(
                        !qemu_ok,
                        "{ctx}: libqbm refused ({e}) although a second QEMU could open it"
                    );
                    assert_eq!(e.errno(), libc::EBUSY, "{ctx}: {e}");
                }
            }
        }
        if qemu_rw {
            // Force-share reads without locks; QEMU's bitmaps are in use.
            let img = Image::open(
                &f,
                OpenOptions {
                    writable: false,
                    force_share: true,
                    ..OpenOptions::default()
                },
            )
            .unwrap();
            let list = img.bitmaps().unwrap();
            assert!(
                list[0].in_use && !list[0].usable,
                "force-share open while QEMU writes: {list:?}"
            );
            img.close().unwrap();
        }
        s.quit();
    }
    // libqbm holds the image: QEMU gets exactly what it gets against itself.
    std::fs::copy(&f, &f2).unwrap();
    for lib_rw in [true, false] {
        let img = open_img(
            &f,
            OpenOptions {
                writable: lib_rw,
                ..Default::default()
            },
        )
        .unwrap();
        let s = QemuIoSession::open(&f2, !lib_rw);
        for qemu_rw in [false, true] {
            let ctx = format!(
                "libqbm holds it {}, QEMU opens {}",
                if lib_rw { "rw" } else { "ro" },
                if qemu_rw { "rw" } else { "ro" }
            );
            let want = qemu_can_open(&f2, qemu_rw);
            assert_eq!(
                qemu_can_open_if(&f, qemu_rw, want),
                want,
                "{ctx}: QEMU's verdict differs from QEMU-vs-QEMU's"
            );
        }
        // Force-share always reads.
        assert_eq!(qemu_img_info_bitmaps_shared(&f).len(), 1);
        s.quit();
        img.close().unwrap();
    }
    assert!(
        qemu_can_open_if(&f, true, true),
        "locks left behind after close"
    );
    qemu_img_check(&f);
}

// ---------------------------------------------------------------------------
// 17. A LUKS-encrypted qcow2: the encryption header (its extension and its
//     clusters) survives libqbm, and QEMU with the key reads our bitmaps

#[test]
fn t17_luks_encrypted_image() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t17");
    let f = dir.join("luks.qcow2");
    let secret = "secret,id=sec0,data=interop-passphrase";
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "--object", secret, "-o"])
        .arg("encrypt.format=luks,encrypt.key-secret=sec0,cluster_size=4096")
        .arg(&f)
        .arg("64M"));
    let opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        f.display()
    );
    let qemu_io_enc = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["--object", secret, "--image-opts"]);
        for x in cmds {
            c.args(["-c", x]);
        }
        let out = run(c.arg(&opts));
        assert!(
            !out.contains("failed") && !out.contains("error"),
            "qemu-io: {out}"
        );
    };
    let check_enc = || {
        let out = run_output(
            Command::new("qemu-img")
                .args(["check", "--output=json", "--object", secret, "--image-opts"])
                .arg(&opts),
        );
        let raw = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "qemu-img check: {raw}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = Json::parse(&raw).unwrap();
        for k in ["corruptions", "leaks", "check-errors"] {
            assert_eq!(
                v.get(k).and_then(Json::as_u64).unwrap_or(0),
                0,
                "{k}: {raw}"
            );
        }
    };
    qemu_io_enc(&["write -P 0x5a 0 128k", "write -P 0x6b 40M 8k"]);
    let c0_before = cluster0(&f);
    let enc_ext = |c: &[u8]| {
        raw_extensions(c)
            .0
            .into_iter()
            .find(|e| e.magic == 0x0537_be77)
            .map(|e| e.data)
    };
    assert!(
        enc_ext(&c0_before).is_some(),
        "setup: no encryption header extension"
    );
    let (luks_off, luks_len) = {
        let d = enc_ext(&c0_before).unwrap();
        (be_u64(&d, 0), be_u64(&d, 8))
    };
    let luks_before = read_bytes(&f, luks_off, luks_len as usize);
    {
        let img = open_img(&f, rw()).unwrap_or_else(|e| panic!("open rw: {e}"));
        img.add_bitmap("enc", Some(65536), true).unwrap();
        img.add_bitmap("enc2", Some(512), false).unwrap();
        img.mark_dirty(MIB, 1).unwrap();
        img.set_range("enc2", 0, 64 * MIB).unwrap();
        img.reset_range("enc2", 8 * MIB, 512).unwrap();
        img.close().unwrap();
    }
    let c0 = cluster0(&f);
    assert_eq!(
        be_u32(&c0, 32),
        be_u32(&c0_before, 32),
        "crypt_method changed"
    );
    assert_eq!(
        enc_ext(&c0),
        enc_ext(&c0_before),
        "encryption header extension changed"
    );
    assert!(
        read_bytes(&f, luks_off, luks_len as usize) == luks_before,
        "LUKS header clusters changed"
    );
    check_enc();
    assert_qemu_list("luks", &f, &[("enc", 65536, true), ("enc2", 512, false)]);
    let image = [
        "--object".to_string(),
        secret.to_string(),
        "--image-opts".to_string(),
        opts.clone(),
    ];
    assert_eq!(nbd_dirty_extents_with(&image, "enc"), vec![(MIB, 64 * KIB)]);
    assert_eq!(
        nbd_dirty_extents_with(&image, "enc2"),
        vec![(0, 8 * MIB), (8 * MIB + 512, 56 * MIB - 512)]
    );
    // The encrypted data still decrypts, and QEMU's writes mark our bitmap.
    qemu_io_enc(&[
        "read -P 0x5a 0 128k",
        "read -P 0x6b 40M 8k",
        "write -P 1 20M 1",
    ]);
    check_enc();
    let img = open_img(&f, ro()).unwrap();
    assert_eq!(
        ours(&img, "enc"),
        vec![(MIB, 64 * KIB), (20 * MIB, 64 * KIB)]
    );
    img.close().unwrap();
}

// ---------------------------------------------------------------------------
// 18. QEMU maintenance on libqbm images: amend refcount_bits, check -r all,
//     convert --bitmaps, resize

#[test]
fn t18_qemu_maintenance_on_our_images() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t18");
    let f = dir.join("m.qcow2");
    let size = 64 * MIB;
    let mut rng = Rng::new(0x1800);
    let mut a = Model::new(size, 4096);
    let mut b = Model::new(size, 65536);
    {
        let img = Image::create(
            &f,
            &CreateOptions {
                size,
                cluster_size: 4096,
                refcount_bits: 16,
                ..Default::default()
            },
        )
        .unwrap();
        img.add_bitmap("a", Some(4096), true).unwrap();
        img.add_bitmap("b", Some(65536), false).unwrap();
        for _ in 0..300 {
            let off = rng.below(size);
            let len = rng.range(1, 256 * KIB).min(size - off);
            img.mark_dirty(off, len).unwrap();
            a.mark(off, len);
            let off = rng.below(size);
            img.set_range("b", off, 1).unwrap();
            b.mark(off, 1);
        }
        img.close().unwrap();
    }
    qemu_io(&f, &write_cmds(&[(0, 64 * KIB), (30 * MIB, 12345)]));
    for (o, l) in [(0, 64 * KIB), (30 * MIB, 12345)] {
        a.mark(o, l);
    }
    // check -r all finds nothing to repair.
    let out = run_output(
        Command::new("qemu-img")
            .args(["check", "-r", "all", "--output=json"])
            .arg(&f),
    );
    let v = Json::parse(&String::from_utf8_lossy(&out.stdout)).unwrap();
    for k in ["corruptions-fixed", "leaks-fixed", "corruptions", "leaks"] {
        assert_eq!(
            v.get(k).and_then(Json::as_u64).unwrap_or(0),
            0,
            "check -r all: {k}"
        );
    }
    // Amend the refcount width: QEMU rewrites every refcount of our clusters.
    for rb in [64, 1, 16] {
        qemu_img(&[
            "amend",
            "-f",
            "qcow2",
            "-o",
            &format!("refcount_bits={rb}"),
            f.to_str().unwrap(),
        ]);
        qemu_img_check(&f);
        let img = open_img(&f, rw()).unwrap_or_else(|e| panic!("open after amend to {rb}: {e}"));
        assert_eq!(img.info().unwrap().refcount_bits, rb);
        assert_eq!(
            ours(&img, "a"),
            a.extents(),
            "after amend to refcount_bits={rb}"
        );
        assert_eq!(
            ours(&img, "b"),
            b.extents(),
            "after amend to refcount_bits={rb}"
        );
        img.set_range("b", (rb as u64 % 60) * MIB, 1).unwrap();
        b.mark((rb as u64 % 60) * MIB, 1);
        img.close().unwrap();
        qemu_img_check(&f);
    }
    // convert --bitmaps copies our bitmaps into a QEMU-written image.
    let c = dir.join("converted.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "qcow2", "--bitmaps"])
        .arg(&f)
        .arg(&c));
    qemu_img_check(&c);
    {
        let img = open_img(&c, ro()).unwrap();
        assert_eq!(ours(&img, "a"), a.extents(), "converted a");
        assert_eq!(ours(&img, "b"), b.extents(), "converted b");
        let list = img.bitmaps().unwrap();
        assert!(info_of(&list, "a").enabled && !info_of(&list, "b").enabled);
        img.close().unwrap();
    }
    // Resize: QEMU resizes our bitmaps; libqbm reads the new geometry.
    qemu_img(&[
        "resize",
        "-f",
        "qcow2",
        f.to_str().unwrap(),
        &(3 * size + 512).to_string(),
    ]);
    qemu_img_check(&f);
    {
        let img = open_img(&f, rw()).unwrap();
        assert_eq!(img.size(), 3 * size + 512);
        assert_eq!(ours(&img, "a"), a.extents(), "after grow");
        img.mark_dirty(3 * size, 512).unwrap();
        img.close().unwrap();
    }
    qemu_img_check(&f);
    let mut a3 = Model::new(3 * size + 512, 4096);
    for (s, l) in a.extents() {
        a3.mark(s, l);
    }
    a3.mark(3 * size, 512);
    assert_eq!(
        nbd_dirty_extents(&f, "a"),
        a3.extents(),
        "after grow + libqbm mark"
    );
    qemu_img(&[
        "resize",
        "-f",
        "qcow2",
        "--shrink",
        f.to_str().unwrap(),
        &(size / 2).to_string(),
    ]);
    qemu_img_check(&f);
    let img = open_img(&f, ro()).unwrap();
    let half: Vec<(u64, u64)> = nbd_dirty_extents(&f, "a");
    assert_eq!(ours(&img, "a"), half, "after shrink");
    assert!(half.iter().all(|&(s, l)| s + l <= size / 2));
    img.close().unwrap();
}

// ---------------------------------------------------------------------------
// 19. A header size that is not a multiple of 512 (hand-made): QEMU reads the
//     disk as size rounded down to 512; libqbm must read QEMU's bitmaps there.

#[test]
fn t19_header_size_not_multiple_of_512() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t19");
    let f = dir.join("odd.qcow2");
    let qemu_size = 2 * MIB;
    // Created 512 bytes bigger so that the L1 table covers the odd size.
    qemu_img_create(&f, qemu_size + 512, 512, 16);
    write_bytes(&f, 24, &(qemu_size + 100).to_be_bytes());
    assert_eq!(
        qemu_img_info(&f, false)
            .get("virtual-size")
            .and_then(Json::as_u64),
        Some(qemu_size),
        "setup"
    );
    qemu_bitmap_add(&f, "b", Some(512), true);
    qemu_io(&f, &write_cmds(&[(qemu_size - 512, 512), (4096, 1)]));
    qemu_img_check(&f);
    let truth = nbd_dirty_extents(&f, "b");
    assert_eq!(truth, vec![(4096, 512), (qemu_size - 512, 512)], "setup");
    let img = open_img(&f, ro())
        .unwrap_or_else(|e| panic!("libqbm cannot open an image QEMU reads: {e}"));
    assert_eq!(ours(&img, "b"), truth);
    img.close().unwrap();
    {
        let img = open_img(&f, rw()).unwrap();
        img.mark_dirty(0, 1).unwrap();
        img.close().unwrap();
    }
    qemu_img_check(&f);
    assert_eq!(
        nbd_dirty_extents(&f, "b"),
        vec![(0, 512), (4096, 512), (qemu_size - 512, 512)]
    );
}

// ---------------------------------------------------------------------------
// 20. QEMU accepts bitmap names that are not UTF-8 (`qemu-img bitmap --add F
//     $'a\xffb'`); libqbm must still open such an image, use its other
//     bitmaps and keep the odd one byte for byte.

#[test]
fn t20_non_utf8_bitmap_name_from_qemu() {
    if !have_tools(TOOLS) {
        return;
    }
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = TempDir::new("t20");
    let f = dir.join("n.qcow2");
    qemu_img_create(&f, 16 * MIB, 65536, 16);
    let raw_name: &[u8] = b"a\xffb";
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&f)
        .arg(OsStr::from_bytes(raw_name)));
    qemu_bitmap_add(&f, "good", Some(65536), true);
    qemu_io(&f, &write_cmds(&[(MIB, 1)]));
    qemu_img_check(&f);
    assert_eq!(qemu_img_info_bitmaps(&f).len(), 2, "setup");
    // The hand reader agrees with QEMU: bit 16 (1 MiB) set, bit 32 clear.
    assert_eq!(raw_bitmap_bit(&f, raw_name, 16), Some((2, true)), "setup");
    assert_eq!(raw_bitmap_bit(&f, raw_name, 32), Some((2, false)), "setup");
    let img = open_img(&f, ro()).unwrap_or_else(|e| {
        panic!("libqbm cannot open an image QEMU made with bitmap name b\"a\\xffb\" (QEMU opens it fine): {e}")
    });
    assert_eq!(ours(&img, "good"), vec![(MIB, 64 * KIB)]);
    assert_eq!(img.bitmaps().unwrap().len(), 2);
    img.close().unwrap();
    {
        let img = open_img(&f, rw()).unwrap();
        img.mark_dirty(2 * MIB, 1).unwrap();
        img.close().unwrap();
    }
    qemu_img_check(&f);
    assert_eq!(qemu_img_info_bitmaps(&f).len(), 2);
    assert!(
        dir_entry_bytes_raw(&f, raw_name),
        "the non-UTF-8 name was not kept byte for byte"
    );
    assert_eq!(
        nbd_dirty_extents(&f, "good"),
        vec![(MIB, 64 * KIB), (2 * MIB, 64 * KIB)]
    );
    // The odd bitmap is enabled (auto): a libqbm session that does not track
    // it must leave it flagged in-use, or QEMU trusts a bitmap that missed
    // the write at 2 MiB.
    let (flags, bit) = raw_bitmap_bit(&f, raw_name, 2 * MIB / (64 * KIB)).expect("entry");
    assert!(flags & 2 != 0, "setup: the odd bitmap is enabled");
    assert!(
        flags & 1 != 0 || bit,
        "enabled bitmap b\"a\\xffb\" missed the write libqbm marked at 2 MiB and is not flagged in-use \
         (flags {flags:#x}): QEMU will trust stale data"
    );
}

/// The directory flags of the bitmap named `name` (raw bytes) and the value
/// of its bit `bit`, read by hand from the bitmap table and data.
fn raw_bitmap_bit(path: &Path, name: &[u8], bit: u64) -> Option<(u32, bool)> {
    let c0 = cluster0(path);
    let cs = 1u64 << be_u32(&c0, 20);
    let (exts, _) = raw_extensions(&c0);
    let bm = exts.into_iter().find(|e| e.magic == 0x2385_2875)?;
    let nb = be_u32(&bm.data, 0);
    let d = read_bytes(path, be_u64(&bm.data, 16), be_u64(&bm.data, 8) as usize);
    let mut p = 0;
    for _ in 0..nb {
        let esz = be_u32(&d, p + 20) as usize;
        let nsz = u16::from_be_bytes([d[p + 18], d[p + 19]]) as usize;
        if &d[p + 24 + esz..p + 24 + esz + nsz] == name {
            let table_off = be_u64(&d, p);
            let flags = be_u32(&d, p + 12);
            let byte = bit / 8;
            let entry = be_u64(&read_bytes(path, table_off + 8 * (byte / cs), 8), 0);
            let data_off = entry & 0x00ff_ffff_ffff_fe00;
            let value = if data_off == 0 {
                entry & 1 == 1
            } else {
                read_bytes(path, data_off + byte % cs, 1)[0] >> (bit % 8) & 1 == 1
            };
            return Some((flags, value));
        }
        p += (24 + esz + nsz).div_ceil(8) * 8;
    }
    None
}

/// Whether a directory entry with exactly this name exists.
fn dir_entry_bytes_raw(path: &Path, name: &[u8]) -> bool {
    let (exts, _) = raw_extensions(&cluster0(path));
    let Some(bm) = exts.into_iter().find(|e| e.magic == 0x2385_2875) else {
        return false;
    };
    let nb = be_u32(&bm.data, 0);
    let d = read_bytes(path, be_u64(&bm.data, 16), be_u64(&bm.data, 8) as usize);
    let mut p = 0;
    for _ in 0..nb {
        let esz = be_u32(&d, p + 20) as usize;
        let nsz = u16::from_be_bytes([d[p + 18], d[p + 19]]) as usize;
        if &d[p + 24 + esz..p + 24 + esz + nsz] == name {
            return true;
        }
        p += (24 + esz + nsz).div_ceil(8) * 8;
    }
    false
}

// ---------------------------------------------------------------------------
// 21. Crash consistency: a process using libqbm is SIGKILLed at random points
//     while it marks, stores, adds and removes bitmaps. QEMU must always open
//     the image, find no corruption, and see every bitmap consistent or in-use.

const CRASH_ENV: &str = "QBM_INTEROP_CRASH_WORKER";

/// Runs only as the child of t21 (with QBM_INTEROP_CRASH_WORKER=image): works
/// on the image until killed.
#[test]
fn t21_crash_worker_helper() {
    let Some(path) = std::env::var_os(CRASH_ENV) else {
        return;
    };
    let seed: u64 = std::env::var("QBM_INTEROP_CRASH_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let mut rng = Rng::new(seed);
    let img = open_img(&path, rw()).expect("worker open");
    let size = img.size();
    // Bitmaps found in use were left by the previous crash: drop them.
    for b in img.bitmaps().unwrap() {
        if !b.usable {
            img.remove_bitmap(&b.name).unwrap();
        }
    }
    println!("worker ready");
    let mut n = 0u64;
    loop {
        n += 1;
        let names: Vec<String> = img.bitmaps().unwrap().into_iter().map(|b| b.name).collect();
        match rng.below(10) {
            0 if names.len() < 12 => {
                let g = GRANULARITIES[rng.below(4) as usize];
                img.add_bitmap(&format!("w{seed}-{n}"), Some(g), rng.chance(70))
                    .unwrap();
            }
            1 if names.len() > 2 => {
                img.remove_bitmap(&names[rng.below(names.len() as u64) as usize])
                    .unwrap();
            }
            2 | 3 if !names.is_empty() => {
                let name = &names[rng.below(names.len() as u64) as usize];
                let off = rng.below(size);
                img.set_range(name, off, rng.range(1, 8 * MIB).min(size - off))
                    .unwrap();
            }
            _ => {
                for _ in 0..50 {
                    let off = rng.below(size);
                    img.mark_dirty(off, rng.range(1, MIB).min(size - off))
                        .unwrap();
                }
            }
        }
        img.flush().unwrap();
    }
}

#[test]
fn t21_crash_consistency() {
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t21");
    let exe = std::env::current_exe().unwrap();
    for (case, &(cs, rb)) in [(512u64, 16u32), (4096, 1), (65536, 64)].iter().enumerate() {
        let f = dir.join(&format!("crash{case}.qcow2"));
        {
            let img = Image::create(
                &f,
                &CreateOptions {
                    size: 128 * MIB,
                    cluster_size: cs,
                    refcount_bits: rb,
                    ..Default::default()
                },
            )
            .unwrap();
            img.add_bitmap("base", Some(4096), true).unwrap();
            img.close().unwrap();
        }
        let mut rng = Rng::new(0x2100 + case as u64);
        for round in 0..4 {
            let ctx = format!("t21 cluster {cs} refcount_bits {rb} round {round}");
            let mut child = Command::new(&exe)
                .args([
                    "--exact",
                    "t21_crash_worker_helper",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CRASH_ENV, &f)
                .env("QBM_INTEROP_CRASH_SEED", (case * 100 + round).to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            loop {
                line.clear();
                assert!(
                    out.read_line(&mut line).unwrap() > 0,
                    "{ctx}: worker died before ready"
                );
                if line.contains("worker ready") {
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(rng.range(20, 300)));
            child.kill().unwrap();
            child.wait().unwrap();

            let c = qemu_img_check_raw(&f);
            assert_eq!(
                c.corruptions, 0,
                "{ctx}: corruption after a crash: {}",
                c.raw
            );
            assert_eq!(c.check_errors, 0, "{ctx}: {}", c.raw);
            let q = qemu_img_info_bitmaps(&f);
            let img = open_img(&f, ro())
                .unwrap_or_else(|e| panic!("{ctx}: libqbm open after crash: {e}"));
            let list = img.bitmaps().unwrap();
            assert_same_list(&ctx, &list, &q);
            for b in list.iter().filter(|b| b.usable) {
                assert_eq!(
                    ours(&img, &b.name),
                    nbd_dirty_extents(&f, &b.name),
                    "{ctx}: '{}'",
                    b.name
                );
            }
            img.close().unwrap();
            eprintln!(
                "{ctx}: {} leaked clusters, bitmaps {:?}",
                c.leaks,
                q.iter()
                    .map(|b| (b.name.as_str(), b.in_use()))
                    .collect::<Vec<_>>()
            );
            // Leaks are allowed after a crash; repair them for the next round.
            if c.leaks > 0 {
                run_output(
                    Command::new("qemu-img")
                        .args(["check", "-q", "-r", "leaks"])
                        .arg(&f),
                );
                qemu_img_check(&f);
            }
        }
        // A final clean session leaves a clean image.
        {
            let img = open_img(&f, rw()).unwrap();
            for b in img.bitmaps().unwrap() {
                if !b.usable {
                    img.remove_bitmap(&b.name).unwrap();
                }
            }
            img.mark_dirty(0, 1).unwrap();
            img.close().unwrap();
        }
        qemu_img_check(&f);
        assert!(qemu_img_info_bitmaps(&f).iter().all(|b| !b.in_use()));
    }
}

// ---------------------------------------------------------------------------
// 22. close() must release the image locks at once, even while other threads
//     of the process spawn programs (a VMM does): a child between fork and
//     exec still shares the open file description, so an OFD lock that is
//     only dropped by close(2) outlives Image::close(). QEMU unlocks its lock
//     bytes explicitly before closing.

#[test]
fn t22_close_releases_locks_despite_concurrent_spawns() {
    const SPAWNERS: usize = 2;
    if !have_tools(TOOLS) {
        return;
    }
    let dir = TempDir::new("t22");
    let f = dir.join("l.qcow2");
    Image::create(
        &f,
        &CreateOptions {
            size: MIB,
            cluster_size: 65536,
            refcount_bits: 16,
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut busy = Vec::new();
    std::thread::scope(|s| {
        for _ in 0..SPAWNERS {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = Command::new("true").status();
                }
            });
        }
        for i in 0..300 {
            for opts in [ro(), rw()] {
                match Image::open(&f, opts) {
                    Ok(img) => img.close().unwrap(),
                    Err(e) => busy.push(format!("iteration {i}, writable {}: {e}", opts.writable)),
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert!(
        busy.is_empty(),
        "{} of 600 opens right after our own close failed (the lock of the closed handle lingered in a \
         forked child); first: {}",
        busy.len(),
        busy[0]
    );
}
