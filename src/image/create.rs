//! Creating a new, empty qcow2 v3 image.

use super::allocator::Allocator;
use super::lock;
use super::{Image, OpenOptions};
use crate::error::{Error, Result};
use crate::format::extension;
use crate::format::header::{self, Header};
use crate::format::l2::COPIED;
use crate::format::refcount;
use crate::storage::{FileStorage, Storage};
use std::path::{Path, PathBuf};

/// QEMU refuses L1 tables bigger than this.
const MAX_L1_BYTES: u64 = 32 << 20;

/// What `Image::create` makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual disk size in bytes; rounded up to a multiple of 512 as
    /// qemu-img does (QEMU reads sizes in 512-byte sectors). With a data
    /// file, 0 means the data file's size.
    pub size: u64,
    /// 512 B ..= 2 MiB, a power of two.
    pub cluster_size: u64,
    /// 1, 2, 4, 8, 16, 32 or 64.
    pub refcount_bits: u32,
    /// An existing raw file holding the guest data: the image becomes its
    /// metadata companion (external data file, data-file-raw), as
    /// `qemu-img create -o data_file=RAW,data_file_raw=on` makes it. The
    /// name is stored as given; QEMU resolves a relative one against its
    /// working directory, so give an absolute path. The file is never written.
    pub data_file: Option<PathBuf>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            data_file: None,
        }
    }
}

impl CreateOptions {
    fn validate(&self) -> Result<(u32, u32, u32)> {
        let cs = self.cluster_size;
        let min = 1u64 << header::MIN_CLUSTER_BITS;
        let max = 1u64 << header::MAX_CLUSTER_BITS;
        if !cs.is_power_of_two() || !(min..=max).contains(&cs) {
            return Err(Error::InvalidArgument(format!(
                "cluster size {cs} must be a power of two from {min} to {max}"
            )));
        }
        let rb = self.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return Err(Error::InvalidArgument(format!(
                "refcount bits {rb} must be 1, 2, 4, 8, 16, 32 or 64"
            )));
        }
        let cluster_bits = cs.trailing_zeros();
        let l2_span = cs * (cs / 8);
        let l1_entries = self.size.div_ceil(l2_span);
        if l1_entries * 8 > MAX_L1_BYTES || self.size > i64::MAX as u64 - 511 {
            return Err(Error::InvalidArgument(format!(
                "a {}-byte disk is too big for cluster size {cs} (the L1 table would exceed {MAX_L1_BYTES} bytes)",
                self.size
            )));
        }
        Ok((cluster_bits, rb.trailing_zeros(), l1_entries as u32))
    }
}

