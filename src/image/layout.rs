//! Where each piece of metadata lies, checked when an image is loaded:
//! no two structures may share a cluster (FORMAT.md section 4), and on a
//! read-write open every cluster they use must have a refcount, or the
//! allocator would hand it out again.

use super::allocator::Allocator;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::header::Header;
use crate::format::{be16, be32, be64, pad8};
use crate::storage::Storage;

/// What a run of clusters holds. The order is precedence: when two runs
/// overlap, the error names the later kind as pointing into the earlier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Kind {
    Header,
    RefcountTable,
    /// Refcount table index.
    RefcountBlock(u32),
    L1Table,
    SnapshotTable,
    /// Snapshot number.
    SnapshotL1(u32),
    /// Index of the active L1 entry naming it.
    L2Table(u32),
    Directory,
    /// Bitmap number in directory order.
    BitmapTable(u32),
    /// Bitmap number, table entry.
    BitmapData(u32, u32),
}

impl Kind {
    fn rank(self) -> u8 {
        match self {
            Kind::Header => 0,
            Kind::RefcountTable => 1,
            Kind::RefcountBlock(_) => 2,
            Kind::L1Table => 3,
            Kind::SnapshotTable => 4,
            Kind::SnapshotL1(_) => 5,
            Kind::L2Table(_) => 6,
            Kind::Directory => 7,
            Kind::BitmapTable(_) => 8,
            Kind::BitmapData(..) => 9,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Region {
    /// Byte offset of the first cluster (cluster aligned).
    pub offset: u64,
    pub clusters: u64,
    pub kind: Kind,
}

pub(super) struct Layout {
    cluster_bits: u32,
    regions: Vec<Region>,
}

impl Layout {
    pub fn new(cluster_bits: u32) -> Layout {
        Layout {
            cluster_bits,
            regions: Vec::new(),
        }
    }

    /// Records that `bytes` (at least one) from cluster-aligned `offset` hold `kind`.
    pub fn add(&mut self, offset: u64, bytes: u64, kind: Kind) {
        let cs = 1u64 << self.cluster_bits;
        self.regions.push(Region {
            offset,
            clusters: bytes.max(1).div_ceil(cs),
            kind,
        });
    }

    fn end(&self, r: &Region) -> u64 {
        r.offset
            .saturating_add(r.clusters.saturating_mul(1 << self.cluster_bits))
    }

    /// Fails, naming both, when two structures share a cluster. `names` are
    /// the bitmap names in directory order.
    pub fn check_overlaps(&mut self, names: &[String]) -> Result<()> {
        self.regions.sort_by_key(|r| (r.offset, r.kind.rank()));
        // Sweep, remembering the run that reaches furthest: any run that
        // overlaps an earlier one overlaps that one too.
        let mut reach: Option<Region> = None;
        for r in &self.regions {
            if let Some(prev) = reach {
                if r.offset < self.end(&prev) {
                    let both_l2 =
                        matches!((prev.kind, r.kind), (Kind::L2Table(_), Kind::L2Table(_)));
                    if !both_l2 {
                        let (bad, other) = if r.kind.rank() >= prev.kind.rank() {
                            (r, &prev)
                        } else {
                            (&prev, r)
                        };
                        return corrupt!(
                            "{} points into {}",
                            subject(bad, names),
                            object(other.kind, names)
                        );
                    }
                }
                if self.end(r) <= self.end(&prev) {
                    continue;
                }
            }
            reach = Some(*r);
        }
        Ok(())
    }
}

const SNAPSHOT_ENTRY_FIXED: usize = 40;

fn read(storage: &dyn Storage, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
    storage
        .read_at(buf, offset)
        .map_err(|e| Error::io(format!("reading {what} at {offset:#x}"), e))
}

/// The structures cluster 0 names: the header, the refcount table (and its
/// blocks when `alloc` is loaded), the active L1 table and the L2 tables it
/// names, the snapshot table and each snapshot's L1 table. Fails when one of
/// them lies past the end of the file; unaligned L1 entries are left to
/// whoever reads guest data (an L2 table past the end of the file is kept: it
/// must not overlap anything, and a writer needs its refcount).
pub(super) fn base(
    storage: &dyn Storage,
    h: &Header,
    alloc: Option<&Allocator>,
    file_len: u64,
) -> Result<Layout> {
    let cs = h.cluster_size();
    let mut l = Layout::new(h.cluster_bits);
    l.add(0, cs, Kind::Header);
    l.add(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        Kind::RefcountTable,
    );
    if let Some(a) = alloc {
        for (i, off) in a.block_offsets() {
            l.add(off, cs, Kind::RefcountBlock(i as u32));
        }
    }
    if h.l1_size > 0 {
        let bytes = u64::from(h.l1_size) * 8;
        if h.l1_table_offset.saturating_add(bytes) > file_len {
            return corrupt!(
                "l1_table_offset {:#x} (l1_size {}) lies past the end of the file ({file_len})",
                h.l1_table_offset,
                h.l1_size
            );
        }
        l.add(h.l1_table_offset, bytes, Kind::L1Table);
        let mut l1 = vec![0u8; bytes as usize];
        read(storage, &mut l1, h.l1_table_offset, "the L1 table")?;
        for i in 0..h.l1_size as usize {
            let off = be64(&l1, i * 8) & crate::format::l2::OFFSET_MASK;
            // Also past the end of the file: a file that grows later (our own
            // allocations) would otherwise turn such an entry into an overlap.
            if off != 0 && off % cs == 0 {
                l.add(off, cs, Kind::L2Table(i as u32));
            }
        }
    }
    if h.nb_snapshots > 0 {
        let mut at = h.snapshots_offset;
        for i in 0..h.nb_snapshots {
            let mut e = [0u8; SNAPSHOT_ENTRY_FIXED];
            if at.saturating_add(SNAPSHOT_ENTRY_FIXED as u64) > file_len {
                return corrupt!(
                    "snapshot table at {:#x} (nb_snapshots {}): entry {i} lies past the end of the file ({file_len})",
                    h.snapshots_offset,
                    h.nb_snapshots
                );
            }
            read(storage, &mut e, at, "the snapshot table")?;
            let l1_offset = be64(&e, 0);
            let l1_bytes = u64::from(be32(&e, 8)) * 8;
            let len = SNAPSHOT_ENTRY_FIXED
                + be32(&e, 36) as usize
                + usize::from(be16(&e, 12))
                + usize::from(be16(&e, 14));
            if l1_bytes > 0 {
                if l1_offset % cs != 0
                    || l1_offset == 0
                    || l1_offset.saturating_add(l1_bytes) > file_len
                {
                    return corrupt!(
                        "snapshot {i}: l1_table_offset {l1_offset:#x} ({l1_bytes} bytes) is not a cluster-aligned offset inside the file"
                    );
                }
                l.add(l1_offset, l1_bytes, Kind::SnapshotL1(i));
            }
            // The last entry's padding need not be in the file.
            if at.saturating_add(len as u64) > file_len {
                return corrupt!(
                    "snapshot table at {:#x} (nb_snapshots {}): entry {i} runs past the end of the file ({file_len})",
                    h.snapshots_offset,
                    h.nb_snapshots
                );
            }
            at = at.saturating_add(pad8(len) as u64);
        }
        l.add(
            h.snapshots_offset,
            at - h.snapshots_offset,
            Kind::SnapshotTable,
        );
    }
    Ok(l)
}

/// Read-write opens: every cluster of every structure must have a refcount,
/// or the allocator could hand it out again and corrupt the image.
pub(super) fn check_refcounts(
    l: &Layout,
    alloc: &mut Allocator,
    storage: &dyn Storage,
    names: &[String],
) -> Result<()> {
    let cb = l.cluster_bits;
    for r in &l.regions {
        let first = r.offset >> cb;
        for c in first..first.saturating_add(r.clusters) {
            if alloc.refcount(storage, c)? == 0 {
                let at = if r.clusters > 1 {
                    format!(": cluster at {:#x}", c << cb)
                } else {
                    String::new()
                };
                return corrupt!(
                    "{}{at} has refcount 0, yet is in use (writing could reuse it); repair with `qemu-img check -r all`",
                    subject(r, names)
                );
            }
        }
    }
    Ok(())
}

fn name(names: &[String], b: u32) -> &str {
    names.get(b as usize).map_or("?", String::as_str)
}

/// The structure a message is about, by the field that placed it.
pub(super) fn subject(r: &Region, names: &[String]) -> String {
    let off = r.offset;
    match r.kind {
        Kind::Header => "cluster 0 (the header)".into(),
        Kind::RefcountTable => format!("refcount_table_offset {off:#x}"),
        Kind::RefcountBlock(i) => format!("refcount table entry {i}: refcount block at {off:#x}"),
        Kind::L1Table => format!("l1_table_offset {off:#x}"),
        Kind::SnapshotTable => format!("snapshots_offset {off:#x}"),
        Kind::SnapshotL1(i) => format!("snapshot {i}: L1 table at {off:#x}"),
        Kind::L2Table(i) => format!("L1 entry {i}: L2 table at {off:#x}"),
        Kind::Directory => format!("bitmap_directory_offset {off:#x}"),
        Kind::BitmapTable(b) => {
            format!("bitmap '{}': bitmap_table_offset {off:#x}", name(names, b))
        }
        Kind::BitmapData(b, e) => {
            format!("bitmap '{}': table entry {e} ({off:#x})", name(names, b))
        }
    }
}

/// The structure something points into.
fn object(kind: Kind, names: &[String]) -> String {
    match kind {
        Kind::Header => "cluster 0 (the header)".into(),
        Kind::RefcountTable => "the refcount table".into(),
        Kind::RefcountBlock(i) => format!("a refcount block (refcount table entry {i})"),
        Kind::L1Table => "the L1 table".into(),
        Kind::SnapshotTable => "the snapshot table".into(),
        Kind::SnapshotL1(i) => format!("the L1 table of snapshot {i}"),
        Kind::L2Table(i) => format!("an L2 table (L1 entry {i})"),
        Kind::Directory => "the bitmap directory".into(),
        Kind::BitmapTable(b) => format!("the bitmap table of bitmap '{}'", name(names, b)),
        Kind::BitmapData(b, e) => {
            format!(
                "the data cluster of bitmap '{}' table entry {e}",
                name(names, b)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_name_the_later_structure() {
        let names = vec!["b1".to_string(), "b2".to_string()];
        let mut l = Layout::new(16);
        l.add(0, 112, Kind::Header);
        l.add(0x10000, 0x10000, Kind::RefcountTable);
        l.add(0x30000, 8, Kind::BitmapTable(0));
        l.add(0x40000, 0x10000, Kind::BitmapData(0, 0));
        l.check_overlaps(&names).unwrap();
        l.add(0x10000, 0x10000, Kind::BitmapData(1, 3));
        let e = l.check_overlaps(&names).unwrap_err().to_string();
        assert_eq!(
            e,
            "bitmap 'b2': table entry 3 (0x10000) points into the refcount table"
        );
        let mut l = Layout::new(16);
        l.add(0x50000, 0x30000, Kind::RefcountTable);
        l.add(0x60000, 1, Kind::L2Table(0));
        l.add(0x70000, 1, Kind::BitmapData(0, 1));
        let e = l.check_overlaps(&names).unwrap_err().to_string();
        assert!(e.contains("L1 entry 0"), "{e}");
        let mut l = Layout::new(16);
        l.add(0x60000, 1, Kind::L2Table(0));
        l.add(0x60000, 1, Kind::L2Table(1));
        l.add(0x50000, 1, Kind::BitmapData(0, 0));
        l.add(0x50000, 1, Kind::BitmapData(1, 0));
        let e = l.check_overlaps(&names).unwrap_err().to_string();
        assert_eq!(
            e,
            "bitmap 'b2': table entry 0 (0x50000) points into the data cluster of bitmap 'b1' table entry 0"
        );
    }
}
