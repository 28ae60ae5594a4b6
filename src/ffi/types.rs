//! Types and constants of the C API.

use crate::image::Image;
use std::os::raw::c_char;

/// Library version, also given by `qbm_version()`.
pub const QBM_VERSION_MAJOR: u32 = 0;
pub const QBM_VERSION_MINOR: u32 = 1;
pub const QBM_VERSION_PATCH: u32 = 0;

/// `qbm_open` flag: open read-write (read-only otherwise).
pub const QBM_OPEN_RDWR: u32 = 1 << 0;
/// `qbm_open` flag: read without taking QEMU's image locks, like `qemu-img -U`
/// (read-only opens only; the image may change underneath).
pub const QBM_OPEN_FORCE_SHARE: u32 = 1 << 1;
/// `qbm_open` flag (with `QBM_OPEN_RDWR`): write-intent mode. A
/// `qbm_mark_dirty` that sets bits not yet durable on disk returns once they
/// are (concurrent marks share one write and flush), so that the bitmaps
/// survive a crash of the process: the next read-write open recovers them
/// (`QBM_BITMAP_RECOVERED`). See `qbm_mark_dirty_nowait` and `qbm_sync`.
pub const QBM_OPEN_WRITE_INTENT: u32 = 1 << 2;
/// `qbm_open` flag: lazy mode, for backup and management tools. Bitmap data
/// is read only when a call needs it; extents, dirty counts, merges of equal
/// granularity and clears work a chunk at a time without loading it, so
/// memory and I/O follow what a call touches, not the disk size. With
/// `QBM_OPEN_RDWR` bitmaps are not flagged in_use (nothing is tracked) and
/// `qbm_mark_dirty` fails with -EINVAL. Not with `QBM_OPEN_WRITE_INTENT`.
pub const QBM_OPEN_LAZY: u32 = 1 << 3;

/// `qbm_bitmap_add` flag: the new bitmap starts disabled (not marked by writes).
pub const QBM_BITMAP_DISABLED: u32 = 1 << 0;

/// `qbm_bitmap_info.flags`: marked by every write (`auto` on disk).
pub const QBM_BITMAP_ENABLED: u32 = 1 << 0;
/// `qbm_bitmap_info.flags`: found in use (inconsistent) at open; it can only be removed.
pub const QBM_BITMAP_IN_USE: u32 = 1 << 1;
/// `qbm_bitmap_info.flags`: carries extra data this version does not
/// understand; it is preserved but cannot be used or changed.
pub const QBM_BITMAP_UNSUPPORTED: u32 = 1 << 2;
/// `qbm_bitmap_info.flags`: found in use at open but recovered: it was in
/// write-intent mode when its last user stopped, and nothing else wrote the
/// image since. Its bits hold every mark that returned; it is usable.
pub const QBM_BITMAP_RECOVERED: u32 = 1 << 3;

/// `qbm_check` flag: lower the refcount of leaked clusters (read-write images).
pub const QBM_CHECK_REPAIR_LEAKS: u32 = 1 << 0;
/// `qbm_check` flag: remove bitmaps found in use (inconsistent) at open; their
/// content is lost for good (read-write images).
pub const QBM_CHECK_REMOVE_INCONSISTENT: u32 = 1 << 1;

/// `qbm_image_info.flags`: the image is open read-write.
pub const QBM_IMAGE_WRITABLE: u32 = 1 << 0;

/// Longest bitmap name in bytes (the format's limit); names are copied into
/// `qbm_bitmap_info.name` with a terminating NUL.
pub const QBM_NAME_MAX: usize = 1023;

/// An open image. Opaque: create it with `qbm_open` or `qbm_create`, free it
/// with `qbm_close`.
pub struct qbm_image {
    /// `HANDLE_MAGIC` while the handle is live; lets calls on a closed handle
    /// fail cleanly where the memory has not been reused yet.
    pub(crate) magic: u64,
    pub(crate) image: Image,
}

