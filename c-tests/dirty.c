/*
 * Dirty tracking: qbm_mark_dirty marks only enabled bitmaps; qbm_bitmap_set
 * and qbm_bitmap_reset on one bitmap; granule rounding; the partial last
 * granule; ranges past the end; extents and dirty bytes survive reopening.
 */
#include "util.h"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
/* Not a multiple of 64 KiB nor of 4 KiB: the last granule of each is partial. */
#define SIZE (100 * MiB + 12800)
#define LAST64 (100 * MiB)          /* start of the last 64 KiB granule: 12800 bytes */
#define LAST4 (100 * MiB + 12288)   /* start of the last 4 KiB granule: 512 bytes */

#define N(a) (sizeof(a) / sizeof((a)[0]))

/* Ranges outside the disk are refused by every call that takes one. */
static void out_of_range(struct qbm_image *img)
{
    static const uint64_t bad[][2] = {
        {SIZE, 1}, {SIZE - 1, 2}, {0, SIZE + 1}, {SIZE + 65536, 65536}, {UINT64_MAX, 2}, {2, UINT64_MAX},
    };
    for (size_t i = 0; i < N(bad); i++) {
        err(qbm_mark_dirty(img, bad[i][0], bad[i][1]), -EINVAL);
        err(qbm_bitmap_set(img, "g64", bad[i][0], bad[i][1]), -EINVAL);
        err(qbm_bitmap_reset(img, "g64", bad[i][0], bad[i][1]), -EINVAL);
    }
}

/* The state after the marks, sets and resets of main(). */
static const struct extent final_g64[] = {{131072, 65536}, {1 * MiB, 65536}, {2 * MiB, 65536}};
static const struct extent final_g4[] = {{126976, 8192}};
static const struct extent final_off[] = {{0, 65536}, {262144, 65536}, {393216, 131072}, {2 * MiB, 65536}};

static void check_final(struct qbm_image *img)
{
    struct qbm_bitmap_info info;
    check_extents(img, "g64", final_g64, N(final_g64));
    check_extents(img, "g4", final_g4, N(final_g4));
    check_extents(img, "off", final_off, N(final_off));
    expect(find_bitmap(img, "g4", &info));
    expect_eq(info.flags, 0);
    expect_eq(info.dirty_bytes, 8192);
    expect(find_bitmap(img, "off", &info));
    expect_eq(info.flags, QBM_BITMAP_ENABLED);
    expect_eq(info.dirty_bytes, 65536 + 65536 + 131072 + 65536);
}

