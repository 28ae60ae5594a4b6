/*
 * qbm_flush stores the bitmaps but leaves them in_use; a process that dies
 * after a flush without qbm_close leaves them flagged inconsistent: they are
 * then reported with QBM_BITMAP_IN_USE, refuse every use with -EBUSY and can
 * only be removed. A clean close leaves nothing in use.
 */
#include "util.h"

#include <sys/types.h>

#define SIZE (UINT64_C(64) << 20)

/* In a child process: add bitmaps, mark, flush, then die without closing. */
static void crash_after_flush(void)
{
    pid_t pid;
    int status;
    fflush(NULL);
    pid = fork();
    expect(pid >= 0);
    if (pid == 0) {
        struct qbm_image *img = create_image("crash.qcow2", SIZE);
        ok(qbm_bitmap_add(img, "a", 65536, 0));
        ok(qbm_bitmap_add(img, "b", 4096, QBM_BITMAP_DISABLED));
        ok(qbm_mark_dirty(img, 0, 1));
        ok(qbm_flush(img));
        ok(qbm_flush(img)); /* nothing changed: fine too */
        _exit(0);           /* a crash: no qbm_close */
    }
    expect(waitpid(pid, &status, 0) == pid);
    expect(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

static void check_in_use(struct qbm_image *img, const char *name, uint64_t granularity, uint32_t enabled)
{
    struct qbm_bitmap_info info;
    expect(find_bitmap(img, name, &info));
    expect_eq(info.granularity, granularity);
    expect_eq(info.flags, QBM_BITMAP_IN_USE | enabled);
    expect_eq(info.dirty_bytes, 0); /* not usable */
}

int main(void)
{
    const char *path = test_path("crash.qcow2");
    struct qbm_image *img, *other;
    uint32_t count = 0;
    uint64_t s, l, bytes;
    int have_qemu = qemu_img_available();

    crash_after_flush();

    /* The crash left no corruption (leaks are allowed). */
    if (have_qemu) {
        int rc = run_cmd("qemu-img check -q '%s'", path);
        if (rc != 0 && rc != 3) {
            run_cmd("qemu-img check '%s' >&2", path);
            fprintf(stderr, "qemu-img check found corruption after a crash (exit %d)\n", rc);
            return 1;
        }
        expect(run_cmd("qemu-img info '%s' | grep -q in-use", path) == 0);
    }

    /* Read-only: listed as in use, nothing else. */
    img = open_image("crash.qcow2", 0);
    ok(qbm_bitmap_count(img, &count));
    expect_eq(count, 2);
    check_in_use(img, "a", 65536, QBM_BITMAP_ENABLED);
    check_in_use(img, "b", 4096, 0);
    err_msg(qbm_bitmap_next_extent(img, "a", 0, &s, &l), -EBUSY, "a");
    err_msg(qbm_bitmap_dirty_bytes(img, "a", &bytes), -EBUSY, "a");
    ok(qbm_close(img));

    /* Read-write: every use but remove is -EBUSY; writes skip the bitmaps. */
    img = open_image("crash.qcow2", QBM_OPEN_RDWR);
    other = create_image("other.qcow2", SIZE);
    ok(qbm_bitmap_add(other, "o", 0, 0));
    check_in_use(img, "a", 65536, QBM_BITMAP_ENABLED);
    ok(qbm_mark_dirty(img, 0, 65536));
    err(qbm_bitmap_next_extent(img, "a", 0, &s, &l), -EBUSY);
    err(qbm_bitmap_dirty_bytes(img, "a", &bytes), -EBUSY);
    err(qbm_bitmap_set(img, "a", 0, 1), -EBUSY);
    err(qbm_bitmap_reset(img, "a", 0, 65536), -EBUSY);
    err(qbm_bitmap_clear(img, "a"), -EBUSY);
    err(qbm_bitmap_enable(img, "b"), -EBUSY);
    err(qbm_bitmap_disable(img, "a"), -EBUSY);
    err(qbm_bitmap_rename(img, "a", "c"), -EBUSY);
    err(qbm_bitmap_merge(img, "a", other, "o"), -EBUSY);
    err(qbm_bitmap_merge(other, "o", img, "a"), -EBUSY);
    err(qbm_bitmap_add(img, "a", 0, 0), -EEXIST); /* the name is still taken */
    check_in_use(img, "a", 65536, QBM_BITMAP_ENABLED);
    ok(qbm_bitmap_remove(img, "a"));
    ok(qbm_bitmap_remove(img, "b"));
    ok(qbm_bitmap_add(img, "a", 0, 0));
    ok(qbm_mark_dirty(img, 0, 1));
    ok(qbm_close(other));
    ok(qbm_flush(img));
    ok(qbm_close(img));

    /* A clean close leaves a usable bitmap, not in use. */
    img = open_image("crash.qcow2", 0);
    {
        static const struct extent want[] = {{0, 65536}};
        struct qbm_bitmap_info info;
        ok(qbm_bitmap_count(img, &count));
        expect_eq(count, 1);
        expect(find_bitmap(img, "a", &info));
        expect_eq(info.flags, QBM_BITMAP_ENABLED);
        check_extents(img, "a", want, 1);
    }
    ok(qbm_close(img));
    if (have_qemu) {
        expect(run_cmd("qemu-img check -q '%s'", path) == 0);
        expect(run_cmd("qemu-img info '%s' | grep -q in-use", path) != 0);
    }
    return test_pass("flush", NULL);
}
