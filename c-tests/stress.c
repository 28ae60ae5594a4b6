/*
 * Marking under fire (issue 6, point 4).
 *
 * MARKERS threads call qbm_mark_dirty on random unaligned ranges while a
 * management thread flushes, adds, removes, enables, disables, clears and
 * merges bitmaps. Two "stable" bitmaps (64 KiB and 4 KiB granularity) stay
 * enabled for the whole run; up to CHURN "churn-N" bitmaps come and go.
 *
 * The checkpoint guarantee tested (include/qbm.h, qbm_flush): a mark that
 * returned before qbm_flush was called is in the stored bitmaps when
 * qbm_flush returns. "Before" is a happens-before edge, made here by a global
 * epoch counter that every party updates with a read-modify-write:
 *   management: k = ++epoch (acq_rel), then qbm_flush, then reads the file;
 *   marker:     qbm_mark_dirty(range), then e = epoch (a fetch_add of 0,
 *               acq_rel), then logs "granules of range: epoch e".
 * If e < k the marker's RMW precedes the management's in the counter's
 * modification order, so the mark returned before the flush was called
 * (release sequence), and every granule it touched must be set on disk.
 * Marks with e >= k raced with the flush: no requirement, except that they
 * are never lost (the final close stores them; checked exactly at the end).
 *
 * Each marker keeps its own log: for every 4 KiB granule, the smallest epoch
 * at which one of its marks touching it had returned (UINT32_MAX: never).
 * After every flush the management thread reads the two stable bitmaps
 * straight from the file (they are flagged in_use while the image is open, so
 * neither libqbm nor QEMU would load them) and asserts:
 *   - every granule logged with an epoch < k is set;
 *   - nothing set at the previous checkpoint was lost (stable bitmaps only grow).
 * At the end (image closed):
 *   - each stable bitmap, reopened, is exactly the union of all logged
 *     granules at its granularity (no mark lost, no bit nobody marked), and so
 *     is the last checkpoint's on-disk copy at most (a subset);
 *   - every bit of every surviving churn bitmap lies in that union;
 *   - QEMU exports the same extents for every bitmap (qemu-nbd -B + nbdinfo
 *     --map) and `qemu-img check` is clean.
 *
 * Run time: QBM_STRESS_SECONDS (default 20) of marking; QBM_STRESS_SEED picks
 * the random sequence (printed, so a failure can be replayed as closely as
 * threads allow). QEMU's tools are required under CI=true; elsewhere their
 * checks are skipped with a note when missing.
 */
#include "util.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <time.h>

#define MARKERS 4
#define CHURN 4
#define G 4096 /* log granule = the finest granularity used */
#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define SIZE ((UINT64_C(1) << 30) + 7 * 512) /* the last granule of every bitmap is partial */
#define NG ((SIZE + G - 1) / G)
#define NEVER UINT32_MAX
#define RING 256
#define MIN_FLUSHES 8

/* Fraction of the disk's 4 KiB granules fresh marks may reach by the end. */
#define FRESH_FILL 0.2

static const char *const stable_names[] = {"stable-64k", "stable-4k"};
static const uint64_t stable_gran[] = {65536, 4096};
#define NSTABLE 2

static const char *path;
static _Atomic uint32_t epoch;
static atomic_bool stop;
static atomic_int markers_started;
static _Atomic uint32_t *logs[MARKERS]; /* logs[t][granule]: first epoch seen after a mark */
static _Atomic uint64_t ring[RING];     /* recent fresh ranges: offset << 21 | length */
static atomic_uint ring_next;
static double run_seconds = 20;
static uint64_t seed;

struct marker {
    pthread_t tid;
    unsigned index;
    struct qbm_image *img;
    uint64_t marks, fresh, failures;
};

