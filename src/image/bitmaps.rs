//! Loading, storing and changing the persistent bitmaps of an image.
//!
//! Store order (FORMAT.md section 5, with one flush fewer): new data
//! clusters, tables and the new directory into fresh clusters, flush; cluster
//! 0 naming the directory, in tear-safe flushed steps
//! (`State::commit_cluster0`); only then are the old clusters freed.
//! FORMAT.md flushes between the tables and the directory too, which buys
//! nothing: nothing durable names either before cluster 0 does.
//! tests/crash.rs cuts a run after every write to hold this.

use super::layout::{self, Kind, Layout};
use super::{Image, State};
use crate::bitmap::DirtyBitmap;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::bitmap_dir::{self, DirEntry, FLAG_AUTO, FLAG_IN_USE};
use crate::format::bitmap_table::{self, TableEntry};
use crate::format::extension::{self, BitmapsExtension, Extension};
use crate::format::header;
use std::sync::Arc;

/// Reads and writes of bitmap data go in pieces of at most this many bytes:
/// large enough for sequential device speed, small enough that the buffer
/// does not dominate the resident memory of a sparse bitmap.
const IO_CHUNK: u64 = 1 << 20;

/// What a caller sees of one bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// Marked by every write (the `auto` flag).
    pub enabled: bool,
    /// Found flagged in_use when the image was opened: its content is not
    /// trustworthy, and it can only be removed.
    pub in_use: bool,
    /// Neither inconsistent nor carrying extra data this version does not know.
    pub usable: bool,
    /// Dirty bytes; None when not usable, or not counted
    /// ([`Image::bitmap_list`] does not count).
    pub dirty_bytes: Option<u64>,
    /// Extra data from the directory entry, kept byte for byte.
    pub extra_data: Vec<u8>,
    /// Found in_use but recovered at open: it was in write-intent mode when
    /// the program that had it open stopped, and nothing wrote the image
    /// since (docs/write-intent.md). Its bits hold every returned mark.
    pub recovered: bool,
}

/// One bitmap of the image, loaded or not.
pub(crate) struct Slot {
    /// The directory entry as it is (or will be) on disk. `table_offset` and
    /// `table_size` name the stored table while `table` is `Some`.
    pub(super) entry: DirEntry,
    /// The bits in memory; `None` when the bitmap is inconsistent or
    /// untouchable, or `stored`.
    pub(super) data: Option<Arc<DirtyBitmap>>,
    /// Usable, with its bits on disk only (lazy opens, see stored.rs): they
    /// are those of `table` until a call loads them into `data`.
    pub(super) stored: bool,
    /// The entries of the stored table, once known.
    pub(super) table: Option<Vec<TableEntry>>,
    /// Loaded from an in_use entry by write-intent recovery.
    recovered: bool,
}

impl Slot {
    pub(crate) fn usable(&self) -> bool {
        self.data.is_some() || self.stored
    }

    /// What a caller sees, without the dirty count.
    fn info(&self) -> BitmapInfo {
        BitmapInfo {
            name: self.entry.name.clone(),
            granularity: 1u64 << self.entry.granularity_bits,
            enabled: self.entry.auto(),
            in_use: !self.usable() && self.entry.in_use(),
            usable: self.usable(),
            dirty_bytes: None,
            extra_data: self.entry.extra_data.clone(),
            recovered: self.recovered,
        }
    }

    fn needs_data_store(&self) -> bool {
        self.data
            .as_ref()
            .is_some_and(|d| self.table.is_none() || d.is_modified())
    }
}

impl State {
    pub(super) fn enabled_bitmaps(&self) -> Vec<Arc<DirtyBitmap>> {
        self.slots
            .iter()
            .filter(|s| s.entry.auto())
            .filter_map(|s| s.data.clone())
            .collect()
    }

