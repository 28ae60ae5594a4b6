//! What a crash or an I/O error may leave on disk, and the one function
//! that judges such an image.
#![allow(dead_code)]

use super::qemu_img_check_raw;
use qbm::image::{Image, OpenOptions};
use qbm::storage::MemoryStorage;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// One bitmap as a reader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapState {
    pub granularity: u64,
    pub enabled: bool,
    /// Flagged inconsistent; `extents` is then empty.
    pub in_use: bool,
    pub extents: Vec<(u64, u64)>,
}

/// Every bitmap of an image by name.
pub type Snapshot = BTreeMap<String, BitmapState>;

/// The bitmaps of an open image; panics on one that is neither usable nor
/// in_use (a snapshot describes a state a test expects).
pub fn snapshot_of(img: &Image) -> Snapshot {
    img.bitmaps()
        .unwrap()
        .into_iter()
        .map(|b| {
            assert!(
                b.usable || b.in_use,
                "bitmap '{}' is not usable: {b:?}",
                b.name
            );
            let extents = match b.in_use {
                true => Vec::new(),
                false => img.extents(&b.name).unwrap().collect(),
            };
            (
                b.name,
                BitmapState {
                    granularity: b.granularity,
                    enabled: b.enabled,
                    in_use: b.in_use,
                    extents,
                },
            )
        })
        .collect()
}

/// The snapshot of an image held in `bytes`, opened read-only by us.
pub fn snapshot_of_bytes(bytes: &[u8]) -> Snapshot {
    let img = Image::open_storage(
        Box::new(MemoryStorage::new(bytes.to_vec())),
        "snapshot",
        OpenOptions::read_only(),
    )
    .unwrap_or_else(|e| panic!("cannot open the image to snapshot it: {e}"));
    snapshot_of(&img)
}

/// What a cut image may show.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    /// The states the bitmaps may be in: old, new, any durable state between.
    pub states: Vec<Snapshot>,
    /// The backing file name every state has.
    pub backing_file: Option<String>,
}

/// What one checked image showed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Verdict {
    /// Clusters `qemu-img check` counts as leaked.
    pub leaks: u64,
    /// Bitmaps found flagged in_use.
    pub in_use: usize,
}

/// Judges a disk image a crash (or a failed write) left behind against what
/// it may show; `scratch` is a file path the image may be written to.
/// Panics, naming `ctx`, unless:
/// - our read-only open succeeds, with the backing file name unchanged;
/// - the set of bitmap names is that of one of `states`;
/// - each bitmap is flagged in_use (with a name and flags some state has),
///   or has exactly the granularity, flags and dirty extents some state
///   gives its name;
/// - `qemu-img check` finds no corruption and no check error (leaks are
///   counted and returned).
pub fn verify_cut_image(image: &[u8], expected: &Expected, scratch: &Path, ctx: &str) -> Verdict {
    let states = &expected.states;
    let mut verdict = Verdict::default();
    let img = Image::open_storage(
        Box::new(MemoryStorage::new(image.to_vec())),
        "cut",
        OpenOptions::read_only(),
    )
    .unwrap_or_else(|e| panic!("{ctx}: our read-only open failed: {e}"));
    assert_eq!(
        img.info().unwrap().backing_file,
        expected.backing_file,
        "{ctx}: backing file name"
    );
    let infos = img.bitmaps().unwrap();
    let names: BTreeSet<&str> = infos.iter().map(|b| b.name.as_str()).collect();
    assert!(
        states
            .iter()
            .any(|s| s.keys().map(String::as_str).collect::<BTreeSet<_>>() == names),
        "{ctx}: bitmap names {names:?} match no expected state {:?}",
        states
            .iter()
            .map(|s| s.keys().collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    for b in &infos {
        let candidates: Vec<&BitmapState> = states.iter().filter_map(|s| s.get(&b.name)).collect();
        if b.in_use {
            verdict.in_use += 1;
            assert!(
                candidates
                    .iter()
                    .any(|c| c.granularity == b.granularity && c.enabled == b.enabled),
                "{ctx}: in_use bitmap '{}' (granularity {}, enabled {}) has flags no state has",
                b.name,
                b.granularity,
                b.enabled
            );
            continue;
        }
        assert!(b.usable, "{ctx}: bitmap '{}' is not usable: {b:?}", b.name);
        let got = BitmapState {
            granularity: b.granularity,
            enabled: b.enabled,
            in_use: false,
            extents: img.extents(&b.name).unwrap().collect(),
        };
        assert!(
            candidates.contains(&&got),
            "{ctx}: bitmap '{}' is presented as consistent with content no state has:\n got {}\n want one of {}",
            b.name,
            short(&got),
            candidates.iter().map(|c| short(c)).collect::<Vec<_>>().join("\n  or ")
        );
    }
    drop(img);

    // Our check over the same bytes must find what qemu-img finds: no
    // corruption, and the same number of leaked clusters.
    let ours = qbm::image::check_storage(&qbm::storage::MemoryStorage::new(image.to_vec()))
        .unwrap_or_else(|e| panic!("{ctx}: our check could not run: {e}"));
    std::fs::write(scratch, image).expect("write the cut image");
    let c = qemu_img_check_raw(scratch);
    assert!(
        c.corruptions == 0 && c.check_errors == 0,
        "{ctx}: qemu-img check: {} corruptions, {} check errors\n{}",
        c.corruptions,
        c.check_errors,
        c.raw
    );
    assert!(
        ours.is_consistent() && ours.leaks == c.leaks,
        "{ctx}: our check says {} corruptions, {} leaks, {} check errors ({:?}); qemu-img {} leaks",
        ours.corruptions,
        ours.leaks,
        ours.check_errors,
        ours.messages,
        c.leaks
    );
    verdict.leaks = c.leaks;
    verdict
}

fn short(s: &BitmapState) -> String {
    let n = s.extents.len();
    let head: Vec<_> = s.extents.iter().take(4).collect();
    format!(
        "granularity {} enabled {} in_use {} {n} extents {head:?}{}",
        s.granularity,
        s.enabled,
        s.in_use,
        if n > 4 { " ..." } else { "" }
    )
}