int main(void)
{
    struct qbm_image *img = create_image("dirty.qcow2", SIZE);
    uint64_t bytes = 1, s = 0, l = 0;

    /* Marking an image without bitmaps is fine (and does nothing). */
    ok(qbm_mark_dirty(img, 0, 4096));

    ok(qbm_bitmap_add(img, "g64", 65536, 0));
    ok(qbm_bitmap_add(img, "g4", 4096, 0));
    ok(qbm_bitmap_add(img, "off", 65536, QBM_BITMAP_DISABLED));
    ok(qbm_bitmap_dirty_bytes(img, "g64", &bytes));
    expect_eq(bytes, 0);
    expect_eq(ok(qbm_bitmap_next_extent(img, "g64", 0, &s, &l)), 0);

    /* One byte at 70000 dirties the whole granule around it. */
    ok(qbm_mark_dirty(img, 70000, 1));
    {
        static const struct extent g64[] = {{65536, 65536}};
        static const struct extent g4[] = {{69632, 4096}};
        check_extents(img, "g64", g64, 1);
        check_extents(img, "g4", g4, 1);
        check_clean(img, "off");
    }
    /* The last byte of the disk: the last granule is clamped to the disk size. */
    ok(qbm_mark_dirty(img, SIZE - 1, 1));
    /* Two bytes across a granule boundary dirty both granules. */
    ok(qbm_mark_dirty(img, 131071, 2));
    {
        static const struct extent g64[] = {{65536, 131072}, {LAST64, SIZE - LAST64}};
        static const struct extent g4[] = {{69632, 4096}, {126976, 8192}, {LAST4, SIZE - LAST4}};
        check_extents(img, "g64", g64, N(g64));
        check_extents(img, "g4", g4, N(g4));
        check_clean(img, "off");
    }

    /* next_extent from an arbitrary clean offset, from the end, and for a missing bitmap. */
    expect_eq(ok(qbm_bitmap_next_extent(img, "g64", 1, &s, &l)), 1);
    expect_eq(s, 65536);
    expect_eq(l, 131072);
    expect_eq(ok(qbm_bitmap_next_extent(img, "g64", 196608 + 5, &s, &l)), 1);
    expect_eq(s, LAST64);
    expect_eq(l, SIZE - LAST64);
    expect_eq(ok(qbm_bitmap_next_extent(img, "g64", SIZE, &s, &l)), 0);
    err_msg(qbm_bitmap_next_extent(img, "nope", 0, &s, &l), -ENOENT, "nope");
    err_msg(qbm_bitmap_dirty_bytes(img, "nope", &bytes), -ENOENT, "nope");

    /* qbm_bitmap_set marks one bitmap, enabled or not. */
    ok(qbm_bitmap_set(img, "off", 0, 1));
    ok(qbm_bitmap_set(img, "off", 300000, 200000)); /* granules 4..7 */
    err_msg(qbm_bitmap_set(img, "nope", 0, 1), -ENOENT, "nope");

    /* Disabled bitmaps are not marked by writes; enabled ones are. */
    ok(qbm_bitmap_disable(img, "g4"));
    ok(qbm_mark_dirty(img, 1 * MiB + 5, 10));
    ok(qbm_bitmap_enable(img, "off"));
    ok(qbm_mark_dirty(img, 2 * MiB, 65536));
    {
        static const struct extent g64[] = {
            {65536, 131072}, {1 * MiB, 65536}, {2 * MiB, 65536}, {LAST64, SIZE - LAST64}};
        static const struct extent g4[] = {{69632, 4096}, {126976, 8192}, {LAST4, SIZE - LAST4}};
        static const struct extent off[] = {{0, 65536}, {262144, 262144}, {2 * MiB, 65536}};
        check_extents(img, "g64", g64, N(g64));
        check_extents(img, "g4", g4, N(g4));
        check_extents(img, "off", off, N(off));
    }

    /* Ranges past the end change nothing. */
    out_of_range(img);

    /* Reset must start on a granule and end on one or at the end of the disk. */
    err(qbm_bitmap_reset(img, "g64", 65537, 65535), -EINVAL);
    err(qbm_bitmap_reset(img, "g64", 131072, 1000), -EINVAL);
    err(qbm_bitmap_reset(img, "g64", LAST64, SIZE - LAST64 - 1), -EINVAL);
    err(qbm_bitmap_reset(img, "g64", LAST64, 65536), -EINVAL); /* a whole granule, past the end */
    err(qbm_bitmap_reset(img, "g4", LAST4 + 1, SIZE - LAST4 - 1), -EINVAL);
    err_msg(qbm_bitmap_reset(img, "nope", 0, 65536), -ENOENT, "nope");
    ok(qbm_bitmap_reset(img, "g64", 65536, 65536));
    ok(qbm_bitmap_reset(img, "g64", LAST64, SIZE - LAST64)); /* ends at the end of the disk */
    ok(qbm_bitmap_reset(img, "g4", 69632, 4096));
    ok(qbm_bitmap_reset(img, "g4", LAST4, SIZE - LAST4));
    ok(qbm_bitmap_reset(img, "off", 327680, 65536)); /* splits an extent */
    ok(qbm_bitmap_reset(img, "off", 3 * MiB, 1 * MiB)); /* clean already: fine */
    check_final(img);
    ok(qbm_close(img));

    /* Read-only: the same extents; marking is refused. */
    img = open_image("dirty.qcow2", 0);
    check_final(img);
    err(qbm_mark_dirty(img, 0, 1), -EROFS);
    err(qbm_bitmap_set(img, "g64", 0, 1), -EROFS);
    err(qbm_bitmap_reset(img, "g64", 131072, 65536), -EROFS);
    check_final(img);
    ok(qbm_close(img));

    /* Read-write again: whole-disk mark and reset. */
    img = open_image("dirty.qcow2", QBM_OPEN_RDWR);
    check_final(img);
    ok(qbm_mark_dirty(img, 0, SIZE));
    {
        static const struct extent whole[] = {{0, SIZE}};
        check_extents(img, "g64", whole, 1);
        check_extents(img, "off", whole, 1);
        check_extents(img, "g4", final_g4, N(final_g4)); /* still disabled */
    }
    ok(qbm_bitmap_reset(img, "g64", 0, SIZE));
    check_clean(img, "g64");
    ok(qbm_bitmap_set(img, "g4", 0, SIZE));
    ok(qbm_close(img));

    img = open_image("dirty.qcow2", 0);
    {
        static const struct extent whole[] = {{0, SIZE}};
        check_clean(img, "g64");
        check_extents(img, "off", whole, 1);
        check_extents(img, "g4", whole, 1);
    }
    ok(qbm_close(img));
    return test_pass("dirty", NULL);
}
