/*
 * Bitmap management: add (granularity, default granularity, disabled), count,
 * get_info, remove, clear, enable, disable, rename; their failures; -EROFS on
 * a read-only handle; everything persists across close and reopen.
 */
#include "util.h"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define GiB (UINT64_C(1) << 30)
#define SIZE GiB

static struct qbm_bitmap_info info_at(struct qbm_image *img, uint32_t index)
{
    struct qbm_bitmap_info info;
    memset(&info, 0xff, sizeof info); /* the name must come back NUL-terminated */
    info.struct_size = sizeof info;
    ok(qbm_bitmap_get_info(img, index, &info));
    expect_eq(info.struct_size, sizeof info);
    expect(memchr(info.name, '\0', sizeof info.name) != NULL);
    return info;
}

static void check_bitmap(struct qbm_image *img, uint32_t index, const char *name, uint64_t granularity,
                         uint32_t flags, uint64_t dirty)
{
    struct qbm_bitmap_info info = info_at(img, index);
    if (strcmp(info.name, name) != 0) {
        fprintf(stderr, "bitmap #%u is named \"%s\", expected \"%s\"\n", index, info.name, name);
        exit(1);
    }
    expect_eq(info.granularity, granularity);
    expect_eq(info.flags, flags);
    expect_eq(info.extra_data_size, 0);
    expect_eq(info.dirty_bytes, dirty);
}

static void check_count(struct qbm_image *img, uint32_t want)
{
    uint32_t count = 12345;
    struct qbm_image_info ii;
    struct qbm_bitmap_info bi;
    ok(qbm_bitmap_count(img, &count));
    expect_eq(count, want);
    memset(&ii, 0, sizeof ii);
    ii.struct_size = sizeof ii;
    ok(qbm_image_get_info(img, &ii));
    expect_eq(ii.bitmap_count, want);
    /* One past the end, and far past it. */
    memset(&bi, 0, sizeof bi);
    bi.struct_size = sizeof bi;
    err(qbm_bitmap_get_info(img, want, &bi), -ENOENT);
    err(qbm_bitmap_get_info(img, UINT32_MAX, &bi), -ENOENT);
}

/* Default granularity: the cluster size within 4 KiB..64 KiB. */
static void default_granularity(void)
{
    static const uint64_t clusters[][2] = {
        {512, 4 * KiB}, {4 * KiB, 4 * KiB}, {32 * KiB, 32 * KiB}, {64 * KiB, 64 * KiB}, {2 * MiB, 64 * KiB},
    };
    for (size_t i = 0; i < sizeof clusters / sizeof clusters[0]; i++) {
        struct qbm_create_options o = create_opts(SIZE);
        struct qbm_image *img = NULL;
        char name[64];
        snprintf(name, sizeof name, "default-gran-%" PRIu64 ".qcow2", clusters[i][0]);
        o.cluster_size = clusters[i][0];
        ok(qbm_create(test_path(name), &o, &img));
        ok(qbm_bitmap_add(img, "d", 0, 0));
        check_bitmap(img, 0, "d", clusters[i][1], QBM_BITMAP_ENABLED, 0);
        ok(qbm_close(img));
    }
}

static void bad_adds(struct qbm_image *img)
{
    static const uint64_t bad_gran[] = {1, 256, 511, 513, 3000, 3 * 4096, UINT64_C(1) << 32, UINT64_MAX};
    char long_name[QBM_NAME_MAX + 2];

    /* Duplicates, whatever the other arguments. */
    err_msg(qbm_bitmap_add(img, "a", 0, 0), -EEXIST, "a");
    err(qbm_bitmap_add(img, "a", 4096, QBM_BITMAP_DISABLED), -EEXIST);

    /* Bad names: empty, too long, not UTF-8. */
    err(qbm_bitmap_add(img, "", 0, 0), -EINVAL);
    memset(long_name, 'n', QBM_NAME_MAX + 1);
    long_name[QBM_NAME_MAX + 1] = '\0';
    err(qbm_bitmap_add(img, long_name, 0, 0), -EINVAL);
    err(qbm_bitmap_add(img, "\xff\xfe", 0, 0), -EINVAL);
    err(qbm_bitmap_add(img, "bad-\x80-continuation", 0, 0), -EINVAL);
    err(qbm_bitmap_add(img, "overlong-\xc0\xaf", 0, 0), -EINVAL);

    /* Bad granularities: not a power of two, below 512, above 2 GiB. */
    for (size_t i = 0; i < sizeof bad_gran / sizeof bad_gran[0]; i++) {
        err(qbm_bitmap_add(img, "g", bad_gran[i], 0), -EINVAL);
    }

    /* Unknown flags. */
    err(qbm_bitmap_add(img, "f", 0, 2), -EINVAL);
    err(qbm_bitmap_add(img, "f", 0, 0x80000000u), -EINVAL);

    /* Nothing of the above was added. */
    check_count(img, 5);
}