pub(crate) const HANDLE_MAGIC: u64 = 0x7162_6d5f_696d_6721;

/// Options for `qbm_create`. Set `struct_size` to `sizeof(struct qbm_create_options)`
/// (later versions accept this size and give the fields they add their defaults).
/// A `struct_size` below this version's size or above 4096 is -EINVAL, and so
/// is a longer struct with a non-zero byte past the fields this version knows.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct qbm_create_options {
    /// `sizeof(struct qbm_create_options)` as the caller compiled it.
    pub struct_size: usize,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes, 512 to 2 MiB, a power of two; 0 means 64 KiB.
    pub cluster_size: u64,
    /// Refcount width: 1, 2, 4, 8, 16, 32 or 64; 0 means 16.
    pub refcount_bits: u32,
    /// Reserved, must be 0.
    pub flags: u32,
    /// NULL, or an existing raw file holding the guest data: the new image
    /// is its metadata companion (external data file, data-file-raw) and the
    /// raw file is never written. A `virtual_size` of 0 then means the raw
    /// file's size. The name is stored as given, and QEMU resolves a relative
    /// name against its working directory: give an absolute path. (Added in
    /// 0.2; callers compiled against 0.1 pass the shorter struct.)
    pub data_file: *const c_char,
}

/// One guest write of a batch given to `qbm_mark_dirty_many`: bytes
/// `[offset, offset + length)` of the virtual disk.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct qbm_range {
    pub offset: u64,
    pub length: u64,
}

/// Facts about an open image, filled by `qbm_image_get_info`. A `struct_size`
/// below this version's size or above 4096 is -EINVAL; bytes of a longer
/// struct past the fields this version knows are left alone.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct qbm_image_info {
    /// `sizeof(struct qbm_image_info)` as the caller compiled it.
    pub struct_size: usize,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// qcow2 version: 2 or 3.
    pub version: u32,
    /// Number of bitmaps, usable or not.
    pub bitmap_count: u32,
    /// `QBM_IMAGE_*` bits.
    pub flags: u32,
}

/// One bitmap, filled by `qbm_bitmap_get_info`; `struct_size` as for
/// `struct qbm_image_info`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct qbm_bitmap_info {
    /// `sizeof(struct qbm_bitmap_info)` as the caller compiled it.
    pub struct_size: usize,
    /// The name, NUL-terminated; the caller owns this copy.
    pub name: [c_char; 1024],
    /// Bytes of guest disk per bit.
    pub granularity: u64,
    /// `QBM_BITMAP_*` bits.
    pub flags: u32,
    /// Bytes of extra data in the directory entry (kept unchanged).
    pub extra_data_size: u32,
    /// Dirty bytes (0 unless the bitmap is usable). On a `QBM_OPEN_LAZY`
    /// handle, counting them reads the bitmap's data clusters.
    pub dirty_bytes: u64,
}

/// What `qbm_check` found, counted as `qemu-img check` counts it.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct qbm_check_result {
    /// `sizeof(struct qbm_check_result)` as the caller compiled it.
    pub struct_size: usize,
    /// Clusters referenced more often than their refcount, and broken entries.
    pub corruptions: u64,
    /// Clusters whose refcount is above their references (left after repair).
    pub leaks: u64,
    /// Metadata that could not be read.
    pub check_errors: u64,
    /// Leaked clusters repaired by this call.
    pub leaks_fixed: u64,
    /// Bitmaps flagged in use (inconsistent) that remain.
    pub inconsistent_bitmaps: u64,
    /// Inconsistent bitmaps removed by this call.
    pub removed_bitmaps: u64,
    /// End of the last cluster in use, in bytes.
    pub image_end_offset: u64,
    /// Guest clusters (virtual size / cluster size, rounded up).
    pub total_clusters: u64,
    /// Guest clusters with data.
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
}
