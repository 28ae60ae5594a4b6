#!/usr/bin/env python3
"""Full and incremental backups with libqbm alone, from Python.

The same recipe as examples/backup.c (README: "Checkpoints and incremental
backup"); `make check-examples` runs it and it checks itself.

The "VM" keeps its disk in disk.raw and its bitmaps in disk.qcow2, a
metadata-only qcow2 image of the same size; every guest write goes to
disk.raw and is marked with Image.mark_dirty.

  full backup:    add bitmap "b1" (checkpoint 1), then copy the whole disk;
  guest writes:   marked in b1 (in every enabled bitmap);
  incremental 1:  add "b2" (checkpoint 2), disable "b1" (freeze it), copy
                  b1's extents, remove b1; the guest writes meanwhile, into
                  b2 only;
  incremental 2:  the same with "b3" and "b2".

Checks: each frozen bitmap's extents are exactly the granules written
between its two checkpoints, and the full backup plus both incremental
copies equal the disk byte for byte.

Usage: backup.py [DIR]   (files are created in DIR, default ".")
"""

import os
import shutil
import sys

import qbm

MiB = 1 << 20
DISK_SIZE = 64 * MiB
GRANULARITY = 65536


class Guest:
    """Writes data into disk.raw and marks it; records the granules written."""

    def __init__(self, img: qbm.Image, raw: str) -> None:
        self.img = img
        self.raw = raw
        self.written = set()

    def write(self, offset: int, length: int, byte: bytes) -> None:
        with open(self.raw, "r+b") as f:
            f.seek(offset)
            f.write(byte * length)
        self.img.mark_dirty(offset, length)
        first, last = offset // GRANULARITY, (offset + length - 1) // GRANULARITY
        self.written.update(range(first, last + 1))


def check(ok: bool, what: str) -> None:
    """Like assert, but not removed by python -O."""
    if not ok:
        sys.exit(f"backup example: {what}")


def copy_ranges(src: str, dst: str, ranges) -> int:
    copied = 0
    with open(src, "rb") as s, open(dst, "r+b") as d:
        for start, length in ranges:
            s.seek(start)
            d.seek(start)
            d.write(s.read(length))
            copied += length
    return copied


def runs(granules):
    """The written granules as (start, length) byte runs, clamped to the disk."""
    out = []
    for g in sorted(granules):
        start, end = g * GRANULARITY, min((g + 1) * GRANULARITY, DISK_SIZE)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))
    return out


def incremental_backup(guest: Guest, last: str, next_: str, backup: str, during=None):
    """Checkpoint `next_`, freeze `last`, copy its extents, remove it.

    `during` is a guest write made while the backup runs. Checks that `last`
    held exactly the granules written since its checkpoint.
    """
    img = guest.img
    img.add_bitmap(next_, GRANULARITY)  # 1. the next checkpoint starts tracking
    img.disable_bitmap(last)  # 2. freeze the last one
    written, guest.written = guest.written, set()
    if during:
        during()  # lands in `next_` only: this backup does not copy it
    extents = list(img.extents(last))  # 3. what changed between the checkpoints
    for start, length in extents:
        print(f"  copy [{start}, +{length})")
    copy_ranges(guest.raw, backup, extents)
    img.remove_bitmap(last)  # 4. only once the copy is safe
    want = runs(written)
    check(extents == want, f"{last} holds {extents}, but the writes since its checkpoint are {want}")
    return extents


def same_files(a: str, b: str) -> bool:
    with open(a, "rb") as x, open(b, "rb") as y:
        return x.read() == y.read()


def main(directory: str) -> None:
    raw = os.path.join(directory, "disk.raw")
    image = os.path.join(directory, "disk.qcow2")
    backup = os.path.join(directory, "backup.raw")
    for p in (raw, image, backup):
        if os.path.exists(p):
            os.unlink(p)
    with open(raw, "wb") as f:
        f.truncate(DISK_SIZE)

    img = qbm.Image.create(image, DISK_SIZE)
    guest = Guest(img, raw)
    guest.write(0, 3 * MiB, b"a")  # before any backup: not tracked by b1

    # Full backup: the checkpoint first, then the copy.
    img.add_bitmap("b1", GRANULARITY)
    guest.written.clear()
    shutil.copyfile(raw, backup)
    print(f"full backup: {DISK_SIZE} bytes")

    guest.write(4096, 512, b"b")
    guest.write(1 * MiB + 100, 70000, b"c")
    img.close()  # b1 is stored and survives a VMM restart
    img = guest.img = qbm.Image.open(image, writable=True)
    guest.write(10 * MiB, GRANULARITY, b"d")
    guest.write(DISK_SIZE - 1, 1, b"e")

    print("incremental backup 1 (b1, then b2 tracks):")
    extents = incremental_backup(guest, "b1", "b2", backup, lambda: guest.write(30 * MiB, 3 * GRANULARITY, b"x"))
    check(
        extents == [(0, 65536), (1048576, 131072), (10485760, 65536), (67043328, 65536)],
        f"unexpected extents {extents}",
    )
    check("b1" not in img, "b1 still exists after the incremental backup")
    check(not same_files(raw, backup), "the write made during backup 1 is already in the backup?")

    guest.write(20 * MiB, 1, b"f")
    print("incremental backup 2 (b2, then b3 tracks):")
    extents = incremental_backup(guest, "b2", "b3", backup)
    check(extents == [(20 * MiB, GRANULARITY), (30 * MiB, 3 * GRANULARITY)], f"unexpected extents {extents}")
    check(same_files(raw, backup), "the full backup plus the incremental copies differ from the disk")
    check(list(img.extents("b3")) == [], "b3 is not empty")
    img.close()
    for p in (raw, image, backup):
        os.unlink(p)
    print("backup example ok")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
