//! Header::parse on arbitrary bytes; what parses encodes back to the same
//! bytes and parses again to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qbm::format::header::Header;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = Header::parse(data) else { return };
    let _ = (
        h.cluster_size(),
        h.refcount_bits(),
        h.unknown_incompatible(),
    );
    let len = h.header_length as usize;
    assert_eq!(h.extensions_start(), len);
    let mut bytes = h.encode();
    // Every byte up to header_length is a field or kept verbatim.
    assert_eq!(&bytes[..], &data[..len]);
    // The backing file name lies past the header: keep the rest of the input.
    bytes.extend_from_slice(&data[len..]);
    assert_eq!(Header::parse(&bytes).expect("encoded header parses"), h);
});
