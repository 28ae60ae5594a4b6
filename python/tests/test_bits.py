"""Dirty bits: set_range, reset_range, mark_dirty, dirty_bytes, extents, and
their persistence."""

from __future__ import annotations

import errno
import threading

import pytest

import qbm
from conftest import DISK, MiB, Images


def test_one_byte_mark_rounds_to_the_granule(img: qbm.Image) -> None:
    img.add_bitmap("b0", granularity=65536)
    img.mark_dirty(70000, 1)
    assert list(img.extents("b0")) == [(65536, 65536)]
    assert img.dirty_bytes("b0") == 65536
    assert img.bitmap("b0").dirty_bytes == 65536


def test_mark_dirty_many_marks_what_single_marks_mark(img: qbm.Image, images: Images) -> None:
    img.add_bitmap("b0", granularity=65536)
    img.add_bitmap("b4", granularity=4096)
    batch = [(0, 4096), (3 * MiB + 100, 70000), (5 * MiB, 0), (DISK - 1, 1), (8192, 4096)]
    img.mark_dirty_many(batch)
    other = images.create(name="single.qcow2")
    other.add_bitmap("b0", granularity=65536)
    other.add_bitmap("b4", granularity=4096)
    for off, length in batch:
        other.mark_dirty(off, length)
    for name in ("b0", "b4"):
        assert list(img.extents(name)) == list(other.extents(name)), name
    assert list(img.extents("b0"))[0] == (0, 65536)
    assert list(img.extents("b4"))[:2] == [(0, 4096), (8192, 4096)]


def test_mark_dirty_many_with_a_bad_range_marks_nothing(img: qbm.Image) -> None:
    img.add_bitmap("b0", granularity=65536)
    with pytest.raises(qbm.InvalidArgument, match="range 1 of 2"):
        img.mark_dirty_many([(0, 4096), (DISK, 1)])
    with pytest.raises(TypeError, match="range 0"):
        img.mark_dirty_many([(1, 2, 3)])  # type: ignore[list-item]
    assert list(img.extents("b0")) == []
    img.mark_dirty_many([])
    assert list(img.extents("b0")) == []


def test_next_extent_returns_none_after_the_last_run(img: qbm.Image) -> None:
    """qbm_bitmap_next_extent returns 0 (no run) past the last dirty run; it
    never reports a run of length 0."""
    img.add_bitmap("b0", granularity=65536)
    img.mark_dirty(70000, 1)
    assert img.next_extent("b0") == (65536, 65536)
    assert img.next_extent("b0", 131072) is None
    assert img.next_extent("b0", 200000) is None
    assert img.next_extent("b0", DISK - 1) is None


def test_next_extent_never_returns_an_empty_run(img: qbm.Image) -> None:
    img.add_bitmap("b", granularity=512)
    for off in (0, 1024, 4096, 40960):
        img.set_range("b", off, 512)
    for start in range(0, 65536, 512):
        ext = img.next_extent("b", start)
        if ext is not None:
            assert ext[1] > 0, f"empty run {ext} from {start}"
            assert ext[0] >= start


def test_raw_next_extent_contract(img: qbm.Image) -> None:
    """The C call itself: 1 and the run, then 0 when there is none."""
    import ctypes

    img.add_bitmap("b0")
    img.set_range("b0", 1 << 20, 1)
    s, n = ctypes.c_uint64(), ctypes.c_uint64()
    h = img._handle()
    assert qbm.lib.qbm_bitmap_next_extent(h, b"b0", 0, ctypes.byref(s), ctypes.byref(n)) == 1
    assert (s.value, n.value) == (1 << 20, 65536)
    assert qbm.lib.qbm_bitmap_next_extent(h, b"b0", (1 << 20) + 65536, ctypes.byref(s), ctypes.byref(n)) == 0
    assert qbm.lib.qbm_bitmap_next_extent(h, b"zz", 0, ctypes.byref(s), ctypes.byref(n)) == -errno.ENOENT
    assert qbm.lib.qbm_bitmap_next_extent(h, None, 0, ctypes.byref(s), ctypes.byref(n)) == -errno.EINVAL
    assert qbm.lib.qbm_bitmap_next_extent(h, b"b0", 0, None, None) == -errno.EINVAL
    assert qbm.last_error()


