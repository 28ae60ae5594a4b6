//! The bitmap directory. Input: one byte selecting the cluster size, the
//! disk size (u64 BE), nb_bitmaps (u32 BE), then the directory bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qbm::format::bitmap_dir;

fuzz_target!(|data: &[u8]| {
    if data.len() < 13 {
        return;
    }
    let cluster_size = 1u64 << (9 + data[0] % 13);
    let disk_size = u64::from_be_bytes(data[1..9].try_into().unwrap());
    let nb = u32::from_be_bytes(data[9..13].try_into().unwrap());
    let Ok(entries) = bitmap_dir::parse(&data[13..], nb, disk_size, cluster_size) else {
        return;
    };
    assert_eq!(entries.len(), nb as usize);
    let bytes = bitmap_dir::encode(&entries);
    let lens: usize = entries.iter().map(|e| e.encoded_len()).sum();
    assert_eq!(bytes.len(), lens);
    let again = bitmap_dir::parse(&bytes, nb, disk_size, cluster_size);
    assert_eq!(again.expect("encoded directory parses"), entries);
});
