//! Where an image's bytes live. The image layer does all its I/O through
//! `Storage`, so tests can swap the file for memory or for a storage that
//! records, cuts or fails writes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// Positioned I/O on one image file. Methods take `&self`: implementations
/// that need state use interior mutability.
pub trait Storage: Send + Sync {
    /// Fills `buf` from `offset`; reading past the end is `UnexpectedEof`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Asks for `[offset, offset + len)`, just written, to go to the device
    /// now, without waiting: the device works while the caller prepares
    /// the next writes, and the next `flush` has less left to do. A hint:
    /// it makes nothing durable and cannot fail.
    fn start_writeback(&self, _offset: u64, _len: u64) {}
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// A storage shared with the caller, who keeps a handle on the bytes (tests
/// read an image back after `Image::close` consumed its storage).
impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        (**self).start_writeback(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
}

/// A regular file or block device.
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    pub fn new(file: File) -> FileStorage {
        FileStorage { file }
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return;
        };
        // Linux starts the writeback of a range's dirty pages for this
        // advice (and drops only pages already clean: the bitmaps live in
        // memory). Errors do not matter: the flush that follows reports
        // real ones.
        let _ = nix::fcntl::posix_fadvise(
            &self.file,
            offset,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

/// An image held in memory, for tests and fuzzing.
#[derive(Default)]
pub struct MemoryStorage {
    data: Mutex<Vec<u8>>,
}

impl MemoryStorage {
    pub fn new(data: Vec<u8>) -> MemoryStorage {
        MemoryStorage {
            data: Mutex::new(data),
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the Vec half-updated
        // in a way that matters for a test double; keep going.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.lock();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&end| end <= data.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&data[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.lock();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        if end > data.len() {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        self.lock().resize(len, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_storage_reads_back_and_refuses_past_end() {
        let s = MemoryStorage::default();
        s.write_at(b"abc", 4).unwrap();
        assert_eq!(s.len().unwrap(), 7);
        let mut buf = [0u8; 3];
        s.read_at(&mut buf, 4).unwrap();
        assert_eq!(&buf, b"abc");
        let err = s.read_at(&mut buf, 5).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn file_storage_keeps_data_through_a_writeback_hint() {
        let path = std::env::temp_dir().join(format!("qbm-storage-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        let s = FileStorage::new(file);
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        s.write_at(&data, 4096).unwrap();
        s.start_writeback(4096, data.len() as u64);
        // Ranges the call cannot express are ignored, not errors.
        s.start_writeback(u64::MAX, 1);
        s.start_writeback(0, u64::MAX);
        s.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        s.read_at(&mut back, 4096).unwrap();
        assert!(back == data, "data changed");
        assert_eq!(s.len().unwrap(), 4096 + data.len() as u64);
    }
}
