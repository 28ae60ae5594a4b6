//! Cluster allocation and freeing through the refcount table and blocks.
//!
//! Refcount changes are written through before `allocate` returns, so a
//! caller's later flush makes them durable before any reference to the new
//! clusters is written: a crash can leak clusters but never leave a
//! referenced cluster with a zero refcount.

use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::refcount;
use crate::storage::Storage;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

/// The refcount table may not grow past this (QEMU's bound is 8 MiB).
const MAX_TABLE_BYTES: u64 = 8 << 20;
/// Header bytes of refcount_table_offset (u64) and refcount_table_clusters (u32).
const HEADER_TABLE_FIELDS: u64 = 48;

pub struct Allocator {
    cluster_bits: u32,
    order: u32,
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u32,
    blocks: HashMap<usize, Vec<u8>>,
    /// Byte ranges of cached blocks changed since the last write-back.
    pending: BTreeMap<usize, Range<usize>>,
    /// No cluster below this is free (first-fit search starts here).
    free_hint: u64,
}

impl Allocator {
    /// Loads the refcount table named by the header. Blocks load on demand.
    pub fn load(
        storage: &dyn Storage,
        cluster_bits: u32,
        refcount_order: u32,
        table_offset: u64,
        table_clusters: u32,
    ) -> Result<Allocator> {
        let cluster_size = 1u64 << cluster_bits;
        let bytes = u64::from(table_clusters) * cluster_size;
        if bytes > MAX_TABLE_BYTES {
            return corrupt!("refcount_table_clusters {table_clusters}: a refcount table of {bytes} bytes exceeds the limit of {MAX_TABLE_BYTES}");
        }
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the file size", e))?;
        if table_offset.saturating_add(bytes) > file_len {
            return corrupt!("refcount_table_offset {table_offset:#x} (+{bytes}) lies past the end of the file ({file_len})");
        }
        let mut buf = vec![0u8; bytes as usize];
        storage
            .read_at(&mut buf, table_offset)
            .map_err(|e| Error::io("reading the refcount table", e))?;
        // Only entries up to the last block in use: a table has room for
        // growth (a 1 GiB image uses 1 of its 8,192 entries), and an
        // entry past `table.len()` reads as "no block".
        let used = buf
            .chunks_exact(8)
            .rposition(|e| e.iter().any(|&b| b != 0))
            .map_or(0, |i| (i + 1) * 8);
        let table = refcount::parse_table(&buf[..used], cluster_size)?;
        if let Some((i, &off)) = table
            .iter()
            .enumerate()
            .find(|(_, &o)| o != 0 && o.saturating_add(cluster_size) > file_len)
        {
            return corrupt!(
                "refcount table entry {i}: refcount block at {off:#x} lies past the end of the file ({file_len})"
            );
        }
        Ok(Allocator {
            cluster_bits,
            order: refcount_order,
            table,
            table_offset,
            table_clusters,
            blocks: HashMap::new(),
            pending: BTreeMap::new(),
            free_hint: 0,
        })
    }

    /// (refcount table index, block offset) of every block the table names.
    pub fn block_offsets(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.table
            .iter()
            .enumerate()
            .filter(|(_, &o)| o != 0)
            .map(|(i, &o)| (i, o))
    }

    pub fn table_offset(&self) -> u64 {
        self.table_offset
    }

