//! libqbm: QEMU-compatible persistent dirty bitmaps for qcow2 images.

pub mod bitmap;
pub mod error;
pub mod ffi;
pub mod format;
pub mod image;
pub mod storage;

pub use bitmap::{ByteRange, DirtyBitmap};
pub use error::{Error, Result};
