/*
 * Image locking, compatible with QEMU's: a read-write handle excludes every
 * other opener (-EBUSY, as between two QEMUs) but a QBM_OPEN_FORCE_SHARE
 * reader, read-only handles share, and libqbm and QEMU's tools see each
 * other's locks.
 */
#define _GNU_SOURCE /* F_OFD_GETLK */
#include "util.h"

#include <fcntl.h>
#include <time.h>

#define SIZE (UINT64_C(64) << 20)

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* True if another open file description holds a lock on `byte` of `path`. */
static int lock_byte_held(const char *path, off_t byte)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        return 0;
    }
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1};
    int held = fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
    close(fd);
    return held;
}

int main(void)
{
    const char *path = test_path("locks.qcow2");
    struct qbm_image *rw = create_image("locks.qcow2", SIZE);
    struct qbm_image *ro1 = NULL, *ro2 = NULL, *img = NULL;
    struct qbm_bitmap_info info;
    int have_qemu;

    /* A read-write handle: nobody else may open the image ... */
    ok(qbm_bitmap_add(rw, "b", 0, 0));
    ok(qbm_flush(rw));
    err_msg(qbm_open(path, QBM_OPEN_RDWR, &img), -EBUSY, "lock");
    err(qbm_open(path, 0, &img), -EBUSY);
    expect(img == NULL);
    /* ... except a read-only force-share reader, which sees the bitmap in use. */
    err(qbm_open(path, QBM_OPEN_RDWR | QBM_OPEN_FORCE_SHARE, &img), -EINVAL);
    expect(img == NULL);
    img = open_image("locks.qcow2", QBM_OPEN_FORCE_SHARE);
    expect(find_bitmap(img, "b", &info));
    expect_eq(info.flags, QBM_BITMAP_ENABLED | QBM_BITMAP_IN_USE);
    err(qbm_bitmap_add(img, "c", 0, 0), -EROFS);
    ok(qbm_close(img));
    img = NULL;
    ok(qbm_close(rw));

    /* Read-only handles share the image, and exclude writers. */
    ro1 = open_image("locks.qcow2", 0);
    ro2 = open_image("locks.qcow2", 0);
    err(qbm_open(path, QBM_OPEN_RDWR, &img), -EBUSY);
    img = open_image("locks.qcow2", QBM_OPEN_FORCE_SHARE);
    expect(find_bitmap(img, "b", &info));
    expect_eq(info.flags, QBM_BITMAP_ENABLED); /* closed cleanly: not in use */
    ok(qbm_close(img));
    img = NULL;
    ok(qbm_close(ro1));
    err(qbm_open(path, QBM_OPEN_RDWR, &img), -EBUSY);
    ok(qbm_close(ro2));
    /* All closed: the locks are gone. */
    rw = open_image("locks.qcow2", QBM_OPEN_RDWR);

    have_qemu = qemu_img_available();
    if (have_qemu) {
        /* QEMU's tools respect libqbm's lock ... */
        expect(run_cmd("qemu-img bitmap --add '%s' q 2>/dev/null", path) != 0);
        expect(run_cmd("qemu-img info '%s' >/dev/null 2>&1", path) != 0);
        expect(run_cmd("qemu-img info -U '%s' >/dev/null", path) == 0); /* force share */
        ok(qbm_close(rw));
        expect(run_cmd("qemu-img bitmap --add '%s' q", path) == 0);

        /* ... and libqbm respects QEMU's: qemu-io holds the image for 3 s. */
        if (run_cmd("qemu-io --version >/dev/null 2>&1") == 0) {
            expect(run_cmd("(qemu-io -f qcow2 -c 'sleep 3000' '%s' >/dev/null 2>&1; touch '%s') &", path,
                           test_path("qemu-io.done")) == 0);
            /* Wait for qemu-io's write lock with a probe that takes no lock
             * itself (a probing open could make qemu-io fail instead). */
            int held = 0;
            for (int i = 0; i < 500 && !held && !file_exists(test_path("qemu-io.done")); i++) {
                held = lock_byte_held(path, 101);
                if (!held) {
                    sleep_ms(10);
                }
            }
            expect(held);
            err_msg(qbm_open(path, QBM_OPEN_RDWR, &img), -EBUSY, "another process");
            err(qbm_open(path, 0, &img), -EBUSY);
            for (int i = 0; i < 1000 && !file_exists(test_path("qemu-io.done")); i++) {
                sleep_ms(10);
            }
            expect(file_exists(test_path("qemu-io.done")));
            rw = open_image("locks.qcow2", QBM_OPEN_RDWR);
            expect(find_bitmap(rw, "q", &info)); /* added by qemu-img */
        } else {
            rw = open_image("locks.qcow2", QBM_OPEN_RDWR);
        }
    }
    ok(qbm_close(rw));
    return test_pass("locks", have_qemu ? NULL : " (qemu-img checks skipped)");
}
