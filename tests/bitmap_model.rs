//! Model test: `DirtyBitmap` against a naive `Vec<bool>` over random sizes,
//! granularities and operation sequences, in both layouts (sparse and flat)
//! and across switches from one to the other.

use proptest::collection::vec;
use proptest::prelude::*;
use qbm::bitmap::DirtyBitmap;
use std::ops::RangeInclusive;

/// Naive reference bitmap.
#[derive(Debug, Clone)]
struct Model {
    size: u64,
    gb: u32,
    bits: Vec<bool>,
}

impl Model {
    fn new(size: u64, gb: u32) -> Model {
        Model {
            size,
            gb,
            bits: vec![false; size.div_ceil(1 << gb) as usize],
        }
    }

    fn len(&self) -> u64 {
        self.bits.len() as u64
    }

    fn set_range(&mut self, first: u64, count: u64, value: bool) {
        let end = first.saturating_add(count).min(self.len());
        for k in first..end {
            self.bits[k as usize] = value;
        }
    }

    fn mark_bytes(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        for granule in (offset >> self.gb)..end.div_ceil(1 << self.gb) {
            self.bits[granule as usize] = true;
        }
    }

    fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut k = 0;
        while k < self.len() {
            if self.bits[k as usize] {
                let start = k;
                while k < self.len() && self.bits[k as usize] {
                    k += 1;
                }
                out.push((start, k - start));
            } else {
                k += 1;
            }
        }
        out
    }

    /// Expected `next_dirty_extent(from)`, given `self.runs()`.
    fn next_extent(&self, runs: &[(u64, u64)], from: u64) -> Option<(u64, u64)> {
        if from >= self.size {
            return None;
        }
        let (run, len) = next_run(runs, from >> self.gb)?;
        let start = (run << self.gb).max(from);
        let end = ((run + len) << self.gb).min(self.size);
        Some((start, end - start))
    }

    fn extents(&self) -> Vec<(u64, u64)> {
        self.runs()
            .into_iter()
            .map(|(s, l)| {
                let start = s << self.gb;
                (start, ((s + l) << self.gb).min(self.size) - start)
            })
            .collect()
    }

    /// LSB-first serialization, written out independently of the word layout.
    fn serialized(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.bits.len().div_ceil(8)];
        for (k, &b) in self.bits.iter().enumerate() {
            if b {
                out[k / 8] |= 1 << (k % 8);
            }
        }
        out
    }

    fn write_serialized(&mut self, byte_offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            let Some(pos) = byte_offset.checked_add(i as u64) else {
                break;
            };
            for j in 0..8 {
                let k = pos.saturating_mul(8).saturating_add(j);
                if byte >> j & 1 != 0 && k < self.len() {
                    self.bits[k as usize] = true;
                }
            }
        }
    }
}

/// Expected `next_set_run(from)`, given the model's runs.
fn next_run(runs: &[(u64, u64)], from: u64) -> Option<(u64, u64)> {
    let &(s, l) = runs.iter().find(|&&(s, l)| s + l > from)?;
    let start = s.max(from);
    Some((start, s + l - start))
}

#[derive(Debug, Clone)]
enum Op {
    Set(u64, u64),
    Reset(u64, u64),
    Mark(u64, u64),
    ClearAll,
    /// Merge from a bitmap with an optional different size / granularity,
    /// dirtied by the given byte ranges.
    Merge {
        size: Option<u64>,
        gb: Option<u32>,
        marks: Vec<(u64, u64)>,
    },
    WriteSerialized(u64, Vec<u8>),
    FillOnes(u64, u64),
    /// Replace the bitmap by a copy in the other layout (as a switch to
    /// flat, or a load that gives flat up, does).
    Relayout,
}

/// Positions mostly inside (or just past) `0..=n`, some at multiples of
/// `align` (block boundaries), sometimes extreme.
fn pos(n: u64, align: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0..=n + 70,
        2 => aligned(0..=n / align + 1, align),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

/// `k * align`, off by at most one.
fn aligned(k: RangeInclusive<u64>, align: u64) -> impl Strategy<Value = u64> {
    (k, -1i64..=1).prop_map(move |(k, d)| (k * align).saturating_add_signed(d))
}

fn len(n: u64, small: u64, align: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..=small,
        4 => 0..=n + 70,
        2 => aligned(1..=3, align),
        1 => Just(u64::MAX),
    ]
}

