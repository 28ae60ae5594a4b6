"""Lazy opens (``lazy=True``, ``QBM_OPEN_LAZY``): bitmap data read only
when a call needs it, with the same answers as a loading open."""

from __future__ import annotations

import errno

import pytest

import qbm
from conftest import MiB, Images

GiB = 1024 * MiB


def test_lazy_reads_and_changes_equal_loading_ones(images: Images) -> None:
    img = images.create(size=64 * GiB, name="l.qcow2")
    img.add_bitmap("a")
    img.add_bitmap("b", enabled=False)
    img.mark_dirty(3 * MiB, 1)
    img.mark_dirty(20 * GiB, 5 * GiB)  # whole bitmap clusters: stored as all-ones flags
    img.set_range("b", 9 * GiB, 65536)
    path = images.path("l.qcow2")
    img.close()

    lazy = qbm.Image.open(path, writable=True, lazy=True)
    assert list(lazy.extents("a")) == [(3 * MiB, 65536), (20 * GiB, 5 * GiB)]
    assert lazy.dirty_bytes("a") == 65536 + 5 * GiB
    assert list(lazy.extents("a", start=21 * GiB)) == [(21 * GiB, 4 * GiB)]
    with pytest.raises(qbm.InvalidArgument) as e:
        lazy.mark_dirty(0, 4096)
    assert e.value.errno == errno.EINVAL and "lazily" in str(e.value)
    lazy.merge_bitmap("a", "b")
    lazy.clear_bitmap("b")
    lazy.close()

    loaded = qbm.Image.open(path)
    assert list(loaded.extents("a")) == [(3 * MiB, 65536), (9 * GiB, 65536), (20 * GiB, 5 * GiB)]
    assert list(loaded.extents("b")) == []
    loaded.close()


def test_lazy_write_intent_is_refused(images: Images) -> None:
    img = images.create(name="w.qcow2")
    img.close()
    with pytest.raises(qbm.InvalidArgument) as e:
        qbm.Image.open(images.path("w.qcow2"), writable=True, write_intent=True, lazy=True)
    assert e.value.errno == errno.EINVAL and "lazy" in str(e.value)
