/* In-process benchmarks through the C ABI (issue 5, items 2-4) and the image
 * builder the whole-process comparisons use. Prints JSON lines.
 *
 *   lib mem DIR       resident memory of a 16 TiB / 64 KiB bitmap
 *   lib extents DIR   extent walks: 10,000 extents, clean, dense
 *   lib io DIR        store/load of a dense 32 MiB bitmap against plain
 *                     sequential write+fdatasync / read of 32 MiB; sparse
 *                     store I/O volume
 *   lib mkimg PATH SIZE NBITMAPS sparse|dense [GRANULES]
 *                     an image whose bitmaps b0..b(N-1) all hold the pattern
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qbm.h"

#define TIB (1ULL << 40)
#define GRAN (64ULL << 10)

static double wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what) {
    fprintf(stderr, "%s: %s\n", what, qbm_last_error());
    exit(1);
}

static uint64_t rng = 0x2545F4914F6CDD1DULL;
static uint64_t next_rand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* A field of /proc/self/status or /proc/self/io, in its unit (kB or bytes). */
static long long proc_field(const char *file, const char *name) {
    FILE *f = fopen(file, "r");
    char line[256];
    long long v = -1;
    size_t n = strlen(name);
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, name, n) && line[n] == ':')
            v = atoll(line + n + 1);
    if (f)
        fclose(f);
    return v;
}
static long long rss_anon_kib(void) { return proc_field("/proc/self/status", "RssAnon"); }

static struct qbm_image *create(const char *path, uint64_t size) {
    struct qbm_create_options o = {.struct_size = sizeof o, .virtual_size = size};
    struct qbm_image *img;
    unlink(path);
    if (qbm_create(path, &o, &img))
        die("qbm_create");
    return img;
}

static struct qbm_image *open_img(const char *path, int rw) {
    struct qbm_image *img;
    if (qbm_open(path, rw ? QBM_OPEN_RDWR : 0, &img))
        die("qbm_open");
    return img;
}

static void scatter(struct qbm_image *img, uint64_t size, uint64_t granules) {
    for (uint64_t i = 0; i < granules; i++)
        if (qbm_mark_dirty(img, (next_rand() % (size / GRAN)) * GRAN, 4096))
            die("qbm_mark_dirty");
}

/* Half the disk dirty in `runs` alternating runs: every bitmap cluster
 * holds both ones and zeros, so every one is stored as data. */
static void dense_runs(struct qbm_image *img, uint64_t size, uint64_t runs) {
    uint64_t run = size / runs;
    if (run < 2 * GRAN)
        run = 2 * GRAN;
    for (uint64_t off = 0; off + run <= size; off += 2 * run)
        if (qbm_mark_dirty(img, off, run))
            die("qbm_mark_dirty");
}

static void emit(const char *metric, double v) {
    printf("{\"metric\": \"%s\", \"value\": %.6g}\n", metric, v);
    fflush(stdout);
}

static int cmd_mem(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/mem.qcow2", dir);
    uint64_t size = 16 * TIB;
    long long base = rss_anon_kib();
    struct qbm_image *img = create(path, size);
    if (qbm_bitmap_add(img, "b0", GRAN, 0))
        die("add");
    scatter(img, size, 10000);
    emit("mem_sparse_marked_kib", rss_anon_kib() - base);
    if (qbm_close(img))
        die("close");
    base = rss_anon_kib();
    img = open_img(path, 1);
    emit("mem_sparse_loaded_kib", rss_anon_kib() - base);
    scatter(img, size, 10000);
    emit("mem_sparse_loaded_marked_kib", rss_anon_kib() - base);
    if (qbm_close(img))
        die("close");
    /* Fully dirty. */
    base = rss_anon_kib();
    img = create(path, size);
    if (qbm_bitmap_add(img, "b0", GRAN, 0) || qbm_mark_dirty(img, 0, size))
        die("full");
    emit("mem_full_kib", rss_anon_kib() - base);
    if (qbm_close(img))
        die("close");
    unlink(path);
    return 0;
}

/* Best wall time of `reps` walks over every extent of b0; returns extents. */
static uint64_t walk(struct qbm_image *img, int reps, double *best) {
    uint64_t n = 0;
    *best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = wall();
        uint64_t from = 0, start, len;
        n = 0;
        for (;;) {
            int rc = qbm_bitmap_next_extent(img, "b0", from, &start, &len);
            if (rc < 0)
                die("next_extent");
            if (rc == 0)
                break;
            n++;
            from = start + len;
        }
        double t = wall() - t0;
        if (t < *best)
            *best = t;
    }
    return n;
}

