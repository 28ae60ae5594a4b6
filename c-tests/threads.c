/*
 * qbm_mark_dirty from 4 threads at once. Each thread marks its own granules,
 * but the granules interleave (thread t owns granules 8k + 2t), so every
 * 64-bit word of the bitmap is written by all threads: a lost update shows.
 * Afterwards the extents are exactly the union, before and after reopening.
 */
#include "util.h"

#include <pthread.h>

#define THREADS 4
#define CALLS 100000
#define G64 UINT64_C(65536)
#define SIZE (UINT64_C(1) << 30)        /* 16384 granules of 64 KiB */
#define PER_THREAD (SIZE / G64 / 8)     /* granules each thread owns: 2048 */

struct worker {
    pthread_t tid;
    struct qbm_image *img;
    unsigned index;
    int failures;
};

static pthread_barrier_t start;

static void *mark(void *arg)
{
    struct worker *w = arg;
    pthread_barrier_wait(&start);
    for (uint64_t i = 0; i < CALLS; i++) {
        /* Walk the thread's granules in a scrambled order (2039 is prime). */
        uint64_t k = (i * 2039) % PER_THREAD;
        uint64_t granule = 8 * k + 2 * w->index;
        /* Bytes 1000..6000 of the granule: all of it at 64 KiB, two granules at 4 KiB. */
        if (qbm_mark_dirty(w->img, granule * G64 + 1000, 5000) < 0) {
            w->failures++;
        }
    }
    return NULL;
}

/* The union: every even 64 KiB granule (odd ones are never marked). */
static void check_union(struct qbm_image *img)
{
    static struct extent g64[SIZE / G64 / 2], g4[SIZE / G64 / 2];
    size_t n = 0;
    for (uint64_t granule = 0; granule < SIZE / G64; granule += 2) {
        g64[n].start = granule * G64;
        g64[n].length = G64;
        g4[n].start = granule * G64;
        g4[n].length = 8192;
        n++;
    }
    check_extents(img, "g64", g64, n);
    check_extents(img, "g4", g4, n);
    check_clean(img, "off");
}

int main(void)
{
    struct qbm_image *img = create_image("threads.qcow2", SIZE);
    struct worker workers[THREADS];

    ok(qbm_bitmap_add(img, "g64", 65536, 0));
    ok(qbm_bitmap_add(img, "g4", 4096, 0));
    ok(qbm_bitmap_add(img, "off", 65536, QBM_BITMAP_DISABLED));

    expect(pthread_barrier_init(&start, NULL, THREADS) == 0);
    for (unsigned t = 0; t < THREADS; t++) {
        workers[t].img = img;
        workers[t].index = t;
        workers[t].failures = 0;
        expect(pthread_create(&workers[t].tid, NULL, mark, &workers[t]) == 0);
    }
    for (unsigned t = 0; t < THREADS; t++) {
        expect(pthread_join(workers[t].tid, NULL) == 0);
        if (workers[t].failures != 0) {
            fprintf(stderr, "thread %u: %d qbm_mark_dirty calls failed\n", t, workers[t].failures);
            return 1;
        }
    }
    pthread_barrier_destroy(&start);

    check_union(img);
    ok(qbm_close(img));

    img = open_image("threads.qcow2", 0);
    check_union(img);
    ok(qbm_close(img));
    printf("%d threads x %d marks each\n", THREADS, CALLS);
    return test_pass("threads", NULL);
}
