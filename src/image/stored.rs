//! Bitmaps that stay on disk: lazy opens (`OpenOptions::lazy`) read a
//! bitmap's bits only when a call needs them, a chunk at a time, so a tool
//! that lists, counts, walks, merges, clears or removes bitmaps uses memory
//! that does not grow with the disk, and reads only the clusters the call
//! needs (none for all-zero and all-one clusters, which the table describes).
//!
//! The bytes read are the serialized form (bit `k` is bit `k % 8` of byte
//! `k / 8`); bits past the bitmap's last one are ignored wherever they are
//! read, whatever a hostile image put there.

use super::bitmaps::classify;
use super::State;
use crate::error::Result;
use crate::format::bitmap_dir::{self, DirEntry};
use crate::format::bitmap_table::{self, TableEntry};

/// Bytes of a stored bitmap read (or merged and written) at a time: the
/// whole memory a lazy walk needs, so smaller than a loading open's reads;
/// large enough that the syscalls cost little next to the copying.
const CHUNK: u64 = 256 << 10;

/// Bytes a merge writes at a time: 1/32 of the bitmap, from `CHUNK` up to
/// 1 MiB. Memory stays a small share of what is merged, and a large
/// bitmap goes out in fewer, longer writes (16 TiB at 64 KiB: 26-30 ms
/// instead of 37-50 ms with 256 KiB pieces).
fn merge_batch_bytes(serialized_len: u64) -> u64 {
    (serialized_len / 32).clamp(CHUNK, 4 * CHUNK)
}

/// The last chunk read, kept for the next call: an extent walk calls
/// `next_extent` once per extent, mostly within one chunk.
pub(super) struct ChunkCache {
    /// Identifies the stored table; tables are freed (and their offsets
    /// reused) only in `State::free_pending`, which drops the cache.
    table_offset: u64,
    chunk: u64,
    bytes: Vec<u8>,
}

/// Shape of one stored bitmap.
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    pub(super) cluster_size: u64,
    /// Serialized bytes.
    pub(super) total: u64,
    pub(super) bit_count: u64,
    pub(super) granularity_bits: u32,
    pub(super) disk_size: u64,
    /// Clusters per chunk.
    chunk_clusters: u64,
}

impl Geometry {
    pub(super) fn new(entry: &DirEntry, disk_size: u64, cluster_size: u64) -> Geometry {
        let g = u32::from(entry.granularity_bits);
        Geometry {
            cluster_size,
            total: bitmap_dir::serialized_len(disk_size, entry.granularity_bits),
            bit_count: disk_size.div_ceil(1 << g),
            granularity_bits: g,
            disk_size,
            chunk_clusters: (CHUNK / cluster_size).max(1),
        }
    }

    fn chunk_bytes(&self) -> u64 {
        self.chunk_clusters * self.cluster_size
    }

    fn chunk_count(&self) -> u64 {
        self.total.div_ceil(self.chunk_bytes())
    }

    /// Table entries of chunk `c`.
    fn entries<'t>(&self, table: &'t [TableEntry], c: u64) -> &'t [TableEntry] {
        let first = (c * self.chunk_clusters) as usize;
        let end = (first + self.chunk_clusters as usize).min(table.len());
        &table[first.min(end)..end]
    }

    /// Bits of the bitmap in chunk `c`: `[first, end)`.
    fn chunk_bits(&self, c: u64) -> (u64, u64) {
        let first = c * self.chunk_bytes() * 8;
        (first, (first + self.chunk_bytes() * 8).min(self.bit_count))
    }

    /// Dirty guest bytes of `count` set bits, the last bit's granule
    /// counting only up to the end of the disk when `last_set`.
    fn dirty_bytes(&self, count: u64, last_set: bool) -> u64 {
        if count == 0 {
            return 0;
        }
        if last_set {
            let tail = self.disk_size - ((self.bit_count - 1) << self.granularity_bits);
            ((count - 1) << self.granularity_bits).saturating_add(tail)
        } else {
            count.saturating_mul(1 << self.granularity_bits)
        }
    }
}