static int cmd_extents(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/ext.qcow2", dir);
    uint64_t size = 16 * TIB, bits = size / GRAN;
    double t;
    struct qbm_image *img = create(path, size);
    if (qbm_bitmap_add(img, "b0", GRAN, 0))
        die("add");
    walk(img, 20, &t);
    emit("extents_clean_ms", t * 1e3);
    /* 10,000 separate extents: granules at distinct even positions. */
    uint64_t stride = bits / 10000;
    for (uint64_t i = 0; i < 10000; i++)
        if (qbm_mark_dirty(img, (i * stride + next_rand() % (stride - 1)) * GRAN, 1))
            die("mark");
    uint64_t n = walk(img, 20, &t);
    emit("extents_10k_count", (double)n);
    emit("extents_10k_ms", t * 1e3);
    /* Dense: everything dirty except one granule in 65,536. */
    if (qbm_mark_dirty(img, 0, size))
        die("mark");
    for (uint64_t g = 0; g < bits; g += 65536)
        if (qbm_bitmap_reset(img, "b0", (g + 12345) * GRAN, GRAN))
            die("reset");
    n = walk(img, 5, &t);
    emit("extents_dense_count", (double)n);
    emit("extents_dense_gbps", (double)(bits / 8) / t / 1e9);
    /* The limit: one pass over 32 MiB of words looking for a clear bit. */
    uint64_t words = bits / 64, *arr = malloc(words * 8);
    memset(arr, 0xff, words * 8);
    for (uint64_t g = 0; g < bits; g += 65536)
        arr[(g + 12345) / 64] &= ~(1ULL << ((g + 12345) % 64));
    double best = 1e30;
    volatile uint64_t sink = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = wall();
        uint64_t found = 0;
        for (uint64_t w = 0; w < words; w++)
            found += arr[w] != ~0ULL;
        sink += found;
        double tt = wall() - t0;
        if (tt < best)
            best = tt;
    }
    emit("extents_dense_scan_limit_gbps", (double)(words * 8) / best / 1e9);
    free(arr);
    if (qbm_close(img))
        die("close");
    unlink(path);
    return 0;
}

/* dd-equivalent: sequential 1 MiB writes of `len` bytes then fdatasync, and
 * a sequential read of the same file (page cache, as the load reads). */
/* Drops a file's clean pages from the page cache (no root needed), so the
 * next read comes from the device. */
static void drop_cache(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return;
    fdatasync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
}

static void plain_io(const char *path, size_t len, double *wsecs, double *rsecs, double *cold_rsecs) {
    size_t chunk = 1 << 20;
    char *buf = malloc(chunk);
    memset(buf, 0x5a, chunk);
    unlink(path);
    int fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0644);
    double t0 = wall();
    for (size_t off = 0; off < len; off += chunk)
        if (pwrite(fd, buf, chunk, off) != (ssize_t)chunk)
            exit(1);
    fdatasync(fd);
    *wsecs = wall() - t0;
    t0 = wall();
    for (size_t off = 0; off < len; off += chunk)
        if (pread(fd, buf, chunk, off) != (ssize_t)chunk)
            exit(1);
    *rsecs = wall() - t0;
    drop_cache(path);
    t0 = wall();
    for (size_t off = 0; off < len; off += chunk)
        if (pread(fd, buf, chunk, off) != (ssize_t)chunk)
            exit(1);
    *cold_rsecs = wall() - t0;
    close(fd);
    unlink(path);
    free(buf);
}