fn op(size: u64, gb: u32) -> impl Strategy<Value = Op> {
    let bits = size.div_ceil(1 << gb);
    let ser = bits.div_ceil(8);
    // One block (one summary bit) covers 1024 bits = 128 serialized bytes.
    let (block, block_bytes) = (1024, 128);
    let byte_range = move || (pos(size, block << gb), len(size, 3 << gb, block << gb));
    prop_oneof![
        4 => (pos(bits, block), len(bits, 130, block)).prop_map(|(f, c)| Op::Set(f, c)),
        3 => (pos(bits, block), len(bits, 130, block)).prop_map(|(f, c)| Op::Reset(f, c)),
        3 => byte_range().prop_map(|(o, l)| Op::Mark(o, l)),
        1 => Just(Op::ClearAll),
        2 => (
            prop_oneof![2 => Just(None), 1 => (0..=size * 2).prop_map(Some)],
            prop_oneof![1 => Just(None), 1 => (9..=16u32).prop_map(Some)],
            vec(byte_range(), 0..4),
        )
            .prop_map(|(size, gb, marks)| Op::Merge { size, gb, marks }),
        2 => (
            pos(ser, block_bytes),
            // Runs of repeated bytes (zero, full or mixed) up to ~1.2 KiB; cheaper
            // to generate than random bytes and closer to real bitmaps.
            vec((0..300usize, prop_oneof![Just(0u8), Just(0xff), any::<u8>()]), 0..5),
        )
            .prop_map(|(o, runs)| {
                let data = runs.into_iter().flat_map(|(n, b)| vec![b; n]);
                Op::WriteSerialized(o, data.collect())
            }),
        1 => (pos(ser, block_bytes), len(ser, 600, block_bytes))
            .prop_map(|(o, l)| Op::FillOnes(o, l)),
        1 => Just(Op::Relayout),
    ]
}

fn case() -> impl Strategy<Value = (u64, u32, Vec<Op>)> {
    (9..=16u32)
        .prop_flat_map(|gb| {
            let max = 9_000u64 << gb; // a bit under 9 blocks of bits
                                      // Past 64 blocks the summary spills into a second word.
            let big = 70_000u64 << gb;
            let size = prop_oneof![1 => Just(0u64), 1 => Just(1u64), 8 => 0..=max, 1 => 0..=big];
            (size, Just(gb))
        })
        .prop_flat_map(|(size, gb)| (Just(size), Just(gb), vec(op(size, gb), 1..12)))
}

fn apply(bm: &DirtyBitmap, model: &mut Model, op: &Op) {
    match op {
        Op::Set(f, c) => {
            let before = model.bits.clone();
            model.set_range(*f, *c, true);
            assert_eq!(bm.set_bits(*f, *c), before != model.bits, "set_bits result");
        }
        Op::Reset(f, c) => {
            bm.reset_bits(*f, *c);
            model.set_range(*f, *c, false);
        }
        Op::Mark(o, l) => {
            let before = model.bits.clone();
            model.mark_bytes(*o, *l);
            assert_eq!(
                bm.mark_bytes(*o, *l),
                before != model.bits,
                "mark_bytes result"
            );
        }
        Op::ClearAll => {
            bm.clear_all();
            model.bits.fill(false);
        }
        Op::Merge { size, gb, marks } => {
            let size = size.unwrap_or(model.size);
            let gb = gb.unwrap_or(model.gb);
            // A source in the layout the target is not in.
            let other = if bm.is_flat() {
                DirtyBitmap::new(size, gb).unwrap()
            } else {
                DirtyBitmap::new_flat(size, gb).unwrap()
            };
            let mut other_model = Model::new(size, gb);
            for &(o, l) in marks {
                other.mark_bytes(o, l);
                other_model.mark_bytes(o, l);
            }
            let before = model.bits.clone();
            for (s, l) in other_model.extents() {
                model.mark_bytes(s, l);
            }
            assert_eq!(bm.merge_from(&other), before != model.bits, "merge result");
            assert!(!bm.merge_from(bm));
        }
        Op::WriteSerialized(o, d) => {
            bm.write_serialized(*o, d);
            model.write_serialized(*o, d);
        }
        Op::FillOnes(o, l) => {
            bm.fill_serialized_ones(*o, *l);
            model.set_range(o.saturating_mul(8), l.saturating_mul(8), true);
        }
        Op::Relayout => unreachable!("handled by `run`"),
    }
}

