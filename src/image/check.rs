//! The full consistency check: every cluster's references are recomputed from
//! everything that can point at it (header, L1/L2 tables of the active state
//! and of every snapshot, snapshot table, refcount table and blocks, crypto
//! header, bitmap directory, tables and data) and compared with its refcount.
//!
//! Verdicts follow `qemu-img check` (FORMAT.md section 3): a cluster whose
//! refcount is below its references is a corruption, one above is a leak.
//! The walk never trusts a size or an offset before bounding it, so a hostile
//! image gives counts and messages, not a crash or a huge allocation.

use super::lock;
use super::{Image, State};
use crate::error::{Error, Result};
use crate::format::bitmap_dir;
use crate::format::bitmap_table::{self, TableEntry};
use crate::format::extension::{self, BitmapsExtension, Extension};
use crate::format::header::{self, Header};
use crate::format::l2::{self, COMPRESSED, COPIED, L1_RESERVED, L2_RESERVED};
use crate::format::{be16, be32, be64, pad8, refcount};
use crate::storage::{FileStorage, Storage};
use std::collections::HashMap;
use std::path::Path;

/// QEMU's largest L1 table (32 MiB) and snapshot count.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_SNAPSHOTS: u32 = 65536;
/// Snapshot table bound (QEMU: 64 MiB).
const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
const SNAPSHOT_ENTRY_FIXED: usize = 40;
const REFCOUNT_TABLE_RESERVED: u64 = 0x1ff;
/// At most this many problems are kept as messages; all are counted.
const MAX_MESSAGES: usize = 1000;

/// What to repair. Nothing is written unless a flag asks for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckOptions {
    /// Lower the refcount of leaked clusters to their reference count.
    pub repair_leaks: bool,
    /// Remove bitmaps that were in use when the image was opened: their
    /// content is lost for good, and they can never be used again.
    pub remove_inconsistent: bool,
}

/// The result of a check, in `qemu-img check`'s terms where it has them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters referenced more often than their refcount says, and broken
    /// entries (unaligned offsets, COPIED flags that disagree, unreadable
    /// bitmap metadata).
    pub corruptions: u64,
    /// Clusters with a refcount above their references.
    pub leaks: u64,
    /// Metadata that could not be read at all.
    pub check_errors: u64,
    pub leaks_fixed: u64,
    pub corruptions_fixed: u64,
    /// Bitmaps flagged in_use (inconsistent), by name.
    pub inconsistent_bitmaps: Vec<String>,
    /// Inconsistent bitmaps removed by this check.
    pub removed_bitmaps: Vec<String>,
    /// One line per problem (the first `MAX_MESSAGES`).
    pub messages: Vec<String>,
    /// End of the last cluster in the file that is referenced or has a refcount.
    pub image_end_offset: u64,
    /// Guest clusters: virtual size / cluster size, rounded up.
    pub total_clusters: u64,
    /// Guest clusters with a host cluster (or compressed data).
    pub allocated_clusters: u64,
    /// Allocated guest clusters not right after their predecessor on the host.
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
}

impl CheckReport {
    /// No corruption and no error (leaks and inconsistent bitmaps allowed).
    pub fn is_consistent(&self) -> bool {
        self.corruptions == 0 && self.check_errors == 0
    }

    fn corruption(&mut self, message: String) {
        self.corruptions += 1;
        self.note(message);
    }

    fn note(&mut self, message: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(message);
        }
    }
}

/// Checks the image stored in `storage` without opening it as an `Image`, so
/// images libqbm refuses to open can still be examined. Fails only when the
/// header itself cannot be parsed or the storage cannot be read at all.
pub fn check_storage(storage: &dyn Storage) -> Result<CheckReport> {
    Ok(Walk::run(storage)?.report)
}

/// `check_storage` on the file at `path`, opened read-only under QEMU's
/// shared read lock (none with `force_share`), as `qemu-img check` does.
pub fn check_file(path: impl AsRef<Path>, force_share: bool) -> Result<CheckReport> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let file =
        std::fs::File::open(path).map_err(|e| Error::io(format!("{name}: cannot open"), e))?;
    let _guard = match force_share {
        true => None,
        false => Some(lock::lock(&file, false, &name)?),
    };
    check_storage(&FileStorage::new(file)).map_err(|e| e.context(&name))
}

