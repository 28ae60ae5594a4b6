"""Shared fixtures for the qbm binding tests.

The tests import the binding from the source tree (python/) unless it is
already importable, and load the library named by QBM_LIBRARY (see
`make check-python`).
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

PYTHON_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = PYTHON_DIR.parent
sys.path.insert(0, str(PYTHON_DIR))

import qbm  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
DISK = 64 * MiB

# A whole test may not take longer than this; a call stuck inside the library
# then dumps every thread's stack and ends the run instead of hanging CI.
SESSION_WATCHDOG = 300


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(SESSION_WATCHDOG, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


class Images:
    """Creates images in a test's tmp_path and closes them all at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.open_images: List[qbm.Image] = []
        self.count = 0

    def path(self, name: str = "") -> Path:
        self.count += 1
        return self.dir / (name or f"disk{self.count}.qcow2")

    def create(self, size: int = DISK, name: str = "", **kw: Any) -> qbm.Image:
        img = qbm.Image.create(self.path(name), size, **kw)
        self.open_images.append(img)
        return img

    def open(self, path: "os.PathLike[str] | str", writable: bool = False) -> qbm.Image:
        img = qbm.Image.open(path, writable=writable)
        self.open_images.append(img)
        return img

    def reopen(self, img: qbm.Image, writable: bool = False) -> qbm.Image:
        path = img.path
        img.close()
        return self.open(path, writable=writable)

    def abandon(self, *imgs: qbm.Image) -> None:
        """Forgets images whose handle a hung library call still holds: closing
        them would wait forever for the image's lock."""
        for img in imgs:
            img._h = None

    def close_all(self) -> None:
        for img in self.open_images:
            img.close()


@pytest.fixture
def images(tmp_path: Path) -> Iterator[Images]:
    imgs = Images(tmp_path)
    yield imgs
    imgs.close_all()


@pytest.fixture
def img(images: Images) -> qbm.Image:
    """A new, empty, writable 64 MiB image (64 KiB clusters)."""
    return images.create()


def call_with_timeout(images: Images, hold: List[qbm.Image], fn: Callable[[], Any], timeout: float = 30) -> Any:
    """Runs fn() in a helper thread; fails the test (instead of hanging the
    run) when the library does not return within `timeout` seconds. The images
    in `hold` are then abandoned, since the stuck call owns them."""
    result: List[Any] = []
    error: List[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the test's thread
            error.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        images.abandon(*hold)
        pytest.fail(f"library call did not return within {timeout} s (hang inside libqbm)")
    if error:
        raise error[0]
    return result[0] if result else None


def qemu_tools_or_skip(*tools: str) -> None:
    """Skips when a QEMU tool is missing, except under CI=true, where the
    interop tests must run."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        msg = f"QEMU tools not installed: {', '.join(missing)}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " (required when CI=true)")
        pytest.skip(msg)


def run(*args: "str | os.PathLike[str]") -> str:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert p.returncode == 0, f"{args} failed ({p.returncode}): {p.stderr}{p.stdout}"
    return p.stdout
