//! The bitmap directory: one variable-length entry per bitmap (FORMAT.md section 5).

use super::{be16, be32, be64, pad8};
use crate::corrupt;
use crate::error::Result;

pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
pub const FLAGS_KNOWN: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
pub const TYPE_DIRTY_TRACKING: u8 = 1;
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
pub const MAX_NAME_SIZE: usize = 1023;
/// Bounds set by QEMU, checked before anything is allocated.
pub const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
pub const MAX_SERIALIZED_BYTES: u64 = 0x2000_0000;
const ENTRY_FIXED_LEN: usize = 24;

/// One directory entry. The name is kept as a validated UTF-8 string; extra
/// data is kept byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub bitmap_type: u8,
    pub granularity_bits: u8,
    pub name: String,
    /// The name's bytes when they are not UTF-8 (QEMU accepts any bytes);
    /// `name` then holds a lossy copy, by which callers address the bitmap.
    pub raw_name: Option<Vec<u8>>,
    pub extra_data: Vec<u8>,
}

impl DirEntry {
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Extra data that this version does not understand makes the bitmap
    /// untouchable, but it must be preserved.
    pub fn has_incompatible_extra_data(&self) -> bool {
        !self.extra_data.is_empty() && self.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0
    }

    pub fn name_bytes(&self) -> &[u8] {
        self.raw_name.as_deref().unwrap_or(self.name.as_bytes())
    }

    pub fn encoded_len(&self) -> usize {
        pad8(ENTRY_FIXED_LEN + self.extra_data.len() + self.name_bytes().len())
    }

    fn encode_into(&self, b: &mut Vec<u8>) {
        let start = b.len();
        b.extend_from_slice(&self.table_offset.to_be_bytes());
        b.extend_from_slice(&self.table_size.to_be_bytes());
        b.extend_from_slice(&self.flags.to_be_bytes());
        b.push(self.bitmap_type);
        b.push(self.granularity_bits);
        b.extend_from_slice(&(self.name_bytes().len() as u16).to_be_bytes());
        b.extend_from_slice(&(self.extra_data.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.extra_data);
        b.extend_from_slice(self.name_bytes());
        b.resize(start + self.encoded_len(), 0);
    }
}

/// Checks a bitmap name against the format's rules.
pub fn validate_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("bitmap name is empty".into());
    }
    if name.contains('\0') {
        return Err(format!("bitmap name {name:?} contains a NUL byte"));
    }
    if name.len() > MAX_NAME_SIZE {
        return Err(format!(
            "bitmap name is {} bytes, more than the limit of {MAX_NAME_SIZE}",
            name.len()
        ));
    }
    Ok(())
}

/// Size in bytes of the serialized bitmap of a disk of `size` bytes.
pub fn serialized_len(size: u64, granularity_bits: u8) -> u64 {
    let bits = size.div_ceil(1u64 << granularity_bits);
    bits.div_ceil(8)
}

/// Number of bitmap table entries (clusters of serialized bitmap) needed.
pub fn table_entries(size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    serialized_len(size, granularity_bits).div_ceil(cluster_size)
}

/// Checks that a bitmap of this granularity fits QEMU's limits for a disk of
/// `size` bytes; the error says which limit.
pub fn check_bitmap_limits(
    size: u64,
    granularity_bits: u8,
    cluster_size: u64,
) -> std::result::Result<(), String> {
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
        return Err(format!(
            "granularity {} is out of range (512 B ..= 2 GiB, a power of two)",
            1u128 << granularity_bits
        ));
    }
    if size == 0 {
        return Err("a disk of 0 bytes cannot hold a bitmap".into());
    }
    let bytes = serialized_len(size, granularity_bits);
    if bytes > MAX_SERIALIZED_BYTES {
        return Err(format!(
            "a bitmap of granularity {} over {size} bytes needs {bytes} bytes, more than QEMU's limit of {MAX_SERIALIZED_BYTES}",
            1u64 << granularity_bits
        ));
    }
    let entries = table_entries(size, granularity_bits, cluster_size);
    if entries > MAX_TABLE_ENTRIES {
        return Err(format!(
            "bitmap table of {entries} entries exceeds QEMU's limit of {MAX_TABLE_ENTRIES}"
        ));
    }
    Ok(())
}

