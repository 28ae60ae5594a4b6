"""Bitmaps for a raw disk: Image.create(..., data_file=RAW) makes a qcow2
metadata companion; the raw file is never written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import qbm
from conftest import MiB, qemu_tools_or_skip, run


def make_raw(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MiB)
        f.write(b"\x5a" * 4096)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_companion_takes_the_raw_size_and_leaves_it_untouched(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    digest = make_raw(raw, 48 * MiB)
    with qbm.Image.create(tmp_path / "disk.qcow2", data_file=raw.resolve()) as img:
        assert img.info().virtual_size == 48 * MiB
        img.add_bitmap("b", granularity=65536)
        img.mark_dirty(2 * MiB, 1)
    with qbm.Image.open(tmp_path / "disk.qcow2") as img:
        assert list(img.extents("b")) == [(2 * MiB, 65536)]
        assert img.info().data_file == str(raw.resolve())
    with qbm.Image.create(tmp_path / "plain.qcow2", MiB) as img:
        assert img.info().data_file is None
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == digest


def test_bad_data_files(tmp_path: Path) -> None:
    raw = tmp_path / "small.raw"
    make_raw(raw, 4 * MiB)
    with pytest.raises(qbm.InvalidArgument, match="smaller than the virtual size"):
        qbm.Image.create(tmp_path / "a.qcow2", 8 * MiB, data_file=raw)
    with pytest.raises(FileNotFoundError, match="cannot open"):
        qbm.Image.create(tmp_path / "b.qcow2", data_file=tmp_path / "missing.raw")
    assert not (tmp_path / "a.qcow2").exists() and not (tmp_path / "b.qcow2").exists()


def test_qemu_sees_the_data_file_and_the_bitmaps(tmp_path: Path) -> None:
    qemu_tools_or_skip("qemu-img", "qemu-io")
    raw = tmp_path / "disk.raw"
    make_raw(raw, 16 * MiB)
    img_path = tmp_path / "disk.qcow2"
    with qbm.Image.create(img_path, data_file=raw.resolve()) as img:
        img.add_bitmap("b")
    info = json.loads(run("qemu-img", "info", "--output=json", img_path))
    data = info["format-specific"]["data"]
    assert data["data-file"] == str(raw.resolve()) and data["data-file-raw"] is True
    assert [b["name"] for b in data["bitmaps"]] == ["b"]
    out = run("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 4k", "-c", "write -P 1 5M 4k", img_path)
    assert "verification failed" not in out and "wrote 4096/4096" in out, out
    with qbm.Image.open(img_path) as img:
        assert list(img.extents("b")) == [(5 * MiB, 65536)]
    run("qemu-img", "check", img_path)
