//! Inputs found by the cargo-fuzz targets in fuzz/, rebuilt by code from a
//! fresh image so that each states the one defect it exercises.

use qbm::format::bitmap_dir;
use qbm::format::bitmap_table::{self, TableEntry};
use qbm::format::extension::{self, BitmapsExtension};
use qbm::format::header::Header;
use qbm::format::refcount;
use qbm::image::{CreateOptions, Image, OpenOptions};
use qbm::storage::MemoryStorage;
use qbm::DirtyBitmap;
use std::sync::Arc;

/// A fresh image's bytes, after `setup` ran on it read-write.
fn image(cluster_size: u64, refcount_bits: u32, setup: impl FnOnce(&Image)) -> Vec<u8> {
    let mem = Arc::new(MemoryStorage::default());
    let options = CreateOptions {
        size: 1 << 20,
        cluster_size,
        refcount_bits,
        ..Default::default()
    };
    let img = Image::create_storage(Box::new(mem.clone()), "base", &options).unwrap();
    setup(&img);
    img.close().unwrap();
    mem.contents()
}

fn open(bytes: &[u8], options: OpenOptions) -> qbm::Result<Image> {
    Image::open_storage(
        Box::new(MemoryStorage::new(bytes.to_vec())),
        "fuzz",
        options,
    )
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Sets the refcount of the cluster at `offset` as the image's own table says.
fn set_refcount(img: &mut [u8], offset: u64, value: u64) {
    let h = Header::parse(img).unwrap();
    let cs = h.cluster_size();
    let per_block = refcount::entries_per_block(h.cluster_bits, h.refcount_order);
    let c = offset / cs;
    let block = be64(img, (h.refcount_table_offset + c / per_block * 8) as usize) as usize;
    refcount::set(
        &mut img[block..block + cs as usize],
        h.refcount_order,
        (c % per_block) as usize,
        value,
    );
}

/// The refused read-write open: EUCLEAN naming `needles`. A read-only open,
/// which allocates nothing, still works.
fn assert_refused_for_writing(img: &[u8], needles: &[&str]) {
    let err = match open(img, OpenOptions::read_write()) {
        Ok(_) => panic!("read-write open of a corrupt image succeeded"),
        Err(e) => e,
    };
    assert_eq!(err.errno(), libc::EUCLEAN, "{err}");
    for n in needles {
        assert!(err.to_string().contains(n), "{err:?} lacks {n:?}");
    }
    open(img, OpenOptions::read_only()).expect("read-only open still works");
}

/// Fuzz crash (open_image, first minute): every refcount was 0, so the first
/// allocation of a read-write open returned cluster 1, the refcount table, and
/// a new bitmap table was written over it. The image we then wrote no longer
/// opened ("bitmap table entry ... has reserved bits set").
#[test]
fn zero_refcount_on_the_refcount_table_refuses_writing() {
    let mut img = image(4096, 2, |_| {});
    let h = Header::parse(&img).unwrap();
    set_refcount(&mut img, h.refcount_table_offset, 0);
    assert_refused_for_writing(&img, &["refcount_table_offset 0x1000", "has refcount 0"]);

    // Every refcount zero, as in the fuzzer's input: the header is named first.
    let mut img = image(4096, 2, |_| {});
    let block = be64(&img, 4096) as usize;
    img[block..block + 4096].fill(0);
    assert_refused_for_writing(&img, &["cluster 0 (the header) has refcount 0"]);
}

/// The same input also had refcount table entry 61 pointing at the refcount
/// table itself: a refcount update for clusters that block covers would
/// overwrite the table.
#[test]
fn refcount_block_overlapping_the_table_refuses_writing() {
    let mut img = image(4096, 2, |_| {});
    let table = Header::parse(&img).unwrap().refcount_table_offset as usize;
    img[table + 61 * 8..table + 62 * 8].copy_from_slice(&(table as u64).to_be_bytes());
    assert_refused_for_writing(
        &img,
        &["refcount table entry 61: refcount block at 0x1000 points into the refcount table"],
    );
}

/// The L1 table, L2 tables and bitmap structures are checked the same way:
/// a zero refcount on any of them would hand it out to the next allocation.
#[test]
fn zero_refcount_on_l1_or_bitmap_metadata_refuses_writing() {
    let base = image(512, 16, |img| {
        img.add_bitmap("b", Some(512), true).unwrap();
        img.set_range("b", 0, 4096).unwrap();
    });
    let h = Header::parse(&base).unwrap();

    let mut img = base.clone();
    set_refcount(&mut img, h.l1_table_offset, 0);
    assert_refused_for_writing(&img, &["l1_table_offset", "has refcount 0"]);

    let cs = h.cluster_size();
    let exts = extension::parse_all(&base[..cs as usize], h.extensions_start()).unwrap();
    let ext = exts.iter().find(|e| e.magic == extension::BITMAPS).unwrap();
    let ext = BitmapsExtension::parse(&ext.data, cs).unwrap();
    let dir_at = ext.directory_offset as usize;
    let dir_bytes = &base[dir_at..dir_at + ext.directory_size as usize];
    let dir = bitmap_dir::parse(dir_bytes, ext.nb_bitmaps, h.size, cs).unwrap();

    let mut img = base.clone();
    set_refcount(&mut img, ext.directory_offset, 0);
    assert_refused_for_writing(&img, &["bitmap_directory_offset", "has refcount 0"]);

    let mut img = base.clone();
    set_refcount(&mut img, dir[0].table_offset, 0);
    assert_refused_for_writing(&img, &["bitmap 'b': bitmap_table_offset", "has refcount 0"]);
}

/// Two bitmaps naming one data cluster: storing one frees the cluster while
/// the other still reads it, and the next allocation overwrites it.
#[test]
fn bitmaps_sharing_a_data_cluster_refuse_writing() {
    let base = image(512, 16, |img| {
        for name in ["a", "b"] {
            img.add_bitmap(name, Some(512), true).unwrap();
            img.set_range(name, 0, 8192).unwrap();
        }
        // Different contents, so each bitmap has its own data cluster.
        img.reset_range("b", 0, 512).unwrap();
    });
    let h = Header::parse(&base).unwrap();
    let cs = h.cluster_size();
    let exts = extension::parse_all(&base[..cs as usize], h.extensions_start()).unwrap();
    let ext = exts.iter().find(|e| e.magic == extension::BITMAPS).unwrap();
    let ext = BitmapsExtension::parse(&ext.data, cs).unwrap();
    let dir_at = ext.directory_offset as usize;
    let dir = bitmap_dir::parse(
        &base[dir_at..dir_at + ext.directory_size as usize],
        ext.nb_bitmaps,
        h.size,
        cs,
    )
    .unwrap();
    let table = |i: usize| {
        let at = dir[i].table_offset as usize;
        bitmap_table::parse(&base[at..at + 8 * dir[i].table_size as usize], cs, "t").unwrap()
    };
    let (TableEntry::Data(a0), TableEntry::Data(_)) = (table(0)[0], table(1)[0]) else {
        panic!("both bitmaps store their first cluster as data");
    };
    let mut img = base.clone();
    let b_table = dir[1].table_offset as usize;
    img[b_table..b_table + 8].copy_from_slice(&TableEntry::Data(a0).encode().to_be_bytes());
    // Refused for reading too: one of the two would show the other's bits.
    let err = open(&img, OpenOptions::read_only()).err().expect("opened");
    assert_eq!(err.errno(), libc::EUCLEAN, "{err}");
    assert!(
        err.to_string()
            .contains("points into the data cluster of bitmap 'a'"),
        "{err}"
    );
    let err = open(&img, OpenOptions::read_write()).err().expect("opened");
    assert_eq!(err.errno(), libc::EUCLEAN, "{err}");
}

/// Fuzz timeout (open_image): adding a 64 KiB-granularity bitmap to a
/// 256 TiB disk with 512-byte clusters and storing it took minutes. Each
/// cluster-sized "is this range clean" probe scanned the summary words up
/// to the end of the bitmap instead of stopping at the range: quadratic in
/// the bitmap size. A probe now costs the same in a 512 MiB bitmap as in a
/// 2 MiB one (it was ~250 times more before the fix).
#[test]
fn range_probes_of_a_big_clean_bitmap_stop_at_the_range() {
    let big = DirtyBitmap::new(1 << 48, 16).unwrap();
    let small = DirtyBitmap::new(1 << 40, 16).unwrap();
    assert_eq!(big.serialized_len(), 512 << 20);
    assert_eq!(small.serialized_len(), 2 << 20);
    let probes = small.serialized_len() / 512;
    let time = |bm: &DirtyBitmap| {
        bm.mark_bytes(0, 1);
        let start = std::time::Instant::now();
        let mut dirty = 0;
        for _ in 0..20 {
            dirty = (0..probes)
                .filter(|&i| !bm.serialized_range_is_clean(i * 512, 512))
                .count();
            // reset_bits walks the flagged chunks of its range the same way.
            for i in 1..probes {
                bm.reset_bits(i * 4096, 4096);
            }
        }
        assert_eq!(dirty, 1);
        assert_eq!(bm.dirty_bytes(), 65536);
        start.elapsed()
    };
    let (t_small, t_big) = (time(&small), time(&big));
    assert!(
        t_big < t_small * 20 + std::time::Duration::from_millis(50),
        "probing a 512 MiB bitmap took {t_big:?}, a 2 MiB one {t_small:?}"
    );
}

/// Fuzz crash (open_image, after the branches merged): an L1 entry with a
/// reserved bit set (0x700 → offset 0x600) named the L1 table itself as an
/// L2 table, but past the end of the then-short file, so the open accepted
/// it; our own writes grew the file, and the image we closed no longer
/// opened ("points into the L1 table"). L2 tables past the end of the file
/// are now mapped too: the open refuses the overlap at once, and refuses to
/// write over an L2 table that lies past the end (its refcount is 0).
#[test]
fn l2_tables_past_the_end_of_the_file_are_mapped() {
    let base = image(512, 16, |_| {});
    let h = Header::parse(&base).unwrap();
    let l1 = h.l1_table_offset as usize;

    // The L1 table names itself (through a reserved bit), in a short file.
    let mut img = base.clone();
    img[l1 + 31 * 8..l1 + 32 * 8].copy_from_slice(&(h.l1_table_offset + 0x100).to_be_bytes());
    img.truncate(l1 + 32 * 8 + 27);
    for options in [OpenOptions::read_only(), OpenOptions::read_write()] {
        let err = open(&img, options).err().expect("opened");
        assert_eq!(err.errno(), libc::EUCLEAN, "{err}");
        assert!(
            err.to_string().contains("L1 entry 31: L2 table at"),
            "{err}"
        );
        assert!(
            err.to_string().contains("points into the L1 table"),
            "{err}"
        );
    }

    // An L2 table wholly past the end: readable, not writable.
    let mut img = base.clone();
    let past = (img.len() as u64 + 4096).next_multiple_of(512);
    img[l1 + 8..l1 + 16].copy_from_slice(&past.to_be_bytes());
    open(&img, OpenOptions::read_only()).expect("read-only open works");
    let err = open(&img, OpenOptions::read_write())
        .err()
        .expect("opened for writing");
    assert_eq!(err.errno(), libc::EUCLEAN, "{err}");
    assert!(err.to_string().contains("L1 entry 1: L2 table at"), "{err}");
    assert!(err.to_string().contains("has refcount 0"), "{err}");
}