/// Value of bit `bit` of serialized `bytes` (which start at bit 0 of a chunk).
fn bit_at(bytes: &[u8], bit: u64) -> bool {
    bytes[(bit / 8) as usize] >> (bit % 8) & 1 != 0
}

/// The 64 bits of `bytes` starting at bit `8 * byte` (zeros past the end).
#[inline]
fn word_at(bytes: &[u8], byte: usize) -> u64 {
    match bytes.get(byte..byte + 8) {
        Some(w) => u64::from_le_bytes(w.try_into().expect("8 bytes")),
        None => {
            let mut w = [0u8; 8];
            let end = bytes.len().min(byte + 8);
            w[..end - byte].copy_from_slice(&bytes[byte..end]);
            u64::from_le_bytes(w)
        }
    }
}

/// First bit in `[from, end)` of `bytes` whose value is `set`.
fn find_bit(bytes: &[u8], from: u64, end: u64, set: bool) -> Option<u64> {
    let mut bit = from;
    while bit < end {
        let byte = (bit / 8) as usize & !7;
        let mut w = word_at(bytes, byte);
        if !set {
            w = !w;
        }
        let base = byte as u64 * 8;
        w &= u64::MAX << (bit - base);
        if w != 0 {
            let found = base + u64::from(w.trailing_zeros());
            return (found < end).then_some(found);
        }
        bit = base + 64;
    }
    None
}

/// ORs `src` into `dst` (same length); true if a bit of `dst` changed.
fn or_into(dst: &mut [u8], src: &[u8]) -> bool {
    let mut new = 0u64;
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (x, y) in (&mut d).zip(&mut s) {
        let xv = u64::from_ne_bytes((&*x).try_into().expect("8 bytes"));
        let yv = u64::from_ne_bytes(y.try_into().expect("8 bytes"));
        new |= yv & !xv;
        x.copy_from_slice(&(xv | yv).to_ne_bytes());
    }
    for (x, y) in d.into_remainder().iter_mut().zip(s.remainder()) {
        new |= u64::from(*y & !*x);
        *x |= *y;
    }
    new != 0
}

/// Set bits of `bytes` in `[0, end)`.
fn count_bits(bytes: &[u8], end: u64) -> u64 {
    let full = (end / 8) as usize;
    let words = bytes[..full].chunks_exact(8);
    let rest = words.remainder();
    let mut n: u64 = words
        .map(|c| u64::from(u64::from_le_bytes(c.try_into().expect("8 bytes")).count_ones()))
        .sum();
    n += rest.iter().map(|b| u64::from(b.count_ones())).sum::<u64>();
    if end % 8 != 0 {
        n += u64::from((bytes[full] & ((1u8 << (end % 8)) - 1)).count_ones());
    }
    n
}

impl State {
    pub(super) fn geometry(&self, entry: &DirEntry) -> Geometry {
        Geometry::new(entry, self.header.size, self.cluster_size())
    }

    /// Reads chunk `c` of a stored bitmap into `buf` (resized to the chunk),
    /// coalescing adjacent data clusters into one read.
    fn read_chunk(
        &self,
        name: &str,
        geo: &Geometry,
        table: &[TableEntry],
        c: u64,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let start = c * geo.chunk_bytes();
        let len = geo.chunk_bytes().min(geo.total - start) as usize;
        buf.clear();
        buf.resize(len, 0);
        let cs = geo.cluster_size as usize;
        let entries = geo.entries(table, c);
        let mut k = 0;
        while k < entries.len() {
            let at = k * cs;
            let here = cs.min(len - at);
            match entries[k] {
                TableEntry::Zeros => k += 1,
                TableEntry::Ones => {
                    buf[at..at + here].fill(0xff);
                    k += 1;
                }
                TableEntry::Data(off) => {
                    let mut run = 1;
                    while k + run < entries.len()
                        && entries[k + run] == TableEntry::Data(off + (run * cs) as u64)
                    {
                        run += 1;
                    }
                    let end = (at + run * cs).min(len);
                    self.read(&mut buf[at..end], off, &format!("bitmap '{name}' data"))?;
                    k += run;
                }
            }
        }
        Ok(())
    }