impl Image {
    /// Checks every cluster's refcount (see the module comment) and repairs
    /// what `options` asks for. A writable image is flushed first, so the
    /// check sees what is in memory; its own bitmaps, flagged in_use on disk
    /// while it is open, are not reported as inconsistent.
    pub fn check(&self, options: CheckOptions) -> Result<CheckReport> {
        if (options.repair_leaks || options.remove_inconsistent) && !self.writable {
            return Err(Error::ReadOnly(format!(
                "{}: repairing needs an image opened read-write",
                self.name
            )));
        }
        let inconsistent = self.inconsistent_bitmaps()?;
        let mut removed = Vec::new();
        if options.remove_inconsistent {
            for name in &inconsistent {
                self.remove_bitmap(name)?;
                removed.push(name.clone());
            }
        }
        let mut st = self.lock()?;
        if self.writable {
            st.persist(false).map_err(|e| e.context(&self.name))?;
        }
        let walk = Walk::run(st.storage.as_ref()).map_err(|e| e.context(&self.name))?;
        let (mut report, leaked) = (walk.report, walk.leaked);
        report.inconsistent_bitmaps = inconsistent
            .into_iter()
            .filter(|n| !removed.contains(n))
            .collect();
        report.removed_bitmaps = removed;
        if options.repair_leaks && report.leaks > 0 {
            report.leaks_fixed =
                repair_leaks(&mut st, &leaked).map_err(|e| e.context(&self.name))?;
            report.leaks -= report.leaks_fixed;
        }
        Ok(report)
    }

    /// Bitmaps found in use at open (not the ones this handle flags while
    /// it is open); read from the slots, without counting anyone's bits.
    fn inconsistent_bitmaps(&self) -> Result<Vec<String>> {
        Ok(self
            .lock()?
            .slots
            .iter()
            .filter(|s| !s.usable() && s.entry.in_use())
            .map(|s| s.entry.name.clone())
            .collect())
    }
}

/// Drops the extra refcount of every leaked cluster, one block write each.
fn repair_leaks(st: &mut State, leaked: &[(u64, u64, u64)]) -> Result<u64> {
    let storage = st.storage.as_ref();
    let alloc = st
        .alloc
        .as_mut()
        .ok_or_else(|| Error::ReadOnly("repairing needs a writable image".into()))?;
    let values: Vec<(u64, u64)> = leaked.iter().map(|&(c, _, refs)| (c, refs)).collect();
    alloc.set_refcounts(storage, &values)?;
    storage
        .flush()
        .map_err(|e| Error::io("flushing repaired refcounts", e))?;
    Ok(leaked.len() as u64)
}

/// The header extensions as QEMU reads them to open an image: up to the end
/// marker, the backing file name or the end of cluster 0, whichever comes
/// first; a later copy of an extension replaces an earlier one. An extension
/// running past that end makes the image unopenable, for QEMU as for us.
fn extensions_as_qemu_reads(c0: &[u8], header: &Header) -> Result<Vec<Extension>> {
    let limit = match header.backing_file_offset {
        0 => c0.len(),
        at => (at as usize).min(c0.len()),
    };
    let mut out: Vec<Extension> = Vec::new();
    let mut at = header.extensions_start();
    while at + 8 <= limit {
        let magic = be32(c0, at);
        let len = be32(c0, at + 4) as usize;
        if magic == extension::END {
            break;
        }
        let end = at + 8 + len;
        if end > limit {
            return Err(Error::Corrupt(format!(
                "header extension {magic:#010x} at {at:#x} of length {len} runs past {limit:#x}"
            )));
        }
        out.retain(|e| e.magic != magic);
        out.push(Extension {
            magic,
            data: c0[at + 8..end].to_vec(),
        });
        at += 8 + pad8(len);
    }
    Ok(out)
}

/// One pass over the image's metadata.
struct Walk<'a> {
    storage: &'a dyn Storage,
    header: Header,
    cluster_bits: u32,
    file_len: u64,
    /// References per cluster index (saturating).
    refs: Vec<u16>,
    /// (cluster, COPIED flag set, what) to compare with refcount == 1.
    copied: Vec<(u64, bool, &'static str)>,
    /// (cluster, refcount, references) of every leak.
    leaked: Vec<(u64, u64, u64)>,
    report: CheckReport,
}

