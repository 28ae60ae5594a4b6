//! One open image: the file, its header and extensions, the refcounts and
//! the bitmaps. Management calls are serialised by one lock; `mark_dirty`
//! takes none.

mod allocator;
mod bitmaps;
mod create;
mod enabled;
mod lock;

pub use bitmaps::{BitmapInfo, Extents};
pub use create::CreateOptions;

use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::extension::{self, Extension};
use crate::format::header::{self, Header};
use crate::storage::{FileStorage, Storage};
use allocator::Allocator;
use bitmaps::Slot;
use enabled::EnabledSet;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// Open read-write: bitmaps become changeable and are marked in_use on disk.
    pub writable: bool,
    /// Read without taking QEMU's image locks (`qemu-img -U`): the image may
    /// be changing under us. Read-only opens only.
    pub force_share: bool,
}

impl OpenOptions {
    pub fn read_only() -> OpenOptions {
        OpenOptions::default()
    }

    pub fn read_write() -> OpenOptions {
        OpenOptions {
            writable: true,
            ..OpenOptions::default()
        }
    }
}

/// Facts about an open image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub virtual_size: u64,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub version: u32,
    pub bitmap_count: usize,
    pub writable: bool,
    pub backing_file: Option<String>,
}

/// An open qcow2 image and its persistent dirty bitmaps.
pub struct Image {
    name: String,
    writable: bool,
    size: u64,
    state: Mutex<State>,
    enabled: EnabledSet,
    /// Released when the image is dropped, after the state is stored.
    _lock: Option<lock::LockGuard>,
}

/// Everything behind the management lock.
pub(crate) struct State {
    storage: Box<dyn Storage>,
    header: Header,
    extensions: Vec<Extension>,
    backing_name: Vec<u8>,
    /// Present on writable images only.
    alloc: Option<Allocator>,
    slots: Vec<Slot>,
    /// (offset, size) of the bitmap directory the header names now.
    directory: Option<(u64, u64)>,
    /// Names, flags or the set of bitmaps changed since the last store.
    dir_changed: bool,
    /// (offset, clusters) that become free once the next directory is durable.
    pending_free: Vec<(u64, u64)>,
    closed: bool,
}

