/*
 * Full and incremental backups with libqbm alone (README: "Checkpoints and
 * incremental backup"). `make check-examples` runs it and it checks itself.
 *
 * The "VM" keeps its disk in a raw file, disk.raw, and its bitmaps in a
 * metadata-only qcow2 image, disk.qcow2, of the same size. Every guest write
 * goes to disk.raw and is marked with qbm_mark_dirty.
 *
 *   full backup:    add bitmap "b1" (checkpoint 1), then copy the whole disk;
 *   guest writes:   marked in b1 (in every enabled bitmap);
 *   incremental 1:  add "b2" (checkpoint 2: it tracks from now on), disable
 *                   "b1" (freeze it), copy b1's extents, remove b1; the guest
 *                   writes meanwhile, into b2 only;
 *   incremental 2:  the same with "b3" and "b2".
 *
 * Checks: each frozen bitmap's extents are exactly the granules written
 * between its two checkpoints, and the full backup plus both incremental
 * copies equal the disk byte for byte.
 *
 * Usage: backup [DIR]  (files are created in DIR, default ".")
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <qbm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MiB (UINT64_C(1) << 20)
#define DISK_SIZE (64 * MiB)
#define GRANULARITY UINT64_C(65536)
#define GRANULES (DISK_SIZE / GRANULARITY)

#define CHECK(call)                                                                                      \
    do {                                                                                                 \
        int r_ = (call);                                                                                 \
        if (r_ < 0) {                                                                                    \
            fprintf(stderr, "%s failed: %s (%s)\n", #call, qbm_last_error(), strerror(-r_));            \
            exit(1);                                                                                     \
        }                                                                                                \
    } while (0)

static void die(const char *what)
{
    fprintf(stderr, "backup example: %s\n", what);
    exit(1);
}

static char dir[4096];

static const char *file(const char *name)
{
    static char paths[4][4200];
    static int next;
    char *p = paths[next++ % 4];
    snprintf(p, sizeof paths[0], "%s/%s", dir, name);
    return p;
}

static void copy_range(int from, int to, uint64_t offset, uint64_t length)
{
    static char buf[1 << 16];
    while (length > 0) {
        size_t n = length < sizeof buf ? (size_t)length : sizeof buf;
        if (pread(from, buf, n, (off_t)offset) != (ssize_t)n || pwrite(to, buf, n, (off_t)offset) != (ssize_t)n) {
            die("copy failed");
        }
        offset += n;
        length -= n;
    }
}

/* The guest side: write the data, mark the range. */
static int disk;                      /* disk.raw */
static unsigned char since[GRANULES]; /* granules written since the last checkpoint (the example's own record) */

static void guest_write(struct qbm_image *img, uint64_t offset, uint64_t length, int byte)
{
    char buf[4096];
    memset(buf, byte, sizeof buf);
    for (uint64_t done = 0; done < length;) {
        size_t n = length - done < sizeof buf ? (size_t)(length - done) : sizeof buf;
        if (pwrite(disk, buf, n, (off_t)(offset + done)) != (ssize_t)n) {
            die("guest write failed");
        }
        done += n;
    }
    CHECK(qbm_mark_dirty(img, offset, length));
    for (uint64_t g = offset / GRANULARITY; g <= (offset + length - 1) / GRANULARITY; g++) {
        since[g] = 1;
    }
}

