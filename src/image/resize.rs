//! Changing the virtual disk size, and every bitmap's size with it, as
//! `qemu-img resize` leaves an image: bits past a shrunken end are dropped,
//! grown space starts clean, and the guest clusters past a shrunken end are
//! discarded (a later grow must read zeros there, not old data).
//!
//! Order, so that a crash at any point leaves a valid image (leaks at most):
//! 1. shrinking: L2 entries and L1 entries past the new end are cleared and
//!    flushed before the clusters they named are freed;
//!    growing: a larger L1 table (and, for a raw data file, the L2 tables
//!    mapping the new clusters) is written and flushed first;
//! 2. the header's size and L1 fields change in one write within sector 0;
//! 3. the bitmaps, in_use on disk while the image is open, are stored at
//!    their new size. A crash between 2 and 3 leaves them in_use with tables
//!    of the old size: inconsistent, as after any crash, and still valid.

use super::{Image, State};
use crate::error::{Error, Result};
use crate::format::header;
use crate::format::l2::{self, COMPRESSED, COPIED};
use crate::DirtyBitmap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// QEMU's largest L1 table.
const MAX_L1_BYTES: u64 = 32 << 20;

impl Image {
    /// Grows or shrinks the virtual disk to `new_size` bytes (a multiple of
    /// 512, as QEMU requires) and every bitmap with it. Refused while a
    /// bitmap is inconsistent (in use when the image was opened) or carries
    /// extra data this version does not understand, and on images with
    /// internal snapshots. A shrink that fails after discarding (an I/O
    /// error) leaves the old size with the discarded tail reading as zeros
    /// (the clusters were freed before the size could change).
    pub fn resize(&self, new_size: u64) -> Result<()> {
        if !self.writable {
            return Err(self.read_only_error());
        }
        if self.intent.is_some() {
            return Err(Error::NotSupported(format!(
                "{}: resizing in write-intent mode is not supported; close and reopen without it",
                self.name
            )));
        }
        let mut st = self.lock()?;
        let replaced = st.resize(new_size).map_err(|e| e.context(&self.name))?;
        // Marks still reaching an old bitmap (through the list published
        // before this one) are forwarded to its successor; those that came
        // before the forwarding are carried over by the merge.
        for (new, old) in &replaced {
            old.forward_to(new.clone());
        }
        self.size.store(new_size, Ordering::Release);
        self.publish_enabled(&st);
        for (new, old) in replaced {
            new.merge_from(&old);
            old.release_memory();
        }
        st.persist(false).map_err(|e| e.context(&self.name))
    }
}