    fn file_len(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| Error::io("reading the file size", e))
    }

    pub(super) fn read(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        self.storage
            .read_at(buf, offset)
            .map_err(|e| Error::io(format!("reading {what} at {offset:#x}"), e))
    }

    pub(super) fn write(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Error::io(format!("writing {what} at {offset:#x}"), e))
    }

    /// [`State::write`] for bulk bitmap data that a flush will soon need
    /// durable: its writeback starts at once (see `Storage::start_writeback`).
    pub(super) fn write_data(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        self.write(buf, offset, what)?;
        self.storage.start_writeback(offset, buf.len() as u64);
        Ok(())
    }

    /// Parses the directory named by the bitmaps extension and loads every
    /// bitmap that is consistent and understood. `layout` holds the
    /// structures cluster 0 names; the directory and the bitmap tables and
    /// data are added to it, and nothing is loaded unless no two of them
    /// share a cluster and (read-write) every one has a refcount.
    pub(super) fn load_bitmaps(&mut self, writable: bool, mut layout: Layout) -> Result<()> {
        let ext = self
            .extensions
            .iter()
            .find(|e| e.magic == extension::BITMAPS);
        let consistent = self.header.version == 3
            && self.header.autoclear_features & header::AUTOCLEAR_BITMAPS != 0;
        let ext = match (ext, consistent) {
            (Some(e), true) => Some(BitmapsExtension::parse(&e.data, self.cluster_size())?),
            // Stale: an older program opened the image read-write. Ignore it.
            (Some(_), false) => None,
            (None, true) if writable => {
                return corrupt!(
                    "autoclear bit 0 (bitmaps) is set but there is no bitmaps extension"
                )
            }
            (None, _) => None,
        };
        let Some(ext) = ext else {
            return self.check_layout(layout, &[], writable);
        };
        let file_len = self.file_len()?;
        if ext.directory_offset.saturating_add(ext.directory_size) > file_len {
            return corrupt!(
                "bitmap_directory_offset {:#x} (bitmap_directory_size {}) lies past the end of the file ({file_len})",
                ext.directory_offset,
                ext.directory_size
            );
        }
        let mut dir = vec![0u8; ext.directory_size as usize];
        self.read(&mut dir, ext.directory_offset, "the bitmap directory")?;
        let entries =
            bitmap_dir::parse(&dir, ext.nb_bitmaps, self.header.size, self.cluster_size())?;
        layout.add(ext.directory_offset, ext.directory_size, Kind::Directory);
        // The tables of bitmaps that will be loaded, and on read-write opens
        // every table: removing a bitmap frees what its table names.
        let mut tables = Vec::with_capacity(entries.len());
        let mut recovered = Vec::with_capacity(entries.len());
        let recoverable =
            super::intent::recoverable(self.header.autoclear_features, &self.extensions, &ext);
        for (b, entry) in entries.iter().enumerate() {
            // Write-intent recovery: an in_use bitmap the intact record names,
            // stored in place (every table entry a data cluster).
            let recover = entry.in_use()
                && !entry.has_incompatible_extra_data()
                && recoverable.contains(&(entry.table_offset, entry.table_size));
            let loadable = !entry.has_incompatible_extra_data() && (!entry.in_use() || recover);
            let table = if loadable || writable {
                let table = self.read_table(entry)?;
                for (i, t) in table.iter().enumerate() {
                    if let TableEntry::Data(off) = *t {
                        layout.add(off, 1, Kind::BitmapData(b as u32, i as u32));
                    }
                }
                Some(table)
            } else {
                None
            };
            let recover = recover && table.as_deref().is_some_and(super::intent::fully_allocated);
            let loadable = loadable && (!entry.in_use() || recover);
            recovered.push(recover);
            layout.add(
                entry.table_offset,
                u64::from(entry.table_size) * 8,
                Kind::BitmapTable(b as u32),
            );
            tables.push(table.filter(|_| loadable));
        }
        let names: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
        self.check_layout(layout, &names, writable)?;
        drop(names);
        self.directory = Some((ext.directory_offset, ext.directory_size));
        for ((entry, table), recovered) in entries.into_iter().zip(tables).zip(recovered) {
            let stored = self.lazy && table.is_some();
            let data = match &table {
                Some(table) if !stored => Some(Arc::new(self.load_data(&entry, table)?)),
                _ => None,
            };
            self.slots.push(Slot {
                entry,
                data,
                stored,
                table,
                recovered,
            });
        }
        Ok(())
    }

    /// No two structures share a cluster; on read-write opens, each has a refcount.
    fn check_layout(&mut self, mut layout: Layout, names: &[String], writable: bool) -> Result<()> {
        layout.check_overlaps(names)?;
        if writable {
            if let Some(alloc) = self.alloc.as_mut() {
                layout::check_refcounts(&layout, alloc, self.storage.as_ref(), names)?;
            }
        }
        Ok(())
    }

    fn read_table(&self, entry: &DirEntry) -> Result<Vec<TableEntry>> {
        let what = format!("bitmap '{}'", entry.name);
        let bytes = u64::from(entry.table_size) * 8;
        let file_len = self.file_len()?;
        if entry.table_offset.saturating_add(bytes) > file_len {
            return corrupt!(
                "{what}: bitmap_table_offset {:#x} (bitmap_table_size {}) lies past the end of the file ({file_len})",
                entry.table_offset,
                entry.table_size
            );
        }
        let mut buf = vec![0u8; bytes as usize];
        self.read(&mut buf, entry.table_offset, &format!("{what} table"))?;
        let table = bitmap_table::parse(&buf, self.cluster_size(), &what)?;
        let cs = self.cluster_size();
        let total = bitmap_dir::serialized_len(self.header.size, entry.granularity_bits);
        for (i, t) in table.iter().enumerate() {
            if let TableEntry::Data(off) = *t {
                // The bytes of this cluster that hold bitmap data must exist.
                let need = cs.min(total.saturating_sub(i as u64 * cs));
                if off.saturating_add(need) > file_len {
                    return corrupt!(
                        "{what}: table entry {i} ({off:#x}) lies past the end of the file ({file_len})"
                    );
                }
            }
        }
        Ok(table)
    }

    /// Reads a bitmap's data clusters, coalescing runs of adjacent clusters.
    fn load_data(&self, entry: &DirEntry, table: &[TableEntry]) -> Result<DirtyBitmap> {
        let cs = self.cluster_size();
        let present = table.iter().filter(|e| **e != TableEntry::Zeros).count() as u64 * cs;
        let gb = u32::from(entry.granularity_bits);
        let mut bm = DirtyBitmap::for_load(self.header.size, gb, present)
            .map_err(|e| Error::io(format!("allocating memory for bitmap '{}'", entry.name), e))?;
        let total = bm.serialized_len();
        let max_run = (bm.load_chunk(IO_CHUNK) / cs).max(1) as usize;
        let mut buf = Vec::new();
        let mut i = 0;
        while i < table.len() {
            let first_byte = i as u64 * cs;
            match table[i] {
                TableEntry::Zeros => i += 1,
                TableEntry::Ones => {
                    bm.fill_serialized_ones(first_byte, cs.min(total - first_byte));
                    i += 1;
                }
                TableEntry::Data(off) => {
                    let mut run = 1;
                    while run < max_run
                        && i + run < table.len()
                        && table[i + run] == TableEntry::Data(off + run as u64 * cs)
                    {
                        run += 1;
                    }
                    let len = (run as u64 * cs).min(total - first_byte) as usize;
                    bm.load_with(first_byte, len, &mut buf, |dst| {
                        self.read(dst, off, &format!("bitmap '{}' data", entry.name))
                    })?;
                    i += run;
                }
            }
        }
        bm.finish_load();
        bm.take_modified();
        Ok(bm)
    }

    /// Stores what changed. `closing` clears in_use on the stored bitmaps;
    /// otherwise they stay flagged, because marks keep arriving.
    pub(crate) fn persist(&mut self, closing: bool) -> Result<()> {
        if self.intent && !closing {
            return self.persist_intent();
        }
        // Lazy opens track no writes: their bitmaps stay as stored.
        let want_in_use = !closing && !self.lazy;
        let flags_change = self
            .slots
            .iter()
            .any(|s| s.usable() && s.entry.in_use() != want_in_use);
        let data_change = self.slots.iter().any(Slot::needs_data_store);
        if !(self.dir_changed || flags_change || data_change || !self.pending_free.is_empty()) {
            return Ok(());
        }
        // Fail before writing anything if cluster 0 cannot hold the result.
        let dir = (!self.slots.is_empty()).then_some((0, 0, 1));
        let (exts, autoclear) = self.bitmaps_extensions(dir);
        self.encode_cluster0(&exts, autoclear)?;

        // Marks racing with the store set `modified` again and are stored next time.
        let changed: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].needs_data_store())
            .collect();
        for &i in &changed {
            self.slots[i].data.as_ref().expect("usable").take_modified();
        }
        let result = self.store_and_commit(&changed, want_in_use);
        if result.is_err() {
            for &i in &changed {
                self.slots[i].data.as_ref().expect("usable").set_modified();
            }
        }
        result
    }

    pub(super) fn store_and_commit(&mut self, changed: &[usize], want_in_use: bool) -> Result<()> {
        // 1. Data and tables of changed bitmaps, into fresh clusters (fully
        // allocated in write-intent mode, for in-place writes).
        let full = self.intent && want_in_use;
        let in_place: Vec<bool> = (0..self.slots.len())
            .map(|i| full && (changed.contains(&i) || self.slots[i].in_place_table().is_some()))
            .collect();
        let mut entries: Vec<DirEntry> = self.slots.iter().map(|s| s.entry.clone()).collect();
        let mut new_tables = Vec::with_capacity(changed.len());
        for &i in changed {
            let data = self.slots[i].data.clone().expect("usable");
            let (offset, table) = self.store_data(&entries[i].name, &data, full)?;
            entries[i].table_offset = offset;
            entries[i].table_size = table.len() as u32;
            new_tables.push((i, table));
        }

        // 2. The directory, into fresh clusters. No flush in between: until
        // cluster 0 names the directory nothing durable names it or the
        // tables, so one flush before that write covers both.
        for (e, s) in entries.iter_mut().zip(&self.slots) {
            if s.usable() {
                e.flags = if want_in_use {
                    e.flags | FLAG_IN_USE
                } else {
                    e.flags & !FLAG_IN_USE
                };
            }
        }
        let cs = self.cluster_size();
        let new_dir = if entries.is_empty() {
            None
        } else {
            let mut bytes = bitmap_dir::encode(&entries);
            let size = bytes.len() as u64;
            let clusters = size.div_ceil(cs);
            let offset = self.allocate(clusters)?;
            bytes.resize((clusters * cs) as usize, 0);
            self.write(&bytes, offset, "the bitmap directory")?;
            Some((offset, size, entries.len() as u32))
        };
        self.flush_storage()?;

        // 3. Cluster 0 names the new directory (and, in write-intent mode,
        // the record of the bitmaps stored in place; its bit set last).
        let (mut exts, mut autoclear) = self.bitmaps_extensions(new_dir);
        self.intent_record(
            &mut exts,
            &mut autoclear,
            new_dir,
            &entries,
            &in_place,
            want_in_use,
        );
        self.commit_cluster0(exts, autoclear)?;

        // 4. The new directory is durable: what only the old one named is garbage.
        if let Some((offset, size)) = self.directory.take() {
            self.pending_free.push((offset, size.div_ceil(cs)));
        }
        self.directory = new_dir.map(|(offset, size, _)| (offset, size));
        for (i, table) in new_tables {
            let slot = &mut self.slots[i];
            if let Some(old) = slot.table.replace(table) {
                self.pending_free
                    .extend(table_clusters(slot.entry.table_offset, &old, cs));
            }
        }
        for (slot, entry) in self.slots.iter_mut().zip(entries) {
            slot.entry = entry;
        }
        self.dir_changed = false;
        self.free_pending()
    }

    /// Frees clusters no durable metadata names any more. The store they
    /// follow is durable, so a failure here does not fail it: the image
    /// stays valid, the clusters leak (qemu-img check -r leaks), and the
    /// refcounts are read again. Retrying could free a cluster twice.
    fn free_pending(&mut self) -> Result<()> {
        // Freed tables may be reallocated: a cached chunk would be stale.
        self.chunk_cache = None;
        let pieces = std::mem::take(&mut self.pending_free);
        let storage = self.storage.as_ref();
        let freed = self
            .alloc
            .as_mut()
            .expect("writable")
            .free_all(storage, &pieces);
        if freed.is_err() {
            self.reload_allocator();
        }
        Ok(())
    }

    /// The extension list and autoclear bits with the bitmaps extension set
    /// to `dir` (offset, size, count), or removed when `None`.
    pub(super) fn bitmaps_extensions(&self, dir: Option<(u64, u64, u32)>) -> (Vec<Extension>, u64) {
        let mut exts = self.extensions.clone();
        let pos = exts.iter().position(|e| e.magic == extension::BITMAPS);
        let autoclear = self.header.autoclear_features;
        match dir {
            Some((offset, size, nb)) => {
                let ext = Extension {
                    magic: extension::BITMAPS,
                    data: BitmapsExtension {
                        nb_bitmaps: nb,
                        directory_size: size,
                        directory_offset: offset,
                    }
                    .encode(),
                };
                match pos {
                    Some(p) => exts[p] = ext,
                    None => exts.push(ext),
                }
                (exts, autoclear | header::AUTOCLEAR_BITMAPS)
            }
            None => {
                super::drop_bitmaps_extension(&mut exts);
                (exts, autoclear & !header::AUTOCLEAR_BITMAPS)
            }
        }
    }

    /// Writes one bitmap's data clusters and table into fresh clusters and
    /// returns the table's offset and entries. Clusters that are all zeros or
    /// all ones are not written: the table entry says so.
    /// `full`: every cluster gets a data cluster (write-intent mode).
    fn store_data(
        &mut self,
        name: &str,
        data: &DirtyBitmap,
        full: bool,
    ) -> Result<(u64, Vec<TableEntry>)> {
        let cs = self.cluster_size();
        let total = data.serialized_len();
        let n = total.div_ceil(cs);
        let mut kinds = Vec::with_capacity(n as usize);
        let mut cluster = vec![0u8; cs as usize];
        for i in 0..n {
            let start = i * cs;
            let len = cs.min(total - start);
            kinds.push(if full {
                TableEntry::Data(0)
            } else if data.serialized_range_is_clean(start, len) {
                TableEntry::Zeros
            } else {
                data.read_serialized(start, &mut cluster[..len as usize]);
                classify(
                    &cluster[..len as usize],
                    start + len == total,
                    data.bit_count(),
                )
            });
        }
        let data_clusters = kinds
            .iter()
            .filter(|k| matches!(k, TableEntry::Data(_)))
            .count() as u64;
        let table_clusters = (n * 8).div_ceil(cs).max(1);
        let base = self.allocate(data_clusters + table_clusters)?;

        // Data clusters are contiguous from `base`: write them in big pieces.
        let per_chunk = (IO_CHUNK / cs).max(1);
        let mut next = base;
        let mut buf: Vec<u8> = Vec::new();
        let mut buf_at = base;
        for (i, kind) in kinds.iter_mut().enumerate() {
            if *kind != TableEntry::Data(0) {
                continue;
            }
            let start = i as u64 * cs;
            let len = cs.min(total - start) as usize;
            let at = buf.len();
            buf.resize(at + cs as usize, 0);
            data.read_serialized(start, &mut buf[at..at + len]);
            *kind = TableEntry::Data(next);
            next += cs;
            if buf.len() as u64 >= per_chunk * cs {
                self.write_data(&buf, buf_at, &format!("bitmap '{name}' data"))?;
                buf_at = next;
                buf.clear();
            }
        }
        if !buf.is_empty() {
            self.write_data(&buf, buf_at, &format!("bitmap '{name}' data"))?;
        }
        // Their memory serves the table next (a CLI's peak is these buffers).
        drop((buf, cluster));
        let mut table = bitmap_table::encode(&kinds);
        table.resize((table_clusters * cs) as usize, 0);
        self.write(&table, next, &format!("bitmap '{name}' table"))?;
        Ok((next, kinds))
    }
}