    /// Chunk `c` of slot `i`'s stored bits, through the cache.
    fn stored_chunk(&mut self, i: usize, c: u64) -> Result<&[u8]> {
        let slot = &self.slots[i];
        let table_offset = slot.entry.table_offset;
        let hit = self
            .chunk_cache
            .as_ref()
            .is_some_and(|k| k.table_offset == table_offset && k.chunk == c);
        if !hit {
            let table = slot
                .table
                .as_deref()
                .expect("stored bitmaps keep their table");
            let geo = self.geometry(&slot.entry);
            let mut bytes = self.chunk_cache.take().map(|k| k.bytes).unwrap_or_default();
            self.read_chunk(&slot.entry.name, &geo, table, c, &mut bytes)?;
            self.chunk_cache = Some(ChunkCache {
                table_offset,
                chunk: c,
                bytes,
            });
        }
        Ok(&self.chunk_cache.as_ref().expect("filled above").bytes)
    }

    /// Dirty bytes of a stored bitmap: reads its data clusters only.
    pub(super) fn stored_dirty_bytes(&mut self, i: usize) -> Result<u64> {
        let geo = self.geometry(&self.slots[i].entry);
        let mut count = 0;
        let mut last_set = false;
        for c in 0..geo.chunk_count() {
            let (first, end) = geo.chunk_bits(c);
            let table = self.slots[i].table.as_deref().expect("stored");
            let entries = geo.entries(table, c);
            if entries.iter().all(|e| *e == TableEntry::Zeros) {
                continue;
            }
            if entries.iter().all(|e| *e == TableEntry::Ones) {
                count += end - first;
                last_set |= end == geo.bit_count;
                continue;
            }
            let bytes = self.stored_chunk(i, c)?;
            count += count_bits(bytes, end - first);
            if end == geo.bit_count {
                last_set = bit_at(bytes, end - 1 - first);
            }
        }
        Ok(geo.dirty_bytes(count, last_set))
    }

    /// First bit at or after `from` whose value is `set`, in a stored bitmap.
    fn stored_find(&mut self, i: usize, from: u64, set: bool) -> Result<Option<u64>> {
        let geo = self.geometry(&self.slots[i].entry);
        let skip = if set {
            TableEntry::Zeros
        } else {
            TableEntry::Ones
        };
        let mut c = from / (geo.chunk_bytes() * 8);
        let mut from = from;
        while c < geo.chunk_count() {
            let (first, end) = geo.chunk_bits(c);
            let table = self.slots[i].table.as_deref().expect("stored");
            let entries = geo.entries(table, c);
            if !entries.iter().all(|e| *e == skip) {
                let bytes = self.stored_chunk(i, c)?;
                if let Some(b) = find_bit(bytes, from.max(first) - first, end - first, set) {
                    return Ok(Some(first + b));
                }
            }
            c += 1;
            from = end;
        }
        Ok(None)
    }

    /// Next dirty extent of a stored bitmap at or after byte `from`.
    pub(super) fn stored_next_extent(&mut self, i: usize, from: u64) -> Result<Option<(u64, u64)>> {
        let geo = self.geometry(&self.slots[i].entry);
        if from >= geo.disk_size {
            return Ok(None);
        }
        let g = geo.granularity_bits;
        let Some(start) = self.stored_find(i, from >> g, true)? else {
            return Ok(None);
        };
        let end = self.stored_find(i, start, false)?.unwrap_or(geo.bit_count);
        let s = (start << g).max(from);
        let e = (end << g).min(geo.disk_size);
        Ok(Some((s, e - s)))
    }