    pub fn table_clusters(&self) -> u32 {
        self.table_clusters
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn per_block(&self) -> u64 {
        refcount::entries_per_block(self.cluster_bits, self.order)
    }

    fn split(&self, cluster: u64) -> (usize, usize) {
        let per = self.per_block();
        ((cluster / per) as usize, (cluster % per) as usize)
    }

    fn table_capacity(&self) -> usize {
        (u64::from(self.table_clusters) * self.cluster_size() / 8) as usize
    }

    fn block(&mut self, storage: &dyn Storage, ti: usize) -> Result<Option<&mut Vec<u8>>> {
        let off = match self.table.get(ti) {
            Some(&o) if o != 0 => o,
            _ => return Ok(None),
        };
        if !self.blocks.contains_key(&ti) {
            let mut buf = vec![0u8; self.cluster_size() as usize];
            storage
                .read_at(&mut buf, off)
                .map_err(|e| Error::io(format!("reading refcount block {ti} at {off:#x}"), e))?;
            self.blocks.insert(ti, buf);
        }
        Ok(self.blocks.get_mut(&ti))
    }

    /// The refcount of cluster `cluster` (0 when no block covers it).
    pub fn refcount(&mut self, storage: &dyn Storage, cluster: u64) -> Result<u64> {
        let (ti, bi) = self.split(cluster);
        let order = self.order;
        Ok(self
            .block(storage, ti)?
            .map_or(0, |b| refcount::get(b, order, bi)))
    }

    fn set_cached(&mut self, ti: usize, bi: usize, value: u64) {
        let order = self.order;
        let block = self.blocks.get_mut(&ti).expect("block loaded before set");
        let r = refcount::set(block, order, bi, value);
        self.pending
            .entry(ti)
            .and_modify(|p| *p = p.start.min(r.start)..p.end.max(r.end))
            .or_insert(r);
    }

    /// Writes every changed byte range of cached blocks.
    fn write_back(&mut self, storage: &dyn Storage) -> Result<()> {
        for (ti, range) in std::mem::take(&mut self.pending) {
            let off = self.table[ti] + range.start as u64;
            storage
                .write_at(&self.blocks[&ti][range], off)
                .map_err(|e| Error::io(format!("writing refcount block {ti}"), e))?;
        }
        Ok(())
    }

    /// First run of `n` clusters with refcount 0 at or after the hint.
    fn find_free_run(&mut self, storage: &dyn Storage, n: u64) -> Result<u64> {
        let mut start = self.free_hint.max(1);
        let mut c = start;
        while c - start < n {
            if self.refcount(storage, c)? != 0 {
                start = c + 1;
            }
            c += 1;
        }
        Ok(start)
    }

    /// Allocates `n` contiguous clusters and returns the offset of the first.
    /// Their refcounts are 1 and written (not flushed) when this returns.
    pub fn allocate(&mut self, storage: &dyn Storage, n: u64) -> Result<u64> {
        if n == 0 {
            return Err(Error::InvalidArgument("allocation of zero clusters".into()));
        }
        let mut extra = 0u64;
        for _ in 0..16 {
            let start = self.find_free_run(storage, n + extra)?;
            let plan = self.plan(start, n + extra)?;
            let need = plan.new_blocks.len() as u64 + plan.new_table_clusters;
            if need <= extra {
                self.commit(storage, start, n, plan)?;
                return Ok(start << self.cluster_bits);
            }
            extra = need;
        }
        Err(Error::NoSpace(
            "refcount structures could not be grown".into(),
        ))
    }

    /// Which blocks and table clusters an allocation of [start, start+len) needs.
    fn plan(&self, start: u64, len: u64) -> Result<Plan> {
        let (first_ti, _) = self.split(start);
        let (last_ti, _) = self.split(start + len - 1);
        let new_blocks: Vec<usize> = (first_ti..=last_ti)
            .filter(|&ti| self.table.get(ti).is_none_or(|&o| o == 0))
            .collect();
        let mut new_table_clusters = 0;
        if last_ti >= self.table_capacity() {
            // Grow by half again so that growth stays rare.
            let entries = ((last_ti + 1) as u64).max(self.table_capacity() as u64 * 3 / 2);
            let bytes = (entries * 8).div_ceil(self.cluster_size()) * self.cluster_size();
            if bytes > MAX_TABLE_BYTES {
                return Err(Error::NoSpace(format!(
                    "the refcount table would need {bytes} bytes, more than the limit of {MAX_TABLE_BYTES}"
                )));
            }
            new_table_clusters = bytes / self.cluster_size();
        }
        Ok(Plan {
            new_blocks,
            new_table_clusters,
        })
    }

    fn commit(&mut self, storage: &dyn Storage, start: u64, n: u64, plan: Plan) -> Result<()> {
        let cs = self.cluster_size();
        let blocks_at = start + n;
        let table_at = blocks_at + plan.new_blocks.len() as u64;
        let area_end = table_at + plan.new_table_clusters;
        let old_table = (self.table_offset, self.table_clusters);

        let mut table = self.table.clone();
        if plan.new_table_clusters > 0 {
            table.resize((plan.new_table_clusters * cs / 8) as usize, 0);
        }
        for (j, &ti) in plan.new_blocks.iter().enumerate() {
            if ti >= table.len() {
                table.resize(ti + 1, 0);
            }
            table[ti] = (blocks_at + j as u64) * cs;
            self.blocks.insert(ti, vec![0u8; cs as usize]);
        }
        let saved_table = std::mem::replace(&mut self.table, table);
        for c in start..area_end {
            let (ti, bi) = self.split(c);
            if self.block(storage, ti)?.is_none() {
                self.table = saved_table;
                return corrupt!("refcount block for cluster {c} missing after planning");
            }
            self.set_cached(ti, bi, 1);
        }
        // New blocks go out whole; they must be durable before a table entry points at them.
        for &ti in &plan.new_blocks {
            self.pending.remove(&ti);
            let off = self.table[ti];
            storage
                .write_at(&self.blocks[&ti], off)
                .map_err(|e| Error::io("writing a new refcount block", e))?;
        }
        self.write_back(storage)?;
        self.free_hint = start + n;
        if plan.new_table_clusters > 0 {
            self.switch_table(storage, table_at * cs, plan.new_table_clusters as u32)?;
            self.free(storage, old_table.0, u64::from(old_table.1))?;
        } else if !plan.new_blocks.is_empty() {
            flush(storage)?;
            for &ti in &plan.new_blocks {
                let entry = self.table[ti].to_be_bytes();
                storage
                    .write_at(&entry, self.table_offset + ti as u64 * 8)
                    .map_err(|e| Error::io("writing a refcount table entry", e))?;
            }
        }
        Ok(())
    }

    /// Writes the in-memory table at `offset`, then points the header at it.
    /// Needs: every block it names is written; flushes before and after the header.
    fn switch_table(&mut self, storage: &dyn Storage, offset: u64, clusters: u32) -> Result<()> {
        let bytes: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
        storage
            .write_at(&bytes, offset)
            .map_err(|e| Error::io("writing the grown refcount table", e))?;
        flush(storage)?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&offset.to_be_bytes());
        fields[8..].copy_from_slice(&clusters.to_be_bytes());
        storage
            .write_at(&fields, HEADER_TABLE_FIELDS)
            .map_err(|e| Error::io("pointing the header at the grown refcount table", e))?;
        flush(storage)?;
        self.table_offset = offset;
        self.table_clusters = clusters;
        Ok(())
    }

