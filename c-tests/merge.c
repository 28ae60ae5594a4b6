/*
 * qbm_bitmap_merge: within one image and across two, between different
 * granularities (exact rounding), and its failures (disk sizes differ,
 * missing bitmaps, read-only destination).
 */
#include "util.h"

#define MiB (UINT64_C(1) << 20)
/* A multiple of 4 KiB but not of 64 KiB: the last 64 KiB granule is 12 KiB. */
#define SIZE (10 * MiB + 12288)
#define LAST64 (10 * MiB)

#define N(a) (sizeof(a) / sizeof((a)[0]))

static const struct extent s4_bits[] = {{4096, 4096}, {143360, 8192}, {SIZE - 4096, 4096}};
static const struct extent s64_bits[] = {{196608, 65536}, {LAST64, SIZE - LAST64}};
static const struct extent x_bits[] = {{512, 512}, {SIZE - 512, 512}};

/* Fine into coarse: each source bit dirties the whole coarse granule around it. */
static const struct extent d64_after[] = {{0, 65536}, {131072, 65536}, {327680, 65536}, {LAST64, SIZE - LAST64}};
/* Coarse into fine: every fine granule under a coarse bit, clamped at the end. */
static const struct extent d4_after[] = {{0, 4096}, {196608, 65536}, {LAST64, SIZE - LAST64}};
/* 512-byte granularity from image B into 4 KiB in image A. */
static const struct extent cross_after[] = {{0, 4096}, {SIZE - 4096, 4096}};
/* Image B's "x" after merging A's "s64" into it. */
static const struct extent x_after[] = {{512, 512}, {196608, 65536}, {LAST64, SIZE - LAST64}};

static void set_all(struct qbm_image *img, const char *name, const struct extent *e, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        ok(qbm_bitmap_set(img, name, e[i].start, e[i].length));
    }
}

static void check_a(struct qbm_image *a)
{
    check_extents(a, "s4", s4_bits, N(s4_bits));
    check_extents(a, "s64", s64_bits, N(s64_bits));
    check_extents(a, "d64", d64_after, N(d64_after));
    check_extents(a, "d4", d4_after, N(d4_after));
    check_extents(a, "cross", cross_after, N(cross_after));
}

int main(void)
{
    struct qbm_image *a = create_image("a.qcow2", SIZE);
    struct qbm_image *b = create_image("b.qcow2", SIZE);
    struct qbm_image *c = create_image("c.qcow2", SIZE + 65536);
    struct qbm_bitmap_info info;

    ok(qbm_bitmap_add(a, "s4", 4096, QBM_BITMAP_DISABLED));
    ok(qbm_bitmap_add(a, "s64", 65536, QBM_BITMAP_DISABLED));
    ok(qbm_bitmap_add(a, "d64", 65536, QBM_BITMAP_DISABLED));
    ok(qbm_bitmap_add(a, "d4", 4096, 0));
    ok(qbm_bitmap_add(a, "cross", 4096, 0));
    ok(qbm_bitmap_add(b, "x", 512, 0));
    ok(qbm_bitmap_add(c, "c", 65536, 0));
    set_all(a, "s4", s4_bits, N(s4_bits));
    set_all(a, "s64", s64_bits, N(s64_bits));
    set_all(b, "x", x_bits, N(x_bits));
    ok(qbm_bitmap_set(a, "d64", 327680, 1)); /* merge ORs: existing bits stay */
    ok(qbm_bitmap_set(a, "d4", 0, 1));
    ok(qbm_bitmap_set(c, "c", 0, SIZE + 65536));

    /* Within one image, 4 KiB into 64 KiB (a disabled destination) and back. */
    ok(qbm_bitmap_merge(a, "d64", a, "s4"));
    ok(qbm_bitmap_merge(a, "d4", a, "s64"));
    /* Merging the same source twice changes nothing more. */
    ok(qbm_bitmap_merge(a, "d4", a, "s64"));

    /* Across images: 512 B granularity into 4 KiB, and 64 KiB into 512 B. */
    ok(qbm_bitmap_merge(a, "cross", b, "x"));
    ok(qbm_bitmap_merge(b, "x", a, "s64"));
    check_a(a);
    check_extents(b, "x", x_after, N(x_after));

    /* Merge leaves the destination's settings alone. */
    expect(find_bitmap(a, "d64", &info));
    expect_eq(info.flags, 0);
    expect_eq(info.granularity, 65536);

    /* Disk sizes must match, in either direction. */
    err(qbm_bitmap_merge(a, "d4", c, "c"), -EINVAL);
    err(qbm_bitmap_merge(c, "c", a, "s4"), -EINVAL);

    /* Missing bitmaps, on either side and in either image. */
    err_msg(qbm_bitmap_merge(a, "d4", a, "nope"), -ENOENT, "nope");
    err_msg(qbm_bitmap_merge(a, "nope", a, "s4"), -ENOENT, "nope");
    err_msg(qbm_bitmap_merge(a, "d4", b, "s4"), -ENOENT, "s4");
    err(qbm_bitmap_merge(b, "x", a, "x"), -ENOENT);
    err(qbm_bitmap_merge(a, "d4", a, "\xff"), -EINVAL);

    /* None of the failures changed anything. */
    check_a(a);
    check_extents(b, "x", x_after, N(x_after));
    ok(qbm_close(b));
    ok(qbm_close(c));

    /* A read-only destination is refused; a read-only source is fine. */
    b = open_image("b.qcow2", 0);
    err(qbm_bitmap_merge(b, "x", a, "s4"), -EROFS);
    err(qbm_bitmap_merge(b, "x", b, "x"), -EROFS);
    ok(qbm_bitmap_add(a, "from-ro", 4096, 0));
    ok(qbm_bitmap_merge(a, "from-ro", b, "x"));
    {
        static const struct extent want[] = {{0, 4096}, {196608, 65536}, {LAST64, SIZE - LAST64}};
        check_extents(a, "from-ro", want, N(want));
    }
    check_extents(b, "x", x_after, N(x_after));
    ok(qbm_close(b));
    ok(qbm_close(a));

    /* Merged bits persist. */
    a = open_image("a.qcow2", 0);
    check_a(a);
    ok(qbm_close(a));
    b = open_image("b.qcow2", 0);
    check_extents(b, "x", x_after, N(x_after));
    ok(qbm_close(b));
    return test_pass("merge", NULL);
}