/* Every change fails with -EROFS on a read-only handle and changes nothing. */
static void read_only(struct qbm_image *ro, struct qbm_image *rw_other)
{
    struct qbm_image_info ii;
    memset(&ii, 0, sizeof ii);
    ii.struct_size = sizeof ii;
    ok(qbm_image_get_info(ro, &ii));
    expect_eq(ii.flags & QBM_IMAGE_WRITABLE, 0);

    err(qbm_bitmap_add(ro, "new", 0, 0), -EROFS);
    err(qbm_bitmap_remove(ro, "a"), -EROFS);
    err(qbm_bitmap_clear(ro, "b2"), -EROFS);
    err(qbm_bitmap_enable(ro, "a"), -EROFS);
    err(qbm_bitmap_disable(ro, "c"), -EROFS);
    err(qbm_bitmap_rename(ro, "a", "renamed"), -EROFS);
    err(qbm_bitmap_set(ro, "a", 0, 4096), -EROFS);
    err(qbm_bitmap_reset(ro, "b2", 0, SIZE), -EROFS);
    err(qbm_mark_dirty(ro, 0, 4096), -EROFS);
    err(qbm_bitmap_merge(ro, "a", ro, "b2"), -EROFS);
    err(qbm_bitmap_merge(ro, "a", rw_other, "x"), -EROFS);
}

static const char utf8_name[] = "sauvegarde-\xc3\xa9t\xc3\xa9-\xe2\x9c\x93"; /* "sauvegarde-été-✓" */

/* The state after main()'s changes, as seen through any handle. */
static void check_final_state(struct qbm_image *img)
{
    static const struct extent b2[] = {{40960, 12288}, {SIZE - 4096, 4096}};
    static const struct extent c[] = {{512, 512}};
    check_count(img, 4);
    check_bitmap(img, 0, "a", 64 * KiB, 0, 0);
    check_bitmap(img, 1, "b2", 4 * KiB, QBM_BITMAP_ENABLED, 12288 + 4096);
    check_bitmap(img, 2, "c", 512, QBM_BITMAP_ENABLED, 512);
    check_bitmap(img, 3, utf8_name, UINT64_C(1) << 31, QBM_BITMAP_ENABLED, 0);
    check_clean(img, "a");
    check_extents(img, "b2", b2, 2);
    check_extents(img, "c", c, 1);
    check_clean(img, utf8_name);
}