/// A copy of `bm` in the other layout, made the way the image switches a
/// live bitmap: copy, then absorb what landed meanwhile.
fn relayout(bm: &DirtyBitmap) -> DirtyBitmap {
    let copy = if bm.is_flat() {
        DirtyBitmap::new(bm.size(), bm.granularity_bits()).unwrap()
    } else {
        bm.flat_copy().unwrap()
    };
    copy.absorb(bm);
    assert_ne!(copy.is_flat(), bm.is_flat());
    assert!(!copy.is_modified());
    copy
}

fn run(size: u64, gb: u32, flat: bool, ops: &[Op]) {
    let mut bm = if flat {
        DirtyBitmap::new_flat(size, gb).unwrap()
    } else {
        DirtyBitmap::new(size, gb).unwrap()
    };
    assert_eq!(bm.is_flat(), flat);
    let mut model = Model::new(size, gb);
    check(&bm, &model);
    for op in ops {
        match op {
            Op::Relayout => bm = relayout(&bm),
            op => apply(&bm, &mut model, op),
        }
        check(&bm, &model);
    }
}

fn check(bm: &DirtyBitmap, model: &Model) {
    assert_eq!(bm.bit_count(), model.len());
    assert_eq!(bm.serialized_len(), model.len().div_ceil(8));
    for (k, &b) in model.bits.iter().enumerate() {
        assert_eq!(bm.get_bit(k as u64), b, "bit {k}");
    }
    assert!(!bm.get_bit(model.len()));
    assert!(!bm.get_bit(u64::MAX));
    assert_eq!(
        bm.count_set_bits(),
        model.bits.iter().filter(|&&b| b).count() as u64
    );

    let runs = model.runs();
    let mut got = Vec::new();
    let mut from = 0;
    while let Some((s, l)) = bm.next_set_run(from) {
        got.push((s, l));
        from = s + l;
    }
    assert_eq!(got, runs);
    for &(s, l) in &runs {
        assert_eq!(bm.next_set_run(s + l / 2), next_run(&runs, s + l / 2));
        assert_eq!(bm.next_set_run(s + l), next_run(&runs, s + l));
    }

    let extents = model.extents();
    let mut got = Vec::new();
    let mut from = 0;
    while let Some((s, l)) = bm.next_dirty_extent(from) {
        got.push((s, l));
        from = s + l;
    }
    assert_eq!(got, extents);
    for &(s, l) in &extents {
        for from in [s + 1, s + l / 2, s + l, s + l + 1] {
            assert_eq!(bm.next_dirty_extent(from), model.next_extent(&runs, from));
        }
    }
    assert_eq!(bm.dirty_bytes(), extents.iter().map(|e| e.1).sum::<u64>());

    let expected = model.serialized();
    let mut buf = vec![0xaa; expected.len() + 9];
    bm.read_serialized(0, &mut buf);
    assert_eq!(&buf[..expected.len()], &expected[..]);
    assert!(buf[expected.len()..].iter().all(|&b| b == 0));
    if expected.len() > 3 {
        let mut buf = vec![0xaa; expected.len() - 2];
        bm.read_serialized(3, &mut buf);
        assert_eq!(&buf[..expected.len() - 3], &expected[3..]);
    }
    for start in (0..expected.len()).step_by(200) {
        let mut buf = vec![0xaa; 700];
        bm.read_serialized(start as u64, &mut buf);
        let end = (start + 700).min(expected.len());
        assert_eq!(&buf[..end - start], &expected[start..end]);
        assert!(buf[end - start..].iter().all(|&b| b == 0));
        for n in [1, 8, 200, 513] {
            let end = (start + n).min(expected.len());
            let clean = expected[start..end].iter().all(|&b| b == 0);
            assert_eq!(bm.serialized_range_is_clean(start as u64, n as u64), clean);
        }
    }
    assert!(bm.serialized_range_is_clean(expected.len() as u64, u64::MAX));

    // Round trip into a fresh bitmap.
    let copy = DirtyBitmap::new(model.size, model.gb).unwrap();
    copy.write_serialized(0, &expected);
    let mut again = vec![0; expected.len()];
    copy.read_serialized(0, &mut again);
    assert_eq!(again, expected);
    assert_eq!(copy.count_set_bits(), bm.count_set_bits());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn matches_model((size, gb, ops) in case()) {
        run(size, gb, false, &ops);
    }

    #[test]
    fn flat_matches_model((size, gb, ops) in case()) {
        run(size, gb, true, &ops);
    }

    /// Loading through `load_with` (straight into a flat arena, or through
    /// the buffer) and `finish_load` gives the stored bits, whichever
    /// layout it starts in and ends up in.
    #[test]
    fn load_matches_model(
        (size, gb, pieces) in case().prop_flat_map(|(size, gb, _)| {
            let ser = size.div_ceil(1 << gb).div_ceil(8);
            let piece = (
                0..=ser + 8,
                0usize..700,
                prop_oneof![Just(0u8), Just(0xff), any::<u8>()],
                any::<bool>(),
            );
            (Just(size), Just(gb), vec(piece, 0..6))
        }),
        present in prop_oneof![Just(0u64), Just(u64::MAX / 8), any::<u64>()],
    ) {
        let mut bm = DirtyBitmap::for_load(size, gb, present).unwrap();
        let mut model = Model::new(size, gb);
        let mut buf = Vec::new();
        for (offset, len, byte, fail) in pieces {
            let data = vec![byte; len];
            let r = bm.load_with(offset, len, &mut buf, |dst: &mut [u8]| {
                assert_eq!(dst.len(), len);
                dst.copy_from_slice(&data);
                if fail { Err(()) } else { Ok(()) }
            });
            if fail {
                // A failed read loads nothing.
                prop_assert!(r.is_err());
                continue;
            }
            model.write_serialized(offset, &data);
        }
        bm.finish_load();
        check(&bm, &model);
    }
}