/// How one serialized cluster is stored. `Data(0)` means "needs a cluster".
/// `last` says the cluster holds the final byte, whose bits past `bit_count`
/// are padding.
pub(super) fn classify(bytes: &[u8], last: bool, bit_count: u64) -> TableEntry {
    if all_bytes(bytes, 0) {
        return TableEntry::Zeros;
    }
    let (body, tail) = match (last, bit_count % 8) {
        (true, r) if r != 0 => (&bytes[..bytes.len() - 1], Some((1u8 << r) - 1)),
        _ => (bytes, None),
    };
    if all_bytes(body, 0xff) && tail.is_none_or(|mask| bytes[bytes.len() - 1] == mask) {
        TableEntry::Ones
    } else {
        TableEntry::Data(0)
    }
}

/// Every byte of `bytes` is `v`; compared a word at a time.
fn all_bytes(bytes: &[u8], v: u8) -> bool {
    let word = u64::from_ne_bytes([v; 8]);
    let mut words = bytes.chunks_exact(8);
    words.remainder().iter().all(|&b| b == v)
        && words.all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == word)
}

/// (offset, clusters) pieces a stored table and its data occupy.
pub(super) fn table_clusters(table_offset: u64, table: &[TableEntry], cs: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = table
        .iter()
        .filter_map(|t| match t {
            TableEntry::Data(off) => Some((*off, 1)),
            _ => None,
        })
        .collect();
    out.push((table_offset, (table.len() as u64 * 8).div_ceil(cs).max(1)));
    out
}

