//! The boundary: panic guard, errno conversion, the thread-local message and
//! the checked conversions of raw pointers. Every `unsafe` of the C API that
//! touches caller memory lives here.

use super::types::{qbm_image, qbm_range, HANDLE_MAGIC};
use crate::bitmap::ByteRange;
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    // Interior NULs cannot be represented; replace them rather than lose the message.
    let msg = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

/// The calling thread's last message; valid until its next failing call.
pub(crate) fn last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs an entry point: a `Result` becomes 0/positive or a negative errno
/// with a message; a panic becomes -EIO with a message.
pub(crate) fn run(f: impl FnOnce() -> Result<c_int>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            let errno = e.errno();
            set_last_error(e.to_string());
            -errno
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            set_last_error(format!("internal error in libqbm (please report): {what}"));
            -libc::EIO
        }
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// The live handle behind `p`.
pub(crate) fn handle<'a>(p: *const qbm_image) -> Result<&'a qbm_image> {
    if p.is_null() {
        return Err(invalid("image handle is NULL"));
    }
    // SAFETY: a non-NULL handle came from qbm_open/qbm_create (Box::into_raw),
    // and the caller promises it has not been passed to qbm_close. The magic
    // check catches a closed handle whose memory was not reused yet.
    let h = unsafe { &*p };
    if h.magic != HANDLE_MAGIC {
        return Err(invalid("image handle is not valid (closed or corrupted)"));
    }
    Ok(h)
}

/// The caller's array of `count` ranges at `p`, as the library's own type.
pub(crate) fn ranges_in<'a>(p: *const qbm_range, count: usize) -> Result<&'a [ByteRange]> {
    if p.is_null() {
        return Err(invalid("ranges is NULL"));
    }
    if count > isize::MAX as usize / std::mem::size_of::<qbm_range>() {
        return Err(invalid(format!("range count {count} is too large")));
    }
    const _: () = assert!(
        std::mem::size_of::<qbm_range>() == std::mem::size_of::<ByteRange>()
            && std::mem::align_of::<qbm_range>() == std::mem::align_of::<ByteRange>()
    );
    // SAFETY: the caller promises `count` readable `struct qbm_range` at `p`
    // (C API convention), unchanged during the call; `count` bytes fit in
    // isize (checked). `qbm_range` and `ByteRange` are both repr(C) with
    // the same two u64 fields in the same order, so the layouts match (size
    // and alignment asserted above) and every bit pattern is valid.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<ByteRange>(), count) })
}

/// The live handle behind `p`, or None (no message: for hot paths that
/// retry through [`handle`] to report the error).
#[inline]
pub(crate) fn handle_fast<'a>(p: *const qbm_image) -> Option<&'a qbm_image> {
    if p.is_null() {
        return None;
    }
    // SAFETY: as in `handle`.
    let h = unsafe { &*p };
    (h.magic == HANDLE_MAGIC).then_some(h)
}

/// Gives a new image to the caller through `out_img` (checked non-NULL).
pub(crate) fn store_handle(
    out_img: *mut *mut qbm_image,
    image: crate::image::Image,
) -> Result<c_int> {
    let raw = Box::into_raw(Box::new(qbm_image {
        magic: HANDLE_MAGIC,
        image,
    }));
    // SAFETY: the caller checked `out_img` is non-NULL; it points to a
    // writable `struct qbm_image *` (C API convention).
    unsafe { *out_img = raw };
    Ok(0)
}

/// Takes back ownership of a live handle for `qbm_close`.
pub(crate) fn take_handle(p: *mut qbm_image) -> Result<crate::image::Image> {
    handle(p)?;
    // SAFETY: the handle is live (checked above) and came from Box::into_raw
    // in `store_handle`; by calling close the caller gives up ownership.
    let mut boxed = unsafe { Box::from_raw(p) };
    boxed.magic = 0;
    Ok(boxed.image)
}

/// A NUL-terminated UTF-8 string argument.
pub(crate) fn string<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: the caller passes a NUL-terminated string that stays valid for
    // the duration of the call (C API convention).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|_| {
        invalid(format!(
            "{what} {:?} is not valid UTF-8",
            s.to_string_lossy()
        ))
    })
}

/// A place to write one output value.
pub(crate) fn out<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T> {
    // SAFETY: a non-NULL output pointer points to a writable, aligned T owned
    // by the caller for the duration of the call.
    unsafe { p.as_mut() }.ok_or_else(|| invalid(format!("{what} is NULL")))
}

