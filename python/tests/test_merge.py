"""merge_bitmap within one image and across images.

Merges run in a helper thread with a timeout (call_with_timeout), so a merge
that never returns fails its test instead of hanging the run."""

from __future__ import annotations

import errno

import pytest

import qbm
from conftest import DISK, MiB, Images, call_with_timeout


def merge(images: Images, dst: qbm.Image, dst_name: str, src_name: str, src: "qbm.Image | None" = None) -> None:
    hold = [dst] + ([src] if src is not None else [])
    call_with_timeout(images, hold, lambda: dst.merge_bitmap(dst_name, src_name, src_image=src))


def test_merge_within_an_image(images: Images) -> None:
    img = images.create()
    img.add_bitmap("dst")
    img.add_bitmap("src", enabled=False)
    img.set_range("dst", 0, 1)
    img.set_range("src", 1 * MiB, 65536)
    img.set_range("src", 65536, 1)
    merge(images, img, "dst", "src")
    assert list(img.extents("dst")) == [(0, 131072), (1 * MiB, 65536)]
    assert list(img.extents("src")) == [(65536, 65536), (1 * MiB, 65536)]  # source unchanged
    img = images.reopen(img)
    assert list(img.extents("dst")) == [(0, 131072), (1 * MiB, 65536)]


def test_merge_into_itself_is_a_no_op(img: qbm.Image) -> None:
    img.add_bitmap("b")
    img.set_range("b", 4 * MiB, 1)
    img.merge_bitmap("b", "b")
    assert list(img.extents("b")) == [(4 * MiB, 65536)]


def test_merge_into_a_disabled_bitmap(img: qbm.Image) -> None:
    img.add_bitmap("frozen", enabled=False)
    img.add_bitmap("live")
    img.mark_dirty(2 * MiB, 1)
    img.merge_bitmap("frozen", "live")
    assert list(img.extents("frozen")) == [(2 * MiB, 65536)]
    assert img.bitmap("frozen").enabled is False


def test_merge_finer_into_coarser(images: Images) -> None:
    img = images.create()
    img.add_bitmap("coarse", granularity=65536)
    img.add_bitmap("fine", granularity=512)
    img.set_range("fine", 70000, 1)
    img.set_range("fine", 1 * MiB, 4096)
    img.set_range("fine", 1 * MiB + 65536 - 512, 1024)  # straddles two coarse granules
    merge(images, img, "coarse", "fine")
    assert list(img.extents("coarse")) == [(65536, 65536), (1 * MiB, 131072)]


def test_merge_coarser_into_finer(images: Images) -> None:
    img = images.create()
    img.add_bitmap("fine", granularity=4096)
    img.add_bitmap("coarse", granularity=1 * MiB)
    img.set_range("coarse", 3 * MiB + 5, 1)
    img.set_range("fine", 0, 1)
    merge(images, img, "fine", "coarse")
    assert list(img.extents("fine")) == [(0, 4096), (3 * MiB, 1 * MiB)]
    assert img.dirty_bytes("fine") == 4096 + 1 * MiB


def test_merge_across_images(images: Images) -> None:
    dst = images.create()
    src = images.create()
    dst.add_bitmap("b")
    src.add_bitmap("b")
    src.mark_dirty(10 * MiB, 3 * 65536)
    dst.mark_dirty(0, 1)
    merge(images, dst, "b", "b", src)
    assert list(dst.extents("b")) == [(0, 65536), (10 * MiB, 3 * 65536)]
    assert list(src.extents("b")) == [(10 * MiB, 3 * 65536)]
    dst = images.reopen(dst)
    assert list(dst.extents("b")) == [(0, 65536), (10 * MiB, 3 * 65536)]


def test_merge_across_images_different_granularities(images: Images) -> None:
    dst = images.create()
    src = images.create(cluster_size=4096)
    dst.add_bitmap("d", granularity=65536)
    src.add_bitmap("s", granularity=4096)
    src.set_range("s", 0, 1)
    src.set_range("s", 65536 * 5 + 4096, 8192)
    src.set_range("s", DISK - 4096, 4096)
    merge(images, dst, "d", "s", src)
    assert list(dst.extents("d")) == [(0, 65536), (65536 * 5, 65536), (DISK - 65536, 65536)]


def test_merge_from_a_read_only_source(images: Images) -> None:
    src = images.create()
    src.add_bitmap("s")
    src.mark_dirty(7 * MiB, 1)
    src = images.reopen(src)
    dst = images.create()
    dst.add_bitmap("d")
    merge(images, dst, "d", "s", src)
    assert list(dst.extents("d")) == [(7 * MiB, 65536)]


def test_merge_into_a_read_only_image_raises_read_only(images: Images) -> None:
    img = images.create()
    img.add_bitmap("a")
    img.add_bitmap("b")
    img = images.reopen(img)
    with pytest.raises(qbm.ReadOnlyError) as ei:
        img.merge_bitmap("a", "b")
    assert ei.value.errno == errno.EROFS


def test_merge_disk_sizes_must_match(images: Images) -> None:
    dst = images.create(DISK)
    src = images.create(DISK * 2)
    dst.add_bitmap("b")
    src.add_bitmap("b")
    with pytest.raises(qbm.InvalidArgument) as ei:
        dst.merge_bitmap("b", "b", src_image=src)
    assert ei.value.errno == errno.EINVAL
    assert list(dst.extents("b")) == []


def test_merge_missing_names(images: Images) -> None:
    dst = images.create()
    src = images.create()
    dst.add_bitmap("d")
    src.add_bitmap("s")
    with pytest.raises(qbm.BitmapNotFound) as ei:
        dst.merge_bitmap("d", "missing-src", src_image=src)
    assert "missing-src" in str(ei.value)
    with pytest.raises(qbm.BitmapNotFound) as ei:
        dst.merge_bitmap("missing-dst", "s", src_image=src)
    assert "missing-dst" in str(ei.value)
    # The names are looked up in their own image.
    with pytest.raises(qbm.BitmapNotFound):
        dst.merge_bitmap("d", "d", src_image=src)


def test_merge_source_must_be_an_image(img: qbm.Image) -> None:
    img.add_bitmap("b")
    with pytest.raises(TypeError):
        img.merge_bitmap("b", "b", src_image="not an image")  # type: ignore[arg-type]