def test_extents_iterator(img: qbm.Image) -> None:
    img.add_bitmap("b", granularity=4096)
    img.set_range("b", 0, 1)
    img.set_range("b", 4096, 4096)  # joins the first run
    img.set_range("b", 1 * MiB + 100, 10000)  # 1 MiB .. 1 MiB + 12 KiB
    img.set_range("b", DISK - 1, 1)  # the last granule
    it = img.extents("b")
    assert iter(it) is it
    assert list(it) == [(0, 8192), (1 * MiB, 12288), (DISK - 4096, 4096)]
    assert img.dirty_bytes("b") == 8192 + 12288 + 4096


def test_extents_from_a_start(img: qbm.Image) -> None:
    img.add_bitmap("b", granularity=4096)
    img.set_range("b", 0, 8192)
    img.set_range("b", 1 * MiB, 4096)
    img.set_range("b", 2 * MiB, 4096)
    assert list(img.extents("b", start=8192)) == [(1 * MiB, 4096), (2 * MiB, 4096)]
    assert list(img.extents("b", start=1 * MiB + 4096)) == [(2 * MiB, 4096)]
    assert list(img.extents("b", start=2 * MiB + 4096)) == []
    assert list(img.extents("b", start=DISK)) == []
    # A start inside a run: the run is reported from the start on.
    assert list(img.extents("b", start=4096)) == [(4096, 4096), (1 * MiB, 4096), (2 * MiB, 4096)]


def test_extents_checks_the_bitmap_at_once(img: qbm.Image) -> None:
    with pytest.raises(qbm.BitmapNotFound):
        img.extents("nope")  # no next() needed
    with pytest.raises(qbm.InvalidArgument):
        img.extents("nope", start=-1)


def test_extents_of_an_empty_bitmap(img: qbm.Image) -> None:
    img.add_bitmap("b")
    assert list(img.extents("b")) == []
    assert img.next_extent("b") is None
    assert img.dirty_bytes("b") == 0


def test_whole_disk_dirty(img: qbm.Image) -> None:
    img.add_bitmap("b")
    img.mark_dirty(0, DISK)
    assert list(img.extents("b")) == [(0, DISK)]
    assert img.dirty_bytes("b") == DISK


def test_last_granule_is_clamped_to_the_disk_size(images: Images) -> None:
    # Sizes are kept in 512-byte sectors (rounded up as qemu-img does).
    img = images.create(10 * 65536 + 1000)
    size = 10 * 65536 + 1024
    assert img.info().virtual_size == size
    img.add_bitmap("b", granularity=65536)
    img.mark_dirty(size - 1, 1)
    assert list(img.extents("b")) == [(10 * 65536, 1024)]
    assert img.dirty_bytes("b") == 1024
    # Resetting up to the end of the disk is allowed even though unaligned.
    img.reset_range("b", 10 * 65536, 1024)
    assert list(img.extents("b")) == []


def test_set_range_marks_only_that_bitmap(img: qbm.Image) -> None:
    img.add_bitmap("a")
    img.add_bitmap("b", enabled=False)
    img.set_range("b", 5 * MiB, 1)
    assert img.dirty_bytes("a") == 0
    assert list(img.extents("b")) == [(5 * MiB, 65536)]  # disabled bitmaps can be set directly


def test_set_range_zero_length_is_a_no_op(img: qbm.Image) -> None:
    img.add_bitmap("b")
    img.set_range("b", 4096, 0)
    img.mark_dirty(4096, 0)
    assert img.dirty_bytes("b") == 0


@pytest.mark.parametrize("offset,length", [(DISK, 1), (DISK - 1, 2), (0, DISK + 1), (2**64 - 1, 1)])
def test_ranges_past_the_end_raise_invalid_argument(img: qbm.Image, offset: int, length: int) -> None:
    img.add_bitmap("b")
    for call in (
        lambda: img.set_range("b", offset, length),
        lambda: img.mark_dirty(offset, length),
    ):
        with pytest.raises(qbm.InvalidArgument) as ei:
            call()
        assert ei.value.errno == errno.EINVAL
        assert str(offset) in str(ei.value)
    assert img.dirty_bytes("b") == 0


@pytest.mark.parametrize("offset,length", [(-1, 1), (0, -1), (2**64, 1), (0, 2**64)])
def test_out_of_range_integers_are_rejected_before_c(img: qbm.Image, offset: int, length: int) -> None:
    img.add_bitmap("b")
    for call in (
        lambda: img.set_range("b", offset, length),
        lambda: img.reset_range("b", offset, length),
        lambda: img.mark_dirty(offset, length),
    ):
        with pytest.raises(qbm.InvalidArgument):
            call()
    assert img.dirty_bytes("b") == 0


