#!/usr/bin/env python3
"""Cuts QEMU-made qcow2 images into seeds for each fuzz target.

Usage: extract_seeds.py CORPUS_DIR IMAGE...

Input layouts (the fuzz targets decode the same prefixes):
  open_image    the whole image
  header        cluster 0, up to the end of the extensions and backing name
  extension     [cluster_bits - 9] + the extension area after the header
  bitmap_dir    [cluster_bits - 9] + disk size (u64 BE) + nb_bitmaps (u32 BE)
                + the directory bytes
  bitmap_table  [cluster_bits - 9] + the table bytes
  refcount      [cluster_bits - 9] + [refcount_order] + a refcount table or block
"""
import hashlib
import os
import struct
import sys

BITMAPS = 0x23852875


def be(fmt, b, at):
    return struct.unpack_from(">" + fmt, b, at)[0]


def put(corpus, target, data):
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def extensions(c0, start):
    at = start
    while at + 8 <= len(c0):
        magic, length = be("I", c0, at), be("I", c0, at + 4)
        if magic == 0:
            return at + 8
        yield magic, c0[at + 8 : at + 8 + length]
        at += 8 + (length + 7) // 8 * 8


def seeds(corpus, path):
    img = open(path, "rb").read()
    put(corpus, "open_image", img)
    version = be("I", img, 4)
    cluster_bits = be("I", img, 20)
    cs = 1 << cluster_bits
    size = be("Q", img, 24)
    rt_off, rt_clusters = be("Q", img, 48), be("I", img, 56)
    order, hlen = (be("I", img, 96), be("I", img, 100)) if version == 3 else (4, 72)
    c0 = img[:cs]
    cb = bytes([cluster_bits - 9])

    exts = list(extensions(c0, hlen))
    ext_end = hlen + sum(8 + (len(d) + 7) // 8 * 8 for _, d in exts) + 8
    backing_off, backing_len = be("Q", img, 8), be("I", img, 16)
    end = max(ext_end, backing_off + backing_len if backing_off else 0)
    put(corpus, "header", c0[:end])
    put(corpus, "extension", cb + c0[hlen:ext_end])

    rt = img[rt_off : rt_off + rt_clusters * cs]
    used = len(rt.rstrip(b"\0"))
    put(corpus, "refcount", cb + bytes([order]) + rt[: max(8, (used + 7) // 8 * 8)])
    for i in range(0, len(rt), 8):
        block = be("Q", rt, i)
        if block:
            put(corpus, "refcount", cb + bytes([order]) + img[block : block + cs])

    for magic, data in exts:
        if magic != BITMAPS or version != 3:
            continue
        nb, dir_size, dir_off = be("I", data, 0), be("Q", data, 8), be("Q", data, 16)
        directory = img[dir_off : dir_off + dir_size]
        put(corpus, "bitmap_dir", cb + struct.pack(">QI", size, nb) + directory)
        at = 0
        for _ in range(nb):
            t_off, t_size = be("Q", directory, at), be("I", directory, at + 8)
            name_size, extra = be("H", directory, at + 18), be("I", directory, at + 20)
            put(corpus, "bitmap_table", cb + img[t_off : t_off + 8 * t_size])
            at += (24 + extra + name_size + 7) // 8 * 8


def main():
    corpus = sys.argv[1]
    for path in sys.argv[2:]:
        seeds(corpus, path)


if __name__ == "__main__":
    main()
