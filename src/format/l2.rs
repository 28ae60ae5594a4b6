//! L1 and L2 table entries (FORMAT.md section 4): what the full check,
//! resize, the layout map and raw-disk companions read and write.

/// Bits 9-55: the offset of an L2 table (L1 entry) or of a data cluster
/// (standard L2 entry).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The refcount of what the entry names is exactly 1.
pub const COPIED: u64 = 1 << 63;
/// An L2 entry describing compressed data.
pub const COMPRESSED: u64 = 1 << 62;
/// Bits 0-8 and 56-62 of an L1 entry.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits 1-8 and 56-61 of a standard L2 entry.
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Bytes of one L2 entry: 16 with extended L2 (the second half is the
/// subcluster bitmap), else 8.
pub fn entry_bytes(extended_l2: bool) -> u64 {
    if extended_l2 {
        16
    } else {
        8
    }
}

/// The host byte range `[start, end)` of a compressed L2 entry, whole
/// 512-byte sectors: with `x = 62 - (cluster_bits - 8)`, bits 0..x are the
/// host offset and bits x..62 the number of sectors after the first.
pub fn compressed_range(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let host = entry & ((1u64 << x) - 1);
    let sectors = ((entry & ((1u64 << 62) - 1)) >> x) + 1;
    let start = host & !511;
    (start, start + sectors * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_range_decodes_offset_and_sectors() {
        // 4 KiB clusters: x = 58; offset 0x1234 (inside sector 0x1200),
        // 4 sectors after the first.
        let entry = COMPRESSED | (4u64 << 58) | 0x1234;
        assert_eq!(compressed_range(entry, 12), (0x1200, 0x1200 + 5 * 512));
        // 64 KiB clusters: x = 54.
        let entry = COMPRESSED | (1u64 << 54) | 0x20000;
        assert_eq!(compressed_range(entry, 16), (0x20000, 0x20000 + 2 * 512));
    }
}