/* Copies the whole disk: the full backup. */
static void full_backup(const char *to)
{
    int out = open(to, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (out < 0 || ftruncate(out, (off_t)DISK_SIZE) != 0) {
        die("cannot create the full backup");
    }
    copy_range(disk, out, 0, DISK_SIZE);
    close(out);
}

/*
 * An incremental backup: new checkpoint `next`, freeze `last`, copy its
 * extents onto `backup` (the previous backups), remove `last`. `during` is
 * a guest write made while the backup runs. Returns the bytes copied; checks
 * that `last` held exactly the granules written since its checkpoint.
 */
static uint64_t incremental_backup(struct qbm_image *img, const char *last, const char *next, const char *backup,
                                   void (*during)(struct qbm_image *))
{
    static unsigned char written[GRANULES];
    uint64_t from = 0, start, length, copied = 0, g = 0;
    int r, out = open(backup, O_RDWR);
    if (out < 0) {
        die("cannot open the backup");
    }
    CHECK(qbm_bitmap_add(img, next, GRANULARITY, 0)); /* 1. the next checkpoint starts tracking */
    CHECK(qbm_bitmap_disable(img, last));             /* 2. freeze the last one */
    memcpy(written, since, sizeof written);
    memset(since, 0, sizeof since);
    if (during != NULL) {
        during(img); /* lands in `next` only: this backup does not copy it */
    }
    /* 3. copy what changed between the two checkpoints */
    while ((r = qbm_bitmap_next_extent(img, last, from, &start, &length)) == 1) {
        printf("  copy [%" PRIu64 ", +%" PRIu64 ")\n", start, length);
        copy_range(disk, out, start, length);
        copied += length;
        /* b1's extents must be exactly the written granules, in order. */
        for (; g < GRANULES && !written[g]; g++) {
        }
        if (start != g * GRANULARITY) {
            die("an extent of the frozen bitmap does not start where the writes since its checkpoint do");
        }
        for (; g < GRANULES && written[g]; g++) {
        }
        if (start + length != (g * GRANULARITY < DISK_SIZE ? g * GRANULARITY : DISK_SIZE)) {
            die("an extent of the frozen bitmap does not end where the writes since its checkpoint do");
        }
        from = start + length;
    }
    CHECK(r);
    for (; g < GRANULES; g++) {
        if (written[g]) {
            die("the frozen bitmap misses a granule written since its checkpoint");
        }
    }
    close(out);
    CHECK(qbm_bitmap_remove(img, last)); /* 4. only once the copy is safe */
    return copied;
}

static void write_during_backup(struct qbm_image *img)
{
    guest_write(img, 30 * MiB, 3 * GRANULARITY, 'x');
}

static int same_files(const char *a, const char *b)
{
    static char x[1 << 16], y[1 << 16];
    int fa = open(a, O_RDONLY), fb = open(b, O_RDONLY), same = fa >= 0 && fb >= 0;
    for (uint64_t at = 0; same && at < DISK_SIZE; at += sizeof x) {
        same = pread(fa, x, sizeof x, (off_t)at) == (ssize_t)sizeof x &&
               pread(fb, y, sizeof y, (off_t)at) == (ssize_t)sizeof y && memcmp(x, y, sizeof x) == 0;
    }
    close(fa);
    close(fb);
    return same;
}

int main(int argc, char **argv)
{
    struct qbm_create_options opts = {.struct_size = sizeof opts, .virtual_size = DISK_SIZE};
    struct qbm_image *img;
    uint64_t start, length, copied, bytes;

    snprintf(dir, sizeof dir, "%s", argc > 1 ? argv[1] : ".");
    unlink(file("disk.qcow2"));
    disk = open(file("disk.raw"), O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (disk < 0 || ftruncate(disk, (off_t)DISK_SIZE) != 0) {
        die("cannot create disk.raw");
    }
    CHECK(qbm_create(file("disk.qcow2"), &opts, &img));

    guest_write(img, 0, 3 * MiB, 'a'); /* before any backup: not tracked by b1 */

    /* Full backup: the checkpoint first, then the copy. */
    CHECK(qbm_bitmap_add(img, "b1", GRANULARITY, 0));
    memset(since, 0, sizeof since);
    full_backup(file("backup.raw"));
    printf("full backup: %" PRIu64 " bytes\n", DISK_SIZE);

    /* The guest keeps writing; the VMM may restart in between. */
    guest_write(img, 4096, 512, 'b');
    guest_write(img, 1 * MiB + 100, 70000, 'c');
    CHECK(qbm_close(img)); /* b1 is stored and survives the restart */
    CHECK(qbm_open(file("disk.qcow2"), QBM_OPEN_RDWR, &img));
    guest_write(img, 10 * MiB, GRANULARITY, 'd');
    guest_write(img, DISK_SIZE - 1, 1, 'e');

    printf("incremental backup 1 (b1, then b2 tracks):\n");
    copied = incremental_backup(img, "b1", "b2", file("backup.raw"), write_during_backup);
    printf("  %" PRIu64 " bytes copied\n", copied);
    if (copied != 5 * GRANULARITY) { /* 4096+512: 1; 1 MiB+100..+70100: 2; 10 MiB: 1; the last byte: 1 */
        die("unexpected number of bytes copied");
    }
    if (qbm_bitmap_dirty_bytes(img, "b1", &bytes) != -ENOENT) {
        die("b1 still exists after the incremental backup");
    }
    if (same_files(file("backup.raw"), file("disk.raw"))) {
        die("the write made during backup 1 is already in the backup?");
    }

    guest_write(img, 20 * MiB, 1, 'f');
    printf("incremental backup 2 (b2, then b3 tracks):\n");
    copied = incremental_backup(img, "b2", "b3", file("backup.raw"), NULL);
    printf("  %" PRIu64 " bytes copied\n", copied);
    if (copied != 4 * GRANULARITY) { /* 30 MiB: 3 (written during backup 1); 20 MiB: 1 */
        die("unexpected number of bytes copied");
    }
    if (!same_files(file("backup.raw"), file("disk.raw"))) {
        die("the full backup plus the incremental copies differ from the disk");
    }
    /* b3 tracks from the last switch on: nothing was written since. */
    if (qbm_bitmap_next_extent(img, "b3", 0, &start, &length) != 0) {
        die("b3 is not empty");
    }
    CHECK(qbm_close(img));
    close(disk);
    unlink(file("disk.raw"));
    unlink(file("backup.raw"));
    unlink(file("disk.qcow2"));
    printf("backup example ok\n");
    return 0;
}