static uint64_t rng_next(uint64_t *s)
{
    /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * UINT64_C(2685821657736338717);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint32_t epoch_sync(void)
{
    /* An RMW, not a load: it is what orders this thread's earlier marks
     * before the management thread's later increment (see the top). */
    return atomic_fetch_add_explicit(&epoch, 0, memory_order_acq_rel);
}

static void *mark_loop(void *arg)
{
    struct marker *m = arg;
    _Atomic uint32_t *log = logs[m->index];
    uint64_t s = seed + 0x9e3779b97f4a7c15ULL * (m->index + 1);
    /* Fresh marks (new places) are rationed over the run so that the disk
     * does not fill up; the rest re-mark recent ranges of any thread, so
     * most marks find their bits already set, often just set by another
     * thread whose call has not returned yet. */
    double budget = FRESH_FILL * (double)NG / 10.0 / MARKERS; /* ~10 granules a fresh mark */
    double start = now();
    atomic_fetch_add(&markers_started, 1);
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        uint64_t r = rng_next(&s), off, len;
        int fresh = (m->fresh + 1) <= budget * (now() - start) / run_seconds;
        unsigned filled = atomic_load_explicit(&ring_next, memory_order_relaxed);
        uint64_t recent = fresh || filled == 0
                              ? 0
                              : atomic_load_explicit(&ring[r % (filled < RING ? filled : RING)], memory_order_acquire);
        if (fresh || recent == 0) {
            fresh = 1;
            /* 1 byte .. 64 KiB anywhere, now and then up to 1 MiB. */
            len = 1 + rng_next(&s) % (r % 16 == 0 ? MiB : 64 * KiB);
            off = rng_next(&s) % (SIZE - len + 1);
        } else {
            uint64_t roff = recent >> 21, rlen = recent & (MiB * 2 - 1);
            off = roff + (r >> 8) % rlen;
            len = 1 + (r >> 40) % (roff + rlen - off);
        }
        if (qbm_mark_dirty(m->img, off, len) < 0) {
            fprintf(stderr, "marker %u: qbm_mark_dirty(%" PRIu64 ", %" PRIu64 "): %s\n", m->index, off, len,
                    qbm_last_error());
            m->failures++;
            continue;
        }
        m->marks++;
        uint32_t e = epoch_sync();
        for (uint64_t g = off / G; g <= (off + len - 1) / G; g++) {
            if (atomic_load_explicit(&log[g], memory_order_relaxed) > e) {
                atomic_store_explicit(&log[g], e, memory_order_release);
            }
        }
        if (m->marks % 64 == 0) {
            sched_yield(); /* lets the management thread run under valgrind, which runs one thread at a time */
        }
        if (fresh) {
            m->fresh++;
            unsigned i = atomic_fetch_add_explicit(&ring_next, 1, memory_order_relaxed);
            atomic_store_explicit(&ring[i % RING], off << 21 | len, memory_order_release);
        }
    }
    return NULL;
}

/* ---- reading a bitmap straight from the file (FORMAT.md section 5) ---- */

static uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++) {
        v = v << 8 | p[i];
    }
    return v;
}

static void pread_all(int fd, void *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (r <= 0) {
            fail_at(__FILE__, __LINE__, "pread %zu bytes at %" PRIu64 " of %s failed", len - done, off + done,
                    path);
        }
        done += (size_t)r;
    }
}

/*
 * The stored bitmap `name` as serialized bytes (ceil(bits / 8), malloc'd),
 * whatever its in_use flag; *flags gets its flags. Fails if it is missing.
 */
