//! Header extensions in cluster 0 (FORMAT.md section 2) and the bitmaps
//! extension's payload (section 5).

use super::{be32, be64, pad8};
use crate::corrupt;
use crate::error::Result;

pub const END: u32 = 0;
pub const BACKING_FORMAT: u32 = 0xe279_2aca;
pub const FEATURE_NAME_TABLE: u32 = 0x6803_f857;
pub const BITMAPS: u32 = 0x2385_2875;
pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
pub const DATA_FILE: u32 = 0x4441_5441;

/// One header extension, kept as raw bytes so that unknown ones are written
/// back exactly as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    pub magic: u32,
    pub data: Vec<u8>,
}

/// Parses the extension list of `cluster0` starting at `start`, up to the end
/// marker. Every extension must lie inside `cluster0`.
pub fn parse_all(cluster0: &[u8], start: usize) -> Result<Vec<Extension>> {
    parse_all_before(cluster0, start, None)
}

/// Like `parse_all`, but the list (with its end marker) must also end before
/// `backing_name` (the backing file name's offset), which follows it.
pub fn parse_all_before(
    cluster0: &[u8],
    start: usize,
    backing_name: Option<u64>,
) -> Result<Vec<Extension>> {
    let limit = match backing_name {
        Some(at) if at < cluster0.len() as u64 => at as usize,
        _ => cluster0.len(),
    };
    let past = if limit < cluster0.len() {
        format!("runs into the backing file name at {limit:#x}")
    } else {
        format!("runs past cluster 0 (the end of the file or cluster at {limit:#x})")
    };
    let mut out = Vec::new();
    let mut at = start;
    loop {
        if at + 8 > limit {
            return corrupt!("header extension at {at:#x} {past} (no end marker)");
        }
        let magic = be32(cluster0, at);
        let len = be32(cluster0, at + 4) as usize;
        if magic == END {
            return Ok(out);
        }
        let data_start = at + 8;
        let end = match data_start.checked_add(len) {
            Some(end) if end <= limit => end,
            _ => {
                return corrupt!("header extension {magic:#010x} at {at:#x} of length {len} {past}")
            }
        };
        let known = [
            BACKING_FORMAT,
            FEATURE_NAME_TABLE,
            BITMAPS,
            FULL_DISK_ENCRYPTION,
            DATA_FILE,
        ];
        if known.contains(&magic) && out.iter().any(|e: &Extension| e.magic == magic) {
            return corrupt!("header extension {magic:#010x} appears twice");
        }
        out.push(Extension {
            magic,
            data: cluster0[data_start..end].to_vec(),
        });
        at = data_start + pad8(len);
    }
}

/// The bytes of `exts` followed by the end marker.
pub fn encode_all(exts: &[Extension]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in exts {
        b.extend_from_slice(&e.magic.to_be_bytes());
        b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
        b.extend_from_slice(&e.data);
        b.resize(pad8(b.len()), 0);
    }
    b.extend_from_slice(&[0u8; 8]);
    b
}

/// Where the bitmap directory is (the bitmaps extension's payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExtension {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's bound: 65535 entries of at most 1024 bytes each.
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * 65535;

impl BitmapsExtension {
    pub fn parse(data: &[u8], cluster_size: u64) -> Result<BitmapsExtension> {
        if data.len() != 24 {
            return corrupt!("bitmaps extension has length {}, expected 24", data.len());
        }
        let ext = BitmapsExtension {
            nb_bitmaps: be32(data, 0),
            directory_size: be64(data, 8),
            directory_offset: be64(data, 16),
        };
        let reserved = be32(data, 4);
        if reserved != 0 {
            return corrupt!("bitmaps extension reserved field is {reserved:#x}, must be 0");
        }
        if ext.nb_bitmaps == 0 || ext.nb_bitmaps > MAX_BITMAPS {
            return corrupt!(
                "bitmaps extension nb_bitmaps {} out of range 1..={MAX_BITMAPS}",
                ext.nb_bitmaps
            );
        }
        if ext.directory_size == 0 || ext.directory_size > MAX_DIRECTORY_SIZE {
            return corrupt!(
                "bitmap_directory_size {} out of range 1..={MAX_DIRECTORY_SIZE}",
                ext.directory_size
            );
        }
        if ext.directory_offset == 0 || ext.directory_offset % cluster_size != 0 {
            return corrupt!(
                "bitmap_directory_offset {:#x} is not a nonzero multiple of the cluster size",
                ext.directory_offset
            );
        }
        Ok(ext)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&self.directory_size.to_be_bytes());
        b.extend_from_slice(&self.directory_offset.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_round_trips_with_padding() {
        let exts = vec![
            Extension {
                magic: 0x1234_5678,
                data: b"abc".to_vec(),
            },
            Extension {
                magic: BITMAPS,
                data: BitmapsExtension {
                    nb_bitmaps: 2,
                    directory_size: 64,
                    directory_offset: 0x30000,
                }
                .encode(),
            },
        ];
        let mut c0 = vec![0u8; 112];
        c0.extend(encode_all(&exts));
        c0.resize(512, 0);
        assert_eq!(parse_all(&c0, 112).unwrap(), exts);
    }

    #[test]
    fn rejects_extension_past_cluster0() {
        let mut c0 = vec![0u8; 512];
        c0[112..116].copy_from_slice(&0x1234u32.to_be_bytes());
        c0[116..120].copy_from_slice(&1000u32.to_be_bytes());
        let e = parse_all(&c0, 112).unwrap_err();
        assert!(e.to_string().contains("runs past cluster 0"), "{e}");
    }

    #[test]
    fn bitmaps_extension_limits() {
        let mut ext = BitmapsExtension {
            nb_bitmaps: 0,
            directory_size: 64,
            directory_offset: 0x10000,
        };
        assert!(BitmapsExtension::parse(&ext.encode(), 65536).is_err());
        ext.nb_bitmaps = 1;
        assert!(BitmapsExtension::parse(&ext.encode(), 65536).is_ok());
        ext.directory_offset = 0x10200;
        assert!(BitmapsExtension::parse(&ext.encode(), 65536).is_err());
        ext.directory_offset = 0x10000;
        ext.directory_size = MAX_DIRECTORY_SIZE + 1;
        assert!(BitmapsExtension::parse(&ext.encode(), 65536).is_err());
    }
}