/// Size-versioned structs start with `struct_size: usize`.
/// # Safety
/// Implementors are `repr(C)` plain-data structs whose first field is
/// `struct_size: usize`, for which all-zero bytes are a valid value.
pub(crate) unsafe trait VersionedStruct: Copy {
    const NAME: &'static str;
    /// The size of the struct's first published version: callers compiled
    /// against it keep working, and the fields added since read as 0.
    const MIN_SIZE: usize = std::mem::size_of::<Self>();
}

/// Largest `struct_size` believed: a bigger one is an uninitialised field,
/// not a struct from a newer header (as Linux's `copy_struct_from_user`
/// refuses sizes past a page).
pub(crate) const STRUCT_SIZE_MAX: usize = 4096;

fn caller_size<T: VersionedStruct>(p: *const T) -> Result<usize> {
    if p.is_null() {
        return Err(invalid(format!("struct {} pointer is NULL", T::NAME)));
    }
    // SAFETY: T starts with a usize (trait contract) and the caller allocated
    // at least that much; only the size field is read here.
    let size = unsafe { *(p as *const usize) };
    // Published sizes only: the first version's, or this one's and up. A
    // size in between would cut a field in two.
    if size != T::MIN_SIZE && size < std::mem::size_of::<T>() {
        return Err(invalid(format!(
            "struct {}.struct_size is {size}, expected {}{}",
            T::NAME,
            if T::MIN_SIZE < std::mem::size_of::<T>() {
                format!("{} or at least ", T::MIN_SIZE)
            } else {
                "at least ".to_string()
            },
            std::mem::size_of::<T>()
        )));
    }
    if size > STRUCT_SIZE_MAX {
        return Err(invalid(format!(
            "struct {}.struct_size is {size}, more than {STRUCT_SIZE_MAX}: not set (expected {})",
            T::NAME,
            std::mem::size_of::<T>()
        )));
    }
    Ok(size)
}

/// Reads a size-versioned input struct. A caller's longer struct (a newer
/// header) is accepted only if the fields this version does not know are 0:
/// an option it cannot honour must not be ignored silently.
pub(crate) fn read_sized<T: VersionedStruct>(p: *const T) -> Result<T> {
    let size = caller_size(p)?;
    let ours = std::mem::size_of::<T>();
    if size > ours {
        // SAFETY: the caller's struct is `size` bytes (bounded above by
        // caller_size); the tail is read as bytes only.
        let tail = unsafe { std::slice::from_raw_parts((p as *const u8).add(ours), size - ours) };
        if let Some(at) = tail.iter().position(|&b| b != 0) {
            return Err(invalid(format!(
                "struct {}: byte {} is not 0, but this version of libqbm knows only the first {ours} bytes (struct_size {size})",
                T::NAME,
                ours + at
            )));
        }
    }
    // SAFETY: all-zero bytes are a valid T (trait contract); the caller's
    // struct has at least min(size, ours) readable bytes, copied over them.
    unsafe {
        let mut value: T = std::mem::zeroed();
        std::ptr::copy_nonoverlapping(
            p as *const u8,
            &mut value as *mut T as *mut u8,
            size.min(ours),
        );
        Ok(value)
    }
}

/// Writes a size-versioned output struct, keeping the caller's struct_size.
pub(crate) fn write_sized<T: VersionedStruct>(p: *mut T, value: T) -> Result<()> {
    let size = caller_size(p)?;
    let n = size.min(std::mem::size_of::<T>());
    // SAFETY: both regions are at least n bytes; the first usize (struct_size)
    // is skipped so the caller's value stays.
    unsafe {
        let src = &value as *const T as *const u8;
        let dst = p as *mut u8;
        let skip = std::mem::size_of::<usize>();
        std::ptr::copy_nonoverlapping(src.add(skip), dst.add(skip), n - skip);
    }
    Ok(())
}

/// Copies `bytes` into the caller's `size`-byte buffer as snprintf does:
/// truncated to `size - 1` bytes and NUL-terminated; nothing when `size` is 0.
pub(crate) fn copy_truncated(bytes: &[u8], buf: *mut c_char, size: usize) {
    if size == 0 || buf.is_null() {
        return;
    }
    let n = bytes.len().min(size - 1);
    // SAFETY: the caller's buffer holds `size` bytes (> n).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, n);
        *buf.add(n) = 0;
    }
}