static int cmd_io(const char *dir) {
    char path[4096], raw[4096];
    snprintf(path, sizeof path, "%s/io.qcow2", dir);
    snprintf(raw, sizeof raw, "%s/io.raw", dir);
    uint64_t size = 16 * TIB;
    struct qbm_image *img = create(path, size);
    if (qbm_bitmap_add(img, "b0", GRAN, 0))
        die("add");
    dense_runs(img, size, 1 << 20); /* 8 MiB runs: mixed in every cluster */
    if (qbm_flush(img))
        die("flush");
    const int reps = 5;
    double best_store = 1e30, best_load = 1e30, best_cold = 1e30, bw = 1e30, br = 1e30, bc = 1e30;
    for (int r = 0; r < reps; r++) {
        double w, rd, cold;
        plain_io(raw, 32 << 20, &w, &rd, &cold);
        if (w < bw)
            bw = w;
        if (rd < br)
            br = rd;
        if (cold < bc)
            bc = cold;
        /* Change one bit (in a clean run) so the bitmap is stored again. */
        int rc = r % 2 ? qbm_bitmap_reset(img, "b0", 24ULL << 20, GRAN)
                       : qbm_bitmap_set(img, "b0", 24ULL << 20, GRAN);
        if (rc)
            die("toggle");
        double t0 = wall();
        if (qbm_flush(img))
            die("flush");
        double t = wall() - t0;
        if (t < best_store)
            best_store = t;
    }
    if (qbm_close(img))
        die("close");
    for (int r = 0; r < 2 * reps; r++) {
        /* Odd runs read from the device, even ones from the page cache. */
        if (r % 2)
            drop_cache(path);
        double t0 = wall();
        struct qbm_image *ro = open_img(path, 0);
        double t = wall() - t0;
        if (r % 2 && t < best_cold)
            best_cold = t;
        if (!(r % 2) && t < best_load)
            best_load = t;
        uint64_t dirty;
        if (qbm_bitmap_dirty_bytes(ro, "b0", &dirty) || dirty < size / 2 - size / 100)
            die("dirty bytes");
        qbm_close(ro);
    }
    double mib = 32.0;
    emit("io_store_mibps", mib / best_store);
    emit("io_seq_write_mibps", mib / bw);
    emit("io_load_mibps", mib / best_load);
    emit("io_seq_read_mibps", mib / br);
    emit("io_load_cold_mibps", mib / best_cold);
    emit("io_seq_read_cold_mibps", mib / bc);
    /* Sparse: 10 dirty granules; bytes written by the store. */
    img = create(path, size);
    if (qbm_bitmap_add(img, "b0", GRAN, 0))
        die("add");
    if (qbm_flush(img))
        die("flush");
    scatter(img, size, 10);
    long long w0 = proc_field("/proc/self/io", "wchar");
    double t0 = wall();
    if (qbm_flush(img))
        die("flush");
    emit("io_sparse_store_ms", (wall() - t0) * 1e3);
    emit("io_sparse_store_bytes", (double)(proc_field("/proc/self/io", "wchar") - w0));
    if (qbm_close(img))
        die("close");
    long long r0 = proc_field("/proc/self/io", "rchar");
    img = open_img(path, 0);
    emit("io_sparse_load_bytes", (double)(proc_field("/proc/self/io", "rchar") - r0));
    qbm_close(img);
    unlink(path);
    return 0;
}

/* Each bitmap gets bits of its own, so that merging one into another
 * changes clusters: sparse, `granules` random 4 KiB writes per bitmap;
 * dense, the alternating runs of dense_runs shifted by half a run per
 * bitmap. */
static int cmd_mkimg(const char *path, uint64_t size, int nb, const char *pattern, uint64_t granules) {
    struct qbm_image *img = create(path, size);
    for (int i = 0; i < nb; i++) {
        char name[32];
        snprintf(name, sizeof name, "b%d", i);
        if (qbm_bitmap_add(img, name, GRAN, 0))
            die("add");
        if (!strcmp(pattern, "sparse")) {
            for (uint64_t k = 0; k < granules; k++)
                if (qbm_bitmap_set(img, name, (next_rand() % (size / GRAN)) * GRAN, 4096))
                    die("qbm_bitmap_set");
            continue;
        }
        uint64_t runs = 8192, run = size / runs < 2 * GRAN ? 2 * GRAN : size / runs;
        uint64_t shift = (uint64_t)i * (run / 2) % run / GRAN * GRAN;
        for (uint64_t off = shift; off + run <= size; off += 2 * run)
            if (qbm_bitmap_set(img, name, off, run))
                die("qbm_bitmap_set");
    }
    if (qbm_close(img))
        die("close");
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "mem"))
        return cmd_mem(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "extents"))
        return cmd_extents(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "io"))
        return cmd_io(argv[2]);
    if (argc >= 6 && !strcmp(argv[1], "mkimg"))
        return cmd_mkimg(argv[2], strtoull(argv[3], 0, 0), atoi(argv[4]), argv[5],
                         argc > 6 ? strtoull(argv[6], 0, 0) : 1000);
    fprintf(stderr, "usage: lib mem|extents|io DIR | mkimg PATH SIZE N sparse|dense [GRANULES]\n");
    return 2;
}