impl State {
    /// Resizes the image on disk and swaps in bitmaps of the new size;
    /// returns each (new, old) pair for the caller to finish.
    fn resize(&mut self, new_size: u64) -> Result<Vec<(Arc<DirtyBitmap>, Arc<DirtyBitmap>)>> {
        let old_size = self.header.size;
        if new_size % 512 != 0 {
            return Err(Error::InvalidArgument(format!(
                "new size {new_size} is not a multiple of 512"
            )));
        }
        if self.header.nb_snapshots > 0 {
            return Err(Error::NotSupported(format!(
                "the image has {} internal snapshots; resizing it is not supported",
                self.header.nb_snapshots
            )));
        }
        for s in &self.slots {
            if !s.usable() {
                return Err(Error::Busy(format!(
                    "bitmap '{}' is {}; remove it before resizing",
                    s.entry.name,
                    if s.entry.in_use() {
                        "inconsistent (it was in use when the image was opened)"
                    } else {
                        "not usable (extra data this version does not understand)"
                    }
                )));
            }
            if new_size == 0 {
                return Err(Error::InvalidArgument(format!(
                    "bitmap '{}' cannot cover a 0-byte disk",
                    s.entry.name
                )));
            }
            crate::format::bitmap_dir::check_bitmap_limits(
                new_size,
                s.entry.granularity_bits,
                self.cluster_size(),
            )
            .map_err(|m| Error::InvalidArgument(format!("bitmap '{}': {m}", s.entry.name)))?;
        }
        if let Some(path) = self.data_file_name() {
            let len = std::fs::metadata(&path)
                .map_err(|e| Error::io(format!("data file {}", path.display()), e))?
                .len();
            if len < new_size {
                return Err(Error::InvalidArgument(format!(
                    "data file {} is {len} bytes, smaller than the new size {new_size}",
                    path.display()
                )));
            }
        }
        if new_size == old_size {
            return Ok(Vec::new());
        }
        let cs = self.cluster_size();
        let l1_needed = new_size.div_ceil(cs * self.l2_entries());
        if l1_needed * 8 > MAX_L1_BYTES {
            return Err(Error::InvalidArgument(format!(
                "a {new_size}-byte disk needs an L1 table larger than {MAX_L1_BYTES} bytes"
            )));
        }

        // The new bitmaps first: nothing on disk changes if memory runs out.
        // (A lazy open's stored bitmaps are loaded: every bit moves.)
        for i in 0..self.slots.len() {
            self.load_slot(i)?;
        }
        let mut replaced = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let old = slot.data.clone().expect("usable (checked above)");
            let new = DirtyBitmap::new(new_size, old.granularity_bits())
                .map_err(|e| Error::io("allocating a resized bitmap", e))?;
            new.merge_from(&old);
            new.set_modified();
            replaced.push((Arc::new(new), old));
        }

        // 1. Guest clusters past the end go; or the L1 table grows.
        let mut new_header = self.header.clone();
        new_header.size = new_size;
        let mut old_l1 = None;
        if new_size < old_size {
            self.discard_clusters_from(new_size)?;
        } else {
            if l1_needed > u64::from(self.header.l1_size) {
                old_l1 = Some(self.grow_l1(&mut new_header, l1_needed)?);
            }
            if self.data_file_name().is_some() {
                self.map_raw_clusters(&new_header, old_size, new_size)?;
            }
        }

        // 2. The header, in one sector.
        let old_header = std::mem::replace(&mut self.header, new_header);
        let (exts, autoclear) = (self.extensions.clone(), self.header.autoclear_features);
        if let Err(e) = self.commit_cluster0(exts, autoclear) {
            self.header = old_header;
            return Err(e);
        }
        if let Some((offset, clusters)) = old_l1 {
            self.pending_free.push((offset, clusters));
        }

