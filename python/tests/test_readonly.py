"""An image opened read-only: every change raises ReadOnlyError (EROFS);
reading works."""

from __future__ import annotations

import errno

import pytest

import qbm
from conftest import MiB, Images

WRITES = {
    "add_bitmap": lambda img: img.add_bitmap("new"),
    "remove_bitmap": lambda img: img.remove_bitmap("b0"),
    "clear_bitmap": lambda img: img.clear_bitmap("b0"),
    "enable_bitmap": lambda img: img.enable_bitmap("off"),
    "disable_bitmap": lambda img: img.disable_bitmap("b0"),
    "rename_bitmap": lambda img: img.rename_bitmap("b0", "b9"),
    "merge_bitmap": lambda img: img.merge_bitmap("b0", "off"),
    "set_range": lambda img: img.set_range("b0", 0, 1),
    "reset_range": lambda img: img.reset_range("b0", 1 * MiB, 65536),
    "mark_dirty": lambda img: img.mark_dirty(0, 1),
}


@pytest.fixture
def ro(images: Images) -> qbm.Image:
    img = images.create()
    img.add_bitmap("b0")
    img.add_bitmap("off", enabled=False)
    img.mark_dirty(1 * MiB, 1)
    return images.reopen(img)


@pytest.mark.parametrize("what", sorted(WRITES))
def test_writes_raise_read_only(ro: qbm.Image, what: str) -> None:
    before = ro.bitmaps()
    with pytest.raises(qbm.ReadOnlyError) as ei:
        WRITES[what](ro)
    e = ei.value
    assert isinstance(e, qbm.QbmError) and isinstance(e, OSError)
    assert e.errno == errno.EROFS
    assert e.strerror
    assert ro.bitmaps() == before


def test_reads_work(ro: qbm.Image) -> None:
    assert ro.info().writable is False
    assert [b.name for b in ro.bitmaps()] == ["b0", "off"]
    assert ro.bitmap("b0").in_use is False
    assert ro.dirty_bytes("b0") == 65536
    assert list(ro.extents("b0")) == [(1 * MiB, 65536)]
    assert ro.next_extent("b0") == (1 * MiB, 65536)
    ro.flush()


def test_read_only_open_leaves_the_file_unchanged(images: Images) -> None:
    img = images.create()
    img.add_bitmap("b0")
    img.mark_dirty(0, 1)
    img.close()
    data = open(img.path, "rb").read()
    with qbm.Image.open(img.path) as ro:
        ro.bitmaps()
        list(ro.extents("b0"))
    assert open(img.path, "rb").read() == data
