/* Write-intent cost (issue 7, point 4), through the C ABI.
 *
 * A 100 GiB image, one bitmap at 64 KiB granularity, a 256 MiB working set.
 * For a random 4 KiB write pattern and a sequential one, each in a cold pass
 * (first touch of the working set) and a warm pass (after it), measures per
 * mark: the latency of plain marking and of write-intent marking (the same
 * offsets, the same run), and the share of write-intent marks that wait for
 * I/O (qbm_mark_dirty_nowait says 1, then qbm_sync; the blocking
 * qbm_mark_dirty does exactly that). The baseline of a waiting mark is one
 * 512-byte pwrite + fdatasync on a file in the same directory.
 * Prints one JSON object per line: {"metric": ..., "value": ...}.
 * usage: intent DIR */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qbm.h"

#define GIB (1ULL << 30)
#define MIB (1ULL << 20)
#define DISK (100 * GIB)
#define WS_AT (37 * GIB)
#define WS (256 * MIB)
#define WLEN 4096ULL
#define RANDOM_MARKS 40000
#define SEQ_MARKS (WS / WLEN)

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p) {
    qsort(v, n, sizeof *v, cmp);
    return v[(size_t)(p * (n - 1))];
}

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void die(const char *what, int r) {
    fprintf(stderr, "%s: %d %s\n", what, r, qbm_last_error() ? qbm_last_error() : "");
    exit(1);
}

static void emit(const char *metric, double value) { printf("{\"metric\": \"%s\", \"value\": %.6g}\n", metric, value); }

/* Clears the bitmap, then runs the marks at `offs` in one session
 * (write-intent when `wi`); lat[i] in ns, waited[i] set when it waited. */
static void run(const char *path, int wi, const uint64_t *offs, size_t n, double *lat, char *waited) {
    struct qbm_image *img;
    int r = qbm_open(path, QBM_OPEN_RDWR, &img);
    if (r < 0) die("qbm_open", r);
    if ((r = qbm_bitmap_clear(img, "b")) < 0) die("clear", r);
    if ((r = qbm_close(img)) < 0) die("qbm_close", r);
    if ((r = qbm_open(path, QBM_OPEN_RDWR | (wi ? QBM_OPEN_WRITE_INTENT : 0), &img)) < 0) die("qbm_open", r);
    for (size_t i = 0; i < n; i++) {
        double t = now_ns();
        r = qbm_mark_dirty_nowait(img, offs[i], WLEN);
        waited[i] = r == 1;
        if (r == 1) r = qbm_sync(img);
        lat[i] = now_ns() - t;
        if (r < 0) die("mark", r);
    }
    if ((r = qbm_close(img)) < 0) die("qbm_close", r);
}

static void emit2(const char *name, const char *what, double v) {
    char m[160];
    snprintf(m, sizeof m, "%s %s", name, what);
    emit(m, v);
}

/* Marks [0, cold) are the first pass over the working set, the rest after it. */
static void pattern(const char *path, const char *name, const uint64_t *offs, size_t n, size_t cold) {
    double *plain = malloc(n * sizeof *plain), *wi = malloc(n * sizeof *wi);
    double *waiting = malloc(n * sizeof *waiting);
    char *waited = malloc(n), *pw = malloc(n);
    size_t wc = 0, ww = 0, nwait = 0;
    run(path, 0, offs, n, plain, pw);
    run(path, 1, offs, n, wi, waited);
    for (size_t i = 0; i < n; i++) {
        if (waited[i]) {
            waiting[nwait++] = wi[i];
            if (i < cold) wc++; else ww++;
        }
    }
    emit2(name, "first pass: share of marks waiting", (double)wc / cold);
    emit2(name, "after first pass: share of marks waiting", (double)ww / (n - cold));
    if (nwait) emit2(name, "waiting mark: median ns", pct(waiting, nwait, 0.5));
    emit2(name, "first pass: plain median ns", pct(plain, cold, 0.5));
    emit2(name, "first pass: plain p99 ns", pct(plain, cold, 0.99));
    emit2(name, "first pass: write-intent median ns", pct(wi, cold, 0.5));
    emit2(name, "first pass: write-intent p99 ns", pct(wi, cold, 0.99));
    emit2(name, "after first pass: plain median ns", pct(plain + cold, n - cold, 0.5));
    emit2(name, "after first pass: plain p99 ns", pct(plain + cold, n - cold, 0.99));
    emit2(name, "after first pass: write-intent median ns", pct(wi + cold, n - cold, 0.5));
    emit2(name, "after first pass: write-intent p99 ns", pct(wi + cold, n - cold, 0.99));
    free(plain);
    free(wi);
    free(waiting);
    free(waited);
    free(pw);
}

int main(int argc, char **argv) {
    char path[4096], fpath[4096];
    struct qbm_image *img;
    struct qbm_create_options o;
    int r;
    if (argc < 2) return 2;
    snprintf(path, sizeof path, "%s/intent.qcow2", argv[1]);
    snprintf(fpath, sizeof fpath, "%s/flush.bin", argv[1]);
    unlink(path);
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.virtual_size = DISK;
    o.cluster_size = 65536;
    o.refcount_bits = 16;
    if ((r = qbm_create(path, &o, &img)) < 0) die("qbm_create", r);
    if ((r = qbm_bitmap_add(img, "b", 65536, 0)) < 0) die("add", r);
    qbm_close(img);

    /* Baseline: one 512-byte write + fdatasync. */
    {
        int fd = open(fpath, O_CREAT | O_RDWR | O_TRUNC, 0600);
        char buf[512];
        double t[101];
        memset(buf, 1, sizeof buf);
        for (int i = 0; i < 101; i++) {
            double s = now_ns();
            if (pwrite(fd, buf, sizeof buf, 512 * (i % 64)) != 512 || fdatasync(fd) != 0) die("flush", -1);
            t[i] = now_ns() - s;
        }
        close(fd);
        unlink(fpath);
        emit("pwrite+fdatasync median ns", pct(t, 101, 0.5));
    }

    /* Random: RANDOM_MARKS cold, then 5x as many warm, in the working set. */
    {
        size_t n = 6 * RANDOM_MARKS;
        uint64_t *offs = malloc(n * sizeof *offs), s = 88172645463325252ULL;
        for (size_t i = 0; i < n; i++) offs[i] = WS_AT + (xorshift(&s) % (WS / WLEN)) * WLEN;
        pattern(path, "random 4k", offs, n, RANDOM_MARKS);
        free(offs);
    }
    /* Sequential: the working set once (cold), then three times (warm). */
    {
        size_t n = 4 * SEQ_MARKS;
        uint64_t *offs = malloc(n * sizeof *offs);
        for (size_t i = 0; i < n; i++) offs[i] = WS_AT + (i % SEQ_MARKS) * WLEN;
        pattern(path, "sequential 4k", offs, n, SEQ_MARKS);
        free(offs);
    }
    unlink(path);
    return 0;
}
