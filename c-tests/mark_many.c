/*
 * qbm_mark_dirty_many: a batch marks what one qbm_mark_dirty per range
 * marks (in every enabled bitmap, none in a disabled one, persisted), and
 * refuses bad arguments with nothing marked: NULL handle, NULL ranges, a
 * count too large to be an array, a range past the end or overflowing, a
 * read-only handle.
 */
#include "util.h"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define SIZE (64 * MiB + 512) /* the last 64 KiB granule is partial */

#define N(a) (sizeof(a) / sizeof((a)[0]))

int main(void)
{
    struct qbm_image *img = create_image("many.qcow2", SIZE);
    ok(qbm_bitmap_add(img, "g64", 65536, 0));
    ok(qbm_bitmap_add(img, "g4", 4096, 0));
    ok(qbm_bitmap_add(img, "off", 65536, QBM_BITMAP_DISABLED));

    /* Refused, with nothing marked. */
    static const struct qbm_range good[] = {{0, 4096}};
    static const struct qbm_range past_end[] = {{0, 4096}, {8 * MiB, 4096}, {SIZE - 512, 513}};
    static const struct qbm_range overflow[] = {{8 * MiB, 4096}, {UINT64_MAX, 2}};
    err_msg(qbm_mark_dirty_many(NULL, good, 1), -EINVAL, "handle is NULL");
    err_msg(qbm_mark_dirty_many(img, NULL, 1), -EINVAL, "ranges is NULL");
    err_msg(qbm_mark_dirty_many(img, NULL, 0), -EINVAL, "ranges is NULL");
    err_msg(qbm_mark_dirty_many(img, good, SIZE_MAX), -EINVAL, "too large");
    err_msg(qbm_mark_dirty_many(img, past_end, N(past_end)), -EINVAL, "range 2 of 3");
    err_msg(qbm_mark_dirty_many(img, overflow, N(overflow)), -EINVAL, "range 1 of 2");
    check_clean(img, "g64");
    check_clean(img, "g4");

    /* Count 0 marks nothing. */
    ok(qbm_mark_dirty_many(img, good, 0));
    check_clean(img, "g64");

    /* A batch: 4 KiB writes, one spanning two 64 KiB granules, an empty
     * one, and the partial last granule. */
    static const struct qbm_range batch[] = {
        {4 * KiB, 4 * KiB}, {1 * MiB, 4 * KiB}, {2 * MiB - 4 * KiB, 8 * KiB},
        {5 * MiB, 0},       {SIZE - 1, 1},      {1 * MiB + 8 * KiB, 4 * KiB},
    };
    ok(qbm_mark_dirty_many(img, batch, N(batch)));
    static const struct extent want64[] = {
        {0, 65536}, {1 * MiB, 65536}, {2 * MiB - 65536, 131072}, {64 * MiB, 512}};
    static const struct extent want4[] = {
        {4 * KiB, 4 * KiB}, {1 * MiB, 4 * KiB}, {1 * MiB + 8 * KiB, 4 * KiB}, {2 * MiB - 4 * KiB, 8 * KiB},
        {64 * MiB, 512}};
    check_extents(img, "g64", want64, N(want64));
    check_extents(img, "g4", want4, N(want4));
    check_clean(img, "off");
    ok(qbm_close(img));

    /* Persisted; a read-only handle refuses to mark. */
    img = open_image("many.qcow2", 0);
    check_extents(img, "g64", want64, N(want64));
    check_extents(img, "g4", want4, N(want4));
    err(qbm_mark_dirty_many(img, good, 1), -EROFS);
    ok(qbm_close(img));

    if (qemu_img_available()) {
        expect_eq(run_cmd("qemu-img check -q '%s'", test_path("many.qcow2")), 0);
    }
    return test_pass("mark_many", NULL);
}
