//! The extern "C" entry points. Each one is a thin shell: check arguments,
//! call the Rust API, convert the result. No logic lives here that the Rust
//! API lacks.

use super::guard::{
    copy_truncated, handle, handle_fast, last_error, out, ranges_in, read_sized, run, store_handle,
    string, take_handle, write_sized, VersionedStruct,
};
use super::types::*;
use crate::error::Error;
use crate::image::{CheckOptions, CreateOptions, Image, OpenOptions};
use std::os::raw::{c_char, c_int};

// SAFETY: all four are repr(C) plain data starting with `struct_size: usize`.
unsafe impl VersionedStruct for qbm_create_options {
    const NAME: &'static str = "qbm_create_options";
    const MIN_SIZE: usize = std::mem::offset_of!(qbm_create_options, data_file);
}
// SAFETY: as above.
unsafe impl VersionedStruct for qbm_image_info {
    const NAME: &'static str = "qbm_image_info";
}
// SAFETY: as above.
unsafe impl VersionedStruct for qbm_bitmap_info {
    const NAME: &'static str = "qbm_bitmap_info";
}
// SAFETY: as above.
unsafe impl VersionedStruct for qbm_check_result {
    const NAME: &'static str = "qbm_check_result";
}

static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// The library version as "MAJOR.MINOR.PATCH". Never fails.
#[no_mangle]
pub extern "C" fn qbm_version() -> *const c_char {
    VERSION.as_ptr().cast()
}

/// The calling thread's message for its last failed call ("" if none). The
/// string stays valid until the thread's next failing call.
#[no_mangle]
pub extern "C" fn qbm_last_error() -> *const c_char {
    last_error()
}

fn check_out_handle(out_img: *mut *mut qbm_image) -> Result<(), Error> {
    if out_img.is_null() {
        return Err(Error::InvalidArgument(
            "output image pointer is NULL".into(),
        ));
    }
    Ok(())
}

/// Opens the qcow2 image at `path`. `flags`: `QBM_OPEN_RDWR` for read-write
/// (bitmaps are then marked in_use on disk until close), 0 for read-only;
/// `QBM_OPEN_FORCE_SHARE` reads without QEMU's locks (read-only only);
/// `QBM_OPEN_WRITE_INTENT` (with `QBM_OPEN_RDWR`) makes marks durable so
/// that the bitmaps survive a crash; `QBM_OPEN_LAZY` reads bitmap data only
/// when a call needs it (tools that track no writes). Any read-write open recovers bitmaps a
/// crashed write-intent session left (`QBM_BITMAP_RECOVERED`).
/// Takes the same image locks as QEMU: -EBUSY while another process (a VM,
/// qemu-img) holds the image in a conflicting way.
/// On success stores the handle in `*img`.
#[no_mangle]
pub extern "C" fn qbm_open(path: *const c_char, flags: u32, img: *mut *mut qbm_image) -> c_int {
    run(|| {
        let path = string(path, "path")?;
        check_out_handle(img)?;
        let known = QBM_OPEN_RDWR | QBM_OPEN_FORCE_SHARE | QBM_OPEN_WRITE_INTENT | QBM_OPEN_LAZY;
        if flags & !known != 0 {
            return Err(Error::InvalidArgument(format!(
                "{path}: unknown open flags {:#x}",
                flags & !known
            )));
        }
        let options = OpenOptions {
            writable: flags & QBM_OPEN_RDWR != 0,
            force_share: flags & QBM_OPEN_FORCE_SHARE != 0,
            write_intent: flags & QBM_OPEN_WRITE_INTENT != 0,
            lazy: flags & QBM_OPEN_LAZY != 0,
        };
        let image = Image::open(path, options)?;
        store_handle(img, image)
    })
}

/// Creates a new qcow2 v3 image at `path` (which must not exist) and opens it
/// read-write. On success stores the handle in `*img`.
#[no_mangle]
pub extern "C" fn qbm_create(
    path: *const c_char,
    options: *const qbm_create_options,
    img: *mut *mut qbm_image,
) -> c_int {
    run(|| {
        let path = string(path, "path")?;
        let o = read_sized(options)?;
        check_out_handle(img)?;
        if o.flags != 0 {
            return Err(Error::InvalidArgument(format!(
                "{path}: unknown create flags {:#x}",
                o.flags
            )));
        }
        let defaults = CreateOptions::default();
        let opts = CreateOptions {
            size: o.virtual_size,
            cluster_size: if o.cluster_size == 0 {
                defaults.cluster_size
            } else {
                o.cluster_size
            },
            refcount_bits: if o.refcount_bits == 0 {
                defaults.refcount_bits
            } else {
                o.refcount_bits
            },
            data_file: match o.data_file.is_null() {
                true => None,
                false => Some(string(o.data_file, "data file name")?.into()),
            },
        };
        let image = Image::create(path, &opts)?;
        store_handle(img, image)
    })
}

