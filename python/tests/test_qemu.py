"""Interoperability with QEMU's own tools (skipped when they are missing,
except under CI=true)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import qbm
from conftest import MiB, qemu_tools_or_skip, run


def qemu_bitmaps(path: Path) -> list:
    info = json.loads(run("qemu-img", "info", "--output=json", path))
    return info.get("format-specific", {}).get("data", {}).get("bitmaps", [])


def test_image_made_by_qemu_reads_back(tmp_path: Path) -> None:
    qemu_tools_or_skip("qemu-img", "qemu-io")
    f = tmp_path / "qemu.qcow2"
    run("qemu-img", "create", "-f", "qcow2", f, "64M")
    run("qemu-img", "bitmap", "--add", f, "b0")
    run("qemu-io", "-f", "qcow2", "-c", "write 1M 64k", f)
    with qbm.Image.open(f) as img:
        assert img.info().virtual_size == 64 * MiB
        assert img.bitmaps() == [qbm.BitmapInfo("b0", 65536, True, False, False, 0, 65536)]
        assert list(img.extents("b0")) == [(1 * MiB, 65536)]
    with qbm.Image.open(f, writable=True) as img:
        img.mark_dirty(0, 1)
    with qbm.Image.open(f) as img:
        assert list(img.extents("b0")) == [(0, 65536), (1 * MiB, 65536)]
    run("qemu-img", "check", f)


def test_image_made_by_the_binding_reads_in_qemu(tmp_path: Path) -> None:
    qemu_tools_or_skip("qemu-img")
    f = tmp_path / "qbm.qcow2"
    with qbm.Image.create(f, 64 * MiB) as img:
        img.add_bitmap("on", granularity=4096)
        img.add_bitmap("off", enabled=False)
        img.mark_dirty(5 * MiB, 1)
    run("qemu-img", "check", f)
    got = {b["name"]: (b["granularity"], sorted(b["flags"])) for b in qemu_bitmaps(f)}
    assert got == {"on": (4096, ["auto"]), "off": (65536, [])}
    # QEMU merges and removes them, and the binding sees the result.
    run("qemu-img", "bitmap", "--merge", "on", "--enable", f, "off")
    run("qemu-img", "bitmap", "--remove", f, "on")
    with qbm.Image.open(f) as img:
        assert img.bitmaps() == [qbm.BitmapInfo("off", 65536, True, False, False, 0, 65536)]
        assert list(img.extents("off")) == [(5 * MiB, 65536)]


def test_writable_image_is_locked_against_qemu(tmp_path: Path) -> None:
    """While the binding holds an image read-write, QEMU's tools cannot take
    it (QEMU-compatible image locking); after close they can."""
    qemu_tools_or_skip("qemu-img", "qemu-io")
    f = tmp_path / "locked.qcow2"
    with qbm.Image.create(f, 16 * MiB) as img:
        img.add_bitmap("b0")
        p = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 64k", str(f)], capture_output=True, text=True)
        assert p.returncode != 0, "qemu-io wrote to an image libqbm holds open read-write: " + p.stdout
        assert "lock" in (p.stderr + p.stdout).lower(), p.stdout + p.stderr
    run("qemu-io", "-f", "qcow2", "-c", "write 0 64k", f)
    with qbm.Image.open(f) as img:
        assert list(img.extents("b0")) == [(0, 65536)]
