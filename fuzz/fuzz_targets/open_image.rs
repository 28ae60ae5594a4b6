//! Opens arbitrary bytes as a qcow2 image held in memory, walks every read
//! path, then opens a fresh copy read-write, changes it, and checks that what
//! the library wrote still opens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qbm::image::{Image, OpenOptions};
use qbm::storage::MemoryStorage;
use std::sync::Arc;

/// Bigger inputs only slow the fuzzer down; seeds are a few hundred KiB.
const MAX_INPUT: usize = 1 << 20;

fn open(bytes: Vec<u8>, options: OpenOptions) -> qbm::Result<Image> {
    Image::open_storage(Box::new(MemoryStorage::new(bytes)), "fuzz", options)
}

fn read_everything(img: &Image) {
    let _ = img.info();
    let Ok(bitmaps) = img.bitmaps() else { return };
    for b in &bitmaps {
        let _ = img.dirty_bytes(&b.name);
        if let Ok(extents) = img.extents(&b.name) {
            // Extents are ordered, disjoint and inside the disk.
            let mut end = 0;
            for (off, len) in extents {
                assert!(off >= end && len > 0, "extents out of order");
                end = off.checked_add(len).expect("extent overflows");
                assert!(end <= img.size(), "extent past the end of the disk");
            }
        }
        let _ = img.next_extent(&b.name, 0);
        let _ = img.next_extent(&b.name, img.size() / 2);
        let _ = img.next_extent(&b.name, u64::MAX);
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    if let Ok(img) = open(data.to_vec(), OpenOptions::read_only()) {
        read_everything(&img);
        let _ = img.close();
    }

    // open_storage owns its storage; share it to read the bytes back after close.
    let mem = Arc::new(MemoryStorage::new(data.to_vec()));
    let Ok(img) = Image::open_storage(
        Box::new(mem.clone()),
        "fuzz",
        OpenOptions::read_write(),
    ) else {
        return;
    };
    read_everything(&img);
    let size = img.size();
    let names: Vec<String> = img
        .bitmaps()
        .map(|v| v.into_iter().map(|b| b.name).collect())
        .unwrap_or_default();
    // At most ~1M bits: a bitmap of hundreds of MiB on a huge disk is
    // legitimate but makes each run take seconds of linear work.
    let granularity = (size >> 20).next_power_of_two().clamp(65536, 1 << 31);
    if size / granularity <= 1 << 21 {
        let _ = img.add_bitmap("fuzz-added", Some(granularity), true);
    }
    let _ = img.mark_dirty(0, size.min(4096));
    for b in img.bitmaps().unwrap_or_default() {
        let _ = img.set_range(&b.name, size / 3, size.min(1 << 20) / 2);
        // The second granule: aligned, so the reset is accepted.
        let g = b.granularity;
        if g < size {
            let _ = img.reset_range(&b.name, g, g.min(size - g));
        }
    }
    if let Some(first) = names.first() {
        let _ = img.clear_bitmap(first);
    }
    let flushed = img.flush();
    let closed = img.close();
    let after = mem.contents();
    if flushed.is_ok() && closed.is_ok() {
        // An image we accepted for writing and wrote must stay openable.
        match open(after, OpenOptions::read_only()) {
            Ok(img) => read_everything(&img),
            Err(e) => panic!("image written by libqbm no longer opens: {e}"),
        }
    }
});