impl Image {
    /// Opens the qcow2 image at `path`.
    pub fn open(path: impl AsRef<Path>, options: OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        let name = path.display().to_string();
        if options.writable && options.force_share {
            return Err(Error::InvalidArgument(format!(
                "{name}: force-share is for read-only opens only"
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(options.writable)
            .open(path)
            .map_err(|e| Error::io(format!("{name}: cannot open"), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("{name}: cannot stat"), e))?;
        use std::os::unix::fs::FileTypeExt;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(Error::InvalidArgument(format!(
                "{name}: not a regular file or block device"
            )));
        }
        let guard = match options.force_share {
            true => None,
            false => Some(lock::lock(&file, options.writable, &name)?),
        };
        let mut image = Image::open_storage(Box::new(FileStorage::new(file)), &name, options)?;
        image._lock = guard;
        Ok(image)
    }

    /// Opens an image held by any storage; `name` is used in messages.
    pub fn open_storage(
        storage: Box<dyn Storage>,
        name: &str,
        options: OpenOptions,
    ) -> Result<Image> {
        let state = State::load(storage, options.writable).map_err(|e| e.context(name))?;
        let image = Image {
            name: name.to_string(),
            writable: options.writable,
            size: state.header.size,
            state: Mutex::new(state),
            enabled: EnabledSet::default(),
            _lock: None,
        };
        {
            let mut st = image.lock()?;
            if options.writable {
                if let Err(e) = st.open_for_writing() {
                    // Nothing more may be written for a refused open.
                    st.closed = true;
                    return Err(e.context(name));
                }
            }
            image.publish_enabled(&st);
        }
        Ok(image)
    }

    /// The name used in messages (the path it was opened with).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn info(&self) -> Result<ImageInfo> {
        let st = self.lock()?;
        Ok(ImageInfo {
            virtual_size: st.header.size,
            cluster_size: st.header.cluster_size(),
            refcount_bits: st.header.refcount_bits(),
            version: st.header.version,
            bitmap_count: st.slots.len(),
            writable: self.writable,
            backing_file: (!st.backing_name.is_empty())
                .then(|| String::from_utf8_lossy(&st.backing_name).into_owned()),
        })
    }

    /// Stores every changed bitmap. They stay flagged in_use on disk while the
    /// image is open, as QEMU leaves them.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock()?;
        st.persist(false).map_err(|e| e.context(&self.name))
    }

    /// Stores every bitmap with in_use cleared and closes the image. The image
    /// is closed even when this fails.
    pub fn close(self) -> Result<()> {
        let mut st = self.lock()?;
        st.close().map_err(|e| e.context(&self.name))
    }

    /// Marks `[offset, offset+length)` dirty in every enabled bitmap.
    /// Lock-free and allocation-free; safe from any number of threads.
    pub fn mark_dirty(&self, offset: u64, length: u64) -> Result<()> {
        if !self.writable {
            return Err(self.read_only_error());
        }
        self.check_range(offset, length, None)?;
        self.enabled.for_each(|b| {
            b.mark_bytes(offset, length);
        });
        Ok(())
    }

    /// `bitmap` names the bitmap in the message, if one is involved.
    fn check_range(&self, offset: u64, length: u64, bitmap: Option<&str>) -> Result<()> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "{}: {}range at offset {offset} of length {length} extends past the end of the disk ({} bytes)",
                self.name,
                bitmap.map_or(String::new(), |b| format!("bitmap '{b}': ")),
                self.size
            ))),
        }
    }

    fn read_only_error(&self) -> Error {
        Error::ReadOnly(format!("{}: image is opened read-only", self.name))
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        let st = self.state.lock().map_err(|_| {
            Error::io(
                format!(
                    "{}: image handle unusable after an internal error",
                    self.name
                ),
                std::io::Error::from_raw_os_error(libc::EIO),
            )
        })?;
        if st.closed {
            return Err(Error::InvalidArgument(format!(
                "{}: image is closed",
                self.name
            )));
        }
        Ok(st)
    }

    /// Republishes the list `mark_dirty` walks; call after enabling,
    /// disabling, adding or removing bitmaps.
    fn publish_enabled(&self, st: &State) {
        self.enabled.publish(st.enabled_bitmaps());
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // A Rust user who forgets close() still gets the bitmaps stored.
        if let Ok(st) = self.state.get_mut() {
            if !st.closed {
                let _ = st.close();
            }
        }
    }
}