/// Parses `nb` entries from the directory bytes and validates each against
/// the disk size and cluster size. Every error names the entry.
pub fn parse(buf: &[u8], nb: u32, disk_size: u64, cluster_size: u64) -> Result<Vec<DirEntry>> {
    parse_with(buf, nb, disk_size, cluster_size, false)
}

/// `parse`, optionally accepting NUL bytes in names: QEMU reads such a name
/// as a C string and opens the image, so the full check must too.
pub fn parse_with(
    buf: &[u8],
    nb: u32,
    disk_size: u64,
    cluster_size: u64,
    allow_nul: bool,
) -> Result<Vec<DirEntry>> {
    let mut out: Vec<DirEntry> = Vec::new();
    let mut at = 0usize;
    for i in 0..nb {
        if at + ENTRY_FIXED_LEN > buf.len() {
            return corrupt!(
                "bitmap directory entry {i} at byte {at} runs past the bitmap_directory_size {} (nb_bitmaps {nb})",
                buf.len()
            );
        }
        let table_offset = be64(buf, at);
        let table_size = be32(buf, at + 8);
        let flags = be32(buf, at + 12);
        let bitmap_type = buf[at + 16];
        let granularity_bits = buf[at + 17];
        let name_size = be16(buf, at + 18) as usize;
        let extra_size = be32(buf, at + 20) as usize;
        let total = ENTRY_FIXED_LEN
            .checked_add(extra_size)
            .and_then(|n| n.checked_add(name_size))
            .map(pad8);
        let end = match total.and_then(|t| at.checked_add(t)) {
            Some(end) if end <= buf.len() => end,
            _ => {
                return corrupt!(
                    "bitmap directory entry {i} (extra_data_size {extra_size}, name_size {name_size}) runs past the bitmap_directory_size {}",
                    buf.len()
                )
            }
        };
        let name_start = at + ENTRY_FIXED_LEN + extra_size;
        let name_bytes = &buf[name_start..name_start + name_size];
        let (name, raw_name) = match std::str::from_utf8(name_bytes) {
            Ok(n) => (n.to_string(), None),
            Err(_) => (
                String::from_utf8_lossy(name_bytes).into_owned(),
                Some(name_bytes.to_vec()),
            ),
        };
        let entry = DirEntry {
            table_offset,
            table_size,
            flags,
            bitmap_type,
            granularity_bits,
            name,
            raw_name,
            extra_data: buf[at + ENTRY_FIXED_LEN..name_start].to_vec(),
        };
        let what = format!("bitmap '{}' (directory entry {i})", entry.name);
        if name_size == 0 || name_size > MAX_NAME_SIZE {
            return corrupt!("{what}: name_size {name_size} out of range 1..={MAX_NAME_SIZE}");
        }
        if !allow_nul && entry.name_bytes().contains(&0) {
            return corrupt!("{what}: the name contains a NUL byte");
        }
        if flags & !FLAGS_KNOWN != 0 {
            return corrupt!(
                "{what}: reserved flag bits {:#x} are set",
                flags & !FLAGS_KNOWN
            );
        }
        if bitmap_type != TYPE_DIRTY_TRACKING {
            return corrupt!("{what}: type {bitmap_type} is not 1 (dirty tracking)");
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return corrupt!(
                "{what}: granularity_bits {granularity_bits} out of range {MIN_GRANULARITY_BITS}..={MAX_GRANULARITY_BITS}"
            );
        }
        if let Err(m) = check_bitmap_limits(disk_size, granularity_bits, cluster_size) {
            return corrupt!("{what}: {m}");
        }
        let expected = table_entries(disk_size, granularity_bits, cluster_size);
        // An in-use bitmap is never read, and a crash during a resize leaves
        // its table at the old size: QEMU opens such images, and so do we.
        let in_use = flags & FLAG_IN_USE != 0;
        if u64::from(table_size) != expected
            && !(in_use && u64::from(table_size) <= MAX_TABLE_ENTRIES)
        {
            return corrupt!(
                "{what}: bitmap_table_size {table_size} does not match {expected} for a {disk_size}-byte disk"
            );
        }
        if table_offset == 0 || table_offset % cluster_size != 0 {
            return corrupt!("{what}: bitmap_table_offset {table_offset:#x} is not a nonzero multiple of the cluster size");
        }
        if out.iter().any(|e| e.name_bytes() == entry.name_bytes()) {
            return corrupt!("{what}: duplicate bitmap name");
        }
        out.push(entry);
        at = end;
    }
    if at != buf.len() {
        return corrupt!(
            "bitmap_directory_size {} does not match the {at} bytes of its nb_bitmaps {nb} entries",
            buf.len()
        );
    }
    Ok(out)
}

