//! One open image: the file, its header and extensions, the refcounts and
//! the bitmaps. Management calls are serialised by one lock; `mark_dirty`
//! takes none.

mod allocator;
mod bitmaps;
mod check;
mod create;
mod densify;
mod enabled;
mod intent;
mod layout;
mod lock;
mod resize;
mod stored;

pub use bitmaps::{BitmapInfo, Extents};
pub use check::{check_file, check_storage, CheckOptions, CheckReport};
pub use create::CreateOptions;
pub use intent::{IntentStats, AUTOCLEAR_WRITE_INTENT, RECORD_MAGIC};

use crate::bitmap::ByteRange;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::extension::{self, Extension};
use crate::format::header::{self, Header};
use crate::storage::{FileStorage, Storage};
use allocator::Allocator;
use bitmaps::Slot;
use enabled::EnabledSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// Open read-write: bitmaps become changeable and are marked in_use on disk.
    pub writable: bool,
    /// Read without taking QEMU's image locks (`qemu-img -U`): the image may
    /// be changing under us. Read-only opens only.
    pub force_share: bool,
    /// Write-intent mode (read-write only): a mark returns once its bits are
    /// durable on disk, so that a crash leaves bitmaps that can be recovered.
    pub write_intent: bool,
    /// Lazy mode, for tools that manage bitmaps while nothing writes guest
    /// data through this handle: bitmap data is read only when a call needs
    /// it, and counted, walked, merged (same granularity) and cleared a
    /// chunk at a time without loading it, so memory and I/O follow what a
    /// call touches, not the disk size. A lazy read-write open does not flag
    /// bitmaps in_use (no write is tracked) and refuses `mark_dirty`.
    /// Not with `write_intent`.
    pub lazy: bool,
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

    /// Refuses combinations that mean nothing; `name` is for the message.
    fn check(&self, name: &str) -> Result<()> {
        let refuse = |why: &str| Err(Error::InvalidArgument(format!("{name}: {why}")));
        if self.write_intent && !self.writable {
            return refuse("write-intent mode is for read-write opens only");
        }
        if self.writable && self.force_share {
            return refuse("force-share is for read-only opens only");
        }
        if self.lazy && self.write_intent {
            return refuse("write-intent mode tracks writes; a lazy open tracks none");
        }
        Ok(())
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
    /// The external data file's name as stored, for a raw-disk companion.
    pub data_file: Option<String>,
}

/// An open qcow2 image and its persistent dirty bitmaps.
pub struct Image {
    name: String,
    writable: bool,
    /// Writable and not lazy: `mark_dirty` works.
    tracking: bool,
    /// The virtual size; changes only under the state lock (resize).
    size: AtomicU64,
    state: Mutex<State>,
    enabled: EnabledSet,
    /// Present in write-intent mode: the group commit of durable marks.
    intent: Option<intent::Intent>,
    /// The image's locks and its data file's; released when the image is
    /// dropped, after the state is stored.
    _locks: Vec<lock::LockGuard>,
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
    /// Write-intent mode: bitmaps stored in place, fully allocated.
    intent: bool,
    /// Lazy open: usable bitmaps start `stored` (stored.rs).
    lazy: bool,
    /// The last chunk of a stored bitmap read (stored.rs).
    chunk_cache: Option<stored::ChunkCache>,
}

impl Image {
    /// Opens the qcow2 image at `path`.
    pub fn open(path: impl AsRef<Path>, options: OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        let name = path.display().to_string();
        // Before the file is even opened.
        options.check(&name)?;
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
        let mut locks = Vec::new();
        if !options.force_share {
            locks.push(lock::lock(&file, options.writable, &name)?);
        }
        // The data file is locked before anything is written to the image.
        let storage = Box::new(FileStorage::new(file));
        let mut image = Image::open_storage_with(storage, &name, options, |st| {
            if let Some(guard) = lock_data_file(st, options, &name)? {
                locks.push(guard);
            }
            Ok(())
        })?;
        image._locks = locks;
        Ok(image)
    }

    /// Opens an image held by any storage; `name` is used in messages.
    pub fn open_storage(
        storage: Box<dyn Storage>,
        name: &str,
        options: OpenOptions,
    ) -> Result<Image> {
        Image::open_storage_with(storage, name, options, |_| Ok(()))
    }