static uint8_t *read_stored(const char *name, uint64_t granularity, uint32_t *flags)
{
    int fd = open(path, O_RDONLY);
    uint8_t hdr[104], *c0, *dir;
    uint64_t cs, hlen, dir_off = 0, dir_size = 0, nbytes;
    uint32_t nb = 0;
    uint8_t *out = NULL;
    expect(fd >= 0);
    pread_all(fd, hdr, sizeof hdr, 0);
    cs = UINT64_C(1) << be(hdr + 20, 4);
    hlen = be(hdr + 100, 4);
    if (!(be(hdr + 88, 8) & 1)) { /* autoclear bit 0: the bitmaps extension is consistent */
        fail_at(__FILE__, __LINE__, "%s has no stored bitmaps (autoclear bit 0 clear) after a flush", path);
    }
    c0 = malloc(cs);
    expect(c0 != NULL);
    pread_all(fd, c0, cs, 0);
    for (uint64_t at = hlen; at + 8 <= cs;) {
        uint32_t magic = (uint32_t)be(c0 + at, 4), len = (uint32_t)be(c0 + at + 4, 4);
        if (magic == 0) {
            break;
        }
        if (magic == 0x23852875) {
            nb = (uint32_t)be(c0 + at + 8, 4);
            dir_size = be(c0 + at + 16, 8);
            dir_off = be(c0 + at + 24, 8);
        }
        at += 8 + ((len + 7) & ~7u);
    }
    free(c0);
    expect(nb > 0);
    dir = malloc(dir_size);
    expect(dir != NULL);
    pread_all(fd, dir, dir_size, dir_off);
    nbytes = ((SIZE + granularity - 1) / granularity + 7) / 8;
    for (uint64_t at = 0, i = 0; i < nb; i++) {
        uint64_t table_off = be(dir + at, 8), table_size = be(dir + at + 8, 4);
        uint32_t fl = (uint32_t)be(dir + at + 12, 4);
        uint64_t gbits = dir[at + 17], name_size = be(dir + at + 18, 2), extra = be(dir + at + 20, 4);
        const uint8_t *n = dir + at + 24 + extra;
        if (name_size == strlen(name) && memcmp(n, name, name_size) == 0) {
            uint64_t *table = malloc(table_size * 8);
            expect_eq(UINT64_C(1) << gbits, granularity);
            expect_eq(table_size, (nbytes + cs - 1) / cs);
            expect(table != NULL);
            pread_all(fd, table, table_size * 8, table_off);
            out = malloc(table_size * cs);
            expect(out != NULL);
            for (uint64_t c = 0; c < table_size; c++) {
                uint64_t e = be((const uint8_t *)&table[c], 8), data = e & UINT64_C(0x00fffffffffffe00);
                if (data != 0) {
                    pread_all(fd, out + c * cs, cs, data);
                } else {
                    memset(out + c * cs, (e & 1) ? 0xff : 0, cs);
                }
            }
            free(table);
            *flags = fl;
            break;
        }
        at += (24 + extra + name_size + 7) & ~UINT64_C(7);
    }
    free(dir);
    close(fd);
    if (out == NULL) {
        fail_at(__FILE__, __LINE__, "bitmap %s is not in the stored directory of %s", name, path);
    }
    return out;
}

static int bit(const uint8_t *bits, uint64_t k)
{
    return bits[k / 8] >> (k % 8) & 1;
}

/* ---- the union of logged granules ---- */

/* Smallest epoch any marker logged for 4 KiB granule g (NEVER if unmarked). */
static uint32_t logged(uint64_t g)
{
    uint32_t e = NEVER;
    for (unsigned t = 0; t < MARKERS; t++) {
        uint32_t x = atomic_load_explicit(&logs[t][g], memory_order_acquire);
        e = x < e ? x : e;
    }
    return e;
}

/* The union at `granularity`, as a byte array like the serialized bitmap. */
static uint8_t *union_bits(uint64_t granularity)
{
    uint64_t nbits = (SIZE + granularity - 1) / granularity;
    uint8_t *u = calloc((nbits + 7) / 8, 1);
    expect(u != NULL);
    for (uint64_t g = 0; g < NG; g++) {
        if (logged(g) != NEVER) {
            uint64_t k = g * G / granularity;
            u[k / 8] |= (uint8_t)(1u << (k % 8));
        }
    }
    return u;
}

/* The runs of set bits of `bits`, as byte extents (clamped to SIZE). */
static struct extent *runs(const uint8_t *bits, uint64_t granularity, size_t *n)
{
    uint64_t nbits = (SIZE + granularity - 1) / granularity;
    size_t cap = 1024, k = 0;
    struct extent *v = malloc(cap * sizeof *v);
    expect(v != NULL);
    for (uint64_t b = 0; b < nbits;) {
        if (!bit(bits, b)) {
            b++;
            continue;
        }
        uint64_t e = b;
        while (e < nbits && bit(bits, e)) {
            e++;
        }
        if (k == cap) {
            cap *= 2;
            v = realloc(v, cap * sizeof *v);
            expect(v != NULL);
        }
        v[k].start = b * granularity;
        v[k].length = (e * granularity < SIZE ? e * granularity : SIZE) - b * granularity;
        k++;
        b = e;
    }
    *n = k;
    return v;
}

/* ---- management ---- */

struct churn {
    int present, enabled;
    uint64_t granularity;
    /* The coarsest granularity that reached it: its own, or a merge source's
     * (a merge from a coarser bitmap sets whole coarse granules). */
    uint64_t coarsest;
};

