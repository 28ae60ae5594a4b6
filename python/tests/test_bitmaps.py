"""Bitmap management: add, list, look up, remove, rename, enable, disable, clear."""

from __future__ import annotations

import errno

import pytest

import qbm
from conftest import DISK, GiB, Images


def names(img: qbm.Image) -> list:
    return [b.name for b in img.bitmaps()]


def test_add_and_list(img: qbm.Image) -> None:
    img.add_bitmap("b0")
    img.add_bitmap("b1", granularity=512)
    img.add_bitmap("b2", granularity=2 * GiB, enabled=False)
    assert img.bitmaps() == [
        qbm.BitmapInfo("b0", 65536, True, False, False, 0, 0),
        qbm.BitmapInfo("b1", 512, True, False, False, 0, 0),
        qbm.BitmapInfo("b2", 2 * GiB, False, False, False, 0, 0),
    ]
    assert img.bitmap_count() == 3
    assert img.info().bitmap_count == 3
    assert img.bitmap("b1").granularity == 512
    assert "b2" in img and "nope" not in img and 3 not in img


@pytest.mark.parametrize("cluster_size,expected", [(512, 4096), (4096, 4096), (65536, 65536), (2 << 20, 65536)])
def test_default_granularity_is_cluster_size_within_4k_64k(images: Images, cluster_size: int, expected: int) -> None:
    img = images.create(DISK, cluster_size=cluster_size)
    img.add_bitmap("b")
    assert img.bitmap("b").granularity == expected


def test_bitmap_info_is_a_frozen_dataclass(img: qbm.Image) -> None:
    img.add_bitmap("b0")
    b = img.bitmap("b0")
    with pytest.raises(Exception):
        b.name = "x"  # type: ignore[misc]
    assert hash(b) == hash(img.bitmap("b0"))


def test_add_persists(images: Images) -> None:
    img = images.create()
    img.add_bitmap("on")
    img.add_bitmap("off", granularity=4096, enabled=False)
    img = images.reopen(img)
    assert img.bitmaps() == [
        qbm.BitmapInfo("on", 65536, True, False, False, 0, 0),
        qbm.BitmapInfo("off", 4096, False, False, False, 0, 0),
    ]


def test_add_existing_raises_exists(img: qbm.Image) -> None:
    img.add_bitmap("b0")
    with pytest.raises(qbm.BitmapExists) as ei:
        img.add_bitmap("b0")
    assert isinstance(ei.value, FileExistsError)
    assert ei.value.errno == errno.EEXIST
    assert "b0" in str(ei.value)
    assert ei.value.function == "qbm_bitmap_add"


@pytest.mark.parametrize("granularity", [0 + 1, 256, 1000, 4 * GiB, 3 * 4096])
def test_add_bad_granularity(img: qbm.Image, granularity: int) -> None:
    with pytest.raises(qbm.InvalidArgument) as ei:
        img.add_bitmap("g", granularity=granularity)
    assert ei.value.errno == errno.EINVAL
    assert str(granularity) in str(ei.value)
    assert names(img) == []


def test_add_negative_granularity_is_rejected_before_c(img: qbm.Image) -> None:
    with pytest.raises(qbm.InvalidArgument):
        img.add_bitmap("g", granularity=-65536)
    assert names(img) == []


@pytest.mark.parametrize("bad", ["", "x" * 1024, "é" * 512])
def test_bad_names_raise_invalid_argument(img: qbm.Image, bad: str) -> None:
    img.add_bitmap("ok")
    calls = [
        lambda: img.add_bitmap(bad),
        lambda: img.rename_bitmap("ok", bad),
    ]
    for call in calls:
        with pytest.raises(qbm.InvalidArgument) as ei:
            call()
        assert ei.value.errno == errno.EINVAL
        assert isinstance(ei.value, ValueError)
        assert ei.value.strerror
    assert names(img) == ["ok"]


def test_longest_name_is_1023_bytes(images: Images) -> None:
    img = images.create()
    longest = "n" * 1023
    img.add_bitmap(longest)
    assert names(img) == [longest]
    img = images.reopen(img)
    assert names(img) == [longest]
    assert img.bitmap(longest).name == longest


def test_unicode_names_round_trip(images: Images) -> None:
    img = images.create()
    img.add_bitmap("sauvegarde-été-✓")
    img.add_bitmap(b"bytes-name")
    img = images.reopen(img)
    assert names(img) == ["sauvegarde-été-✓", "bytes-name"]
    assert img.bitmap(b"bytes-name").name == "bytes-name"


def test_name_with_nul_is_rejected_not_truncated(img: qbm.Image) -> None:
    with pytest.raises(qbm.InvalidArgument):
        img.add_bitmap("a\0b")
    assert names(img) == []
    with pytest.raises(TypeError):
        img.add_bitmap(5)  # type: ignore[arg-type]


def test_bitmap_lookup_missing(img: qbm.Image) -> None:
    img.add_bitmap("b0")
    with pytest.raises(qbm.BitmapNotFound) as ei:
        img.bitmap("nope")
    assert isinstance(ei.value, FileNotFoundError)
    assert ei.value.errno == errno.ENOENT
    assert "nope" in str(ei.value)