/// Stores every changed bitmap (they stay flagged in_use while open).
///
/// Checkpoint guarantee: a `qbm_mark_dirty` call that returned before
/// `qbm_flush` was called (returned in this thread, or in another thread
/// whose return the caller orders before this call with a lock, a join or an
/// atomic) is in the stored copy of every bitmap it marked when `qbm_flush`
/// returns 0, and so is
/// every other change (set, reset, clear, merge, add, remove, enable,
/// disable) that returned before it. A mark that runs while `qbm_flush` runs
/// may or may not be stored by it; it is never lost: it stays in memory and
/// the next `qbm_flush` or `qbm_close` stores it. After a failure nothing is
/// lost from memory either; the next flush or close stores it again.
/// While the image is open the stored bitmaps are flagged in_use, as QEMU
/// flags them; `qbm_close` stores them with the flag cleared.
#[no_mangle]
pub extern "C" fn qbm_flush(img: *mut qbm_image) -> c_int {
    run(|| handle(img)?.image.flush().map(|_| 0))
}

/// Stores every bitmap with in_use cleared and frees the handle. The handle
/// is consumed even when storing fails. NULL is a no-op returning 0.
#[no_mangle]
pub extern "C" fn qbm_close(img: *mut qbm_image) -> c_int {
    run(|| {
        if img.is_null() {
            return Ok(0);
        }
        let image = take_handle(img)?;
        image.close().map(|_| 0)
    })
}

/// Fills `*info` (set `info->struct_size` first).
#[no_mangle]
pub extern "C" fn qbm_image_get_info(img: *mut qbm_image, info: *mut qbm_image_info) -> c_int {
    run(|| {
        let i = handle(img)?.image.info()?;
        write_sized(
            info,
            qbm_image_info {
                struct_size: 0,
                virtual_size: i.virtual_size,
                cluster_size: i.cluster_size,
                refcount_bits: i.refcount_bits,
                version: i.version,
                bitmap_count: i.bitmap_count as u32,
                flags: if i.writable { QBM_IMAGE_WRITABLE } else { 0 },
            },
        )?;
        Ok(0)
    })
}

/// Stores the number of bitmaps (usable or not) in `*count`.
#[no_mangle]
pub extern "C" fn qbm_bitmap_count(img: *mut qbm_image, count: *mut u32) -> c_int {
    run(|| {
        let n = handle(img)?.image.bitmap_count()? as u32;
        *out(count, "count")? = n;
        Ok(0)
    })
}

/// Fills `*info` for bitmap number `index` (0 ..< qbm_bitmap_count) in
/// directory order; -ENOENT past the end.
#[no_mangle]
pub extern "C" fn qbm_bitmap_get_info(
    img: *mut qbm_image,
    index: u32,
    info: *mut qbm_bitmap_info,
) -> c_int {
    run(|| {
        let h = handle(img)?;
        let b = h.image.bitmap_info_at(index as usize)?.ok_or_else(|| {
            Error::NotFound(format!(
                "{}: no bitmap at index {index} (the image has {})",
                h.image.name(),
                h.image.bitmap_count().unwrap_or(0)
            ))
        })?;
        let mut name = [0 as c_char; 1024];
        for (d, s) in name.iter_mut().zip(b.name.bytes().take(QBM_NAME_MAX)) {
            *d = s as c_char;
        }
        let mut flags = 0;
        if b.enabled {
            flags |= QBM_BITMAP_ENABLED;
        }
        if b.in_use {
            flags |= QBM_BITMAP_IN_USE;
        }
        if !b.usable && !b.in_use {
            flags |= QBM_BITMAP_UNSUPPORTED;
        }
        if b.recovered {
            flags |= QBM_BITMAP_RECOVERED;
        }
        write_sized(
            info,
            qbm_bitmap_info {
                struct_size: 0,
                name,
                granularity: b.granularity,
                flags,
                extra_data_size: b.extra_data.len() as u32,
                dirty_bytes: b.dirty_bytes.unwrap_or(0),
            },
        )?;
        Ok(0)
    })
}

