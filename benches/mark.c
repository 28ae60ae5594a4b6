/* Mark-path benchmark through the C ABI (issue 5, item 1).
 *
 * Prints one JSON object per line: {"metric": ..., "ns": ...}. Every qbm
 * figure comes with its baseline from the same process, with the same
 * random offsets: a bare loop doing the same atomic ORs on two plain
 * arrays (the memory-latency limit), and the same arrays behind a mutex.
 * usage: mark DIR   (DIR holds the temporary image) */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qbm.h"

#define GRAN_BITS 16
#define WRITE_LEN 4096ULL

static double clock_secs(clockid_t c) {
    struct timespec ts;
    clock_gettime(c, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CPU time of the calling thread: the machine is shared, and time spent
 * preempted is not time spent marking. */
static double cpu_now(void) { return clock_secs(CLOCK_THREAD_CPUTIME_ID); }

static inline uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* Offsets of 4 KiB guest writes, uniformly at random in [0, span). */
static inline uint64_t next_offset(uint64_t *s, uint64_t span) {
    return (xorshift(s) % (span / WRITE_LEN)) * WRITE_LEN;
}

struct arrays {
    uint64_t *a, *b;
    pthread_mutex_t lock;
};

/* What a minimal C implementation does per write: two atomic ORs, skipped
 * when the bit is already set (check before RMW, as libqbm does). */
static inline void bare_mark(struct arrays *ar, uint64_t off) {
    uint64_t bit = off >> GRAN_BITS;
    uint64_t w = bit / 64, m = 1ULL << (bit % 64);
    if (!(__atomic_load_n(&ar->a[w], __ATOMIC_RELAXED) & m))
        __atomic_fetch_or(&ar->a[w], m, __ATOMIC_SEQ_CST);
    if (!(__atomic_load_n(&ar->b[w], __ATOMIC_RELAXED) & m))
        __atomic_fetch_or(&ar->b[w], m, __ATOMIC_SEQ_CST);
}

/* The bare marks inside a non-inlined call as long as a qbm_mark_dirty
 * call (~120 instructions for two bitmaps): what any call of that length
 * reaches, however it spends its instructions. At random over a large disk
 * the misses of successive calls overlap only as far as the CPU's window
 * reaches past the one it waits for, and longer calls put fewer misses in
 * that window. */
__attribute__((noinline)) static void bare_mark_call(struct arrays *ar, uint64_t off) {
    bare_mark(ar, off);
    __asm__ volatile(".rept 100\n\tnop\n\t.endr");
}

enum kind { QBM, QBM_MANY, BARE, BARE_CALL, MUTEX };

/* Writes per qbm_mark_dirty_many call: a VMM completing a virtqueue's or an
 * io_uring's worth of requests at once. */
#define BATCH 64

struct job {
    enum kind kind;
    struct qbm_image *img;
    struct arrays *ar;
    uint64_t span, n, seed;
    double secs;
};

static void *run_job(void *p) {
    struct job *j = p;
    uint64_t s = j->seed, span = j->span;
    double t0 = cpu_now();
    switch (j->kind) {
    case QBM:
        for (uint64_t i = 0; i < j->n; i++)
            if (qbm_mark_dirty(j->img, next_offset(&s, span), WRITE_LEN) != 0) {
                fprintf(stderr, "qbm_mark_dirty: %s\n", qbm_last_error());
                exit(1);
            }
        break;
    case QBM_MANY: {
        struct qbm_range r[BATCH];
        for (uint64_t i = 0; i < j->n; i += BATCH) {
            for (int k = 0; k < BATCH; k++)
                r[k] = (struct qbm_range){next_offset(&s, span), WRITE_LEN};
            if (qbm_mark_dirty_many(j->img, r, BATCH) != 0) {
                fprintf(stderr, "qbm_mark_dirty_many: %s\n", qbm_last_error());
                exit(1);
            }
        }
        break;
    }
    case BARE:
        for (uint64_t i = 0; i < j->n; i++)
            bare_mark(j->ar, next_offset(&s, span));
        break;
    case BARE_CALL:
        for (uint64_t i = 0; i < j->n; i++)
            bare_mark_call(j->ar, next_offset(&s, span));
        break;
    case MUTEX:
        for (uint64_t i = 0; i < j->n; i++) {
            uint64_t off = next_offset(&s, span);
            pthread_mutex_lock(&j->ar->lock);
            bare_mark(j->ar, off);
            pthread_mutex_unlock(&j->ar->lock);
        }
        break;
    }
    j->secs = cpu_now() - t0;
    return NULL;
}

/* CPU ns per call with `threads` threads each doing n calls at the same
 * time; best of `reps` (the machine is shared: the best run is the least
 * disturbed one). For several threads the figure is the inverse of the
 * aggregate rate, sum over threads of calls / thread CPU time: what the
 * threads would reach on as many idle cores, including every cost of their
 * sharing cache lines (measured on CPU time, preemption does not count). */
static double measure(enum kind kind, struct qbm_image *img, struct arrays *ar, uint64_t span,
                      uint64_t n, int threads, int reps) {
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        pthread_t t[8];
        struct job j[8];
        for (int i = 0; i < threads; i++) {
            j[i] = (struct job){kind, img, ar, span, n, 0x9E3779B97F4A7C15ULL * (uint64_t)(r * 8 + i + 1), 0};
            pthread_create(&t[i], NULL, run_job, &j[i]);
        }
        for (int i = 0; i < threads; i++)
            pthread_join(t[i], NULL);
        double rate = 0;
        for (int i = 0; i < threads; i++)
            rate += (double)n / j[i].secs;
        double ns = 1e9 / rate;
        if (ns < best)
            best = ns;
    }
    return best;
}

static void emit(const char *metric, double ns) {
    printf("{\"metric\": \"%s\", \"ns\": %.3f}\n", metric, ns);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    const uint64_t disk = 16ULL << 40; /* 16 TiB */
    char path[4096];
    snprintf(path, sizeof path, "%s/mark.qcow2", argv[1]);
    unlink(path);
    struct qbm_create_options o = {.struct_size = sizeof o, .virtual_size = disk};
    struct qbm_image *img;
    if (qbm_create(path, &o, &img) || qbm_bitmap_add(img, "a", 1 << GRAN_BITS, 0) ||
        qbm_bitmap_add(img, "b", 1 << GRAN_BITS, 0)) {
        fprintf(stderr, "setup: %s\n", qbm_last_error());
        return 1;
    }
    size_t words = (disk >> GRAN_BITS) / 64;
    struct arrays ar;
    ar.a = calloc(words, 8);
    ar.b = calloc(words, 8);
    pthread_mutex_init(&ar.lock, NULL);

    const uint64_t ws = 1ULL << 30;
    int reps = 5;
    uint64_t n = 4000000;
    /* Warm both (commit pages) before timing. */
    measure(QBM, img, &ar, disk, n, 1, 1);
    measure(BARE, img, &ar, disk, n, 1, 1);
    /* A VMM flushes now and then (its checkpoints): bitmaps that became
     * dense switch to the flat layout there, never on a marking call. */
    if (qbm_flush(img)) {
        fprintf(stderr, "flush: %s\n", qbm_last_error());
        return 1;
    }

    emit("mark_1g_qbm", measure(QBM, img, &ar, ws, n, 1, reps));
    emit("mark_1g_bare", measure(BARE, img, &ar, ws, n, 1, reps));
    emit("mark_1g_mutex", measure(MUTEX, img, &ar, ws, n, 1, reps));
    emit("mark_16t_qbm", measure(QBM, img, &ar, disk, n, 1, reps));
    emit("mark_16t_qbm_many", measure(QBM_MANY, img, &ar, disk, n, 1, reps));
    emit("mark_1g_qbm_many", measure(QBM_MANY, img, &ar, ws, n, 1, reps));
    emit("mark_16t_bare", measure(BARE, img, &ar, disk, n, 1, reps));
    emit("mark_16t_bare_call", measure(BARE_CALL, img, &ar, disk, n, 1, reps));
    emit("mark_1g_bare_call", measure(BARE_CALL, img, &ar, ws, n, 1, reps));
    emit("mark_16t_mutex", measure(MUTEX, img, &ar, disk, n, 1, reps));
    emit("mark_1g_qbm_2t", measure(QBM, img, &ar, ws, n, 2, reps));
    emit("mark_1g_mutex_2t", measure(MUTEX, img, &ar, ws, n, 2, reps));
    emit("mark_1g_bare_2t", measure(BARE, img, &ar, ws, n, 2, reps));
    emit("mark_16t_qbm_2t", measure(QBM, img, &ar, disk, n, 2, reps));
    emit("mark_16t_bare_2t", measure(BARE, img, &ar, disk, n, 2, reps));

    free(ar.a);
    free(ar.b);
    if (qbm_close(img)) {
        fprintf(stderr, "close: %s\n", qbm_last_error());
        return 1;
    }
    unlink(path);
    return 0;
}