    /// ORs stored bitmap `src` into stored bitmap `dst` (same granularity)
    /// without loading either: changed clusters go into fresh clusters, a
    /// cluster `src` adds nothing to keeps `dst`'s cluster (or flag), and a
    /// new table names them; the next store commits it. Returns whether any
    /// bit changed (nothing is written when none did).
    pub(super) fn stored_merge(&mut self, dst: usize, src: usize) -> Result<bool> {
        let geo = self.geometry(&self.slots[dst].entry);
        let cs = geo.cluster_size;
        let name = self.slots[dst].entry.name.clone();
        let src_name = self.slots[src].entry.name.clone();
        let dst_table = self.slots[dst].table.clone().expect("stored");
        let src_table = self.slots[src].table.clone().expect("stored");
        let mut result = dst_table.clone();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let batch = (merge_batch_bytes(geo.total) / cs).max(1) as usize;
        // Clusters waiting to be written, contiguous from one allocation.
        let mut pending: Vec<u8> = Vec::new();
        let mut pending_index: Vec<usize> = Vec::new();
        let mut changed = false;
        // Only the entries the disk size calls for: a recovered in_use
        // bitmap's table may be longer or shorter (a crash during resize).
        let n = dst_table.len().min(geo.total.div_ceil(cs) as usize);
        for k in 0..n {
            let d = dst_table[k];
            let s = src_table.get(k).copied().unwrap_or(TableEntry::Zeros);
            if s == TableEntry::Zeros || d == TableEntry::Ones {
                continue;
            }
            if s == TableEntry::Ones {
                result[k] = TableEntry::Ones;
                changed = true;
                continue;
            }
            let start = k as u64 * cs;
            let len = cs.min(geo.total - start) as usize;
            let last = start + len as u64 == geo.total;
            self.read_entry(&src_name, s, len, &mut b)?;
            if last && geo.bit_count % 8 != 0 {
                // Padding bits past the last bit are not bits of the bitmap.
                b[len - 1] &= (1u8 << (geo.bit_count % 8)) - 1;
            }
            self.read_entry(&name, d, len, &mut a)?;
            if !or_into(&mut a, &b) {
                continue;
            }
            changed = true;
            match classify(&a, last, geo.bit_count) {
                TableEntry::Data(_) => {
                    let at = pending.len();
                    pending.extend_from_slice(&a);
                    pending.resize(at + cs as usize, 0);
                    pending_index.push(k);
                    if pending_index.len() == batch {
                        self.write_clusters(&name, &mut pending, &mut pending_index, &mut result)?;
                    }
                }
                flag => result[k] = flag,
            }
        }
        self.write_clusters(&name, &mut pending, &mut pending_index, &mut result)?;
        // Their memory serves the table next (a CLI's peak is these buffers).
        drop((pending, a, b));
        if changed {
            self.replace_stored_table(dst, result)?;
        }
        Ok(changed)
    }

    /// The `len` bytes one table entry stands for.
    fn read_entry(
        &self,
        name: &str,
        entry: TableEntry,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        match entry {
            TableEntry::Zeros => {
                buf.clear();
                buf.resize(len, 0);
            }
            TableEntry::Ones => {
                buf.clear();
                buf.resize(len, 0xff);
            }
            TableEntry::Data(off) => {
                // The read fills it all: only a longer buffer is zeroed first.
                buf.resize(len, 0);
                self.read(buf, off, &format!("bitmap '{name}' data"))?;
            }
        }
        Ok(())
    }

