/*
 * Every pointer argument of every function may be NULL: -EINVAL with a
 * message, never a crash. qbm_close(NULL) is a no-op. Error messages are
 * per thread.
 */
#include "util.h"

#include <pthread.h>

#define SIZE (UINT64_C(64) << 20)

static void null_everywhere(void)
{
    struct qbm_create_options o = create_opts(SIZE);
    struct qbm_image *img = NULL, *out = NULL;
    struct qbm_image_info ii;
    struct qbm_bitmap_info bi;
    uint32_t count = 0;
    uint64_t s = 0, l = 0, bytes = 0;
    const char *path = test_path("null.qcow2");
    const char *other = test_path("null-never-created.qcow2");

    memset(&ii, 0, sizeof ii);
    ii.struct_size = sizeof ii;
    memset(&bi, 0, sizeof bi);
    bi.struct_size = sizeof bi;

    /* Constructors: no file is created when an argument is NULL. */
    err(qbm_create(NULL, &o, &out), -EINVAL);
    err(qbm_create(other, NULL, &out), -EINVAL);
    err(qbm_create(other, &o, NULL), -EINVAL);
    expect(out == NULL);
    expect(!file_exists(other));
    ok(qbm_create(path, &o, &img));
    ok(qbm_bitmap_add(img, "a", 0, 0));
    ok(qbm_bitmap_add(img, "b", 0, 0));
    err(qbm_open(NULL, 0, &out), -EINVAL);
    err(qbm_open(NULL, QBM_OPEN_RDWR, &out), -EINVAL);
    err(qbm_open(path, 0, NULL), -EINVAL);
    expect(out == NULL);

    /* Handle NULL. */
    err(qbm_flush(NULL), -EINVAL);
    err(qbm_image_get_info(NULL, &ii), -EINVAL);
    err(qbm_bitmap_count(NULL, &count), -EINVAL);
    err(qbm_bitmap_get_info(NULL, 0, &bi), -EINVAL);
    err(qbm_bitmap_add(NULL, "c", 0, 0), -EINVAL);
    err(qbm_bitmap_remove(NULL, "a"), -EINVAL);
    err(qbm_bitmap_clear(NULL, "a"), -EINVAL);
    err(qbm_bitmap_enable(NULL, "a"), -EINVAL);
    err(qbm_bitmap_disable(NULL, "a"), -EINVAL);
    err(qbm_bitmap_rename(NULL, "a", "c"), -EINVAL);
    err(qbm_bitmap_merge(NULL, "a", img, "b"), -EINVAL);
    err(qbm_bitmap_merge(img, "a", NULL, "b"), -EINVAL);
    err(qbm_bitmap_merge(NULL, "a", NULL, "b"), -EINVAL);
    err(qbm_bitmap_set(NULL, "a", 0, 1), -EINVAL);
    err(qbm_bitmap_reset(NULL, "a", 0, 65536), -EINVAL);
    err(qbm_mark_dirty(NULL, 0, 1), -EINVAL);
    err(qbm_bitmap_dirty_bytes(NULL, "a", &bytes), -EINVAL);
    err(qbm_bitmap_next_extent(NULL, "a", 0, &s, &l), -EINVAL);

    /* Output pointers NULL. */
    err(qbm_image_get_info(img, NULL), -EINVAL);
    err(qbm_bitmap_count(img, NULL), -EINVAL);
    err(qbm_bitmap_get_info(img, 0, NULL), -EINVAL);
    err(qbm_bitmap_dirty_bytes(img, "a", NULL), -EINVAL);
    err(qbm_bitmap_next_extent(img, "a", 0, NULL, &l), -EINVAL);
    err(qbm_bitmap_next_extent(img, "a", 0, &s, NULL), -EINVAL);
    err(qbm_bitmap_next_extent(img, "a", 0, NULL, NULL), -EINVAL);

    /* Name pointers NULL. */
    err(qbm_bitmap_add(img, NULL, 0, 0), -EINVAL);
    err(qbm_bitmap_remove(img, NULL), -EINVAL);
    err(qbm_bitmap_clear(img, NULL), -EINVAL);
    err(qbm_bitmap_enable(img, NULL), -EINVAL);
    err(qbm_bitmap_disable(img, NULL), -EINVAL);
    err(qbm_bitmap_rename(img, NULL, "c"), -EINVAL);
    err(qbm_bitmap_rename(img, "a", NULL), -EINVAL);
    err(qbm_bitmap_merge(img, NULL, img, "b"), -EINVAL);
    err(qbm_bitmap_merge(img, "a", img, NULL), -EINVAL);
    err(qbm_bitmap_set(img, NULL, 0, 1), -EINVAL);
    err(qbm_bitmap_reset(img, NULL, 0, 65536), -EINVAL);
    err(qbm_bitmap_dirty_bytes(img, NULL, &bytes), -EINVAL);
    err(qbm_bitmap_next_extent(img, NULL, 0, &s, &l), -EINVAL);

    /* None of that changed the image, and the handle still works. */
    ok(qbm_bitmap_count(img, &count));
    expect_eq(count, 2);
    ok(qbm_bitmap_dirty_bytes(img, "a", &bytes));
    expect_eq(bytes, 0);
    ok(qbm_flush(img));
    ok(qbm_close(img));

    /* Closing NULL is a no-op that succeeds. */
    expect_eq(qbm_close(NULL), 0);

    /* The two functions that cannot fail never return NULL. */
    expect(qbm_version() != NULL);
    expect(qbm_last_error() != NULL);
}