def test_reset_range(images: Images) -> None:
    img = images.create()
    img.add_bitmap("b", granularity=65536)
    img.mark_dirty(0, 4 * MiB)
    img.reset_range("b", 1 * MiB, 65536)
    img.reset_range("b", 3 * MiB, 1 * MiB)
    assert list(img.extents("b")) == [(0, 1 * MiB), (1 * MiB + 65536, 2 * MiB - 65536)]
    img.reset_range("b", 0, 0)  # empty: nothing happens
    img = images.reopen(img)
    assert list(img.extents("b")) == [(0, 1 * MiB), (1 * MiB + 65536, 2 * MiB - 65536)]


@pytest.mark.parametrize("offset,length", [(100, 65536), (0, 100), (65536, 65537), (32768, 32768)])
def test_unaligned_reset_raises_invalid_argument(img: qbm.Image, offset: int, length: int) -> None:
    img.add_bitmap("b", granularity=65536)
    img.mark_dirty(0, 1 * MiB)
    with pytest.raises(qbm.InvalidArgument) as ei:
        img.reset_range("b", offset, length)
    assert ei.value.errno == errno.EINVAL
    assert "'b'" in str(ei.value)
    assert img.dirty_bytes("b") == 1 * MiB


def test_reset_past_the_end_raises_invalid_argument(img: qbm.Image) -> None:
    img.add_bitmap("b")
    with pytest.raises(qbm.InvalidArgument):
        img.reset_range("b", DISK, 65536)


def test_mark_dirty_marks_every_enabled_bitmap(img: qbm.Image) -> None:
    img.add_bitmap("g4k", granularity=4096)
    img.add_bitmap("g64k", granularity=65536)
    img.add_bitmap("g1m", granularity=1 * MiB)
    img.add_bitmap("off", enabled=False)
    img.mark_dirty(1 * MiB + 5000, 100)
    assert list(img.extents("g4k")) == [(1 * MiB + 4096, 4096)]
    assert list(img.extents("g64k")) == [(1 * MiB, 65536)]
    assert list(img.extents("g1m")) == [(1 * MiB, 1 * MiB)]
    assert list(img.extents("off")) == []


def test_mark_dirty_without_bitmaps_is_fine(img: qbm.Image) -> None:
    img.mark_dirty(0, 4096)


def test_mark_dirty_from_many_threads(img: qbm.Image) -> None:
    img.add_bitmap("b", granularity=4096)
    errors: list = []

    def writer(k: int) -> None:
        try:
            for i in range(k, 1024, 8):
                img.mark_dirty(i * 8192, 1)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert img.dirty_bytes("b") == 1024 * 4096
    ext = list(img.extents("b"))
    assert ext == [(i * 8192, 4096) for i in range(1024)]


def test_persistence_across_close_and_reopen(images: Images) -> None:
    img = images.create()
    img.add_bitmap("b0", granularity=65536)
    img.add_bitmap("b1", granularity=512)
    img.mark_dirty(70000, 1)
    img.set_range("b1", 10 * MiB + 3, 1000)
    img.mark_dirty(DISK - 512, 512)
    want0 = [(65536, 65536), (DISK - 65536, 65536)]
    want1 = [(69632, 512), (10 * MiB, 1024), (DISK - 512, 512)]
    assert list(img.extents("b0")) == want0
    assert list(img.extents("b1")) == want1
    img = images.reopen(img, writable=True)
    assert list(img.extents("b0")) == want0
    assert list(img.extents("b1")) == want1
    assert img.dirty_bytes("b1") == 2048
    # More changes in a second session are stored too.
    img.mark_dirty(0, 1)
    img.reset_range("b1", 10 * MiB, 1024)
    img = images.reopen(img)
    assert list(img.extents("b0")) == [(0, 131072), (DISK - 65536, 65536)]
    assert list(img.extents("b1")) == [(0, 512), (69632, 512), (DISK - 512, 512)]
    assert [b.in_use for b in img.bitmaps()] == [False, False]


def test_dirty_bytes_sparse_pattern(img: qbm.Image) -> None:
    img.add_bitmap("b", granularity=512)
    for i in range(0, 1000, 3):
        img.set_range("b", i * 4096, 512)
    assert img.dirty_bytes("b") == len(range(0, 1000, 3)) * 512
    assert list(img.extents("b")) == [(i * 4096, 512) for i in range(0, 1000, 3)]