/* Per churn bitmap, after the run; the final check allows a bit only where
 * its `coarsest`-sized block holds a mark. */
static struct churn churn_final[CHURN];

struct stats {
    uint64_t flushes, adds, removes, enables, disables, merges, clears, checked, checked_new;
};

static char churn_name[CHURN][16];

/* After flush k: the stable bitmaps on disk hold every granule logged < k. */
static void checkpoint(uint32_t k, uint8_t **prev, struct stats *st)
{
    uint64_t checked = 0;
    for (int b = 0; b < NSTABLE; b++) {
        uint64_t gran = stable_gran[b], nbytes = ((SIZE + gran - 1) / gran + 7) / 8;
        uint32_t flags = 0;
        uint8_t *disk = read_stored(stable_names[b], gran, &flags);
        expect_eq(flags & 3, 3); /* in_use and auto while open */
        for (uint64_t g = 0; g < NG; g++) {
            uint32_t e = logged(g);
            if (e < k) {
                checked++;
                if (!bit(disk, g * G / gran)) {
                    fail_at(__FILE__, __LINE__,
                            "after flush #%" PRIu32 ": bitmap %s on disk lacks bit %" PRIu64
                            " (bytes %" PRIu64 "..), marked by a call that returned at epoch %" PRIu32
                            ", before the flush was called (seed %" PRIu64 ")",
                            k, stable_names[b], g * G / gran, g * G / gran * gran, e, seed);
                }
                if (e == k - 1) {
                    st->checked_new++;
                }
            }
        }
        if (prev[b] != NULL) {
            for (uint64_t i = 0; i < nbytes; i++) {
                if (prev[b][i] & ~disk[i]) {
                    fail_at(__FILE__, __LINE__, "after flush #%" PRIu32 ": bitmap %s lost a stored bit near byte %" PRIu64,
                            k, stable_names[b], i * 8 * gran);
                }
            }
            free(prev[b]);
        }
        prev[b] = disk;
    }
    st->checked += checked;
}

static void manage(struct qbm_image *img, struct stats *st, uint8_t **prev)
{
    struct churn ch[CHURN];
    static const uint64_t grans[] = {4096, 65536, MiB};
    uint64_t s = seed ^ 0x5bd1e995;
    double start = now();
    memset(ch, 0, sizeof ch);
    /* At least MIN_FLUSHES flushes even on a slow machine, within a hard limit. */
    while (now() < start + run_seconds || (st->flushes < MIN_FLUSHES && now() < start + 10 * run_seconds)) {
        uint64_t r = rng_next(&s);
        unsigned i = (unsigned)(r >> 8) % CHURN;
        struct churn *c = &ch[i];
        switch (r % 8) {
        case 0:
        case 1: {
            uint32_t k = atomic_fetch_add_explicit(&epoch, 1, memory_order_acq_rel) + 1;
            ok(qbm_flush(img));
            st->flushes++;
            checkpoint(k, prev, st);
            break;
        }
        case 2:
            if (!c->present) {
                c->granularity = grans[(r >> 16) % 3];
                c->enabled = (r >> 20) % 4 != 0;
                ok(qbm_bitmap_add(img, churn_name[i], c->granularity, c->enabled ? 0 : QBM_BITMAP_DISABLED));
                c->present = 1;
                c->coarsest = c->granularity;
                st->adds++;
            } else {
                ok(qbm_bitmap_remove(img, churn_name[i]));
                c->present = 0;
                st->removes++;
            }
            break;
        case 3:
        case 4:
            if (c->present) {
                if (c->enabled) {
                    ok(qbm_bitmap_disable(img, churn_name[i]));
                    st->disables++;
                } else {
                    ok(qbm_bitmap_enable(img, churn_name[i]));
                    st->enables++;
                }
                c->enabled = !c->enabled;
            }
            break;
        case 5:
        case 6:
            if (c->present) {
                /* From a stable bitmap or another churn bitmap. */
                unsigned j = (unsigned)(r >> 24) % (CHURN + NSTABLE);
                const char *src = j < CHURN ? churn_name[j] : stable_names[j - CHURN];
                if (j >= CHURN || (j != i && ch[j].present)) {
                    uint64_t g = j < CHURN ? ch[j].coarsest : stable_gran[j - CHURN];
                    ok(qbm_bitmap_merge(img, churn_name[i], img, src));
                    c->coarsest = g > c->coarsest ? g : c->coarsest;
                    st->merges++;
                }
            }
            break;
        case 7:
            if (c->present && (r >> 28) % 4 == 0) {
                ok(qbm_bitmap_clear(img, churn_name[i]));
                c->coarsest = c->granularity;
                st->clears++;
            }
            break;
        }
    }
    memcpy(churn_final, ch, sizeof ch);
}