        // 3. New bitmaps of the new size; the caller publishes them and
        //    stores them.
        for (slot, (new, _)) in self.slots.iter_mut().zip(&replaced) {
            slot.data = Some(new.clone());
        }
        self.dir_changed = true;
        Ok(replaced)
    }

    /// Entries per L2 table (16-byte entries with extended L2).
    fn l2_entries(&self) -> u64 {
        let extended = self.header.incompatible_features & header::INCOMPAT_EXTL2 != 0;
        self.cluster_size() / l2::entry_bytes(extended)
    }

    fn read_vec(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.read(&mut buf, offset, what)?;
        Ok(buf)
    }

    /// Clears the mapping of every guest cluster at or past `new_size`, then
    /// frees what it named.
    fn discard_clusters_from(&mut self, new_size: u64) -> Result<()> {
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        let per_l2 = self.l2_entries();
        let entry_bytes = cs / per_l2;
        let external = self.header.incompatible_features & header::INCOMPAT_DATA_FILE != 0;
        let first = new_size.div_ceil(cs);
        let l1_offset = self.header.l1_table_offset;
        let l1_len = u64::from(self.header.l1_size);
        let l1 = self.read_vec(l1_offset, l1_len * 8, "the L1 table")?;
        let mut free = Vec::new();
        let mut cleared_l1 = Vec::new();
        for i in first / per_l2..l1_len {
            let l2 = u64::from_be_bytes(l1[i as usize * 8..][..8].try_into().expect("8 bytes"))
                & l2::OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let from = if i == first / per_l2 {
                first % per_l2
            } else {
                0
            };
            let mut table = self.read_vec(l2, cs, "an L2 table")?;
            for j in from..per_l2 {
                let at = (j * entry_bytes) as usize;
                let entry = u64::from_be_bytes(table[at..at + 8].try_into().expect("8 bytes"));
                if entry & COMPRESSED != 0 {
                    let (start, end) = l2::compressed_range(entry, bits);
                    let (c0, c1) = (start >> bits, (end - 1) >> bits);
                    free.push((c0 << bits, c1 - c0 + 1));
                } else if entry & l2::OFFSET_MASK != 0 && !external {
                    free.push((entry & l2::OFFSET_MASK, 1));
                }
                table[at..at + entry_bytes as usize].fill(0);
            }
            if from == 0 {
                cleared_l1.push(i);
                free.push((l2, 1));
            } else {
                self.write(&table, l2, "an L2 table")?;
            }
        }
        for &i in &cleared_l1 {
            self.write(&0u64.to_be_bytes(), l1_offset + i * 8, "the L1 table")?;
        }
        self.flush_storage()?;
        // Nothing names these clusters any more.
        let storage = self.storage.as_ref();
        let alloc = self.alloc.as_mut().expect("writable");
        if alloc.free_all(storage, &free).is_err() {
            self.reload_allocator();
        }
        Ok(())
    }

    /// Writes a larger L1 table (old entries, then zeros) and points
    /// `header` at it; returns the old table's (offset, clusters).
    fn grow_l1(&mut self, header: &mut header::Header, entries: u64) -> Result<(u64, u64)> {
        let cs = self.cluster_size();
        let old_bytes = u64::from(self.header.l1_size) * 8;
        let mut l1 = self.read_vec(self.header.l1_table_offset, old_bytes, "the L1 table")?;
        let clusters = (entries * 8).div_ceil(cs);
        l1.resize((clusters * cs) as usize, 0);
        let offset = self.allocate(clusters)?;
        self.write(&l1, offset, "the grown L1 table")?;
        self.flush_storage()?;
        header.l1_table_offset = offset;
        header.l1_size = entries as u32;
        Ok((self.header.l1_table_offset, old_bytes.div_ceil(cs)))
    }

    /// For a raw data file, maps guest clusters [old_size, new_size) to the
    /// same offsets (data-file-raw keeps every cluster allocated).
    fn map_raw_clusters(
        &mut self,
        header: &header::Header,
        old_size: u64,
        new_size: u64,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        let per_l2 = self.l2_entries();
        let entry_bytes = cs / per_l2;
        let (first, end) = (old_size.div_ceil(cs), new_size.div_ceil(cs));
        let mut l1 = self.read_vec(
            header.l1_table_offset,
            u64::from(header.l1_size) * 8,
            "the L1 table",
        )?;
        let mut l1_changed = false;
        let mut c = first;
        while c < end {
            let i = (c / per_l2) as usize;
            let raw = u64::from_be_bytes(l1[i * 8..][..8].try_into().expect("8 bytes"));
            let (l2, mut table) = match raw & l2::OFFSET_MASK {
                0 => {
                    let l2 = self.allocate(1)?;
                    l1[i * 8..][..8].copy_from_slice(&(l2 | COPIED).to_be_bytes());
                    l1_changed = true;
                    (l2, vec![0u8; cs as usize])
                }
                l2 => (l2, self.read_vec(l2, cs, "an L2 table")?),
            };
            let table_end = ((i as u64 + 1) * per_l2).min(end);
            for g in c..table_end {
                let at = ((g % per_l2) * entry_bytes) as usize;
                table[at..at + 8].copy_from_slice(&((g << bits) | COPIED).to_be_bytes());
            }
            self.write(&table, l2, "an L2 table")?;
            c = table_end;
        }
        self.flush_storage()?;
        if l1_changed {
            self.write(&l1, header.l1_table_offset, "the L1 table")?;
            self.flush_storage()?;
        }
        Ok(())
    }
}