/// Adds an empty bitmap. `granularity` in bytes (power of two, 512 to 2 GiB),
/// or 0 for QEMU's default (the cluster size within 4 KiB..64 KiB).
/// `flags`: `QBM_BITMAP_DISABLED` to create it disabled. An enabled one is
/// marked by every `qbm_mark_dirty` call that starts after this returns.
#[no_mangle]
pub extern "C" fn qbm_bitmap_add(
    img: *mut qbm_image,
    name: *const c_char,
    granularity: u64,
    flags: u32,
) -> c_int {
    run(|| {
        let h = handle(img)?;
        let name = string(name, "bitmap name")?;
        if flags & !QBM_BITMAP_DISABLED != 0 {
            return Err(Error::InvalidArgument(format!(
                "{}: bitmap '{name}': unknown flags {:#x}",
                h.image.name(),
                flags & !QBM_BITMAP_DISABLED
            )));
        }
        let granularity = (granularity != 0).then_some(granularity);
        h.image
            .add_bitmap(name, granularity, flags & QBM_BITMAP_DISABLED == 0)
            .map(|_| 0)
    })
}

fn by_name(
    img: *mut qbm_image,
    name: *const c_char,
    op: fn(&Image, &str) -> crate::Result<()>,
) -> c_int {
    run(|| {
        let h = handle(img)?;
        let name = string(name, "bitmap name")?;
        op(&h.image, name).map(|_| 0)
    })
}

/// Removes a bitmap (also an inconsistent one); its clusters are freed at the
/// next flush or close.
#[no_mangle]
pub extern "C" fn qbm_bitmap_remove(img: *mut qbm_image, name: *const c_char) -> c_int {
    by_name(img, name, Image::remove_bitmap)
}

/// Clears every bit of a bitmap.
#[no_mangle]
pub extern "C" fn qbm_bitmap_clear(img: *mut qbm_image, name: *const c_char) -> c_int {
    by_name(img, name, Image::clear_bitmap)
}

/// Enables a bitmap: `qbm_mark_dirty` calls that start after this returns
/// mark it (calls already running may or may not).
#[no_mangle]
pub extern "C" fn qbm_bitmap_enable(img: *mut qbm_image, name: *const c_char) -> c_int {
    by_name(img, name, Image::enable_bitmap)
}

/// Disables (freezes) a bitmap: `qbm_mark_dirty` calls that start after this
/// returns no longer mark it; calls already running may still mark it until
/// they return.
#[no_mangle]
pub extern "C" fn qbm_bitmap_disable(img: *mut qbm_image, name: *const c_char) -> c_int {
    by_name(img, name, Image::disable_bitmap)
}

/// Renames bitmap `old_name` to `new_name`.
#[no_mangle]
pub extern "C" fn qbm_bitmap_rename(
    img: *mut qbm_image,
    old_name: *const c_char,
    new_name: *const c_char,
) -> c_int {
    run(|| {
        let h = handle(img)?;
        let old = string(old_name, "old bitmap name")?;
        let new = string(new_name, "new bitmap name")?;
        h.image.rename_bitmap(old, new).map(|_| 0)
    })
}

/// ORs bitmap `src_name` of `src_img` (may be `dst_img`) into `dst_name` of
/// `dst_img`. Granularities may differ; disk sizes must match.
#[no_mangle]
pub extern "C" fn qbm_bitmap_merge(
    dst_img: *mut qbm_image,
    dst_name: *const c_char,
    src_img: *mut qbm_image,
    src_name: *const c_char,
) -> c_int {
    run(|| {
        let dst = handle(dst_img)?;
        let src = handle(src_img)?;
        let dst_name = string(dst_name, "destination bitmap name")?;
        let src_name = string(src_name, "source bitmap name")?;
        dst.image
            .merge_bitmap(dst_name, &src.image, src_name)
            .map(|_| 0)
    })
}

/// Marks every granule that `[offset, offset+length)` touches in one bitmap.
#[no_mangle]
pub extern "C" fn qbm_bitmap_set(
    img: *mut qbm_image,
    name: *const c_char,
    offset: u64,
    length: u64,
) -> c_int {
    run(|| {
        let h = handle(img)?;
        let name = string(name, "bitmap name")?;
        h.image.set_range(name, offset, length).map(|_| 0)
    })
}