    /// `open_storage`, running `before_writing` on the loaded state before
    /// a read-write open writes anything.
    fn open_storage_with(
        storage: Box<dyn Storage>,
        name: &str,
        options: OpenOptions,
        before_writing: impl FnOnce(&State) -> Result<()>,
    ) -> Result<Image> {
        options.check(name)?;
        let mut state =
            State::load(storage, options.writable, options.lazy).map_err(|e| e.context(name))?;
        state.intent = options.write_intent;
        before_writing(&state)?;
        let image = Image {
            name: name.to_string(),
            writable: options.writable,
            tracking: options.writable && !options.lazy,
            size: AtomicU64::new(state.header.size),
            state: Mutex::new(state),
            enabled: EnabledSet::default(),
            intent: options.write_intent.then(intent::Intent::default),
            _locks: Vec::new(),
        };
        {
            let mut st = image.lock()?;
            if options.writable {
                if let Err(e) = st.open_for_writing() {
                    // The bitmaps may already be flagged in_use on disk: when
                    // the disk works again, store them without the flag.
                    // Nothing else is written for a refused open.
                    if matches!(e, Error::Io { .. }) {
                        let _ = st.persist(true);
                    }
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
        self.size.load(Ordering::Acquire)
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
            data_file: st
                .data_file_name()
                .map(|p| p.to_string_lossy().into_owned()),
        })
    }

    /// Stores every changed bitmap. They stay flagged in_use on disk while the
    /// image is open, as QEMU leaves them.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock()?;
        self.densify(&mut st);
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
    /// In write-intent mode it returns once the marked bits are durable
    /// (at once, without I/O or locks, when they already are).
    #[inline]
    pub fn mark_dirty(&self, offset: u64, length: u64) -> Result<()> {
        self.mark_dirty_plain(offset, length)?;
        match &self.intent {
            Some(i) => self.mark_durable(i, &[ByteRange { offset, length }]),
            None => Ok(()),
        }
    }

    /// Marks a batch of writes, each as [`Image::mark_dirty`] would, with
    /// one set of enabled bitmaps for the whole batch: a VMM that completes
    /// several requests at once (a virtqueue, an io_uring completion batch)
    /// marks them in one call, and the marks of different writes overlap
    /// their cache misses instead of waiting for each other. Every range is
    /// checked first: an invalid one fails the call with nothing marked. In
    /// write-intent mode a failure to make the marks durable may leave some
    /// ranges marked in memory; marking again is harmless.
    pub fn mark_dirty_many(&self, ranges: &[ByteRange]) -> Result<()> {
        let size = self.size.load(Ordering::Relaxed);
        for (i, r) in ranges.iter().enumerate() {
            self.check_mark(r.offset, r.length, size)
                .map_err(|e| e.context(format!("range {i} of {}", ranges.len())))?;
        }
        if self.intent.is_none() && self.enabled.mark_many_fast(ranges) {
            return Ok(());
        }
        self.mark_in_memory(ranges);
        match &self.intent {
            Some(i) => self.mark_durable(i, ranges),
            None => Ok(()),
        }
    }

    /// Marks in memory only.
    #[inline]
    fn mark_dirty_plain(&self, offset: u64, length: u64) -> Result<()> {
        self.check_mark(offset, length, self.size.load(Ordering::Relaxed))?;
        self.mark_in_memory(&[ByteRange { offset, length }]);
        Ok(())
    }

    /// Marks checked ranges in every enabled bitmap, the general way.
    fn mark_in_memory(&self, ranges: &[ByteRange]) {
        self.enabled.for_each(|b| {
            for r in ranges {
                b.mark_bytes(r.offset, r.length);
            }
        });
    }

    /// A mark of `[offset, offset + length)` is allowed on a disk of `size` bytes.
    #[inline]
    fn check_mark(&self, offset: u64, length: u64, size: u64) -> Result<()> {
        match offset.checked_add(length) {
            Some(end) if self.tracking && end <= size => Ok(()),
            _ => Err(self.mark_error(offset, length, size)),
        }
    }

    /// The common case of [`Image::mark_dirty`] for the C hot path, without
    /// calls, frames or panics: true when every enabled bitmap took the mark through
    /// [`crate::bitmap::Marker::mark_fast`]. False means "not done (or
    /// partly)", and always in write-intent mode: the caller goes the
    /// ordinary way, which marks again (and waits for durability).
    #[inline(always)]
    pub fn mark_dirty_fast(&self, offset: u64, length: u64) -> bool {
        let last = offset.wrapping_add(length).wrapping_sub(1);
        // length > 0, no overflow, inside the disk.
        if length == 0 || last < offset || !self.tracking {
            return false;
        }
        if last >= self.size.load(Ordering::Relaxed) {
            return false;
        }
        // Write-intent marks take the guarded path: their durability check
        // walks more code than this path may (it must not be able to panic).
        self.intent.is_none() && self.enabled.mark_fast(offset, last)
    }

    /// Why a mark of `[offset, offset + length)` on a disk of `size` bytes
    /// (the size the check read: a resize may change it since) was refused.
    #[cold]
    fn mark_error(&self, offset: u64, length: u64, size: u64) -> Error {
        if !self.writable {
            return self.read_only_error();
        }
        if !self.tracking {
            return Error::InvalidArgument(format!(
                "{}: opened lazily, the image tracks no writes (open it without the lazy option to mark)",
                self.name
            ));
        }
        self.range_error(offset, length, None, size)
    }

    /// `bitmap` names the bitmap in the message, if one is involved.
    fn check_range(&self, offset: u64, length: u64, bitmap: Option<&str>) -> Result<()> {
        let size = self.size();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(self.range_error(offset, length, bitmap, size)),
        }
    }

