//! The qcow2 header in cluster 0 (FORMAT.md section 1).

use super::{be32, be64};
use crate::error::Result;
use crate::{corrupt, Error};

pub const MAGIC: u32 = 0x5146_49fb;
pub const V2_HEADER_LEN: u32 = 72;
/// v3 header fields we know end at byte 104 (compression type adds one byte).
pub const V3_BASE_LEN: u32 = 104;
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
pub const MAX_BACKING_NAME: u32 = 1023;
/// QEMU's bounds on the active L1 table (32 MiB) and the refcount table
/// (8 MiB), checked before either is read.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// QEMU's bound on the number of snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 = (1 << 5) - 1;

pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
pub const AUTOCLEAR_KNOWN: u64 = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

/// Every header field. Bytes past the fields we know (up to header_length)
/// are kept in `unknown_tail` and written back unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// Byte 104 and its padding, present when header_length > 104.
    pub compression_type: u8,
    pub unknown_tail: Vec<u8>,
}

impl Header {
    /// Parses and validates the header at the start of `buf` (cluster 0, or as
    /// much of the file as exists when it is shorter).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let h = Header::parse_fields(buf)?;
        h.check_backing_name(buf.len(), false)?;
        Ok(h)
    }

    /// `parse`, but accepting a backing file name that overlaps the header or
    /// its extensions, as QEMU does: the full check must read such images.
    pub fn parse_as_qemu(buf: &[u8]) -> Result<Header> {
        let h = Header::parse_fields(buf)?;
        h.check_backing_name(buf.len(), true)?;
        Ok(h)
    }

    fn parse_fields(buf: &[u8]) -> Result<Header> {
        if buf.len() < 4 || be32(buf, 0) != MAGIC {
            let magic = buf
                .iter()
                .take(4)
                .fold(0u32, |m, &b| (m << 8) | u32::from(b));
            return Err(Error::InvalidArgument(format!(
                "not a qcow2 image ({} bytes, magic {magic:#010x})",
                buf.len()
            )));
        }
        if buf.len() < V2_HEADER_LEN as usize {
            return corrupt!("file is {} bytes, too short for a qcow2 header", buf.len());
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::NotSupported(format!(
                "qcow2 version {version} is not supported (only 2 and 3)"
            )));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            unknown_tail: Vec::new(),
        };
        if version == 3 {
            if buf.len() < V3_BASE_LEN as usize {
                return corrupt!("file too short for a qcow2 v3 header");
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_BASE_LEN || h.header_length % 8 != 0 {
                return corrupt!(
                    "header_length {} must be at least 104 and a multiple of 8",
                    h.header_length
                );
            }
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return corrupt!(
                "cluster_bits {} out of range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}",
                h.cluster_bits
            );
        }
        let cluster_size = h.cluster_size();
        if u64::from(h.header_length) > cluster_size {
            return corrupt!(
                "header_length {} exceeds the cluster size {cluster_size}",
                h.header_length
            );
        }
        if buf.len() < h.header_length as usize {
            return corrupt!("file too short for its header_length {}", h.header_length);
        }
        if h.header_length > V3_BASE_LEN {
            h.compression_type = buf[104];
            h.unknown_tail = buf[105..h.header_length as usize].to_vec();
        }
        if h.refcount_order > 6 {
            return corrupt!("refcount_order {} out of range 0..=6", h.refcount_order);
        }
        for (name, off) in [
            ("l1_table_offset", h.l1_table_offset),
            ("refcount_table_offset", h.refcount_table_offset),
            ("snapshots_offset", h.snapshots_offset),
        ] {
            if off % cluster_size != 0 {
                return corrupt!(
                    "{name} {off:#x} is not aligned to the cluster size {cluster_size}"
                );
            }
        }
        if h.refcount_table_offset == 0 || h.refcount_table_clusters == 0 {
            return corrupt!(
                "image has no refcount table (refcount_table_offset {:#x}, refcount_table_clusters {})",
                h.refcount_table_offset,
                h.refcount_table_clusters
            );
        }
        let rt_bytes = u64::from(h.refcount_table_clusters) * cluster_size;
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return corrupt!(
                "refcount_table_clusters {}: a refcount table of {rt_bytes} bytes exceeds the limit of {MAX_REFCOUNT_TABLE_BYTES}",
                h.refcount_table_clusters
            );
        }
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return corrupt!(
                "l1_size {}: an L1 table of {l1_bytes} bytes exceeds the limit of {MAX_L1_BYTES}",
                h.l1_size
            );
        }
        // Each L1 entry maps one L2 table of cluster_size / 8 entries.
        let l1_span = cluster_size * (cluster_size / 8);
        let l1_needed = h.size.div_ceil(l1_span);
        if u64::from(h.l1_size) < l1_needed {
            return corrupt!(
                "l1_size {} is too small for a disk of size {} ({l1_needed} entries needed)",
                h.l1_size,
                h.size
            );
        }
        if h.l1_size > 0 && h.l1_table_offset == 0 {
            return corrupt!(
                "l1_table_offset is 0 (cluster 0) for an L1 table of {} entries",
                h.l1_size
            );
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return corrupt!(
                "nb_snapshots {} exceeds the limit of {MAX_SNAPSHOTS}",
                h.nb_snapshots
            );
        }
        if h.nb_snapshots > 0 && h.snapshots_offset == 0 {
            return corrupt!(
                "snapshots_offset is 0 (cluster 0) for {} snapshots",
                h.nb_snapshots
            );
        }
        Ok(h)
    }

    /// The backing file name lies in cluster 0 after the header, within the
    /// `read_len` bytes read of a possibly truncated file.
    fn check_backing_name(&self, read_len: usize, may_overlap_header: bool) -> Result<()> {
        let cluster_size = self.cluster_size();
        if self.backing_file_offset != 0 {
            if self.backing_file_size > MAX_BACKING_NAME {
                return corrupt!(
                    "backing_file_size {} exceeds {MAX_BACKING_NAME}",
                    self.backing_file_size
                );
            }
            let end = self
                .backing_file_offset
                .saturating_add(u64::from(self.backing_file_size));
            // Within cluster 0 and within what was read (a truncated file).
            if end > cluster_size.min(read_len as u64)
                || (!may_overlap_header && self.backing_file_offset < u64::from(self.header_length))
            {
                return corrupt!(
                    "backing file name at {:#x} (+{}) lies outside cluster 0 past the header",
                    self.backing_file_offset,
                    self.backing_file_size
                );
            }
        }
        Ok(())
    }

    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Where header extensions start.
    pub fn extensions_start(&self) -> usize {
        self.header_length as usize
    }

    /// Unknown incompatible bits, or 0.
    pub fn unknown_incompatible(&self) -> u64 {
        self.incompatible_features & !INCOMPAT_KNOWN
    }

    /// The header bytes (header_length of them).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.header_length as usize);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        b.extend_from_slice(&self.backing_file_size.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            b.extend_from_slice(&self.incompatible_features.to_be_bytes());
            b.extend_from_slice(&self.compatible_features.to_be_bytes());
            b.extend_from_slice(&self.autoclear_features.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > V3_BASE_LEN {
                b.push(self.compression_type);
                b.extend_from_slice(&self.unknown_tail);
            }
        }
        b.resize(self.header_length as usize, 0);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 8,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 1,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            unknown_tail: vec![0; 7],
        }
    }

    #[test]
    fn round_trips() {
        let h = sample();
        let bytes = h.encode();
        assert_eq!(bytes.len(), 112);
        assert_eq!(Header::parse(&bytes).unwrap(), h);
    }

    #[test]
    fn rejects_bad_fields_with_their_names() {
        let mut h = sample();
        h.cluster_bits = 22;
        let e = Header::parse(&h.encode()).unwrap_err();
        assert!(e.to_string().contains("cluster_bits 22"), "{e}");
        let mut h = sample();
        h.refcount_table_offset = 0x10001;
        let e = Header::parse(&h.encode()).unwrap_err();
        assert!(e.to_string().contains("refcount_table_offset"), "{e}");
        let mut b = sample().encode();
        b[7] = 4;
        assert_eq!(Header::parse(&b).unwrap_err().errno(), libc::ENOTSUP);
        assert_eq!(Header::parse(&b[..40]).unwrap_err().errno(), libc::EUCLEAN);
        assert_eq!(Header::parse(b"hello\n").unwrap_err().errno(), libc::EINVAL);
        assert_eq!(Header::parse(b"").unwrap_err().errno(), libc::EINVAL);
        // A backing file name past the end of a truncated file is an error, not a panic.
        let mut h = sample();
        h.backing_file_offset = 200;
        h.backing_file_size = 100;
        let mut b = h.encode();
        b.resize(250, 0);
        assert_eq!(Header::parse(&b).unwrap_err().errno(), libc::EUCLEAN);
    }
}
