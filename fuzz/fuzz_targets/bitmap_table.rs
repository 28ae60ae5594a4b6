//! Bitmap tables. Input: one byte selecting the cluster size, then the
//! table. A valid table encodes back to exactly its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qbm::format::bitmap_table;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, table)) = data.split_first() else {
        return;
    };
    let cluster_size = 1u64 << (9 + sel % 13);
    let Ok(entries) = bitmap_table::parse(table, cluster_size, "fuzz") else {
        return;
    };
    assert_eq!(entries.len(), table.len() / 8);
    let bytes = bitmap_table::encode(&entries);
    assert_eq!(&bytes[..], &table[..table.len() / 8 * 8]);
    let again = bitmap_table::parse(&bytes, cluster_size, "fuzz");
    assert_eq!(again.expect("encoded table parses"), entries);
});
