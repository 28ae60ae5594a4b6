//! Refcount tables and blocks of every width. Input: one byte selecting the
//! cluster size, one the refcount order, then the table or block bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qbm::format::refcount;

/// Entries of a block checked per input; a 2 MiB block of 1-bit refcounts
/// has 16 million.
const MAX_ENTRIES: usize = 1 << 14;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cluster_bits = 9 + u32::from(data[0] % 13);
    let cluster_size = 1u64 << cluster_bits;
    let order = u32::from(data[1] % 7);
    let bytes = &data[2..];

    if let Ok(table) = refcount::parse_table(bytes, cluster_size) {
        for (i, &off) in table.iter().enumerate() {
            let raw = u64::from_be_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
            assert_eq!(off, raw);
            assert_eq!(off % cluster_size, 0);
        }
    }

    let per_block = refcount::entries_per_block(cluster_bits, order);
    assert_eq!(per_block, (cluster_size * 8) >> order);
    let max = refcount::max_refcount(order);
    let mut block = bytes.to_vec();
    let n = (block.len() * 8) >> order;
    let entry_bytes = ((1usize << order) / 8).max(1);
    for i in 0..n.min(MAX_ENTRIES) {
        // The bytes around entry i, to see what set() touches (no allocation:
        // this runs for every entry).
        let at = (i << order) / 8;
        let window = at.saturating_sub(8)..(at + entry_bytes + 8).min(block.len());
        let mut saved = [0u8; 24];
        let before = &mut saved[..window.len()];
        before.copy_from_slice(&block[window.clone()]);
        let before = &*before;
        let v = refcount::get(&block, order, i);
        assert!(v <= max);
        // Writing back what was read changes nothing.
        refcount::set(&mut block, order, i, v);
        assert_eq!(&block[window.clone()], before);
        // A new value reads back and touches only the bytes set() reports.
        let x = (v ^ 0x5a5a_5a5a_5a5a_5a5a ^ i as u64) & max;
        let range = refcount::set(&mut block, order, i, x);
        assert_eq!(refcount::get(&block, order, i), x);
        for (j, (a, b)) in block[window.clone()].iter().zip(before).enumerate() {
            let j = j + window.start;
            assert!(a == b || range.contains(&j), "set({i}) changed byte {j}");
        }
        refcount::set(&mut block, order, i, v);
        assert_eq!(&block[window], before);
    }
});