/* ---- final checks ---- */

static int have_nbd;

/* QEMU's extents of `name` (qemu-nbd -B, nbdinfo --map), merged into runs. */
static struct extent *nbd_extents(const char *name, size_t *n)
{
    char *map = run_capture("nbdinfo --map=qemu:dirty-bitmap:'%s' -- [ qemu-nbd -r -f qcow2 -B '%s' '%s' ]", name,
                            name, path);
    size_t cap = 1024, k = 0;
    struct extent *v = malloc(cap * sizeof *v);
    char *save = NULL;
    expect(v != NULL);
    if (map == NULL) {
        fail_at(__FILE__, __LINE__, "nbdinfo --map of bitmap %s in %s failed", name, path);
    }
    for (char *line = strtok_r(map, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
        uint64_t start, length;
        unsigned type;
        if (sscanf(line, "%" SCNu64 " %" SCNu64 " %u", &start, &length, &type) != 3) {
            fail_at(__FILE__, __LINE__, "unexpected nbdinfo line: %s", line);
        }
        if (!(type & 1)) {
            continue;
        }
        if (k > 0 && v[k - 1].start + v[k - 1].length == start) {
            v[k - 1].length += length;
            continue;
        }
        if (k == cap) {
            cap *= 2;
            v = realloc(v, cap * sizeof *v);
            expect(v != NULL);
        }
        v[k].start = start;
        v[k].length = length;
        k++;
    }
    free(map);
    *n = k;
    return v;
}

static void expect_same_extents(const char *what, const char *name, const struct extent *got, size_t ngot,
                                const struct extent *want, size_t nwant)
{
    for (size_t i = 0; i < ngot || i < nwant; i++) {
        if (i >= ngot || i >= nwant || got[i].start != want[i].start || got[i].length != want[i].length) {
            fail_at(__FILE__, __LINE__,
                    "bitmap %s: %s extent #%zu is %s[%" PRIu64 ", +%" PRIu64 ") but expected %s[%" PRIu64
                    ", +%" PRIu64 ") (%zu vs %zu extents, seed %" PRIu64 ")",
                    name, what, i, i < ngot ? "" : "(none) ", i < ngot ? got[i].start : 0,
                    i < ngot ? got[i].length : 0, i < nwant ? "" : "(none) ", i < nwant ? want[i].start : 0,
                    i < nwant ? want[i].length : 0, ngot, nwant, seed);
        }
    }
}

/* libqbm's extents of `name`, checked against its dirty byte count. */
static struct extent *lib_extents(struct qbm_image *img, const char *name, size_t *n)
{
    uint64_t from = 0, s, l, total = 0, bytes = 0;
    size_t cap = 1024, k = 0;
    struct extent *v = malloc(cap * sizeof *v);
    expect(v != NULL);
    while (ok(qbm_bitmap_next_extent(img, name, from, &s, &l)) == 1) {
        expect(l > 0 && s >= from);
        if (k == cap) {
            cap *= 2;
            v = realloc(v, cap * sizeof *v);
            expect(v != NULL);
        }
        v[k].start = s;
        v[k].length = l;
        k++;
        total += l;
        from = s + l;
    }
    ok(qbm_bitmap_dirty_bytes(img, name, &bytes));
    expect_eq(bytes, total);
    *n = k;
    return v;
}

static void final_checks(uint8_t **prev, int qemu)
{
    struct qbm_image *img = NULL;
    uint32_t count = 0;
    ok(qbm_open(path, 0, &img));
    for (int b = 0; b < NSTABLE; b++) {
        uint64_t gran = stable_gran[b], nbytes = ((SIZE + gran - 1) / gran + 7) / 8;
        uint8_t *u = union_bits(gran);
        size_t n;
        struct extent *want = runs(u, gran, &n);
        /* Exactly the union: no mark lost, no bit that nobody marked. */
        {
            size_t k;
            struct extent *got = lib_extents(img, stable_names[b], &k);
            expect_same_extents("libqbm's", stable_names[b], got, k, want, n);
            free(got);
        }
        for (uint64_t i = 0; prev[b] != NULL && i < nbytes; i++) {
            if (prev[b][i] & ~u[i]) {
                fail_at(__FILE__, __LINE__, "bitmap %s: the last flush stored a bit nobody marked near byte %" PRIu64,
                        stable_names[b], i * 8 * gran);
            }
        }
        if (qemu && have_nbd) {
            size_t k;
            struct extent *got = nbd_extents(stable_names[b], &k);
            expect_same_extents("QEMU's", stable_names[b], got, k, want, n);
            free(got);
        }
        {
            uint64_t total = 0;
            for (size_t i = 0; i < n; i++) {
                total += want[i].length;
            }
            printf("%s: %zu extents, %" PRIu64 " dirty bytes\n", stable_names[b], n, total);
        }
        free(want);
        free(u);
    }
    /* Churn bitmaps: every extent lies where some mark touched. */
    ok(qbm_bitmap_count(img, &count));
    for (uint32_t i = 0; i < count; i++) {
        struct qbm_bitmap_info info;
        uint64_t from = 0, s, l, total = 0;
        size_t n = 0, cap = 1024;
        struct extent *mine = malloc(cap * sizeof *mine);
        int r;
        memset(&info, 0, sizeof info);
        info.struct_size = sizeof info;
        ok(qbm_bitmap_get_info(img, i, &info));
        expect(info.flags == 0 || info.flags == QBM_BITMAP_ENABLED);
        if (strncmp(info.name, "churn-", 6) != 0) {
            free(mine);
            continue;
        }
        int ci = atoi(info.name + 6);
        uint64_t coarse;
        expect(ci >= 0 && ci < CHURN && churn_final[ci].present);
        expect_eq(info.granularity, churn_final[ci].granularity);
        expect_eq(!!(info.flags & QBM_BITMAP_ENABLED), churn_final[ci].enabled);
        coarse = churn_final[ci].coarsest;
        while ((r = ok(qbm_bitmap_next_extent(img, info.name, from, &s, &l))) == 1) {
            /* Each granule of the extent must lie in a block of the coarsest
             * granularity that reached the bitmap holding a marked 4 KiB granule. */
            for (uint64_t at = s; at < s + l; at += info.granularity) {
                uint64_t block = at / coarse * coarse;
                int found = 0;
                for (uint64_t g = block / G; g * G < block + coarse && g < NG && !found; g++) {
                    found = logged(g) != NEVER;
                }
                if (!found) {
                    fail_at(__FILE__, __LINE__,
                            "bitmap %s (granularity %" PRIu64 ", merged from granularities up to %" PRIu64
                            ") holds [%" PRIu64 ", +%" PRIu64 ") which no thread marked (seed %" PRIu64 ")",
                            info.name, info.granularity, coarse, at, info.granularity, seed);
                }
            }
            if (n == cap) {
                cap *= 2;
                mine = realloc(mine, cap * sizeof *mine);
                expect(mine != NULL);
            }
            mine[n].start = s;
            mine[n].length = l;
            n++;
            total += l;
            from = s + l;
        }
        expect_eq(total, info.dirty_bytes);
        if (qemu && have_nbd) {
            size_t k;
            struct extent *got = nbd_extents(info.name, &k);
            expect_same_extents("QEMU's", info.name, got, k, mine, n);
            free(got);
        }
        printf("%s: granularity %" PRIu64 ", %s, %zu extents, %" PRIu64 " dirty bytes\n", info.name,
               info.granularity, info.flags & QBM_BITMAP_ENABLED ? "enabled" : "disabled", n, total);
        free(mine);
    }
    ok(qbm_close(img));
    if (qemu && run_cmd("qemu-img check -q '%s'", path) != 0) {
        run_cmd("qemu-img check '%s' >&2", path);
        fail_at(__FILE__, __LINE__, "qemu-img check is not clean on %s", path);
    }
}

int main(void)
{
    struct qbm_create_options o = create_opts(SIZE);
    struct qbm_image *img = NULL;
    struct marker m[MARKERS];
    struct stats st;
    uint8_t *prev[NSTABLE] = {NULL, NULL};
    uint64_t marks = 0, fresh = 0;
    const char *env;
    int qemu;
    double t0;

    if ((env = getenv("QBM_STRESS_SECONDS")) != NULL && *env) {
        run_seconds = atof(env);
        expect(run_seconds > 0);
    }
    seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    if ((env = getenv("QBM_STRESS_SEED")) != NULL && *env) {
        seed = strtoull(env, NULL, 0);
    }
    seed |= 1; /* xorshift needs a non-zero state */
    printf("stress: %d markers, %.1f s, QBM_STRESS_SEED=%" PRIu64 "\n", MARKERS, run_seconds, seed);
    fflush(stdout);

    qemu = qemu_img_available();
    have_nbd = qemu && run_cmd("command -v qemu-nbd >/dev/null && command -v nbdinfo >/dev/null") == 0;
    if (qemu && !have_nbd) {
        if (ci_mode()) {
            fprintf(stderr, "FAIL: qemu-nbd or nbdinfo is not installed and CI=true\n");
            return 1;
        }
        fprintf(stderr, "SKIP: qemu-nbd or nbdinfo missing: not comparing extents with QEMU's export\n");
    }

    path = test_path("stress.qcow2");
    unlink(path);
    ok(qbm_create(path, &o, &img));
    for (int b = 0; b < NSTABLE; b++) {
        ok(qbm_bitmap_add(img, stable_names[b], stable_gran[b], 0));
    }
    for (int i = 0; i < CHURN; i++) {
        snprintf(churn_name[i], sizeof churn_name[i], "churn-%d", i);
    }
    for (unsigned t = 0; t < MARKERS; t++) {
        logs[t] = malloc(NG * sizeof *logs[t]);
        expect(logs[t] != NULL);
        for (uint64_t g = 0; g < NG; g++) {
            atomic_init(&logs[t][g], NEVER);
        }
    }
    for (unsigned i = 0; i < RING; i++) {
        atomic_init(&ring[i], 0);
    }

    memset(&st, 0, sizeof st);
    t0 = now();
    for (unsigned t = 0; t < MARKERS; t++) {
        memset(&m[t], 0, sizeof m[t]);
        m[t].index = t;
        m[t].img = img;
        expect(pthread_create(&m[t].tid, NULL, mark_loop, &m[t]) == 0);
    }
    while (atomic_load(&markers_started) < MARKERS) {
        sched_yield();
    }
    manage(img, &st, prev);
    atomic_store(&stop, true);
    for (unsigned t = 0; t < MARKERS; t++) {
        expect(pthread_join(m[t].tid, NULL) == 0);
        expect_eq(m[t].failures, 0);
        marks += m[t].marks;
        fresh += m[t].fresh;
    }
    /* One more checkpoint with every mark returned: all of them must be stored. */
    {
        uint32_t k = atomic_fetch_add_explicit(&epoch, 1, memory_order_acq_rel) + 1;
        ok(qbm_flush(img));
        st.flushes++;
        checkpoint(k, prev, &st);
    }
    ok(qbm_close(img));
    printf("%" PRIu64 " marks (%" PRIu64 " fresh) in %.1f s; %" PRIu64 " flushes checked %" PRIu64
           " granule-bitmap pairs (%" PRIu64 " marked in the epoch just before); %" PRIu64 " adds, %" PRIu64
           " removes, %" PRIu64 " enables, %" PRIu64 " disables, %" PRIu64 " merges, %" PRIu64 " clears\n",
           marks, fresh, now() - t0, st.flushes, st.checked, st.checked_new, st.adds, st.removes, st.enables,
           st.disables, st.merges, st.clears);
    expect(st.flushes > MIN_FLUSHES);
    expect(fresh > 0);

    final_checks(prev, qemu);
    for (int b = 0; b < NSTABLE; b++) {
        free(prev[b]);
    }
    for (unsigned t = 0; t < MARKERS; t++) {
        free((void *)logs[t]);
    }
    return test_pass("stress", qemu ? (have_nbd ? NULL : " (nbd comparison skipped)") : " (QEMU checks skipped)");
}
