//! Bitmap table entries: where each cluster of a serialized bitmap lives.

use super::be64;
use crate::corrupt;
use crate::error::Result;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const ALL_ONES_FLAG: u64 = 1;
const RESERVED_MASK: u64 = !OFFSET_MASK & !ALL_ONES_FLAG;

/// How one cluster of bitmap data is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableEntry {
    /// No cluster; reads as all zeros.
    Zeros,
    /// No cluster; reads as all ones.
    Ones,
    /// Data at this host offset.
    Data(u64),
}

impl TableEntry {
    pub fn decode(raw: u64, cluster_size: u64) -> std::result::Result<TableEntry, String> {
        if raw & RESERVED_MASK != 0 {
            return Err("has reserved bits set".into());
        }
        let offset = raw & OFFSET_MASK;
        if offset == 0 {
            return Ok(if raw & ALL_ONES_FLAG != 0 {
                TableEntry::Ones
            } else {
                TableEntry::Zeros
            });
        }
        if raw & ALL_ONES_FLAG != 0 {
            return Err("has both an offset and the all-ones flag".into());
        }
        if offset % cluster_size != 0 {
            return Err(format!(
                "points at {offset:#x}, which is not cluster aligned"
            ));
        }
        Ok(TableEntry::Data(offset))
    }

    pub fn encode(self) -> u64 {
        match self {
            TableEntry::Zeros => 0,
            TableEntry::Ones => ALL_ONES_FLAG,
            TableEntry::Data(off) => off & OFFSET_MASK,
        }
    }
}

/// Decodes a whole table; `what` names the bitmap in errors.
pub fn parse(buf: &[u8], cluster_size: u64, what: &str) -> Result<Vec<TableEntry>> {
    (0..buf.len() / 8)
        .map(|i| {
            let raw = be64(buf, i * 8);
            match TableEntry::decode(raw, cluster_size) {
                Ok(e) => Ok(e),
                Err(m) => corrupt!("{what}: table entry {i} ({raw:#018x}) {m}"),
            }
        })
        .collect()
}

pub fn encode(entries: &[TableEntry]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|e| e.encode().to_be_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_kind() {
        let cs = 65536;
        assert_eq!(TableEntry::decode(0, cs), Ok(TableEntry::Zeros));
        assert_eq!(TableEntry::decode(1, cs), Ok(TableEntry::Ones));
        assert_eq!(
            TableEntry::decode(0x30000, cs),
            Ok(TableEntry::Data(0x30000))
        );
        assert!(TableEntry::decode(0x30200, cs).is_err());
        assert!(TableEntry::decode(0x30001, cs).is_err());
        assert!(TableEntry::decode(1 << 63, cs).is_err());
        assert!(TableEntry::decode(0x2, cs).is_err());
    }

    #[test]
    fn round_trips() {
        let t = vec![
            TableEntry::Zeros,
            TableEntry::Ones,
            TableEntry::Data(0x1_0000_0000),
        ];
        assert_eq!(parse(&encode(&t), 512, "b").unwrap(), t);
    }
}
