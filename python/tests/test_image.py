"""Image lifetime: create, open, info, flush, close, context manager."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qbm
from conftest import DISK, MiB, Images


def test_create_and_info(images: Images) -> None:
    img = images.create(DISK)
    assert img.info() == qbm.ImageInfo(
        virtual_size=DISK, cluster_size=65536, refcount_bits=16, version=3, bitmap_count=0, writable=True
    )
    assert img.writable
    assert img.bitmaps() == []
    assert img.bitmap_count() == 0
    assert not img.closed


@pytest.mark.parametrize("cluster_size,refcount_bits", [(512, 1), (4096, 8), (2 * MiB, 64), (65536, 32)])
def test_create_with_options(images: Images, cluster_size: int, refcount_bits: int) -> None:
    img = images.create(16 * MiB, cluster_size=cluster_size, refcount_bits=refcount_bits)
    i = img.info()
    assert (i.cluster_size, i.refcount_bits, i.virtual_size) == (cluster_size, refcount_bits, 16 * MiB)
    img = images.reopen(img)
    i = img.info()
    assert (i.cluster_size, i.refcount_bits, i.virtual_size, i.writable) == (cluster_size, refcount_bits, 16 * MiB, False)


def test_create_accepts_str_and_pathlike(tmp_path: Path) -> None:
    with qbm.Image.create(str(tmp_path / "a.qcow2"), MiB) as a:
        assert a.info().virtual_size == MiB
    with qbm.Image.create(tmp_path / "b.qcow2", MiB) as b:
        assert b.path == tmp_path / "b.qcow2"
    assert (tmp_path / "a.qcow2").exists() and (tmp_path / "b.qcow2").exists()


def test_create_existing_file_raises_file_exists(images: Images) -> None:
    img = images.create()
    with pytest.raises(qbm.BitmapExists) as ei:
        qbm.Image.create(img.path, DISK)
    assert isinstance(ei.value, FileExistsError)
    assert ei.value.errno == errno.EEXIST
    assert os.fspath(img.path) in str(ei.value)


@pytest.mark.parametrize("kw", [{"cluster_size": 1000}, {"cluster_size": 256}, {"cluster_size": 4 * MiB},
                                {"refcount_bits": 3}, {"refcount_bits": 128}])
def test_create_bad_options_raise_invalid_argument(tmp_path: Path, kw: dict) -> None:
    path = tmp_path / "bad.qcow2"
    with pytest.raises(qbm.InvalidArgument) as ei:
        qbm.Image.create(path, DISK, **kw)
    assert ei.value.errno == errno.EINVAL
    assert str(list(kw.values())[0]) in str(ei.value)
    assert ei.value.function == "qbm_create"


def test_create_negative_size_is_rejected_before_c(tmp_path: Path) -> None:
    with pytest.raises(qbm.InvalidArgument) as ei:
        qbm.Image.create(tmp_path / "neg.qcow2", -1)
    assert ei.value.errno == errno.EINVAL
    assert not (tmp_path / "neg.qcow2").exists()
    with pytest.raises(TypeError):
        qbm.Image.create(tmp_path / "f.qcow2", 1.5)  # type: ignore[arg-type]


def test_create_in_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(qbm.BitmapNotFound) as ei:
        qbm.Image.create(tmp_path / "no" / "dir.qcow2", DISK)
    assert isinstance(ei.value, FileNotFoundError)
    assert ei.value.errno == errno.ENOENT


def test_open_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.qcow2"
    with pytest.raises(FileNotFoundError) as ei:
        qbm.Image.open(path)
    assert isinstance(ei.value, qbm.BitmapNotFound)
    assert ei.value.errno == errno.ENOENT
    assert "missing.qcow2" in str(ei.value)
    assert ei.value.function == "qbm_open"


def test_open_not_qcow2(tmp_path: Path) -> None:
    path = tmp_path / "junk.img"
    path.write_bytes(b"x" * 100000)
    with pytest.raises(qbm.QbmError) as ei:
        qbm.Image.open(path)
    assert ei.value.errno in (errno.EINVAL, errno.EUCLEAN, errno.ENOTSUP)
    assert "junk.img" in str(ei.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file modes")
def test_open_unreadable_file_is_permission_error(images: Images) -> None:
    img = images.create()
    img.close()
    os.chmod(img.path, 0)
    with pytest.raises(PermissionError) as ei:
        qbm.Image.open(img.path)
    assert isinstance(ei.value, qbm.PermissionDenied)


def test_path_with_nul_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(qbm.InvalidArgument):
        qbm.Image.open(str(tmp_path / "a\0b"))
    with pytest.raises(qbm.InvalidArgument):
        qbm.Image.create(str(tmp_path / "a\0b"), DISK)


def test_open_read_only_and_read_write(images: Images) -> None:
    img = images.create()
    img.close()
    ro = images.open(img.path)
    assert ro.info().writable is False and not ro.writable
    ro.close()
    rw = images.open(img.path, writable=True)
    assert rw.info().writable is True


def test_context_manager_closes(images: Images) -> None:
    path = images.path()
    with qbm.Image.create(path, DISK) as img:
        assert isinstance(img, qbm.Image)
        img.add_bitmap("b0")
    assert img.closed
    # Closed for real: it can be reopened read-write, and the bitmap was stored.
    with qbm.Image.open(path, writable=True) as again:
        assert [b.name for b in again.bitmaps()] == ["b0"]
        assert again.bitmap("b0").in_use is False
    assert again.closed


def test_context_manager_closes_on_exception(images: Images) -> None:
    path = images.path()
    with pytest.raises(RuntimeError):
        with qbm.Image.create(path, DISK) as img:
            img.add_bitmap("b0")
            raise RuntimeError("boom")
    assert img.closed
    with qbm.Image.open(path) as again:
        assert again.bitmap("b0").in_use is False


def test_close_is_idempotent(img: qbm.Image) -> None:
    img.close()
    img.close()
    assert img.closed
    assert "closed" in repr(img)


def test_entering_a_closed_image_raises(img: qbm.Image) -> None:
    img.close()
    with pytest.raises(ValueError):
        with img:
            pass


CLOSED_CALLS = [
    ("info", ()),
    ("flush", ()),
    ("bitmaps", ()),
    ("bitmap_count", ()),
    ("bitmap", ("b",)),
    ("add_bitmap", ("b",)),
    ("remove_bitmap", ("b",)),
    ("clear_bitmap", ("b",)),
    ("enable_bitmap", ("b",)),
    ("disable_bitmap", ("b",)),
    ("rename_bitmap", ("b", "c")),
    ("merge_bitmap", ("b", "c")),
    ("set_range", ("b", 0, 1)),
    ("reset_range", ("b", 0, 65536)),
    ("mark_dirty", (0, 1)),
    ("dirty_bytes", ("b",)),
    ("extents", ("b",)),
    ("next_extent", ("b",)),
]


@pytest.mark.parametrize("method,args", CLOSED_CALLS)
def test_closed_image_raises_value_error_without_calling_c(
    img: qbm.Image, method: str, args: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    img.add_bitmap("b")
    img.close()

    class Trap:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"{name} was called on a closed image")

    monkeypatch.setattr(qbm, "lib", Trap())
    with pytest.raises(ValueError) as ei:
        getattr(img, method)(*args)
    assert not isinstance(ei.value, qbm.QbmError)
    assert "closed" in str(ei.value)


def test_closed_source_image_in_merge_raises_value_error(images: Images) -> None:
    a = images.create()
    b = images.create()
    a.add_bitmap("x")
    b.add_bitmap("x")
    b.close()
    with pytest.raises(ValueError):
        a.merge_bitmap("x", "x", src_image=b)


def test_flush_persists_while_open(images: Images, tmp_path: Path) -> None:
    img = images.create()
    img.add_bitmap("b0")
    img.set_range("b0", 0, 65536)
    img.flush()
    # A copy of the file taken now holds the bitmap, still flagged in use.
    copy = tmp_path / "copy.qcow2"
    copy.write_bytes(Path(img.path).read_bytes())
    other = images.open(copy)
    b = other.bitmap("b0")
    assert b.in_use is True


def test_flush_read_only_image_is_fine(images: Images) -> None:
    img = images.reopen(images.create())
    img.flush()


def test_unclosed_image_is_stored_when_collected(images: Images) -> None:
    path = images.path()
    code = (
        "import sys, qbm\n"
        f"img = qbm.Image.create({str(path)!r}, {DISK})\n"
        "img.add_bitmap('b0')\n"
        "img.set_range('b0', 0, 1)\n"
        "del img\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(qbm.__file__).parent.parent))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    with qbm.Image.open(path) as img:
        assert img.bitmap("b0").in_use is False
        assert list(img.extents("b0")) == [(0, 65536)]


def test_crash_leaves_bitmaps_in_use(images: Images) -> None:
    """A process that dies with the image open leaves its bitmaps flagged
    in_use: they can only be removed (EBUSY otherwise)."""
    path = images.path()
    code = (
        "import os, qbm\n"
        f"img = qbm.Image.create({str(path)!r}, {DISK})\n"
        "img.add_bitmap('b0')\n"
        "img.mark_dirty(0, 4096)\n"
        "img.flush()\n"
        "os._exit(0)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(qbm.__file__).parent.parent))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)

    img = images.open(path, writable=True)
    img.add_bitmap("fresh")
    b = img.bitmap("b0")
    assert b.in_use is True and b.dirty_bytes == 0
    for call in (
        lambda: img.dirty_bytes("b0"),
        lambda: img.extents("b0"),
        lambda: img.set_range("b0", 0, 1),
        lambda: img.reset_range("b0", 0, 65536),
        lambda: img.clear_bitmap("b0"),
        lambda: img.enable_bitmap("b0"),
        lambda: img.disable_bitmap("b0"),
        lambda: img.rename_bitmap("b0", "b1"),
        lambda: img.merge_bitmap("b0", "fresh"),
        lambda: img.merge_bitmap("fresh", "b0"),
    ):
        with pytest.raises(qbm.Busy) as ei:
            call()
        assert ei.value.errno == errno.EBUSY
        assert "b0" in str(ei.value)
    img.mark_dirty(0, 1)  # the hot path skips it, no error
    img.remove_bitmap("b0")
    assert [b.name for b in img.bitmaps()] == ["fresh"]
    img = images.reopen(img)
    assert [(b.name, b.in_use) for b in img.bitmaps()] == [("fresh", False)]


def test_second_writable_open_is_refused(images: Images) -> None:
    """Two writers would overwrite each other's bitmaps: like QEMU, the image
    is locked while open read-write (EBUSY)."""
    img = images.create()
    with pytest.raises(qbm.Busy) as ei:
        images.open(img.path, writable=True)
    assert ei.value.errno == errno.EBUSY


def test_force_share_reads_an_image_held_read_write(tmp_path: Path) -> None:
    """A locked image refuses a plain read-only open (Busy, naming the lock)
    but force_share reads it, as `qemu-img info -U` does."""
    f = tmp_path / "held.qcow2"
    with qbm.Image.create(f, 16 * 1024 * 1024) as writer:
        writer.add_bitmap("b0")
        with pytest.raises(qbm.Busy) as e:
            qbm.Image.open(f)
        assert e.value.errno == errno.EBUSY
        assert "lock" in str(e.value)
        with qbm.Image.open(f, force_share=True) as reader:
            assert reader.info().virtual_size == 16 * 1024 * 1024
        with pytest.raises(qbm.InvalidArgument):
            qbm.Image.open(f, writable=True, force_share=True)


def test_resize(tmp_path: Path) -> None:
    with qbm.Image.create(tmp_path / "r.qcow2", 64 * MiB) as img:
        img.add_bitmap("b")
        img.mark_dirty(MiB, 1)
        img.mark_dirty(60 * MiB, 1)
        img.resize(16 * MiB)
        assert img.info().virtual_size == 16 * MiB
        assert list(img.extents("b")) == [(MiB, 65536)]
        img.resize(128 * MiB)
        with pytest.raises(qbm.InvalidArgument, match="multiple of 512"):
            img.resize(1000)
    with qbm.Image.open(tmp_path / "r.qcow2") as img:
        assert img.info().virtual_size == 128 * MiB
        assert list(img.extents("b")) == [(MiB, 65536)]
