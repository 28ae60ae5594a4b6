/*
 * Write-intent mode through the C API: a process that marks with
 * QBM_OPEN_WRITE_INTENT and dies without qbm_close leaves bitmaps that the
 * next read-write open recovers (QBM_BITMAP_RECOVERED) with every mark that
 * returned; the split form (qbm_mark_dirty_nowait + qbm_sync) too.
 */
#include "util.h"

#include <pthread.h>
#include <sys/types.h>

#define SIZE (UINT64_C(64) << 20)
#define MIB (UINT64_C(1) << 20)

static void crash_in_write_intent_mode(const char *path)
{
    pid_t pid;
    int status;
    fflush(NULL);
    pid = fork();
    expect(pid >= 0);
    if (pid == 0) {
        struct qbm_image *img;
        ok(qbm_open(path, QBM_OPEN_RDWR | QBM_OPEN_WRITE_INTENT, &img));
        ok(qbm_mark_dirty(img, 0, 1));
        expect_eq(qbm_mark_dirty_nowait(img, 0, 512), 0);   /* already durable */
        expect_eq(qbm_mark_dirty_nowait(img, 8 * MIB, 1), 1); /* needs a sync */
        ok(qbm_sync(img));
        expect_eq(qbm_mark_dirty_nowait(img, 8 * MIB, 1), 0);
        _exit(0); /* a crash: no qbm_close */
    }
    expect(waitpid(pid, &status, 0) == pid);
    expect(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* Threads marking at once share rounds of writes and flushes. */
struct marker {
    struct qbm_image *img;
    uint64_t first;
};

static void *mark_many(void *arg)
{
    struct marker *m = arg;
    for (uint64_t i = 0; i < 100; i++)
        ok(qbm_mark_dirty(m->img, (m->first + i * 4) * 65536, 4096));
    return NULL;
}

static void threads_in_write_intent_mode(const char *path)
{
    struct qbm_image *img;
    struct qbm_bitmap_info info;
    pthread_t t[4];
    struct marker m[4];
    ok(qbm_open(path, QBM_OPEN_RDWR | QBM_OPEN_WRITE_INTENT, &img));
    ok(qbm_bitmap_clear(img, "a"));
    for (int i = 0; i < 4; i++) {
        m[i].img = img;
        m[i].first = (uint64_t)i;
        expect(pthread_create(&t[i], NULL, mark_many, &m[i]) == 0);
    }
    for (int i = 0; i < 4; i++)
        expect(pthread_join(t[i], NULL) == 0);
    expect(find_bitmap(img, "a", &info));
    expect_eq(info.dirty_bytes, 400 * 65536);
    ok(qbm_close(img));
}

int main(void)
{
    const char *path = test_path("intent.qcow2");
    struct qbm_image *img = create_image("intent.qcow2", SIZE);
    struct qbm_bitmap_info info;
    uint64_t s, l;

    ok(qbm_bitmap_add(img, "a", 65536, 0));
    ok(qbm_close(img));
    err(qbm_open(path, QBM_OPEN_WRITE_INTENT, &img), -EINVAL); /* read-write only */

    crash_in_write_intent_mode(path);

    ok(qbm_open(path, QBM_OPEN_RDWR, &img));
    expect(find_bitmap(img, "a", &info));
    expect_eq(info.flags, QBM_BITMAP_ENABLED | QBM_BITMAP_RECOVERED);
    expect_eq(info.dirty_bytes, 2 * 65536);
    ok(qbm_bitmap_next_extent(img, "a", 0, &s, &l));
    expect_eq(s, 0);
    expect_eq(l, 65536);
    ok(qbm_bitmap_next_extent(img, "a", 65536, &s, &l));
    expect_eq(s, 8 * MIB);
    ok(qbm_close(img));

    /* Closed cleanly: an ordinary consistent bitmap again. */
    ok(qbm_open(path, 0, &img));
    expect(find_bitmap(img, "a", &info));
    expect_eq(info.flags, QBM_BITMAP_ENABLED);
    ok(qbm_close(img));

    threads_in_write_intent_mode(path);
    return test_pass("intent", NULL);
}
