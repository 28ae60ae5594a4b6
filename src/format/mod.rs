//! The qcow2 on-disk structures libqbm reads and writes: bytes <-> structs,
//! with validation. Nothing here does I/O.

pub mod bitmap_dir;
pub mod bitmap_table;
pub mod extension;
pub mod header;
pub mod l2;
pub mod refcount;

/// Reads a big-endian u16 at `at`; callers guarantee the bounds.
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads a big-endian u32 at `at`; callers guarantee the bounds.
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a big-endian u64 at `at`; callers guarantee the bounds.
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Rounds `n` up to a multiple of 8 (extension and directory entry padding).
pub(crate) fn pad8(n: usize) -> usize {
    (n + 7) & !7
}