#[test]
fn dense_loads_stay_flat_and_scattered_ones_do_not() {
    // 4 GiB at 512 B: 8 Mi bits, 1 MiB serialized, 256 flat pages.
    let (size, gb) = (4u64 << 30, 9);
    let ser = (size >> gb) / 8;
    let mut dense = DirtyBitmap::for_load(size, gb, ser).unwrap();
    assert!(dense.is_flat());
    let mut buf = Vec::new();
    for off in (0..ser).step_by(65536) {
        dense
            .load_with(off, 65536, &mut buf, |d: &mut [u8]| {
                d.fill(0x5a);
                Ok::<_, ()>(())
            })
            .unwrap();
    }
    dense.finish_load();
    assert!(dense.is_flat());
    assert_eq!(dense.count_set_bits(), (size >> gb) / 2);

    // Every stored cluster present, but one bit per 4 KiB page.
    let mut sparse = DirtyBitmap::for_load(size, gb, ser).unwrap();
    assert!(sparse.is_flat());
    for off in (0..ser).step_by(65536) {
        sparse
            .load_with(off, 65536, &mut buf, |d: &mut [u8]| {
                d.fill(0);
                for page in d.chunks_mut(4096) {
                    page[100] = 1;
                }
                Ok::<_, ()>(())
            })
            .unwrap();
    }
    sparse.finish_load();
    assert!(!sparse.is_flat());
    assert_eq!(sparse.count_set_bits(), ser / 4096);
    assert_eq!(sparse.allocated_block_bytes(), ser / 4096 * 128);
}

#[test]
fn serialized_bytes_are_lsb_first() {
    let bm = DirtyBitmap::new(1 << 20, 9).unwrap();
    bm.set_bits(0, 1);
    let mut buf = [0; 2];
    bm.read_serialized(0, &mut buf);
    assert_eq!(buf, [0x01, 0x00]);
    bm.set_bits(9, 1);
    bm.read_serialized(0, &mut buf);
    assert_eq!(buf, [0x01, 0x02]);
}

#[test]
fn fill_ones_keeps_tail_bits_clear() {
    // 11 bits: only the low 3 bits of the second byte are valid.
    let bm = DirtyBitmap::new(10 * 4096 + 1, 12).unwrap();
    bm.fill_serialized_ones(0, bm.serialized_len());
    let mut buf = [0; 3];
    bm.read_serialized(0, &mut buf);
    assert_eq!(buf, [0xff, 0x07, 0]);
    assert_eq!(bm.count_set_bits(), 11);
    assert_eq!(bm.dirty_bytes(), bm.size());
}