    /// Writes the clusters gathered in `bytes` for table entries `index`
    /// into freshly allocated contiguous clusters and points `table` at them.
    fn write_clusters(
        &mut self,
        name: &str,
        bytes: &mut Vec<u8>,
        index: &mut Vec<usize>,
        table: &mut [TableEntry],
    ) -> Result<()> {
        if index.is_empty() {
            return Ok(());
        }
        let cs = self.cluster_size();
        let base = self.allocate(index.len() as u64)?;
        self.write_data(bytes, base, &format!("bitmap '{name}' data"))?;
        for (n, &k) in index.iter().enumerate() {
            table[k] = TableEntry::Data(base + n as u64 * cs);
        }
        bytes.clear();
        index.clear();
        Ok(())
    }

    /// Writes `table` into fresh clusters and makes slot `i` name it; what
    /// only the old table named is freed after the next durable directory.
    fn replace_stored_table(&mut self, i: usize, table: Vec<TableEntry>) -> Result<()> {
        let cs = self.cluster_size();
        let clusters = (table.len() as u64 * 8).div_ceil(cs).max(1);
        let offset = self.allocate(clusters)?;
        let mut bytes = bitmap_table::encode(&table);
        bytes.resize((clusters * cs) as usize, 0);
        let name = self.slots[i].entry.name.clone();
        self.write(&bytes, offset, &format!("bitmap '{name}' table"))?;
        let slot = &mut self.slots[i];
        let old = slot.table.replace(table).expect("stored");
        let kept: std::collections::HashSet<u64> = slot
            .table
            .iter()
            .flatten()
            .filter_map(|t| match t {
                TableEntry::Data(off) => Some(*off),
                _ => None,
            })
            .collect();
        let mut freed = super::bitmaps::table_clusters(slot.entry.table_offset, &old, cs);
        freed.retain(|(off, _)| !kept.contains(off));
        slot.entry.table_offset = offset;
        self.pending_free.extend(freed);
        self.dir_changed = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_batches_grow_with_the_bitmap_up_to_a_mib() {
        assert_eq!(merge_batch_bytes(0), CHUNK);
        assert_eq!(merge_batch_bytes(2 << 20), CHUNK); // 1 TiB at 64 KiB
        assert_eq!(merge_batch_bytes(16 << 20), 512 << 10);
        assert_eq!(merge_batch_bytes(32 << 20), 1 << 20); // 16 TiB at 64 KiB
        assert_eq!(merge_batch_bytes(u64::MAX), 1 << 20);
    }

    #[test]
    fn find_bit_walks_words_and_stops_at_end() {
        let mut b = vec![0u8; 32];
        b[3] = 0b0001_0000; // bit 28
        b[20] = 0b1000_0000; // bit 167
        assert_eq!(find_bit(&b, 0, 256, true), Some(28));
        assert_eq!(find_bit(&b, 29, 256, true), Some(167));
        assert_eq!(find_bit(&b, 29, 167, true), None);
        assert_eq!(find_bit(&b, 168, 256, true), None);
        assert_eq!(find_bit(&b, 28, 256, false), Some(29));
        let ones = vec![0xffu8; 9];
        let mut d = vec![0b0101u8; 19];
        assert!(!or_into(&mut d, &[0b0001u8; 19]));
        assert!(or_into(&mut d, &[0b0010u8; 19]));
        assert_eq!(d, vec![0b0111u8; 19]);
        let mut tail = vec![0u8; 19];
        let mut last = vec![0u8; 19];
        last[18] = 0x80;
        assert!(or_into(&mut tail, &last));
        assert_eq!(tail[18], 0x80);
        assert_eq!(find_bit(&ones, 3, 72, false), None);
        assert_eq!(find_bit(&ones, 3, 72, true), Some(3));
    }

    #[test]
    fn count_bits_ignores_bits_past_the_end() {
        let b = vec![0xffu8; 10];
        assert_eq!(count_bits(&b, 80), 80);
        assert_eq!(count_bits(&b, 77), 77);
        assert_eq!(count_bits(&b, 3), 3);
        assert_eq!(count_bits(&b, 0), 0);
    }
}
