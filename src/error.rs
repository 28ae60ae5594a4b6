//! One error type for the whole library. Each variant is a failure a caller can
//! tell apart; `errno()` is the single place that maps them to C error codes.

use std::io;

/// Every failure of libqbm. The message names the file, the bitmap and the
/// offending value wherever they are known.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller passed a bad argument (bad name, unaligned range, NULL, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// No bitmap of that name.
    #[error("{0}")]
    NotFound(String),
    /// A bitmap of that name already exists.
    #[error("{0}")]
    Exists(String),
    /// A limit of the format would be exceeded, or the disk is full.
    #[error("{0}")]
    NoSpace(String),
    /// A write was asked of an image opened read-only.
    #[error("{0}")]
    ReadOnly(String),
    /// The image or bitmap is locked, in use or inconsistent.
    #[error("{0}")]
    Busy(String),
    /// A feature this version does not implement (unknown incompatible bit, v2 bitmaps, ...).
    #[error("{0}")]
    NotSupported(String),
    /// The image's metadata is invalid.
    #[error("{0}")]
    Corrupt(String),
    /// The operating system failed an I/O request.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The positive errno a C caller sees (negated at the ABI).
    pub fn errno(&self) -> i32 {
        match self {
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::NotFound(_) => libc::ENOENT,
            Error::Exists(_) => libc::EEXIST,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::ReadOnly(_) => libc::EROFS,
            Error::Busy(_) => libc::EBUSY,
            Error::NotSupported(_) => libc::ENOTSUP,
            Error::Corrupt(_) => libc::EUCLEAN,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(code) if code > 0 => code,
                _ if source.kind() == io::ErrorKind::UnexpectedEof => libc::EUCLEAN,
                _ => libc::EIO,
            },
        }
    }

    /// Prefixes the message with where it happened ("disk.qcow2: ...").
    pub fn context(self, prefix: impl std::fmt::Display) -> Error {
        let wrap = |m: String| format!("{prefix}: {m}");
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(wrap(m)),
            Error::NotFound(m) => Error::NotFound(wrap(m)),
            Error::Exists(m) => Error::Exists(wrap(m)),
            Error::NoSpace(m) => Error::NoSpace(wrap(m)),
            Error::ReadOnly(m) => Error::ReadOnly(wrap(m)),
            Error::Busy(m) => Error::Busy(wrap(m)),
            Error::NotSupported(m) => Error::NotSupported(wrap(m)),
            Error::Corrupt(m) => Error::Corrupt(wrap(m)),
            Error::Io { context, source } => Error::Io {
                context: wrap(context),
                source,
            },
        }
    }

    /// An I/O error with what was being done when it happened.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Shorthand for `Err(Error::Corrupt(format!(...)))`.
#[macro_export]
#[doc(hidden)]
macro_rules! corrupt {
    ($($arg:tt)*) => { Err($crate::error::Error::Corrupt(format!($($arg)*))) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_is_one_per_kind() {
        assert_eq!(Error::Corrupt("x".into()).errno(), libc::EUCLEAN);
        assert_eq!(Error::NotSupported("x".into()).errno(), libc::ENOTSUP);
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(Error::io("writing", full).errno(), libc::ENOSPC);
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(Error::io("reading", eof).errno(), libc::EUCLEAN);
    }

    #[test]
    fn context_keeps_kind_and_prefixes_message() {
        let e = Error::NotFound("bitmap 'b' not found".into()).context("disk.qcow2");
        assert_eq!(e.errno(), libc::ENOENT);
        assert_eq!(e.to_string(), "disk.qcow2: bitmap 'b' not found");
    }
}