    fn range_error(&self, offset: u64, length: u64, bitmap: Option<&str>, size: u64) -> Error {
        Error::InvalidArgument(format!(
            "{}: {}range at offset {offset} of length {length} extends past the end of the disk ({size} bytes)",
            self.name,
            bitmap.map_or(String::new(), |b| format!("bitmap '{b}': ")),
        ))
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

/// Locks the external data file of a raw-disk companion as QEMU locks it
/// (it is the same disk). A read-write open needs it; a read-only one reads
/// the bitmaps without it when it is missing.
fn lock_data_file(st: &State, options: OpenOptions, name: &str) -> Result<Option<lock::LockGuard>> {
    let Some(path) = st.data_file_name() else {
        return Ok(None);
    };
    if options.force_share {
        return Ok(None);
    }
    let shown = format!("{name}: data file {}", path.display());
    match std::fs::File::open(&path) {
        Ok(file) => lock::lock(&file, options.writable, &shown).map(Some),
        Err(e) if options.writable => Err(Error::io(format!("{shown}: cannot open"), e)),
        Err(_) => Ok(None),
    }
}

impl State {
    /// The external data file's name, as stored (QEMU resolves a relative
    /// one against the working directory, and so do we).
    fn data_file_name(&self) -> Option<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        if self.header.incompatible_features & header::INCOMPAT_DATA_FILE == 0 {
            return None;
        }
        self.extensions
            .iter()
            .find(|e| e.magic == extension::DATA_FILE)
            .map(|e| PathBuf::from(std::ffi::OsStr::from_bytes(&e.data)))
    }

    /// Reads and validates cluster 0, the refcount table (writable only) and
    /// the bitmap directory, and loads every usable bitmap.
    fn load(storage: Box<dyn Storage>, writable: bool, lazy: bool) -> Result<State> {
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
        let backing_at = (header.backing_file_offset != 0).then_some(header.backing_file_offset);
        let extensions = extension::parse_all_before(&c0, header.extensions_start(), backing_at)?;
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
        // Its memory serves the refcount table next (a CLI's peak).
        drop(c0);
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
        let layout = layout::base(storage.as_ref(), &header, alloc.as_ref(), len)?;
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
            intent: false,
            lazy,
            chunk_cache: None,
        };
        st.load_bitmaps(writable, layout)?;
        Ok(st)
    }

