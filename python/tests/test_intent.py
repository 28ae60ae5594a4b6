"""Write-intent mode: durable marks survive a SIGKILL of the process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import qbm
from conftest import MiB, PYTHON_DIR

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    import qbm
    img = qbm.Image.open(sys.argv[1], writable=True, write_intent=True)
    img.mark_dirty(0, 4096)
    img.mark_dirty(5 * (1 << 20), 1)
    assert img.mark_dirty_nowait(9 * (1 << 20), 512)
    assert not img.mark_dirty_nowait(0, 1)
    img.sync()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_write_intent_bitmaps_survive_sigkill(tmp_path: Path) -> None:
    f = tmp_path / "wi.qcow2"
    with qbm.Image.create(f, 64 * MiB) as img:
        img.add_bitmap("b", granularity=65536)
    p = subprocess.run([sys.executable, "-c", CHILD, str(f), str(PYTHON_DIR)], env=os.environ)
    assert p.returncode == -signal.SIGKILL
    with qbm.Image.open(f) as img:
        # Read-only: recoverable bitmaps read as recovered, too.
        assert img.bitmap("b").recovered
    with qbm.Image.open(f, writable=True) as img:
        b = img.bitmap("b")
        assert b.recovered and not b.in_use
        assert list(img.extents("b")) == [(0, 65536), (5 * MiB, 65536), (9 * MiB, 65536)]
    with qbm.Image.open(f) as img:
        b = img.bitmap("b")
        assert not b.recovered and not b.in_use


def test_write_intent_needs_writable(tmp_path: Path) -> None:
    f = tmp_path / "ro.qcow2"
    with qbm.Image.create(f, 64 * MiB):
        pass
    try:
        qbm.Image.open(f, write_intent=True)
    except qbm.InvalidArgument:
        pass
    else:
        raise AssertionError("write_intent without writable must fail")
    with qbm.Image.open(f, writable=True) as img:
        # Outside write-intent mode the split form never asks for a sync.
        assert not img.mark_dirty_nowait(0, 1)
        img.sync()