impl State {
    fn find(&self, name: &str) -> Result<usize> {
        // A name no bitmap can have (empty, too long) is a bad argument, not
        // a missing bitmap: the directory parser refuses such names on disk.
        bitmap_dir::validate_name(name).map_err(Error::InvalidArgument)?;
        self.slots
            .iter()
            .position(|s| s.entry.name == name)
            .ok_or_else(|| Error::NotFound(format!("bitmap '{name}' not found")))
    }

    /// Index of a bitmap that may be read or changed.
    fn usable_index(&self, name: &str) -> Result<usize> {
        let i = self.find(name)?;
        let slot = &self.slots[i];
        if slot.usable() {
            Ok(i)
        } else if slot.entry.in_use() {
            Err(Error::Busy(format!(
                "bitmap '{name}' is inconsistent (it was in use when the image was opened); it can only be removed"
            )))
        } else {
            Err(Error::NotSupported(format!(
                "bitmap '{name}' carries {} bytes of extra data this version does not understand; it is kept but cannot be used",
                slot.entry.extra_data.len()
            )))
        }
    }

    /// The bits of a bitmap that may be read or changed, in memory (a
    /// stored one is loaded).
    fn usable(&mut self, name: &str) -> Result<(usize, Arc<DirtyBitmap>)> {
        let i = self.usable_index(name)?;
        Ok((i, self.load_slot(i)?))
    }