    /// What a read-write open changes on disk: unknown autoclear bits cleared,
    /// a stale bitmaps extension dropped, every usable bitmap flagged in_use.
    fn open_for_writing(&mut self) -> Result<()> {
        let mut exts = self.extensions.clone();
        let mut autoclear = self.header.autoclear_features;
        if self.header.version == 3 {
            autoclear &= header::AUTOCLEAR_KNOWN | intent::AUTOCLEAR_WRITE_INTENT;
            if autoclear & header::AUTOCLEAR_BITMAPS == 0 {
                drop_bitmaps_extension(&mut exts);
            }
            if !self.intent || autoclear & header::AUTOCLEAR_BITMAPS == 0 {
                // Recovery is done (at load): the record means nothing now.
                self.intent_record(&mut exts, &mut autoclear, None, &[], &[], false);
            }
        }
        if exts != self.extensions || autoclear != self.header.autoclear_features {
            self.commit_cluster0(exts, autoclear)?;
        }
        if self.slots.iter().any(Slot::usable) {
            self.persist(false)
        } else {
            Ok(())
        }
    }

    fn close(&mut self) -> Result<()> {
        let stored = if self.alloc.is_some() {
            // Write-intent mode: the record and its bit stay while the
            // bitmaps are stored without in_use (a crash then leaves them
            // recoverable or consistent), and go in a step of their own.
            self.persist(true).and_then(|()| self.drop_intent_record())
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
        let cs = self.cluster_size() as usize;
        let mut header = self.header.clone();
        header.autoclear_features = autoclear;
        if let Some(a) = &self.alloc {
            header.refcount_table_offset = a.table_offset();
            header.refcount_table_clusters = a.table_clusters();
        }
        let ext_bytes = extension::encode_all(extensions);
        let ext_end = header.header_length as usize + ext_bytes.len();
        let name_len = self.backing_name.len();
        if name_len > 0 {
            // Keep the name where it is unless the extensions now reach it;
            // then move it to the end of cluster 0, clear of both the old name
            // and the new extensions, so that the move can be made safely
            // (see commit_cluster0). Right after the extensions if it does
            // not fit there.
            let old = header.backing_file_offset as usize;
            let at_end = cs.saturating_sub(name_len);
            header.backing_file_offset = if old >= ext_end {
                old
            } else if at_end >= ext_end && at_end >= old + name_len {
                at_end
            } else {
                ext_end
            } as u64;
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

    /// Makes cluster 0 name `extensions` and `autoclear`, durably.
    /// Needs: everything the new header names is durable.
    ///
    /// A crash may leave any subset of the 512-byte sectors of an unflushed
    /// write on disk, so cluster 0 changes in steps, each a write within one
    /// sector or a write nothing reads yet, each flushed before the next:
    /// 1. autoclear bits that go away (bitmaps disowned before their
    ///    extension changes);
    /// 2. a backing file name that moves: first the name at its new place
    ///    (clear of everything live), then the offset in the header;
    /// 3. the extension area: one sector's worth in place; or, when the
    ///    list grows at its end, what follows the old end marker first and
    ///    the 8 bytes replacing that marker last; or, when it shrinks, the
    ///    new end marker first and the dead bytes after it last;
    /// 4. the rest of the header, with autoclear bits that appear (bitmaps
    ///    owned only once their extension is durable).
    ///
    /// Only an extension change spanning two sectors that is none of these
    /// (a bitmaps extension straddling a sector boundary, which neither
    /// QEMU's nor our layouts produce) goes out as one tearable write.
    fn commit_cluster0(&mut self, extensions: Vec<Extension>, autoclear: u64) -> Result<()> {
        let (header, new) = self.encode_cluster0(&extensions, autoclear)?;
        let cs = self.cluster_size() as usize;
        let file_len = self
            .storage
            .len()
            .map_err(|e| Error::io("reading the file size", e))?;
        let mut cur = vec![0u8; cs.min(file_len as usize).max(new.len())];
        let readable = cs.min(file_len as usize);
        self.storage
            .read_at(&mut cur[..readable], 0)
            .map_err(|e| Error::io("reading cluster 0", e))?;
        // Whatever the disk holds live past our encoding is cleared too.
        let hl = header.header_length as usize;
        let cur_name_end = match be64(&cur, 8) as usize {
            0 => 0,
            off => off + be32(&cur, 16) as usize,
        };
        let span = new
            .len()
            .max(end_marker(&cur, hl).map_or(0, |e| e + 8))
            .max(cur_name_end)
            .min(cur.len());
        let mut want = new;
        want.resize(span, 0);
        cur.truncate(span);

        // 1. Autoclear bits that go away.
        if header.version == 3 {
            let now = be64(&cur, 88);
            if now & !autoclear != 0 {
                let mut step = cur.clone();
                step[88..96].copy_from_slice(&(now & autoclear).to_be_bytes());
                self.write_diff(&mut cur, &step, 88..96)?;
            }
        }
        // 2. A backing file name that moves.
        let name_len = self.backing_name.len();
        let name_at = header.backing_file_offset as usize;
        if name_len > 0 && be64(&cur, 8) != header.backing_file_offset {
            self.write_diff(&mut cur, &want, name_at..name_at + name_len)?;
            self.write_diff(&mut cur, &want, 8..16)?;
        }
        // 3. The extension area.
        if let Some((first, last)) = diff_range(&cur, &want, hl..span) {
            let at = first & !7;
            if first / 512 == last / 512 {
                self.write_diff(&mut cur, &want, first..last + 1)?;
            } else if end_marker(&cur, hl) == Some(at) {
                self.write_diff(&mut cur, &want, at + 8..span)?;
                self.write_diff(&mut cur, &want, at..at + 8)?;
            } else if end_marker(&want, hl) == Some(at) {
                self.write_diff(&mut cur, &want, at..at + 8)?;
                self.write_diff(&mut cur, &want, at + 8..span)?;
            } else {
                self.write_diff(&mut cur, &want, hl..span)?;
            }
        }
        // 4. The rest of the header.
        self.write_diff(&mut cur, &want, 0..hl)?;
        self.header = header;
        self.extensions = extensions;
        Ok(())
    }

    /// Writes the bytes of `want` in `range` that differ from `cur` (as one
    /// write from the first to the last) and flushes; `cur` follows.
    fn write_diff(&self, cur: &mut [u8], want: &[u8], range: std::ops::Range<usize>) -> Result<()> {
        if let Some((first, last)) = diff_range(cur, want, range) {
            self.storage
                .write_at(&want[first..=last], first as u64)
                .map_err(|e| Error::io(format!("writing the header at {first:#x}"), e))?;
            self.flush_storage()?;
            cur[first..=last].copy_from_slice(&want[first..=last]);
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters (refcounts written, not flushed).
    fn allocate(&mut self, n: u64) -> Result<u64> {
        let alloc = self
            .alloc
            .as_mut()
            .ok_or_else(|| Error::ReadOnly("image is opened read-only".into()))?;
        let result = alloc.allocate(self.storage.as_ref(), n);
        if result.is_err() {
            self.reload_allocator();
        }
        result
    }

    /// After a failed refcount update the cached blocks and table may say
    /// more than the disk does (a block the table on disk does not name, a
    /// refcount never written): forget them and read the truth again.
    /// Best effort: if that fails too, the cache stays as it is.
    pub(super) fn reload_allocator(&mut self) {
        if self.alloc.is_none() {
            return;
        }
        let mut fields = [0u8; 12];
        if self.storage.read_at(&mut fields, 48).is_err() {
            return;
        }
        let offset = be64(&fields, 0);
        let clusters = be32(&fields, 8);
        if let Ok(a) = Allocator::load(
            self.storage.as_ref(),
            self.header.cluster_bits,
            self.header.refcount_order,
            offset,
            clusters,
        ) {
            self.alloc = Some(a);
        }
    }
}

/// Removes the bitmaps extension when it is the last one. One followed by
/// others stays in place, stale (autoclear bit 0 clear): removing it would
/// shift the others, a rewrite a crash could tear.
pub(crate) fn drop_bitmaps_extension(exts: &mut Vec<Extension>) {
    if exts.last().is_some_and(|e| e.magic == extension::BITMAPS) {
        exts.pop();
    }
}

/// First and last index in `range` where `a` and `b` differ.
fn diff_range(a: &[u8], b: &[u8], range: std::ops::Range<usize>) -> Option<(usize, usize)> {
    let first = range.clone().find(|&i| a[i] != b[i])?;
    let last = range.rev().find(|&i| a[i] != b[i])?;
    Some((first, last))
}

/// Offset of the extension list's end marker in `c0`, if the list is intact.
fn end_marker(c0: &[u8], start: usize) -> Option<usize> {
    let mut at = start;
    while at + 8 <= c0.len() {
        if be32(c0, at) == extension::END {
            return Some(at);
        }
        at = at.checked_add(8 + (be32(c0, at + 4) as usize).next_multiple_of(8))?;
    }
    None
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

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