/// Clears `[offset, offset+length)` in one bitmap; the range must start on a
/// granule boundary and end on one or at the end of the disk.
#[no_mangle]
pub extern "C" fn qbm_bitmap_reset(
    img: *mut qbm_image,
    name: *const c_char,
    offset: u64,
    length: u64,
) -> c_int {
    run(|| {
        let h = handle(img)?;
        let name = string(name, "bitmap name")?;
        h.image.reset_range(name, offset, length).map(|_| 0)
    })
}

/// Marks `[offset, offset+length)` dirty in every enabled bitmap. Lock-free:
/// call it from any number of threads, on every guest write.
///
/// In write-intent mode (`QBM_OPEN_WRITE_INTENT`) it returns 0 only once
/// the marked bits are durable on disk (without I/O or locks when they
/// already are); it then blocks and may fail with an I/O error.
/// When it returns 0 the range is marked in every bitmap that was enabled
/// for the whole call: the extent calls see it, and a `qbm_flush` called
/// after the return stores it (see `qbm_flush`). A bitmap added, removed,
/// enabled or disabled while the call runs may or may not be marked; the
/// call sees one set of enabled bitmaps, so when a backup switches
/// checkpoints by `qbm_bitmap_add(new)` and then `qbm_bitmap_disable(old)`,
/// every mark lands in old, in new or in both. Read old's extents once every
/// call that was running when `qbm_bitmap_add(new)` returned has returned.
#[no_mangle]
pub extern "C" fn qbm_mark_dirty(img: *mut qbm_image, offset: u64, length: u64) -> c_int {
    // The per-write path: the common case (one granule of an existing block
    // in every enabled bitmap) makes no call and cannot panic, so it needs no
    // frame or unwind guard. Anything else, and any refusal, goes the
    // ordinary way (marking again is harmless), which sets the message.
    if handle_fast(img).is_some_and(|h| h.image.mark_dirty_fast(offset, length)) {
        return 0;
    }
    mark_dirty_slow(img, offset, length)
}

/// Marks a batch of `count` guest writes at `ranges`, each as
/// `qbm_mark_dirty` would, with one set of enabled bitmaps for the whole
/// call: for a VMM that completes several requests at once (a virtqueue,
/// an io_uring completion batch). The writes' cache misses overlap, so a
/// batch marks random writes over a large disk at close to the memory
/// system's rate, which one call per write cannot reach. Every range is
/// checked before any is marked: -EINVAL (naming the range) leaves every
/// bitmap unchanged. `count` 0 marks nothing; `ranges` may not be NULL.
/// Same threading and checkpoint guarantees as `qbm_mark_dirty`; in
/// write-intent mode it returns once every range is durable.
#[no_mangle]
pub extern "C" fn qbm_mark_dirty_many(
    img: *mut qbm_image,
    ranges: *const qbm_range,
    count: usize,
) -> c_int {
    run(|| {
        let h = handle(img)?;
        let ranges = ranges_in(ranges, count)?;
        h.image.mark_dirty_many(ranges).map(|_| 0)
    })
}

/// Write-intent mode, for event-loop VMMs: marks like `qbm_mark_dirty` but
/// never waits. Returns 0 when the marked bits are already durable (or the
/// image is not in write-intent mode), 1 when they are not yet: call
/// `qbm_sync` before submitting the guest write. Negative errno on failure.
#[no_mangle]
pub extern "C" fn qbm_mark_dirty_nowait(img: *mut qbm_image, offset: u64, length: u64) -> c_int {
    run(|| {
        handle(img)?
            .image
            .mark_dirty_nowait(offset, length)
            .map(c_int::from)
    })
}

/// Write-intent mode: makes every mark that `qbm_mark_dirty_nowait`
/// reported as needing a sync (before this call) durable: one round of
/// in-place writes and one flush, shared with concurrent calls. 0 on
/// success (also outside write-intent mode), negative errno on failure;
/// after a failure the marks stay pending and a later `qbm_sync` (or a
/// blocking `qbm_mark_dirty`) tries them again.
#[no_mangle]
pub extern "C" fn qbm_sync(img: *mut qbm_image) -> c_int {
    run(|| handle(img)?.image.sync().map(|_| 0))
}

#[cold]
#[inline(never)]
fn mark_dirty_slow(img: *mut qbm_image, offset: u64, length: u64) -> c_int {
    run(|| handle(img)?.image.mark_dirty(offset, length).map(|_| 0))
}

/// Stores the number of dirty bytes of a bitmap in `*bytes`.
#[no_mangle]
pub extern "C" fn qbm_bitmap_dirty_bytes(
    img: *mut qbm_image,
    name: *const c_char,
    bytes: *mut u64,
) -> c_int {
    run(|| {
        let h = handle(img)?;
        let name = string(name, "bitmap name")?;
        let out_bytes = out(bytes, "dirty bytes output")?;
        *out_bytes = h.image.dirty_bytes(name)?;
        Ok(0)
    })
}