    /// Slot `i`'s bits in memory, loading them if they are only stored.
    pub(super) fn load_slot(&mut self, i: usize) -> Result<Arc<DirtyBitmap>> {
        let data = self.bits_of(i)?;
        let slot = &mut self.slots[i];
        slot.data = Some(data.clone());
        slot.stored = false;
        Ok(data)
    }

    /// Slot `i`'s bits for reading: in memory, or loaded for the caller
    /// alone (a stored bitmap stays stored: its memory goes with the caller's).
    fn bits_of(&self, i: usize) -> Result<Arc<DirtyBitmap>> {
        let slot = &self.slots[i];
        match &slot.data {
            Some(d) => Ok(d.clone()),
            None => {
                let table = slot
                    .table
                    .as_deref()
                    .expect("usable slots keep their table");
                Ok(Arc::new(self.load_data(&slot.entry, table)?))
            }
        }
    }

    /// Slot `i` as a caller sees it; `count` counts its dirty bytes (which
    /// reads a stored bitmap's data clusters).
    fn slot_info(&mut self, i: usize, count: bool) -> Result<BitmapInfo> {
        let mut info = self.slots[i].info();
        if count {
            info.dirty_bytes = match &self.slots[i].data {
                Some(d) => Some(d.dirty_bytes()),
                None if self.slots[i].stored => Some(self.stored_dirty_bytes(i)?),
                None => None,
            };
        }
        Ok(info)
    }

