/*
 * libqbm in one page: what a hypervisor and a backup tool do with it.
 *
 *   ./demo IMAGE.qcow2
 *
 * 1. Create a 1 GiB qcow2 image (64 KiB clusters).
 * 2. Add bitmap "frozen" and let the "guest" write: every write is passed to
 *    qbm_mark_dirty(), which marks all enabled bitmaps (from any thread).
 * 3. Take a checkpoint: disable "frozen" (it keeps the writes so far) and add
 *    "backup-1", which tracks the writes from now on.
 * 4. More guest writes, then close: the bitmaps are stored in the image the
 *    way QEMU stores them (`qemu-img info` lists them afterwards).
 * 5. Reopen read-only, as a backup tool would, and print every bitmap with
 *    its dirty extents.
 *
 * Every call returns a negative errno on failure and qbm_last_error() says why.
 */
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qbm.h"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define GiB (UINT64_C(1) << 30)

/* Stop at the first failing call, with the library's message. */
#define CHECK(call)                                                                          \
    do {                                                                                     \
        int rc_ = (call);                                                                    \
        if (rc_ < 0) {                                                                       \
            fprintf(stderr, "demo: %s failed (%d): %s\n", #call, rc_, qbm_last_error());    \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

/* A guest write of `len` bytes at `off`: the hot path is one call. */
static void guest_write(struct qbm_image *img, uint64_t off, uint64_t len)
{
    printf("  guest writes %8" PRIu64 " bytes at offset %10" PRIu64 "\n", len, off);
    CHECK(qbm_mark_dirty(img, off, len));
}

/* Prints one bitmap and its dirty extents. */
static void print_bitmap(struct qbm_image *img, uint32_t index)
{
    struct qbm_bitmap_info info = {.struct_size = sizeof info};
    uint64_t from = 0, start, length;
    int rc;

    CHECK(qbm_bitmap_get_info(img, index, &info));
    printf("%-10s %11" PRIu64 "  %-8s %12" PRIu64 "\n", info.name, info.granularity,
           (info.flags & QBM_BITMAP_IN_USE)    ? "in-use"
           : (info.flags & QBM_BITMAP_ENABLED) ? "enabled"
                                               : "disabled",
           info.dirty_bytes);

    /* Walk the dirty runs: 1 = found one, 0 = no more, < 0 = error. */
    while ((rc = qbm_bitmap_next_extent(img, info.name, from, &start, &length)) == 1) {
        printf("%13s[%10" PRIu64 ", %10" PRIu64 ")  %8" PRIu64 " bytes\n", "", start, start + length, length);
        from = start + length;
    }
    CHECK(rc);
}

int main(int argc, char **argv)
{
    struct qbm_create_options opts = {
        .struct_size = sizeof opts, /* lets the library grow the struct compatibly */
        .virtual_size = 1 * GiB,
        .cluster_size = 64 * KiB,   /* 0 would mean the same default */
    };
    struct qbm_image *img = NULL;
    uint32_t count = 0;

    if (argc != 2) {
        fprintf(stderr, "usage: %s IMAGE.qcow2\n", argv[0]);
        return 2;
    }
    printf("libqbm %s: creating %s (1 GiB, 64 KiB clusters)\n", qbm_version(), argv[1]);
    CHECK(qbm_create(argv[1], &opts, &img));

    /* A bitmap with 4 KiB granularity: one bit per 4 KiB of guest disk. */
    CHECK(qbm_bitmap_add(img, "frozen", 4 * KiB, 0));
    printf("added bitmap \"frozen\"\n");
    guest_write(img, 0, 512);           /* the boot sector */
    guest_write(img, 70000, 1);         /* one byte dirties its whole granule */
    guest_write(img, 100 * MiB, 1 * MiB);

    /* Checkpoint: freeze "frozen", track new writes in "backup-1". */
    CHECK(qbm_bitmap_disable(img, "frozen"));
    CHECK(qbm_bitmap_add(img, "backup-1", 0, 0)); /* 0: default granularity (64 KiB here) */
    printf("froze \"frozen\", added bitmap \"backup-1\"\n");
    guest_write(img, 70000, 1);         /* again: now only "backup-1" sees it */
    guest_write(img, 512 * MiB - 4 * KiB, 8 * KiB);
    guest_write(img, 1 * GiB - 1, 1);   /* the last byte of the disk */

    /* Close stores the bitmaps (qbm_flush would store them and keep going). */
    CHECK(qbm_close(img));
    img = NULL;

    /* A backup tool: open read-only and list what changed. */
    CHECK(qbm_open(argv[1], 0, &img));
    CHECK(qbm_bitmap_count(img, &count));
    printf("\n%s has %" PRIu32 " bitmaps:\n\n", argv[1], count);
    printf("%-10s %11s  %-8s %12s\n", "bitmap", "granularity", "state", "dirty bytes");
    printf("%-10s %11s  %-8s %12s\n", "------", "-----------", "-----", "-----------");
    for (uint32_t i = 0; i < count; i++) {
        print_bitmap(img, i);
    }
    CHECK(qbm_close(img));
    return 0;
}
