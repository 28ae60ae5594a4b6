//! The header extension list and the bitmaps extension payload. Input: one
//! byte selecting the cluster size, then the extension area.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qbm::format::extension::{self, BitmapsExtension};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, area)) = data.split_first() else {
        return;
    };
    let cluster_size = 1u64 << (9 + sel % 13);
    let Ok(exts) = extension::parse_all(area, 0) else {
        return;
    };
    let bytes = extension::encode_all(&exts);
    assert_eq!(bytes.len() % 8, 0);
    assert_eq!(
        extension::parse_all(&bytes, 0).expect("encoded list parses"),
        exts
    );
    for e in exts.iter().filter(|e| e.magic == extension::BITMAPS) {
        if let Ok(b) = BitmapsExtension::parse(&e.data, cluster_size) {
            let again = BitmapsExtension::parse(&b.encode(), cluster_size);
            assert_eq!(again.expect("encoded bitmaps extension parses"), b);
        }
    }
});