impl<'a> Walk<'a> {
    fn run(storage: &'a dyn Storage) -> Result<Walk<'a>> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the file size", e))?;
        let mut c0 = vec![0u8; file_len.min(1 << header::MAX_CLUSTER_BITS) as usize];
        storage
            .read_at(&mut c0, 0)
            .map_err(|e| Error::io("reading the header", e))?;
        let header = Header::parse_as_qemu(&c0)?;
        let unknown = header.unknown_incompatible();
        if unknown != 0 {
            // qemu-img cannot open it either: nothing can be said of it.
            return Err(Error::NotSupported(format!(
                "unknown incompatible feature bits {unknown:#x}"
            )));
        }
        c0.truncate(header.cluster_size() as usize);
        let exts = extensions_as_qemu_reads(&c0, &header)?;
        let mut walk = Walk {
            storage,
            cluster_bits: header.cluster_bits,
            header,
            file_len,
            refs: Vec::new(),
            copied: Vec::new(),
            leaked: Vec::new(),
            report: CheckReport::default(),
        };
        walk.report.total_clusters = walk.header.size.div_ceil(walk.cluster_size());
        walk.add_ref(0, walk.cluster_size(), "header");
        walk.extensions(&exts);
        let h = walk.header.clone();
        walk.l1_table(h.l1_table_offset, h.l1_size, true, "active L1 table");
        walk.snapshots();
        walk.refcount_structures();
        walk.compare_refcounts()?;
        Ok(walk)
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn external_data(&self) -> bool {
        self.header.incompatible_features & header::INCOMPAT_DATA_FILE != 0
    }

    fn extended_l2(&self) -> bool {
        self.header.incompatible_features & header::INCOMPAT_EXTL2 != 0
    }

    /// Counts one reference to every cluster overlapping [offset, offset+len).
    fn add_ref(&mut self, offset: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = match offset.checked_add(len - 1) {
            Some(end) => end >> self.cluster_bits,
            None => {
                self.report.corruption(format!(
                    "ERROR {what}: offset {offset:#x} + {len} overflows"
                ));
                return;
            }
        };
        // qemu-img does not count a region reaching a cluster or more past
        // the end of the file: it is one corruption, whatever its size.
        let end = offset.saturating_add(len);
        if end > self.file_len && end - self.file_len >= self.cluster_size() {
            self.report.corruption(format!(
                "ERROR {what}: region at {offset:#x} (+{len}) lies past the end of the file"
            ));
            return;
        }
        if self.refs.len() <= last as usize {
            self.refs.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            let r = &mut self.refs[c as usize];
            *r = r.saturating_add(1);
        }
    }

    /// Reads `len` bytes at `offset`; what lies past the end of the file
    /// reads as zeros (its missing refcount is reported by the comparison).
    fn read(&mut self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let available = self.file_len.saturating_sub(offset).min(len as u64) as usize;
        if available > 0 {
            if let Err(e) = self.storage.read_at(&mut buf[..available], offset) {
                self.report.check_errors += 1;
                self.report
                    .note(format!("ERROR reading {len} bytes at {offset:#x}: {e}"));
                return None;
            }
        }
        Some(buf)
    }

    fn extensions(&mut self, exts: &[Extension]) {
        for ext in exts {
            match ext.magic {
                extension::FULL_DISK_ENCRYPTION if ext.data.len() >= 16 => {
                    let (offset, len) = (be64(&ext.data, 0), be64(&ext.data, 8));
                    self.add_ref(offset, len, "encryption header");
                }
                extension::BITMAPS
                    if self.header.autoclear_features & header::AUTOCLEAR_BITMAPS != 0 =>
                {
                    self.bitmaps(&ext.data)
                }
                _ => {}
            }
        }
    }

    fn bitmaps(&mut self, data: &[u8]) {
        let cs = self.cluster_size();
        let ext = match BitmapsExtension::parse(data, cs) {
            Ok(ext) => ext,
            Err(e) => return self.report.corruption(format!("ERROR {e}")),
        };
        self.add_ref(ext.directory_offset, ext.directory_size, "bitmap directory");
        let Some(buf) = self.read(ext.directory_offset, ext.directory_size as usize) else {
            return;
        };
        let entries = match bitmap_dir::parse_with(&buf, ext.nb_bitmaps, self.header.size, cs, true)
        {
            Ok(entries) => entries,
            Err(e) => {
                return self
                    .report
                    .corruption(format!("ERROR bitmap directory: {e}"))
            }
        };
        for entry in entries {
            if entry.in_use() {
                self.report.inconsistent_bitmaps.push(entry.name.clone());
            }
            let what = format!("bitmap '{}'", entry.name);
            let bytes = u64::from(entry.table_size) * 8;
            self.add_ref(entry.table_offset, bytes, "bitmap table");
            let Some(raw) = self.read(entry.table_offset, bytes as usize) else {
                continue;
            };
            match bitmap_table::parse(&raw, cs, &what) {
                Ok(table) => {
                    for e in table {
                        if let TableEntry::Data(off) = e {
                            self.add_ref(off, cs, "bitmap data");
                        }
                    }
                }
                Err(e) => self.report.corruption(format!("ERROR {e}")),
            }
        }
    }

    /// Walks an L1 table, its L2 tables and their data clusters.
    fn l1_table(&mut self, offset: u64, entries: u32, active: bool, what: &'static str) {
        if entries == 0 {
            return;
        }
        let bytes = u64::from(entries) * 8;
        let cs = self.cluster_size();
        if bytes > MAX_L1_BYTES || offset % cs != 0 {
            return self.report.corruption(format!(
                "ERROR {what} at {offset:#x} with {entries} entries is unaligned or too large"
            ));
        }
        self.add_ref(offset, bytes, what);
        let Some(l1) = self.read(offset, bytes as usize) else {
            return;
        };
        for i in 0..entries as usize {
            let entry = be64(&l1, i * 8);
            // Any nonzero entry names an L2 table, even at offset 0.
            if entry == 0 {
                continue;
            }
            if entry & L1_RESERVED != 0 {
                self.report.corruption(format!(
                    "ERROR {what} entry {i} ({entry:#x}) has reserved bits set"
                ));
            }
            let l2 = entry & l2::OFFSET_MASK;
            if l2 % cs != 0 {
                self.report.corruption(format!(
                    "ERROR {what} entry {i}: L2 table offset {l2:#x} is not cluster aligned"
                ));
            }
            self.add_ref(l2, cs, "L2 table");
            // qemu-img checks COPIED flags only below L1 entries with an offset.
            let check_copied = active && l2 != 0;
            if check_copied {
                self.copied
                    .push((l2 >> self.cluster_bits, entry & COPIED != 0, "L2 table"));
            }
            self.l2_table(l2, active, check_copied);
        }
    }

    fn l2_table(&mut self, offset: u64, active: bool, check_copied: bool) {
        let cs = self.cluster_size();
        // Fragmentation is counted within one L2 table, as qemu-img counts it.
        let mut previous_host = None;
        let Some(l2) = self.read(offset, cs as usize) else {
            return;
        };
        let entry_bytes = l2::entry_bytes(self.extended_l2()) as usize;
        for i in 0..cs as usize / entry_bytes {
            let entry = be64(&l2, i * entry_bytes);
            if entry & COMPRESSED != 0 {
                let (start, end) = l2::compressed_range(entry, self.cluster_bits);
                self.add_ref(start, end - start, "compressed data");
                if active {
                    self.report.allocated_clusters += 1;
                    self.report.compressed_clusters += 1;
                    // qemu-img counts every compressed cluster as fragmented.
                    self.report.fragmented_clusters += 1;
                    previous_host = None;
                }
                continue;
            }
            if entry & L2_RESERVED != 0 {
                self.report.corruption(format!(
                    "ERROR L2 table at {offset:#x} entry {i} ({entry:#x}) has reserved bits set"
                ));
            }
            let host = entry & l2::OFFSET_MASK;
            // In an external data file guest cluster 0 sits at offset 0: the
            // COPIED flag is what says it is allocated.
            let allocated = host != 0 || (self.external_data() && entry & COPIED != 0);
            if !allocated {
                continue;
            }
            // Still counted as allocated and referenced from its (unaligned)
            // offset on, as qemu-img counts it.
            if host % cs != 0 {
                self.report.corruption(format!(
                    "ERROR L2 table at {offset:#x} entry {i}: data offset {host:#x} is not cluster aligned"
                ));
            }
            if active {
                self.report.allocated_clusters += 1;
                if previous_host.is_some_and(|p| p + cs != host) {
                    self.report.fragmented_clusters += 1;
                }
                previous_host = Some(host);
            }
            // With an external data file, offsets name clusters of that file.
            if !self.external_data() {
                self.add_ref(host, cs, "data cluster");
                if check_copied {
                    self.copied.push((
                        host >> self.cluster_bits,
                        entry & COPIED != 0,
                        "data cluster",
                    ));
                }
            }
        }
    }

    fn snapshots(&mut self) {
        let (offset, count) = (self.header.snapshots_offset, self.header.nb_snapshots);
        if count == 0 {
            return;
        }
        if count > MAX_SNAPSHOTS {
            return self.report.corruption(format!(
                "ERROR nb_snapshots {count} exceeds {MAX_SNAPSHOTS}"
            ));
        }
        // Entries are read one at a time: their size is only known as we go.
        let mut at = offset;
        let mut l1s = Vec::new();
        for i in 0..count {
            if at - offset > MAX_SNAPSHOT_TABLE_BYTES {
                return self.report.corruption(format!(
                    "ERROR snapshot table exceeds {MAX_SNAPSHOT_TABLE_BYTES} bytes"
                ));
            }
            let Some(fixed) = self.read(at, SNAPSHOT_ENTRY_FIXED) else {
                return;
            };
            let l1_offset = be64(&fixed, 0);
            let l1_size = be32(&fixed, 8);
            let id_size = u64::from(be16(&fixed, 12));
            let name_size = u64::from(be16(&fixed, 14));
            let extra = u64::from(be32(&fixed, 36));
            let len = SNAPSHOT_ENTRY_FIXED as u64 + extra + id_size + name_size;
            if len > MAX_SNAPSHOT_TABLE_BYTES {
                return self.report.corruption(format!(
                    "ERROR snapshot {i}: entry of {len} bytes is too large"
                ));
            }
            l1s.push((l1_offset, l1_size));
            let Some(next) = at.checked_add(pad8(len as usize) as u64) else {
                return self.report.corruption(format!(
                    "ERROR snapshot table at {offset:#x} runs past the largest file offset"
                ));
            };
            at = next;
        }
        self.add_ref(offset, at - offset, "snapshot table");
        for (l1_offset, l1_size) in l1s {
            self.l1_table(l1_offset, l1_size, false, "snapshot L1 table");
        }
    }

    /// The refcount table and blocks reference themselves; they also give
    /// the refcounts `compare_refcounts` reads.
    fn refcount_structures(&mut self) {
        let cs = self.cluster_size();
        let h = self.header.clone();
        let bytes = u64::from(h.refcount_table_clusters) * cs;
        self.add_ref(h.refcount_table_offset, bytes, "refcount table");
        for (ti, raw) in self.refcount_table_raw().into_iter().enumerate() {
            let block = raw & !REFCOUNT_TABLE_RESERVED;
            if raw & REFCOUNT_TABLE_RESERVED != 0 {
                // Its refcounts are still read; the block is not counted as used.
                self.report.corruption(format!(
                    "ERROR refcount table entry {ti} ({raw:#x}) has reserved bits set"
                ));
                continue;
            }
            if block == 0 {
                continue;
            }
            if block % cs != 0 {
                self.report.corruption(format!(
                    "ERROR refcount block {ti} at {block:#x} is not cluster aligned"
                ));
                continue;
            }
            if block >= self.file_len {
                self.report.corruption(format!(
                    "ERROR refcount block {ti} at {block:#x} is outside the image"
                ));
                continue;
            }
            self.add_ref(block, cs, "refcount block");
        }
    }

    /// The refcount table's block offsets, reserved bits dropped.
    fn refcount_table(&mut self) -> Vec<u64> {
        self.refcount_table_raw()
            .into_iter()
            .map(|e| e & !REFCOUNT_TABLE_RESERVED)
            .collect()
    }

    fn refcount_table_raw(&mut self) -> Vec<u64> {
        let h = &self.header;
        let bytes = (u64::from(h.refcount_table_clusters) << self.cluster_bits)
            .min(self.file_len.saturating_sub(h.refcount_table_offset));
        let offset = h.refcount_table_offset;
        let Some(buf) = self.read(offset, bytes as usize) else {
            return Vec::new();
        };
        (0..buf.len() / 8).map(|i| be64(&buf, i * 8)).collect()
    }

    fn compare_refcounts(&mut self) -> Result<()> {
        let cs = self.cluster_size();
        let order = self.header.refcount_order;
        let per_block = refcount::entries_per_block(self.cluster_bits, order);
        let table = self.refcount_table();
        let file_clusters = self.file_len.div_ceil(cs);
        let end = file_clusters.max(self.refs.len() as u64);
        // None: the block cannot be used (unaligned, outside the file or
        // unreadable), so the refcounts it holds are unknown.
        let mut blocks: HashMap<usize, Option<Vec<u8>>> = HashMap::new();
        let mut refcounts: HashMap<u64, u64> = HashMap::new();
        let mut unknown = std::collections::HashSet::new();
        let copied_clusters: std::collections::HashSet<u64> =
            self.copied.iter().map(|c| c.0).collect();
        // qemu-img reports at least one cluster of image end.
        let mut last_used = 1;
        for c in 0..end {
            let ti = (c / per_block) as usize;
            let rc = match table.get(ti) {
                None | Some(0) => 0,
                Some(&off) => {
                    let block = blocks.entry(ti).or_insert_with(|| {
                        if off % cs != 0 || off >= self.file_len {
                            return None;
                        }
                        let mut b = vec![0u8; cs as usize];
                        let n = (self.file_len - off).min(cs) as usize;
                        self.storage.read_at(&mut b[..n], off).ok().map(|_| b)
                    });
                    match block {
                        Some(b) => refcount::get(b, order, (c % per_block) as usize),
                        None => {
                            unknown.insert(c);
                            self.report.check_errors += 1;
                            self.report
                                .note(format!("ERROR cannot read the refcount of cluster {c}"));
                            continue;
                        }
                    }
                }
            };
            let references = u64::from(self.refs.get(c as usize).copied().unwrap_or(0));
            if (references > 0 || rc > 0) && c < file_clusters {
                last_used = c + 1;
            }
            if rc < references {
                self.report.corruption(format!(
                    "ERROR cluster {c} refcount={rc} reference={references}"
                ));
            } else if rc > references {
                self.report.leaks += 1;
                self.report.note(format!(
                    "Leaked cluster {c} refcount={rc} reference={references}"
                ));
                self.leaked.push((c, rc, references));
            }
            if copied_clusters.contains(&c) {
                refcounts.insert(c, rc);
            }
        }
        self.report.image_end_offset = last_used * cs;
        for (ti, &block) in table.iter().enumerate() {
            let c = block >> self.cluster_bits;
            let references = self.refs.get(c as usize).copied().unwrap_or(0);
            if block % cs == 0 && block != 0 && references > 1 {
                self.report.corruption(format!(
                    "ERROR refcount block {ti} at {block:#x} is referenced {references} times"
                ));
            }
        }
        let copied = std::mem::take(&mut self.copied);
        for (c, flag, what) in copied.into_iter().filter(|c| !unknown.contains(&c.0)) {
            let rc = refcounts.get(&c).copied().unwrap_or(0);
            // Counted even when the refcount is 0 (already a corruption), as
            // qemu-img counts it.
            if flag != (rc == 1) {
                self.report.corruption(format!(
                    "ERROR OFLAG_COPIED {what} at cluster {c}: refcount={rc} but COPIED is {}",
                    if flag { "set" } else { "clear" }
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{CreateOptions, Image};
    use crate::storage::MemoryStorage;
    use std::sync::Arc;

    /// A snapshot table at the very end of the offset space is one
    /// corruption, not an arithmetic overflow.
    #[test]
    fn snapshot_table_at_the_end_of_the_offset_space() {
        let mem = Arc::new(MemoryStorage::default());
        let options = CreateOptions {
            size: 1 << 20,
            cluster_size: 512,
            ..Default::default()
        };
        Image::create_storage(Box::new(mem.clone()), "t", &options)
            .unwrap()
            .close()
            .unwrap();
        let mut bytes = mem.contents();
        bytes[60..64].copy_from_slice(&65535u32.to_be_bytes()); // nb_snapshots
        bytes[64..72].copy_from_slice(&(!511u64).to_be_bytes()); // snapshots_offset
        let r = check_storage(&MemoryStorage::new(bytes)).unwrap();
        assert!(
            r.messages.iter().any(|m| m.contains(
                "snapshot table at 0xfffffffffffffe00 runs past the largest file offset"
            )),
            "{:?}",
            r.messages
        );
        assert!(!r.is_consistent());
    }
}