int main(void)
{
    const char *path;
    struct qbm_image *img, *other;
    struct qbm_bitmap_info bi;
    char max_name[QBM_NAME_MAX + 1];
    int have_qemu = qemu_img_available();

    default_granularity();

    img = create_image("bitmaps.qcow2", SIZE);
    path = test_path("bitmaps.qcow2");
    check_count(img, 0);

    /* Add: default granularity, explicit ones, disabled, the largest granularity. */
    ok(qbm_bitmap_add(img, "a", 0, 0));
    ok(qbm_bitmap_add(img, "b", 4096, 0));
    ok(qbm_bitmap_add(img, "c", 512, QBM_BITMAP_DISABLED));
    ok(qbm_bitmap_add(img, utf8_name, UINT64_C(1) << 31, 0));
    memset(max_name, 'm', QBM_NAME_MAX);
    max_name[QBM_NAME_MAX] = '\0';
    ok(qbm_bitmap_add(img, max_name, 65536, QBM_BITMAP_DISABLED));
    check_count(img, 5);
    check_bitmap(img, 0, "a", 64 * KiB, QBM_BITMAP_ENABLED, 0);
    check_bitmap(img, 1, "b", 4 * KiB, QBM_BITMAP_ENABLED, 0);
    check_bitmap(img, 2, "c", 512, 0, 0);
    check_bitmap(img, 3, utf8_name, UINT64_C(1) << 31, QBM_BITMAP_ENABLED, 0);
    check_bitmap(img, 4, max_name, 64 * KiB, 0, 0);
    bi = info_at(img, 4);
    expect_eq(strlen(bi.name), QBM_NAME_MAX); /* full 1023 bytes and the NUL */

    /* bitmap_info.struct_size too small. */
    memset(&bi, 0, sizeof bi);
    err(qbm_bitmap_get_info(img, 0, &bi), -EINVAL);
    bi.struct_size = sizeof bi - 1;
    err(qbm_bitmap_get_info(img, 0, &bi), -EINVAL);

    bad_adds(img);

    /* Some bits, so that persistence and clear can be seen. */
    ok(qbm_bitmap_set(img, "a", 0, 1));
    ok(qbm_bitmap_set(img, "b", 40960, 12288));
    ok(qbm_bitmap_set(img, "b", SIZE - 1, 1));
    ok(qbm_bitmap_set(img, "c", 1000, 1)); /* disabled bitmaps can still be set */

    /* Clear. */
    ok(qbm_bitmap_clear(img, "a"));
    check_clean(img, "a");
    ok(qbm_bitmap_clear(img, "a")); /* clearing a clean bitmap is fine */
    err_msg(qbm_bitmap_clear(img, "nope"), -ENOENT, "nope");

    /* Enable / disable (idempotent), unknown names. */
    ok(qbm_bitmap_disable(img, "a"));
    ok(qbm_bitmap_disable(img, "a"));
    ok(qbm_bitmap_enable(img, "c"));
    ok(qbm_bitmap_enable(img, "c"));
    check_bitmap(img, 0, "a", 64 * KiB, 0, 0);
    check_bitmap(img, 2, "c", 512, QBM_BITMAP_ENABLED, 512);
    err_msg(qbm_bitmap_enable(img, "nope"), -ENOENT, "nope");
    err_msg(qbm_bitmap_disable(img, "nope"), -ENOENT, "nope");
    err_msg(qbm_bitmap_enable(img, ""), -EINVAL, "empty"); /* a name no bitmap can have: a bad argument */
    err(qbm_bitmap_disable(img, "\xff"), -EINVAL); /* not UTF-8 */

    /* Rename: the bits and settings follow the name. */
    ok(qbm_bitmap_rename(img, "b", "b2"));
    check_bitmap(img, 1, "b2", 4 * KiB, QBM_BITMAP_ENABLED, 16384);
    err(qbm_bitmap_dirty_bytes(img, "b", &(uint64_t){0}), -ENOENT);
    err_msg(qbm_bitmap_rename(img, "b2", "a"), -EEXIST, "a");
    err_msg(qbm_bitmap_rename(img, "b", "b3"), -ENOENT, "b");
    err(qbm_bitmap_rename(img, "b2", ""), -EINVAL);
    err(qbm_bitmap_rename(img, "b2", "\xff\xfe"), -EINVAL);
    {
        char too_long[QBM_NAME_MAX + 2];
        memset(too_long, 'r', QBM_NAME_MAX + 1);
        too_long[QBM_NAME_MAX + 1] = '\0';
        err(qbm_bitmap_rename(img, "b2", too_long), -EINVAL);
    }
    check_bitmap(img, 1, "b2", 4 * KiB, QBM_BITMAP_ENABLED, 16384);

    /* Remove: the last one (the long name), then unknown and repeated names. */
    ok(qbm_bitmap_remove(img, max_name));
    err(qbm_bitmap_remove(img, max_name), -ENOENT);
    err_msg(qbm_bitmap_remove(img, "nope"), -ENOENT, "nope");
    err_msg(qbm_bitmap_remove(img, ""), -EINVAL, "empty");
    /* A removed name can be added again, then removed again. */
    ok(qbm_bitmap_add(img, "tmp", 0, 0));
    ok(qbm_bitmap_remove(img, "tmp"));

    check_final_state(img);
    ok(qbm_flush(img));
    check_final_state(img);
    ok(qbm_close(img));

    /* Read-only: every query works, every change is -EROFS. */
    img = open_image("bitmaps.qcow2", 0);
    other = create_image("other.qcow2", SIZE);
    ok(qbm_bitmap_add(other, "x", 0, 0));
    check_final_state(img);
    read_only(img, other);
    check_final_state(img);
    ok(qbm_close(other));
    ok(qbm_close(img));

    /* Read-write again: the same state, and still after a change and back. */
    img = open_image("bitmaps.qcow2", QBM_OPEN_RDWR);
    check_final_state(img);
    ok(qbm_bitmap_disable(img, "b2"));
    ok(qbm_bitmap_enable(img, "b2"));
    ok(qbm_close(img));
    img = open_image("bitmaps.qcow2", 0);
    check_final_state(img);
    ok(qbm_close(img));

    if (have_qemu) {
        char *json = run_capture("qemu-img info --output=json '%s'", path);
        expect(json != NULL);
        expect(strstr(json, "\"name\": \"b2\"") != NULL);
        expect(strstr(json, "\"name\": \"c\"") != NULL);
        expect(strstr(json, "\"name\": \"a\"") != NULL);
        expect(strstr(json, "in-use") == NULL);
        free(json);
        if (run_cmd("qemu-img check -q '%s'", path) != 0) {
            fprintf(stderr, "qemu-img check failed on %s\n", path);
            run_cmd("qemu-img check '%s' >&2", path);
            return 1;
        }
    }
    return test_pass("bitmaps", NULL);
}