    /// Drops one reference to each of `n` clusters starting at `offset`.
    pub fn free(&mut self, storage: &dyn Storage, offset: u64, n: u64) -> Result<()> {
        self.free_all(storage, &[(offset, n)])
    }

    /// Drops one reference to each cluster of each (offset, count) piece,
    /// writing each changed refcount block once.
    pub fn free_all(&mut self, storage: &dyn Storage, pieces: &[(u64, u64)]) -> Result<()> {
        for &(offset, n) in pieces {
            let first = offset >> self.cluster_bits;
            for c in first..first.saturating_add(n) {
                let rc = self.refcount(storage, c)?;
                if rc == 0 {
                    self.write_back(storage)?;
                    return corrupt!(
                        "freeing cluster at {:#x} whose refcount is already 0",
                        c << self.cluster_bits
                    );
                }
                let (ti, bi) = self.split(c);
                self.set_cached(ti, bi, rc - 1);
            }
            self.free_hint = self.free_hint.min(first);
        }
        self.write_back(storage)
    }
    /// Sets each (cluster, refcount) pair, writing each changed block once;
    /// the check uses it to repair leaks.
    pub fn set_refcounts(&mut self, storage: &dyn Storage, values: &[(u64, u64)]) -> Result<()> {
        for &(cluster, value) in values {
            let (ti, bi) = self.split(cluster);
            if self.block(storage, ti)?.is_none() {
                self.write_back(storage)?;
                return corrupt!("no refcount block covers cluster {cluster}");
            }
            self.set_cached(ti, bi, value);
            if value == 0 {
                self.free_hint = self.free_hint.min(cluster);
            }
        }
        self.write_back(storage)
    }
}

struct Plan {
    new_blocks: Vec<usize>,
    new_table_clusters: u64,
}