MISSING_CALLS = {
    "remove_bitmap": lambda img: img.remove_bitmap("missing-bm"),
    "clear_bitmap": lambda img: img.clear_bitmap("missing-bm"),
    "enable_bitmap": lambda img: img.enable_bitmap("missing-bm"),
    "disable_bitmap": lambda img: img.disable_bitmap("missing-bm"),
    "rename_bitmap": lambda img: img.rename_bitmap("missing-bm", "other"),
    "merge_bitmap dst": lambda img: img.merge_bitmap("missing-bm", "b0"),
    "merge_bitmap src": lambda img: img.merge_bitmap("b0", "missing-bm"),
    "set_range": lambda img: img.set_range("missing-bm", 0, 1),
    "reset_range": lambda img: img.reset_range("missing-bm", 0, 65536),
    "dirty_bytes": lambda img: img.dirty_bytes("missing-bm"),
    "extents": lambda img: img.extents("missing-bm"),
    "next_extent": lambda img: img.next_extent("missing-bm"),
}


@pytest.mark.parametrize("what", sorted(MISSING_CALLS))
def test_missing_bitmap_raises_not_found_naming_it(img: qbm.Image, what: str) -> None:
    img.add_bitmap("b0")
    with pytest.raises(qbm.BitmapNotFound) as ei:
        MISSING_CALLS[what](img)
    e = ei.value
    assert isinstance(e, FileNotFoundError)
    assert e.errno == errno.ENOENT
    assert "missing-bm" in str(e)
    assert "missing-bm" in e.strerror
    assert e.function is not None and e.function.startswith("qbm_")
    assert names(img) == ["b0"]


def test_remove(images: Images) -> None:
    img = images.create()
    for n in ("a", "b", "c"):
        img.add_bitmap(n)
    img.set_range("b", 0, 1 << 20)
    img.remove_bitmap("b")
    assert names(img) == ["a", "c"]
    with pytest.raises(qbm.BitmapNotFound):
        img.remove_bitmap("b")
    img = images.reopen(img, writable=True)
    assert names(img) == ["a", "c"]
    img.remove_bitmap("a")
    img.remove_bitmap("c")
    img = images.reopen(img)
    assert names(img) == [] and img.info().bitmap_count == 0


def test_remove_then_add_same_name(images: Images) -> None:
    img = images.create()
    img.add_bitmap("b", granularity=4096)
    img.set_range("b", 0, 4096)
    img.remove_bitmap("b")
    img.add_bitmap("b", granularity=65536)
    assert img.dirty_bytes("b") == 0
    img = images.reopen(img)
    assert img.bitmap("b").granularity == 65536
    assert list(img.extents("b")) == []


def test_rename(images: Images) -> None:
    img = images.create()
    img.add_bitmap("old", granularity=4096, enabled=False)
    img.set_range("old", 8192, 4096)
    img.rename_bitmap("old", "new")
    assert names(img) == ["new"]
    img = images.reopen(img)
    assert img.bitmaps() == [qbm.BitmapInfo("new", 4096, False, False, False, 0, 4096)]
    assert list(img.extents("new")) == [(8192, 4096)]


def test_rename_to_itself_is_a_no_op(img: qbm.Image) -> None:
    img.add_bitmap("same")
    img.rename_bitmap("same", "same")
    assert names(img) == ["same"]


def test_rename_onto_existing_raises_exists(img: qbm.Image) -> None:
    img.add_bitmap("a")
    img.add_bitmap("b")
    with pytest.raises(qbm.BitmapExists) as ei:
        img.rename_bitmap("a", "b")
    assert ei.value.errno == errno.EEXIST
    assert "'b'" in str(ei.value)
    assert names(img) == ["a", "b"]


def test_enable_disable(images: Images) -> None:
    img = images.create()
    img.add_bitmap("b", enabled=False)
    assert img.bitmap("b").enabled is False
    img.mark_dirty(0, 1)
    assert img.dirty_bytes("b") == 0
    img.enable_bitmap("b")
    img.enable_bitmap("b")  # already enabled: fine
    assert img.bitmap("b").enabled is True
    img.mark_dirty(0, 1)
    assert img.dirty_bytes("b") == 65536
    img.disable_bitmap("b")
    img.disable_bitmap("b")
    assert img.bitmap("b").enabled is False
    img.mark_dirty(1 << 20, 1)
    assert img.dirty_bytes("b") == 65536
    img = images.reopen(img, writable=True)
    assert img.bitmap("b").enabled is False
    img.enable_bitmap("b")
    img = images.reopen(img)
    assert img.bitmap("b").enabled is True


def test_clear(images: Images) -> None:
    img = images.create()
    img.add_bitmap("b")
    img.add_bitmap("other")
    img.mark_dirty(0, 10 << 20)
    img.clear_bitmap("b")
    assert img.dirty_bytes("b") == 0
    assert list(img.extents("b")) == []
    assert img.dirty_bytes("other") == 10 << 20
    img = images.reopen(img)
    assert img.bitmap("b").dirty_bytes == 0
    assert img.bitmap("other").dirty_bytes == 10 << 20


def test_many_bitmaps(images: Images) -> None:
    img = images.create()
    want = [f"bm{i:03d}" for i in range(100)]
    for n in want:
        img.add_bitmap(n, granularity=4096)
    img.mark_dirty(4096 * 7, 1)
    img = images.reopen(img)
    assert names(img) == want
    assert all(b.dirty_bytes == 4096 for b in img.bitmaps())