impl Image {
    /// Creates a new image at `path` (which must not exist) and opens it
    /// read-write.
    pub fn create(path: impl AsRef<Path>, options: &CreateOptions) -> Result<Image> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let options = &with_data_file_size(options).map_err(|e| e.context(&name))?;
        options.validate().map_err(|e| e.context(&name))?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(format!("{name}: cannot create"), e))?;
        let storage = FileStorage::new(file);
        let formatted = lock::lock(storage.file(), true, &name).and_then(|guard| {
            format(&storage, options)
                .map(|_| guard)
                .map_err(|e| e.context(&name))
        });
        let guard = match formatted {
            Ok(guard) => guard,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        let mut locks = vec![guard];
        let storage = Box::new(storage);
        let opened = Image::open_storage_with(storage, &name, OpenOptions::read_write(), |st| {
            if let Some(guard) = super::lock_data_file(st, OpenOptions::read_write(), &name)? {
                locks.push(guard);
            }
            Ok(())
        });
        match opened {
            Ok(mut image) => {
                image._locks = locks;
                Ok(image)
            }
            Err(e) => {
                // E.g. a VM holds the data file: leave nothing behind.
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// Formats `storage` (which must be empty) and opens it read-write.
    pub fn create_storage(
        storage: Box<dyn Storage>,
        name: &str,
        options: &CreateOptions,
    ) -> Result<Image> {
        format(storage.as_ref(), options).map_err(|e| e.context(name))?;
        Image::open_storage(storage, name, OpenOptions::read_write())
    }
}

/// Checks the data file (it must exist, be a regular file or block device
/// and hold the whole virtual size) and fills in the size when it is 0.
fn with_data_file_size(options: &CreateOptions) -> Result<CreateOptions> {
    let Some(data) = &options.data_file else {
        return Ok(options.clone());
    };
    let shown = data.display();
    let meta = std::fs::metadata(data)
        .map_err(|e| Error::io(format!("data file {shown}: cannot open"), e))?;
    use std::os::unix::fs::FileTypeExt;
    let len = if meta.is_file() {
        meta.len()
    } else if meta.file_type().is_block_device() {
        std::fs::File::open(data)
            .and_then(|f| FileStorage::new(f).len())
            .map_err(|e| Error::io(format!("data file {shown}: cannot read its size"), e))?
    } else {
        return Err(Error::InvalidArgument(format!(
            "data file {shown} is not a regular file or block device"
        )));
    };
    // QEMU sizes are whole sectors: a raw file's odd tail is not guest data.
    let size = if options.size == 0 {
        len / 512 * 512
    } else {
        options.size
    };
    if size == 0 || len < size.next_multiple_of(512) {
        return Err(Error::InvalidArgument(format!(
            "data file {shown} is {len} bytes, smaller than the virtual size {}",
            size.next_multiple_of(512)
        )));
    }
    Ok(CreateOptions {
        size,
        ..options.clone()
    })
}

/// Writes the smallest valid image: header, a one-cluster refcount table and
/// one refcount block at clusters 0-2, then the L1 table through the allocator
/// (and, for a raw data file, L2 tables mapping every cluster to itself).
fn format(storage: &dyn Storage, options: &CreateOptions) -> Result<()> {
    let (cluster_bits, refcount_order, l1_size) = options.validate()?;
    let cs = 1u64 << cluster_bits;
    let io = |what: &'static str| move |e| Error::io(what, e);
    let mut header = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: options.size.next_multiple_of(512),
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order,
        header_length: 112,
        compression_type: 0,
        unknown_tail: vec![0; 7],
    };
    let mut extensions = Vec::new();
    if let Some(data) = &options.data_file {
        use std::os::unix::ffi::OsStrExt;
        header.incompatible_features |= header::INCOMPAT_DATA_FILE;
        header.autoclear_features |= header::AUTOCLEAR_DATA_FILE_RAW;
        extensions.push(extension::Extension {
            magic: extension::DATA_FILE,
            data: data.as_os_str().as_bytes().to_vec(),
        });
    }
    let mut cluster0 = header.encode();
    cluster0.extend(extension::encode_all(&extensions));
    if cluster0.len() as u64 > cs {
        return Err(Error::InvalidArgument(format!(
            "the data file name is too long to fit in cluster 0 ({cs} bytes)"
        )));
    }
    cluster0.resize(cs as usize, 0);
    let mut table = vec![0u8; cs as usize];
    table[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    let mut block = vec![0u8; cs as usize];
    for c in 0..3 {
        refcount::set(&mut block, refcount_order, c, 1);
    }
    let mut image = cluster0;
    image.extend(table);
    image.extend(block);
    storage
        .write_at(&image, 0)
        .map_err(io("writing the new image"))?;

    if l1_size > 0 {
        let mut alloc = Allocator::load(storage, cluster_bits, refcount_order, cs, 1)?;
        let l1_bytes = u64::from(l1_size) * 8;
        let clusters = l1_bytes.div_ceil(cs);
        let l1 = alloc.allocate(storage, clusters)?;
        storage
            .write_at(&vec![0u8; (clusters * cs) as usize], l1)
            .map_err(io("writing the L1 table"))?;
        if options.data_file.is_some() {
            map_data_file(storage, &mut alloc, cluster_bits, header.size, l1)?;
        }
        header.l1_size = l1_size;
        header.l1_table_offset = l1;
        header.refcount_table_offset = alloc.table_offset();
        header.refcount_table_clusters = alloc.table_clusters();
        storage
            .write_at(&header.encode(), 0)
            .map_err(io("writing the header"))?;
    }
    storage.flush().map_err(io("flushing the new image"))
}

/// Points every guest cluster at the same offset of the raw data file, as
/// data-file-raw requires (QEMU's own create does the same): L2 tables in one
/// contiguous run, written a piece at a time, then the L1 entries.
fn map_data_file(
    storage: &dyn Storage,
    alloc: &mut Allocator,
    cluster_bits: u32,
    size: u64,
    l1: u64,
) -> Result<()> {
    const PIECE: u64 = 8 << 20;
    let cs = 1u64 << cluster_bits;
    let per_l2 = cs / 8;
    let guest_clusters = size.div_ceil(cs);
    let tables = guest_clusters.div_ceil(per_l2);
    let first = alloc.allocate(storage, tables)?;
    let total = tables * cs;
    let mut written = 0;
    while written < total {
        let n = PIECE.min(total - written);
        let mut buf = vec![0u8; n as usize];
        for (i, entry) in buf.chunks_exact_mut(8).enumerate() {
            let guest = (written / 8) + i as u64;
            if guest < guest_clusters {
                entry.copy_from_slice(&((guest << cluster_bits) | COPIED).to_be_bytes());
            }
        }
        storage
            .write_at(&buf, first + written)
            .map_err(|e| Error::io("writing the L2 tables of the data file", e))?;
        written += n;
    }
    let l1_entries: Vec<u8> = (0..tables)
        .flat_map(|t| ((first + t * cs) | COPIED).to_be_bytes())
        .collect();
    storage
        .write_at(&l1_entries, l1)
        .map_err(|e| Error::io("writing the L1 table", e))
}