impl State {
    /// Reads and validates cluster 0, the refcount table (writable only) and
    /// the bitmap directory, and loads every usable bitmap.
    fn load(storage: Box<dyn Storage>, writable: bool) -> Result<State> {
        let len = storage
            .len()
            .map_err(|e| Error::io("reading the file size", e))?;
        // Read a little, learn the cluster size, then read all of cluster 0.
        let mut c0 = vec![0u8; len.min(4096) as usize];
        storage
            .read_at(&mut c0, 0)
            .map_err(|e| Error::io("reading the header", e))?;
        if let Some(bits) = c0
            .get(20..24)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        {
            let want =
                len.min(1u64 << bits.clamp(header::MIN_CLUSTER_BITS, header::MAX_CLUSTER_BITS));
            if want > c0.len() as u64 {
                c0.resize(want as usize, 0);
                storage
                    .read_at(&mut c0, 0)
                    .map_err(|e| Error::io("reading cluster 0", e))?;
            }
        }
        let header = Header::parse(&c0)?;
        c0.truncate(header.cluster_size() as usize);
        let extensions = extension::parse_all(&c0, header.extensions_start())?;
        let unknown = header.unknown_incompatible();
        if unknown != 0 {
            return Err(Error::NotSupported(format!(
                "unknown incompatible feature bits {unknown:#x}{}",
                feature_names(&extensions, unknown)
            )));
        }
        if writable && header.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
            return corrupt!("image is marked corrupt; it can only be opened read-only (repair with `qemu-img check -r all`)");
        }
        if writable && header.incompatible_features & header::INCOMPAT_DIRTY != 0 {
            return corrupt!("refcounts may be stale (dirty bit set by lazy refcounts); repair with `qemu-img check -r all` before opening read-write");
        }
        let backing_name = if header.backing_file_offset != 0 {
            let at = header.backing_file_offset as usize;
            c0[at..at + header.backing_file_size as usize].to_vec()
        } else {
            Vec::new()
        };
        let alloc = if writable {
            Some(Allocator::load(
                storage.as_ref(),
                header.cluster_bits,
                header.refcount_order,
                header.refcount_table_offset,
                header.refcount_table_clusters,
            )?)
        } else {
            None
        };
        let mut st = State {
            storage,
            header,
            extensions,
            backing_name,
            alloc,
            slots: Vec::new(),
            directory: None,
            dir_changed: false,
            pending_free: Vec::new(),
            closed: false,
        };
        st.load_bitmaps(writable)?;
        if writable {
            st.check_metadata_refcounts()?;
        }
        Ok(st)
    }

    /// Before anything is written: every cluster of the metadata we know must
    /// have a refcount and belong to one structure only, or an allocation or
    /// a free would overwrite it (qemu-img check calls this corruption).
    fn check_metadata_refcounts(&mut self) -> Result<()> {
        let cs = self.cluster_size();
        let file_len = self
            .storage
            .len()
            .map_err(|e| Error::io("reading the file size", e))?;
        let alloc = self.alloc.as_mut().expect("writable");
        let mut pieces: Vec<(u64, u64, String)> = vec![(0, 1, "the header".into())];
        pieces.push((
            alloc.table_offset(),
            u64::from(alloc.table_clusters()),
            "the refcount table".into(),
        ));
        pieces.extend(
            alloc
                .block_offsets()
                .map(|(i, off)| (off, 1, format!("refcount block {i}"))),
        );
        let (l1_offset, l1_bytes) = (
            self.header.l1_table_offset,
            u64::from(self.header.l1_size) * 8,
        );
        if l1_bytes > 0 {
            if l1_offset == 0 || l1_offset.saturating_add(l1_bytes) > file_len {
                return corrupt!(
                    "l1_table_offset {l1_offset:#x} (l1_size {}) lies outside the file ({file_len} bytes)",
                    self.header.l1_size
                );
            }
            pieces.push((l1_offset, l1_bytes.div_ceil(cs), "the L1 table".into()));
            let mut l1 = vec![0u8; l1_bytes as usize];
            self.storage
                .read_at(&mut l1, l1_offset)
                .map_err(|e| Error::io("reading the L1 table", e))?;
            for (i, e) in l1.chunks_exact(8).enumerate() {
                let l2 = u64::from_be_bytes(e.try_into().expect("8 bytes")) & L2_OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                if l2 % cs != 0 || l2.saturating_add(cs) > file_len.next_multiple_of(cs) {
                    return corrupt!("L1 entry {i}: L2 table offset {l2:#x} is unaligned or past the end of the file");
                }
                pieces.push((l2, 1, format!("L2 table {i}")));
            }
        }
        pieces.extend(self.bitmap_metadata());
        pieces.sort_by_key(|p| p.0);
        for w in pieces.windows(2) {
            let ((a, n, a_what), (b, _, b_what)) = (&w[0], &w[1]);
            if a.saturating_add(n.saturating_mul(cs)) > *b {
                return corrupt!("{a_what} at {a:#x} overlaps {b_what} at {b:#x}");
            }
        }
        let alloc = self.alloc.as_mut().expect("writable");
        for (offset, n, what) in &pieces {
            for c in offset / cs..offset / cs + n {
                if alloc.refcount(self.storage.as_ref(), c)? == 0 {
                    return corrupt!(
                        "{what} at {offset:#x}: cluster {:#x} has refcount 0 (repair with `qemu-img check -r all`)",
                        c * cs
                    );
                }
            }
        }
        Ok(())
    }

    /// What a read-write open changes on disk: unknown autoclear bits cleared,
    /// a stale bitmaps extension dropped, every usable bitmap flagged in_use.
    fn open_for_writing(&mut self) -> Result<()> {
        let mut header_changed = false;
        if self.header.version == 3 {
            let unknown = self.header.autoclear_features & !header::AUTOCLEAR_KNOWN;
            if unknown != 0 {
                self.header.autoclear_features &= !unknown;
                header_changed = true;
            }
            if self.header.autoclear_features & header::AUTOCLEAR_BITMAPS == 0 {
                let before = self.extensions.len();
                self.extensions.retain(|e| e.magic != extension::BITMAPS);
                header_changed |= self.extensions.len() != before;
            }
        }
        if self.slots.iter().any(Slot::usable) {
            self.persist(false)
        } else if header_changed {
            self.write_cluster0()
        } else {
            Ok(())
        }
    }

    fn close(&mut self) -> Result<()> {
        let stored = if self.alloc.is_some() {
            self.persist(true)
        } else {
            Ok(())
        };
        self.closed = true;
        stored
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    fn flush_storage(&self) -> Result<()> {
        self.storage.flush().map_err(|e| Error::io("flushing", e))
    }

    /// The bytes of cluster 0 from the header, the extensions and the backing
    /// file name; fails without side effects when they do not fit.
    fn encode_cluster0(
        &self,
        extensions: &[Extension],
        autoclear: u64,
    ) -> Result<(Header, Vec<u8>)> {
        let mut header = self.header.clone();
        header.autoclear_features = autoclear;
        if let Some(a) = &self.alloc {
            header.refcount_table_offset = a.table_offset();
            header.refcount_table_clusters = a.table_clusters();
        }
        let ext_bytes = extension::encode_all(extensions);
        let ext_end = header.header_length as usize + ext_bytes.len();
        let cs = self.cluster_size() as usize;
        let name_len = self.backing_name.len();
        if name_len > 0 {
            // Keep the name where it is unless the extensions now reach it.
            let old = header.backing_file_offset as usize;
            header.backing_file_offset = if old >= ext_end { old } else { ext_end } as u64;
        }
        let end = if name_len > 0 {
            header.backing_file_offset as usize + name_len
        } else {
            ext_end
        };
        if end > cs {
            return Err(Error::NoSpace(format!(
                "header, extensions and backing file name need {end} bytes, more than cluster 0 holds ({cs})"
            )));
        }
        let mut bytes = header.encode();
        bytes.extend_from_slice(&ext_bytes);
        if name_len > 0 {
            bytes.resize(header.backing_file_offset as usize, 0);
            bytes.extend_from_slice(&self.backing_name);
        }
        Ok((header, bytes))
    }

    /// Rewrites cluster 0 with the current extensions and flushes.
    /// Needs: everything the header names is durable.
    fn write_cluster0(&mut self) -> Result<()> {
        let (header, bytes) =
            self.encode_cluster0(&self.extensions, self.header.autoclear_features)?;
        self.storage
            .write_at(&bytes, 0)
            .map_err(|e| Error::io("writing the header", e))?;
        self.flush_storage()?;
        self.header = header;
        Ok(())
    }

    /// Allocates `n` contiguous clusters (refcounts written, not flushed).
    fn allocate(&mut self, n: u64) -> Result<u64> {
        let alloc = self
            .alloc
            .as_mut()
            .ok_or_else(|| Error::ReadOnly("image is opened read-only".into()))?;
        alloc.allocate(self.storage.as_ref(), n)
    }
}

/// Bits 9-55 of an L1 entry: the offset of an L2 table.
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// " (name)" for each unknown incompatible bit the feature-name table names.
fn feature_names(extensions: &[Extension], bits: u64) -> String {
    let Some(table) = extensions
        .iter()
        .find(|e| e.magic == extension::FEATURE_NAME_TABLE)
    else {
        return String::new();
    };
    let names: Vec<String> = table
        .data
        .chunks_exact(48)
        .filter(|e| e[0] == 0 && e[1] < 64 && bits & (1u64 << e[1]) != 0)
        .map(|e| {
            let raw = &e[2..];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            format!("bit {}: {}", e[1], String::from_utf8_lossy(&raw[..end]))
        })
        .collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}