/// Finds the next dirty run at or after `from`: returns 1 and stores it in
/// `*start`/`*length`, 0 when there is none, a negative errno on error.
#[no_mangle]
pub extern "C" fn qbm_bitmap_next_extent(
    img: *mut qbm_image,
    name: *const c_char,
    from: u64,
    start: *mut u64,
    length: *mut u64,
) -> c_int {
    run(|| {
        let h = handle(img)?;
        let name = string(name, "bitmap name")?;
        let start = out(start, "start output")?;
        let length = out(length, "length output")?;
        match h.image.next_extent(name, from)? {
            Some((s, l)) => {
                *start = s;
                *length = l;
                Ok(1)
            }
            None => Ok(0),
        }
    })
}

/// Grows or shrinks the virtual disk to `new_size` bytes (a multiple of
/// 512) and every bitmap with it, as `qemu-img resize` does: bits past a
/// shrunken end are dropped, grown space starts clean, guest clusters past a
/// shrunken end are discarded (a raw data file is never touched, and must
/// hold the new size). Crash-safe like a flush; the resized bitmaps are
/// stored before it returns. -EBUSY while a bitmap is inconsistent (remove
/// it first), -ENOTSUP with internal snapshots, -EROFS on a read-only image.
#[no_mangle]
pub extern "C" fn qbm_resize(img: *mut qbm_image, new_size: u64) -> c_int {
    run(|| handle(img)?.image.resize(new_size).map(|_| 0))
}

/// Copies the image's external data file name (set for a raw-disk
/// companion) into `buf` with a terminating NUL, truncated to `size` bytes
/// as snprintf does, and returns the name's full length in bytes: 0 when the
/// image has no data file. `buf` may be NULL when `size` is 0.
#[no_mangle]
pub extern "C" fn qbm_image_get_data_file(
    img: *mut qbm_image,
    buf: *mut c_char,
    size: usize,
) -> c_int {
    run(|| {
        let h = handle(img)?;
        if buf.is_null() && size != 0 {
            return Err(Error::InvalidArgument(format!(
                "data file name buffer is NULL but its size is {size}"
            )));
        }
        let name = h.image.info()?.data_file.unwrap_or_default();
        copy_truncated(name.as_bytes(), buf, size);
        Ok(name.len() as c_int)
    })
}

/// Recomputes every cluster's references (header, L1/L2 tables, snapshots,
/// refcount structures, bitmap directory, tables and data) and compares them
/// with the refcounts, as `qemu-img check` does; fills `*result`. A writable
/// image is flushed first. `flags` (`QBM_CHECK_*`) asks for repairs, which
/// need a read-write image. Returns 0 when the check ran (read the counts),
/// a negative errno when it could not.
#[no_mangle]
pub extern "C" fn qbm_check(
    img: *mut qbm_image,
    flags: u32,
    result: *mut qbm_check_result,
) -> c_int {
    run(|| {
        let h = handle(img)?;
        let known = QBM_CHECK_REPAIR_LEAKS | QBM_CHECK_REMOVE_INCONSISTENT;
        if flags & !known != 0 {
            return Err(Error::InvalidArgument(format!(
                "unknown qbm_check flags {:#x}",
                flags & !known
            )));
        }
        // Validate the output struct before any repair writes.
        write_sized(result, qbm_check_result::default())?;
        let r = h.image.check(CheckOptions {
            repair_leaks: flags & QBM_CHECK_REPAIR_LEAKS != 0,
            remove_inconsistent: flags & QBM_CHECK_REMOVE_INCONSISTENT != 0,
        })?;
        write_sized(
            result,
            qbm_check_result {
                struct_size: 0,
                corruptions: r.corruptions,
                leaks: r.leaks,
                check_errors: r.check_errors,
                leaks_fixed: r.leaks_fixed,
                inconsistent_bitmaps: r.inconsistent_bitmaps.len() as u64,
                removed_bitmaps: r.removed_bitmaps.len() as u64,
                image_end_offset: r.image_end_offset,
                total_clusters: r.total_clusters,
                allocated_clusters: r.allocated_clusters,
                fragmented_clusters: r.fragmented_clusters,
                compressed_clusters: r.compressed_clusters,
            },
        )?;
        Ok(0)
    })
}
