//! Refcount table entries and refcount block entries of every width
//! (FORMAT.md section 3).

use super::be64;
use crate::corrupt;
use crate::error::Result;

const TABLE_RESERVED_MASK: u64 = 0x1ff;

/// Decodes one refcount table entry into the offset of its block (0 = none).
pub fn decode_table_entry(raw: u64, index: usize, cluster_size: u64) -> Result<u64> {
    if raw & TABLE_RESERVED_MASK != 0 {
        return corrupt!("refcount table entry {index} ({raw:#x}) has reserved bits set");
    }
    if raw % cluster_size != 0 {
        return corrupt!(
            "refcount table entry {index}: block offset {raw:#x} is not cluster aligned"
        );
    }
    Ok(raw)
}

pub fn parse_table(buf: &[u8], cluster_size: u64) -> Result<Vec<u64>> {
    (0..buf.len() / 8)
        .map(|i| decode_table_entry(be64(buf, i * 8), i, cluster_size))
        .collect()
}

/// Number of refcount entries in one block.
pub fn entries_per_block(cluster_bits: u32, refcount_order: u32) -> u64 {
    (1u64 << (cluster_bits + 3)) >> refcount_order
}

/// Largest refcount a width can hold.
pub fn max_refcount(refcount_order: u32) -> u64 {
    if refcount_order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << refcount_order)) - 1
    }
}

/// Entry `i` of a refcount block. Widths below 8 bits pack from the least
/// significant bits of each byte; 8 and up are big-endian.
pub fn get(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let width = 1usize << order;
            let per_byte = 8 / width;
            let shift = (i % per_byte) * width;
            u64::from((block[i / per_byte] >> shift) & ((1u8 << width) - 1))
        }
        3 => u64::from(block[i]),
        _ => {
            let bytes = 1usize << (order - 3);
            block[i * bytes..(i + 1) * bytes]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        }
    }
}

/// Sets entry `i`; `value` must fit the width. Returns the byte range that changed.
pub fn set(block: &mut [u8], order: u32, i: usize, value: u64) -> std::ops::Range<usize> {
    debug_assert!(value <= max_refcount(order));
    match order {
        0..=2 => {
            let width = 1usize << order;
            let per_byte = 8 / width;
            let shift = (i % per_byte) * width;
            let mask = ((1u8 << width) - 1) << shift;
            let byte = &mut block[i / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
            i / per_byte..i / per_byte + 1
        }
        3 => {
            block[i] = value as u8;
            i..i + 1
        }
        _ => {
            let bytes = 1usize << (order - 3);
            let be = value.to_be_bytes();
            block[i * bytes..(i + 1) * bytes].copy_from_slice(&be[8 - bytes..]);
            i * bytes..(i + 1) * bytes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_and_packs_lsb_first() {
        for order in 0..=6u32 {
            let cluster_bits = 9;
            let n = entries_per_block(cluster_bits, order) as usize;
            let mut block = vec![0u8; 512];
            let max = max_refcount(order);
            for i in 0..n {
                set(&mut block, order, i, (i as u64 * 7) % (max.min(1000) + 1));
            }
            for i in 0..n {
                assert_eq!(
                    get(&block, order, i),
                    (i as u64 * 7) % (max.min(1000) + 1),
                    "order {order} i {i}"
                );
            }
        }
        // 1-bit refcounts: entry 0 is the least significant bit of byte 0.
        let mut b = vec![0u8; 1];
        set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 0x01);
        set(&mut b, 0, 3, 1);
        assert_eq!(b[0], 0x09);
        // 4-bit: entry 1 is the high nibble.
        let mut b = vec![0u8; 1];
        set(&mut b, 2, 1, 0xa);
        assert_eq!(b[0], 0xa0);
        // 16-bit big-endian.
        let mut b = vec![0u8; 4];
        set(&mut b, 4, 1, 0x0102);
        assert_eq!(b, [0, 0, 1, 2]);
    }

    #[test]
    fn table_entries_are_validated() {
        assert_eq!(decode_table_entry(0x20000, 0, 65536).unwrap(), 0x20000);
        assert!(decode_table_entry(0x20001, 3, 65536)
            .unwrap_err()
            .to_string()
            .contains("entry 3"));
        assert!(decode_table_entry(0x20200, 0, 65536).is_err());
    }
}