/*
 * Messages are per thread: a thread that never failed sees "", and a failure
 * in one thread leaves another thread's message alone.
 */
enum { STEP_FRESH, STEP_FAILED, STEP_DONE };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int step;
static char thread_msg[1024];

static void wait_for(int s)
{
    pthread_mutex_lock(&lock);
    while (step < s) {
        pthread_cond_wait(&cond, &lock);
    }
    pthread_mutex_unlock(&lock);
}

static void advance(int s)
{
    pthread_mutex_lock(&lock);
    step = s;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
}

static void *other_thread(void *arg)
{
    struct qbm_image *img = NULL;
    (void)arg;
    /* The main thread has failed already: its message is not ours. */
    expect(strcmp(qbm_last_error(), "") == 0);
    err_msg(qbm_open(test_path("thread-B-missing.qcow2"), 0, &img), -ENOENT, "thread-B-missing");
    snprintf(thread_msg, sizeof thread_msg, "%s", qbm_last_error());
    advance(STEP_FAILED);
    wait_for(STEP_DONE);
    /* The main thread failed again meanwhile: our message is unchanged. */
    expect(strcmp(qbm_last_error(), thread_msg) == 0);
    return NULL;
}

static void messages_per_thread(void)
{
    struct qbm_image *img = NULL;
    pthread_t tid;
    char main_msg[1024];

    err_msg(qbm_open(test_path("thread-A-missing.qcow2"), 0, &img), -ENOENT, "thread-A-missing");
    snprintf(main_msg, sizeof main_msg, "%s", qbm_last_error());

    expect(pthread_create(&tid, NULL, other_thread, NULL) == 0);
    wait_for(STEP_FAILED);
    /* The other thread's failure did not touch this thread's message. */
    expect(strcmp(qbm_last_error(), main_msg) == 0);
    expect(strstr(qbm_last_error(), "thread-B-missing") == NULL);
    err_msg(qbm_bitmap_count(NULL, NULL), -EINVAL, "");
    advance(STEP_DONE);
    expect(pthread_join(tid, NULL) == 0);
    expect(strstr(thread_msg, "thread-B-missing") != NULL);
}

int main(void)
{
    /* Before any failure, the message is empty (not NULL). */
    expect(qbm_last_error() != NULL);
    expect(strcmp(qbm_last_error(), "") == 0);

    null_everywhere();
    messages_per_thread();
    return test_pass("null_args", NULL);
}