/// The directory bytes for `entries`.
pub fn encode(entries: &[DirEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.iter().map(DirEntry::encoded_len).sum());
    for e in entries {
        e.encode_into(&mut b);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> DirEntry {
        DirEntry {
            table_offset: 0x50000,
            table_size: 1,
            flags: FLAG_AUTO,
            bitmap_type: 1,
            granularity_bits: 16,
            name: name.into(),
            raw_name: None,
            extra_data: vec![],
        }
    }

    #[test]
    fn round_trips_with_extra_data() {
        let mut b = entry("b");
        b.extra_data = vec![1, 2, 3];
        b.flags |= FLAG_EXTRA_DATA_COMPATIBLE;
        let entries = vec![entry("a"), b];
        let bytes = encode(&entries);
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(parse(&bytes, 2, 1 << 30, 65536).unwrap(), entries);
    }

    #[test]
    fn table_size_matches_format_examples() {
        // FORMAT.md: 1 TiB at 64 KiB granularity, 64 KiB clusters: 32 entries; at 4 KiB: 512.
        assert_eq!(table_entries(1 << 40, 16, 65536), 32);
        assert_eq!(table_entries(1 << 40, 12, 65536), 512);
    }

    #[test]
    fn rejects_each_bad_field() {
        type Mutation = Box<dyn Fn(&mut DirEntry)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|e| e.granularity_bits = 32), "granularity_bits 32"),
            (Box::new(|e| e.flags |= 1 << 5), "reserved flag bits"),
            (Box::new(|e| e.bitmap_type = 2), "type 2"),
            (Box::new(|e| e.table_size = 2), "bitmap_table_size 2"),
            (
                Box::new(|e| e.table_offset = 0x50001),
                "bitmap_table_offset",
            ),
        ];
        for (mutate, needle) in cases {
            let mut e = entry("x");
            mutate(&mut e);
            let err = parse(&encode(&[e]), 1, 1 << 30, 65536).unwrap_err();
            assert_eq!(err.errno(), libc::EUCLEAN);
            assert!(err.to_string().contains(needle), "{err} lacks {needle}");
        }
        let dup = encode(&[entry("x"), entry("x")]);
        assert!(parse(&dup, 2, 1 << 30, 65536)
            .unwrap_err()
            .to_string()
            .contains("duplicate"));
        // A name that is not UTF-8 is kept byte for byte (QEMU accepts any bytes).
        let mut odd = encode(&[entry("x")]);
        odd[24] = 0xff;
        let parsed = parse(&odd, 1, 1 << 30, 65536).unwrap();
        assert_eq!(parsed[0].raw_name.as_deref(), Some(&b"\xff"[..]));
        assert_eq!(encode(&parsed), odd);
        assert!(parse(&odd[..20], 1, 1 << 30, 65536).is_err());
    }

    #[test]
    fn limits_are_enforced_before_allocation() {
        // 16 TiB at 512 B granularity would need 4 GiB of bitmap.
        assert!(check_bitmap_limits(16 << 40, 9, 65536).is_err());
        assert!(check_bitmap_limits(16 << 40, 16, 65536).is_ok());
        assert!(check_bitmap_limits(0, 16, 65536).is_err());
        assert!(validate_name(&"n".repeat(1024)).is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("a\0b").is_err());
    }
}
