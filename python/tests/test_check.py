"""Image.check: the library's full refcount check, compared with
``qemu-img check`` on an image with a leak made by hand."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

import qbm
from conftest import MiB, qemu_tools_or_skip


def add_leak(path: Path) -> None:
    """Raises the 16-bit refcount of cluster 0 (the header) from 1 to 2."""
    with open(path, "r+b") as f:
        f.seek(48)
        table = struct.unpack(">Q", f.read(8))[0]
        f.seek(table)
        block = struct.unpack(">Q", f.read(8))[0] & ~0x1FF
        f.seek(block)
        assert struct.unpack(">H", f.read(2))[0] == 1
        f.seek(block)
        f.write(struct.pack(">H", 2))


def test_clean_image_is_consistent(tmp_path: Path) -> None:
    f = tmp_path / "c.qcow2"
    with qbm.Image.create(f, 64 * MiB) as img:
        img.add_bitmap("b")
        img.mark_dirty(MiB, 4096)
        r = img.check()
    assert r.consistent
    assert (r.corruptions, r.leaks, r.check_errors, r.inconsistent_bitmaps) == (0, 0, 0, 0)
    assert r.total_clusters == 64 * MiB // 65536


def test_leak_is_counted_and_repaired(tmp_path: Path) -> None:
    f = tmp_path / "l.qcow2"
    with qbm.Image.create(f, 64 * MiB) as img:
        img.add_bitmap("b", granularity=4096)
        img.mark_dirty(0, 8192)
    add_leak(f)
    with qbm.Image.open(f) as img:
        r = img.check()
        assert (r.leaks, r.corruptions) == (1, 0) and r.consistent
        with pytest.raises(qbm.ReadOnlyError):
            img.check(repair_leaks=True)
    with qbm.Image.open(f, writable=True) as img:
        r = img.check(repair_leaks=True)
        assert (r.leaks_fixed, r.leaks) == (1, 0)
        assert list(img.extents("b")) == [(0, 8192)]
    with qbm.Image.open(f) as img:
        assert img.check().leaks == 0


def test_counts_match_qemu_img(tmp_path: Path) -> None:
    qemu_tools_or_skip("qemu-img")
    f = tmp_path / "q.qcow2"
    with qbm.Image.create(f, 64 * MiB) as img:
        img.add_bitmap("b")
        img.mark_dirty(3 * MiB, 1)
    add_leak(f)
    out = subprocess.run(
        ["qemu-img", "check", "--output=json", str(f)], capture_output=True, text=True
    )
    assert out.returncode == 3  # leaks only
    theirs = json.loads(out.stdout)
    with qbm.Image.open(f) as img:
        ours = img.check()
    assert ours.leaks == theirs.get("leaks", 0) == 1
    assert ours.corruptions == theirs.get("corruptions", 0) == 0
    assert ours.image_end_offset == theirs["image-end-offset"]
    assert ours.allocated_clusters == theirs.get("allocated-clusters", 0)