    /// The clusters a bitmap that was never loaded occupies, if its table
    /// can be trusted enough to free them; otherwise they leak.
    fn unloaded_clusters(&self, entry: &DirEntry) -> Vec<(u64, u64)> {
        match self.read_table(entry) {
            Ok(table) => table_clusters(entry.table_offset, &table, self.cluster_size()),
            Err(_) => Vec::new(),
        }
    }
}

/// Checks a granularity given in bytes and returns its bit count.
fn granularity_bits(granularity: u64) -> Result<u8> {
    let min = 1u64 << bitmap_dir::MIN_GRANULARITY_BITS;
    let max = 1u64 << bitmap_dir::MAX_GRANULARITY_BITS;
    if !granularity.is_power_of_two() || !(min..=max).contains(&granularity) {
        return Err(Error::InvalidArgument(format!(
            "granularity {granularity} must be a power of two from {min} to {max}"
        )));
    }
    Ok(granularity.trailing_zeros() as u8)
}

impl Image {
    fn ctx(&self, e: Error) -> Error {
        e.context(&self.name)
    }

    fn writable_state(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        if !self.writable {
            return Err(self.read_only_error());
        }
        self.lock()
    }

    /// Every bitmap, in directory order, with its dirty bytes counted (on
    /// a lazy open that reads every usable bitmap's data clusters).
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        let mut st = self.lock()?;
        (0..st.slots.len())
            .map(|i| st.slot_info(i, true).map_err(|e| self.ctx(e)))
            .collect()
    }

    /// Every bitmap, in directory order, without counting dirty bytes
    /// (`dirty_bytes` is None): reads nothing.
    pub fn bitmap_list(&self) -> Result<Vec<BitmapInfo>> {
        Ok(self.lock()?.slots.iter().map(Slot::info).collect())
    }

    pub fn bitmap_count(&self) -> Result<usize> {
        Ok(self.lock()?.slots.len())
    }

    /// Bitmap number `index` in directory order, or None past the end.
    pub fn bitmap_info_at(&self, index: usize) -> Result<Option<BitmapInfo>> {
        let mut st = self.lock()?;
        if index >= st.slots.len() {
            return Ok(None);
        }
        st.slot_info(index, true).map(Some).map_err(|e| self.ctx(e))
    }

    pub fn bitmap_info(&self, name: &str) -> Result<BitmapInfo> {
        let mut st = self.lock()?;
        let i = st.find(name).map_err(|e| self.ctx(e))?;
        st.slot_info(i, true).map_err(|e| self.ctx(e))
    }

    /// Adds an empty bitmap. `granularity` None picks QEMU's default.
    pub fn add_bitmap(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        let mut st = self.writable_state()?;
        let granularity = granularity.unwrap_or_else(|| st.cluster_size().clamp(4096, 65536));
        self.add_locked(&mut st, name, granularity, enabled)
            .map_err(|e| self.ctx(e))?;
        // Write-intent mode: stored in place before anyone marks it. When
        // cluster 0 cannot hold the larger record (found before anything
        // is written), the add is undone.
        let stored = st.commit_intent();
        if let Err(Error::NoSpace(_)) = &stored {
            st.slots.pop();
        }
        let stored = stored.map_err(|e| self.ctx(e));
        self.publish_enabled(&st);
        stored
    }

    fn add_locked(
        &self,
        st: &mut State,
        name: &str,
        granularity: u64,
        enabled: bool,
    ) -> Result<()> {
        if st.header.version < 3 {
            return Err(Error::NotSupported(format!(
                "cannot store dirty bitmap '{name}' in a qcow2 v2 image (version 3 needed)"
            )));
        }
        bitmap_dir::validate_name(name).map_err(Error::InvalidArgument)?;
        let bits =
            granularity_bits(granularity).map_err(|e| e.context(format!("bitmap '{name}'")))?;
        if st.slots.iter().any(|s| s.entry.name == name) {
            return Err(Error::Exists(format!("bitmap '{name}' already exists")));
        }
        if st.slots.len() >= extension::MAX_BITMAPS as usize {
            return Err(Error::NoSpace(format!(
                "cannot add bitmap '{name}': the image already has the maximum of {} bitmaps",
                extension::MAX_BITMAPS
            )));
        }
        let cs = st.cluster_size();
        bitmap_dir::check_bitmap_limits(st.header.size, bits, cs)
            .map_err(|m| Error::InvalidArgument(format!("bitmap '{name}': {m}")))?;
        let entry = DirEntry {
            table_offset: 0,
            table_size: bitmap_dir::table_entries(st.header.size, bits, cs) as u32,
            flags: if enabled { FLAG_AUTO } else { 0 },
            bitmap_type: bitmap_dir::TYPE_DIRTY_TRACKING,
            granularity_bits: bits,
            name: name.to_string(),
            raw_name: None,
            extra_data: Vec::new(),
        };
        let dir_size: u64 = st
            .slots
            .iter()
            .map(|s| s.entry.encoded_len() as u64)
            .sum::<u64>()
            + entry.encoded_len() as u64;
        if dir_size > extension::MAX_DIRECTORY_SIZE {
            return Err(Error::NoSpace(format!(
                "cannot add bitmap '{name}': the directory would be {dir_size} bytes, more than {}",
                extension::MAX_DIRECTORY_SIZE
            )));
        }
        let (exts, autoclear) = st.bitmaps_extensions(Some((0, 0, 1)));
        st.encode_cluster0(&exts, autoclear)?;
        let data = DirtyBitmap::new(st.header.size, u32::from(bits))
            .map_err(|e| Error::io(format!("allocating memory for bitmap '{name}'"), e))?;
        st.slots.push(Slot {
            entry,
            data: Some(Arc::new(data)),
            stored: false,
            table: None,
            recovered: false,
        });
        st.dir_changed = true;
        Ok(())
    }

    /// Removes a bitmap, usable or not. Its clusters are freed once a
    /// directory without it is durable.
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        let mut st = self.writable_state()?;
        let i = st.find(name).map_err(|e| self.ctx(e))?;
        let slot = st.slots.remove(i);
        let cs = st.cluster_size();
        let pieces = match &slot.table {
            Some(t) => table_clusters(slot.entry.table_offset, t, cs),
            None if slot.entry.table_offset != 0 && !slot.usable() => {
                st.unloaded_clusters(&slot.entry)
            }
            None => Vec::new(),
        };
        st.pending_free.extend(pieces);
        st.dir_changed = true;
        self.publish_enabled(&st);
        // Published lists keep the bitmap itself alive (see enabled.rs); its
        // memory goes back now. A marker still walking an old list finds
        // zeros and may commit a block again, which nothing reads.
        if let Some(data) = &slot.data {
            data.release_memory();
        }
        st.commit_intent().map_err(|e| self.ctx(e))
    }

    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        let mut st = self.writable_state()?;
        let i = st.usable_index(name).map_err(|e| self.ctx(e))?;
        if st.slots[i].stored {
            // Nothing to read: an empty bitmap replaces it at the next store.
            let empty = DirtyBitmap::new(
                st.header.size,
                u32::from(st.slots[i].entry.granularity_bits),
            )
            .map_err(|e| {
                self.ctx(Error::io(
                    format!("allocating memory for bitmap '{name}'"),
                    e,
                ))
            })?;
            empty.set_modified();
            let slot = &mut st.slots[i];
            slot.data = Some(Arc::new(empty));
            slot.stored = false;
            return Ok(());
        }
        let (_, data) = st.usable(name).map_err(|e| self.ctx(e))?;
        data.clear_all();
        st.sync_intent().map_err(|e| self.ctx(e))
    }

    pub fn enable_bitmap(&self, name: &str) -> Result<()> {
        self.set_enabled(name, true)
    }

    pub fn disable_bitmap(&self, name: &str) -> Result<()> {
        self.set_enabled(name, false)
    }

    fn set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        let mut st = self.writable_state()?;
        let i = st.usable_index(name).map_err(|e| self.ctx(e))?;
        let entry = &mut st.slots[i].entry;
        if entry.auto() != enabled {
            entry.flags ^= FLAG_AUTO;
            st.dir_changed = true;
            self.publish_enabled(&st);
        }
        st.commit_intent().map_err(|e| self.ctx(e))
    }

    pub fn rename_bitmap(&self, old: &str, new: &str) -> Result<()> {
        let mut st = self.writable_state()?;
        let i = st.usable_index(old).map_err(|e| self.ctx(e))?;
        if old == new {
            return Ok(());
        }
        bitmap_dir::validate_name(new).map_err(|m| {
            self.ctx(Error::InvalidArgument(format!(
                "renaming bitmap '{old}': {m}"
            )))
        })?;
        if st.find(new).is_ok() {
            return Err(self.ctx(Error::Exists(format!("bitmap '{new}' already exists"))));
        }
        let grow = new.len() as u64 - old.len().min(new.len()) as u64;
        let dir_size: u64 = st
            .slots
            .iter()
            .map(|s| s.entry.encoded_len() as u64)
            .sum::<u64>()
            + grow;
        if dir_size > extension::MAX_DIRECTORY_SIZE {
            return Err(self.ctx(Error::NoSpace(format!(
                "renaming '{old}' would make the directory {dir_size} bytes, more than {}",
                extension::MAX_DIRECTORY_SIZE
            ))));
        }
        st.slots[i].entry.name = new.to_string();
        st.slots[i].entry.raw_name = None;
        st.dir_changed = true;
        st.commit_intent().map_err(|e| self.ctx(e))
    }

    /// ORs bitmap `src_name` of `src` (this image or another open one) into
    /// bitmap `dst_name` of this image. Granularities may differ; disk sizes
    /// must match, as QEMU requires.
    pub fn merge_bitmap(&self, dst_name: &str, src: &Image, src_name: &str) -> Result<()> {
        if std::ptr::eq(self, src) {
            let mut st = self.writable_state()?;
            let d = st.usable_index(dst_name).map_err(|e| self.ctx(e))?;
            let s = st.usable_index(src_name).map_err(|e| self.ctx(e))?;
            let (dg, sg) = (
                st.slots[d].entry.granularity_bits,
                st.slots[s].entry.granularity_bits,
            );
            if st.slots[d].stored && st.slots[s].stored && dg == sg {
                if d != s {
                    st.stored_merge(d, s).map_err(|e| self.ctx(e))?;
                }
                return Ok(());
            }
            let dst = st.load_slot(d).map_err(|e| self.ctx(e))?;
            let src_bits = st.bits_of(s).map_err(|e| self.ctx(e))?;
            dst.merge_from(&src_bits);
            return st.sync_intent().map_err(|e| self.ctx(e));
        }
        // Another image: its state lock is taken alone, never with ours.
        let src_bits = {
            let st = src.lock()?;
            let s = st.usable_index(src_name).map_err(|e| src.ctx(e))?;
            st.bits_of(s).map_err(|e| src.ctx(e))?
        };
        let mut st = self.writable_state()?;
        let d = st.usable_index(dst_name).map_err(|e| self.ctx(e))?;
        // The bits actually merged, not the other image's size now (it may
        // have been resized since they were read).
        let size = st.header.size;
        if src_bits.size() != size {
            return Err(self.ctx(Error::InvalidArgument(format!(
                "cannot merge bitmap '{src_name}' of a {}-byte disk into bitmap '{dst_name}' of a {size}-byte disk",
                src_bits.size(),
            ))));
        }
        let dst = st.load_slot(d).map_err(|e| self.ctx(e))?;
        dst.merge_from(&src_bits);
        st.sync_intent().map_err(|e| self.ctx(e))
    }

    /// Marks every granule that `[offset, offset+length)` touches.
    pub fn set_range(&self, name: &str, offset: u64, length: u64) -> Result<()> {
        let mut st = self.writable_state()?;
        let (_, data) = st.usable(name).map_err(|e| self.ctx(e))?;
        self.check_range(offset, length, Some(name))?;
        data.mark_bytes(offset, length);
        st.sync_intent().map_err(|e| self.ctx(e))
    }

    /// Clears `[offset, offset+length)`, which must start on a granule and end
    /// on one or at the end of the disk, so no byte outside it is forgotten.
    pub fn reset_range(&self, name: &str, offset: u64, length: u64) -> Result<()> {
        let mut st = self.writable_state()?;
        let (_, data) = st.usable(name).map_err(|e| self.ctx(e))?;
        self.check_range(offset, length, Some(name))?;
        let g = data.granularity();
        let end = offset + length;
        if offset % g != 0 || (end % g != 0 && end != self.size()) {
            return Err(self.ctx(Error::InvalidArgument(format!(
                "bitmap '{name}': reset range at offset {offset} of length {length} is not aligned to the granularity {g}"
            ))));
        }
        data.reset_bits(offset / g, end.div_ceil(g) - offset / g);
        st.sync_intent().map_err(|e| self.ctx(e))
    }

    pub fn dirty_bytes(&self, name: &str) -> Result<u64> {
        let mut st = self.lock()?;
        let i = st.usable_index(name).map_err(|e| self.ctx(e))?;
        let info = st.slot_info(i, true).map_err(|e| self.ctx(e))?;
        Ok(info.dirty_bytes.expect("usable bitmaps are counted"))
    }

    /// The next dirty run (start, length) at or after `from`, or None. On a
    /// lazy open it reads only the chunk holding the run (and keeps it for
    /// the next call).
    pub fn next_extent(&self, name: &str, from: u64) -> Result<Option<(u64, u64)>> {
        let mut st = self.lock()?;
        let i = st.usable_index(name).map_err(|e| self.ctx(e))?;
        match &st.slots[i].data {
            Some(d) => Ok(d.next_dirty_extent(from)),
            None => st.stored_next_extent(i, from).map_err(|e| self.ctx(e)),
        }
    }

    /// Every dirty run, in order. On a lazy open the bitmap is loaded
    /// first; walk it with [`Image::next_extent`] to read it a chunk at a time.
    pub fn extents(&self, name: &str) -> Result<Extents> {
        let mut st = self.lock()?;
        Ok(Extents {
            data: st.usable(name).map_err(|e| self.ctx(e))?.1,
            next: 0,
        })
    }
}

/// Iterator over the dirty runs of one bitmap, as (start, length) in bytes.
pub struct Extents {
    data: Arc<DirtyBitmap>,
    next: u64,
}

impl Iterator for Extents {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let (start, len) = self.data.next_dirty_extent(self.next)?;
        self.next = start + len;
        Some((start, len))
    }
}