fn flush(storage: &dyn Storage) -> Result<()> {
    storage.flush().map_err(|e| Error::io("flushing", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    /// A fresh image's refcount structures at clusters 1 (table) and 2 (block).
    fn fresh(cluster_bits: u32, order: u32) -> (MemoryStorage, Allocator) {
        let cs = 1usize << cluster_bits;
        let mut img = vec![0u8; 3 * cs];
        img[cs..cs + 8].copy_from_slice(&(2 * cs as u64).to_be_bytes());
        for c in 0..3 {
            refcount::set(&mut img[2 * cs..], order, c, 1);
        }
        let st = MemoryStorage::new(img);
        let alloc = Allocator::load(&st, cluster_bits, order, cs as u64, 1).unwrap();
        (st, alloc)
    }

    /// Reloads the allocator from what is on "disk" and returns every
    /// cluster's refcount as stored.
    fn on_disk_refcounts(
        st: &MemoryStorage,
        cluster_bits: u32,
        order: u32,
        clusters: u64,
    ) -> Vec<u64> {
        let bytes = st.contents();
        let table_offset = u64::from_be_bytes(bytes[48..56].try_into().unwrap());
        let table_clusters = u32::from_be_bytes(bytes[56..60].try_into().unwrap());
        let mut a = Allocator::load(st, cluster_bits, order, table_offset, table_clusters).unwrap();
        (0..clusters).map(|c| a.refcount(st, c).unwrap()).collect()
    }

    #[test]
    fn allocations_grow_blocks_and_table_for_every_width() {
        for order in 0..=6 {
            let cluster_bits = 9;
            let (st, mut a) = fresh(cluster_bits, order);
            // The header fields the table switch rewrites.
            let mut header = vec![0u8; 512];
            header[48..56].copy_from_slice(&512u64.to_be_bytes());
            header[56..60].copy_from_slice(&1u32.to_be_bytes());
            st.write_at(&header[48..60], 48).unwrap();
            let mut got = Vec::new();
            // 512-byte clusters with 64-bit refcounts: a block covers 64
            // clusters and the first table 64 blocks, so this must grow both.
            for i in 0..1500u64 {
                let n = 1 + i % 7;
                got.push((a.allocate(&st, n).unwrap() >> cluster_bits, n));
            }
            let end = got.iter().map(|&(f, n)| f + n).max().unwrap();
            let rc = on_disk_refcounts(&st, cluster_bits, order, end);
            for &(first, n) in &got {
                for c in first..first + n {
                    assert_eq!(rc[c as usize], 1, "order {order}: cluster {c}");
                }
            }
            let mut all: Vec<u64> = got.iter().flat_map(|&(f, n)| f..f + n).collect();
            all.sort_unstable();
            let before = all.len();
            all.dedup();
            assert_eq!(before, all.len(), "order {order}: overlapping allocations");
            if order == 6 {
                assert!(a.table_clusters() > 1, "the refcount table grew");
                assert_ne!(a.table_offset(), 512, "the refcount table moved");
            }
            // Free everything we allocated: only metadata keeps a refcount.
            for &(first, n) in &got {
                a.free(&st, first << cluster_bits, n).unwrap();
            }
            let rc = on_disk_refcounts(&st, cluster_bits, order, end);
            for &(first, n) in &got {
                for c in first..first + n {
                    assert_eq!(rc[c as usize], 0, "order {order}: cluster {c} freed");
                }
            }
            assert!(
                a.free(&st, got[0].0 << cluster_bits, 1).is_err(),
                "double free is refused"
            );
        }
    }

    #[test]
    fn a_loaded_table_holds_only_the_entries_in_use() {
        // A 64 KiB table cluster has room for 8,192 entries; one is used.
        let (st, mut a) = fresh(16, 4);
        assert_eq!(a.table.len(), 1);
        assert_eq!(a.table_capacity(), 8192);
        // Past the used entries: no block, refcount 0, and an allocation
        // that needs a second block adds the entry in place.
        let per_block = refcount::entries_per_block(16, 4);
        assert_eq!(a.refcount(&st, per_block + 5).unwrap(), 0);
        // Clusters 0-2 are taken: this run ends in block 1.
        a.allocate(&st, per_block).unwrap();
        let (st_bytes, cs) = (st.contents(), 65536usize);
        let entry1 = u64::from_be_bytes(st_bytes[cs + 8..cs + 16].try_into().unwrap());
        assert_ne!(entry1, 0, "table entry 1 written");
        let reloaded = Allocator::load(&st, 16, 4, cs as u64, 1).unwrap();
        assert_eq!(reloaded.table.len(), 2);
        assert_eq!(reloaded.table[1], entry1);
    }

    #[test]
    fn freed_clusters_are_reused_first_fit() {
        let (st, mut a) = fresh(16, 4);
        let x = a.allocate(&st, 2).unwrap();
        let y = a.allocate(&st, 1).unwrap();
        assert_eq!(y, x + 2 * 65536);
        a.free(&st, x, 2).unwrap();
        assert_eq!(a.allocate(&st, 1).unwrap(), x);
    }
}
