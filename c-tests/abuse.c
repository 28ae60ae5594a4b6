/*
 * The C API under abuse. Every exported function is called with each pointer
 * NULL in turn, struct_size wrong, names empty / too long / not UTF-8 /
 * unknown / taken, lengths zero or huge, offsets past the end and ranges that
 * overflow, granularities and flags out of range, writes on read-only
 * handles, merges that cannot be done and bitmaps that are in use.
 *
 * Each refused call must return the documented negative errno, leave a
 * message naming the problem (and the image, where the library knows it),
 * write no output, and leave both the handle and the image as they were:
 * after every refused call the handle is flushed (nothing may be stored, so
 * the file stays byte-for-byte identical to its snapshot) and every bitmap's
 * info and extents are compared with the model.
 *
 * Freed handles are not tested: the API does not promise to detect them, and
 * a use after free would be this test's bug, which valgrind reports.
 */
#include "util.h"

#include <limits.h>

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define GiB (UINT64_C(1) << 30)
#define SIZE (64 * MiB)
#define OTHER_SIZE (32 * MiB)
#define SENTINEL UINT64_C(0x5a5a5a5a5a5a5a5a)

/* Classes of abuse, counted for the summary line. */
enum kind {
    K_NULL,     /* a NULL pointer argument */
    K_STRUCT,   /* struct_size zero, too small, huge, or unknown fields set */
    K_NAME,     /* an empty, too long or non-UTF-8 name */
    K_NOENT,    /* a name or index that does not exist */
    K_EXIST,    /* a name that is taken */
    K_RANGE,    /* offsets past the end, overflowing or unaligned ranges */
    K_GRAN,     /* granularity out of range */
    K_FLAGS,    /* unknown or conflicting flags, bad create options */
    K_ROFS,     /* a write on a read-only handle */
    K_MERGE,    /* a merge between disks of different sizes */
    K_BUSY,     /* a bitmap found in use (inconsistent) */
    K_OPEN,     /* open/create of a bad, missing, taken or locked path */
    K_NOOP,     /* an odd call the API defines as a harmless no-op */
    K_COUNT
};

static const char *const kind_names[K_COUNT] = {
    "NULL pointers", "struct_size", "bad names", "unknown name/index", "taken names", "ranges/offsets",
    "granularity", "flags/options", "read-only writes", "merge size mismatch", "in-use bitmaps",
    "open/create paths", "defined no-ops",
};

static unsigned counts[K_COUNT];

/* One bitmap of the model: what every handle must show. */
struct model_bitmap {
    const char *name;
    uint64_t granularity;
    uint32_t enabled;
    struct extent ext[2];
    size_t n;
};

static char max_name[QBM_NAME_MAX + 1]; /* exactly the limit: a valid name */
static const char utf8_name[] = "sauvegarde-\xc3\xa9t\xc3\xa9-\xe2\x9c\x93";

static struct model_bitmap model[] = {
    {"a", 64 * KiB, 1, {{1 * MiB, 128 * KiB}, {10 * MiB, 64 * KiB}}, 2},
    {"b", 4 * KiB, 0, {{4 * KiB, 8 * KiB}, {SIZE - 4 * KiB, 4 * KiB}}, 2},
    {utf8_name, 512, 1, {{0, 512}}, 1},
    {max_name, 64 * KiB, 0, {{32 * MiB, 64 * KiB}}, 1},
};
#define NMODEL (sizeof model / sizeof model[0])

/* The handle under test, its file and the file's bytes as last stored. */
static struct {
    struct qbm_image *img;
    const char *path;
    unsigned char *bytes;
    size_t len;
    int writable;
    int in_use; /* every bitmap was found in use: no data, only flags */
} cur;

/* A second, smaller image (read-only handle) for merges across images. */
static struct qbm_image *other;
static unsigned char *other_bytes;
static size_t other_len;

static unsigned char *read_whole(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL;
    size_t cap = 0, n = 0, got;
    if (f == NULL) {
        fail_at(__FILE__, __LINE__, "cannot open %s: %s", path, strerror(errno));
    }
    do {
        if (n == cap) {
            cap = cap ? cap * 2 : 1 << 20;
            buf = realloc(buf, cap);
            if (buf == NULL) {
                fail_at(__FILE__, __LINE__, "out of memory");
            }
        }
        got = fread(buf + n, 1, cap - n, f);
        n += got;
    } while (got > 0);
    fclose(f);
    *len = n;
    return buf;
}

static void same_file_at(const char *file, int line, const char *path, const unsigned char *want, size_t want_len)
{
    size_t len;
    unsigned char *now = read_whole(path, &len);
    if (len != want_len) {
        fail_at(file, line, "%s changed: %zu bytes, was %zu", path, len, want_len);
    }
    /* Word by word first (this runs after every case, under valgrind too). */
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t a, b;
        memcpy(&a, now + i, 8);
        memcpy(&b, want + i, 8);
        if (a != b) {
            break;
        }
    }
    for (; i < len; i++) {
        if (now[i] != want[i]) {
            fail_at(file, line, "%s changed at byte %zu (0x%zx): 0x%02x, was 0x%02x", path, i, i, now[i], want[i]);
        }
    }
    free(now);
}

/* Makes the current file contents the reference. */
static void snapshot(void)
{
    free(cur.bytes);
    cur.bytes = read_whole(cur.path, &cur.len);
}

static void use_handle(struct qbm_image *img, const char *path, int writable, int in_use)
{
    cur.img = img;
    cur.path = path;
    cur.writable = writable;
    cur.in_use = in_use;
    snapshot();
}

/*
 * The handle still works and nothing changed: a flush succeeds and stores
 * nothing (the file is byte-for-byte its snapshot), and every bitmap shows
 * the model's name, granularity, flags and extents.
 */
static void verify_at(const char *file, int line)
{
    uint32_t count = 0;
    struct qbm_image_info ii;

    if (qbm_flush(cur.img) != 0) {
        fail_at(file, line, "qbm_flush after a refused call failed: %s", qbm_last_error());
    }
    same_file_at(file, line, cur.path, cur.bytes, cur.len);
    if (cur.len < 8192) {
        fail_at(file, line, "%s is only %zu bytes: not the image under test", cur.path, cur.len);
    }
    if (other != NULL) {
        same_file_at(file, line, test_path("other.qcow2"), other_bytes, other_len);
    }

    memset(&ii, 0, sizeof ii);
    ii.struct_size = sizeof ii;
    if (qbm_image_get_info(cur.img, &ii) != 0 || qbm_bitmap_count(cur.img, &count) != 0) {
        fail_at(file, line, "the handle no longer works: %s", qbm_last_error());
    }
    if (ii.virtual_size != SIZE || ii.bitmap_count != NMODEL || count != NMODEL ||
        (ii.flags & QBM_IMAGE_WRITABLE) != (cur.writable ? QBM_IMAGE_WRITABLE : 0u)) {
        fail_at(file, line, "image info changed: size %" PRIu64 ", %u bitmaps (count %u), flags %#x", ii.virtual_size,
                ii.bitmap_count, count, ii.flags);
    }
    for (uint32_t i = 0; i < NMODEL; i++) {
        const struct model_bitmap *m = &model[i];
        struct qbm_bitmap_info bi;
        uint32_t want_flags = (m->enabled ? QBM_BITMAP_ENABLED : 0u) | (cur.in_use ? QBM_BITMAP_IN_USE : 0u);
        uint64_t want_dirty = 0;
        memset(&bi, 0, sizeof bi);
        bi.struct_size = sizeof bi;
        if (qbm_bitmap_get_info(cur.img, i, &bi) != 0) {
            fail_at(file, line, "qbm_bitmap_get_info(%u) failed: %s", i, qbm_last_error());
        }
        for (size_t k = 0; !cur.in_use && k < m->n; k++) {
            want_dirty += m->ext[k].length;
        }
        if (strcmp(bi.name, m->name) != 0 || bi.granularity != m->granularity || bi.flags != want_flags ||
            bi.extra_data_size != 0 || bi.dirty_bytes != want_dirty) {
            fail_at(file, line,
                    "bitmap #%u changed: \"%.40s\" granularity %" PRIu64 " flags %#x dirty %" PRIu64
                    "; expected \"%.40s\" %" PRIu64 " %#x %" PRIu64,
                    i, bi.name, bi.granularity, bi.flags, bi.dirty_bytes, m->name, m->granularity, want_flags,
                    want_dirty);
        }
        if (!cur.in_use) {
            check_extents_at(file, line, cur.img, m->name, m->ext, m->n);
        }
    }
}

#define verify() verify_at(__FILE__, __LINE__)

/*
 * Checks one refused call: the errno, a message containing `s1` (and `s2`
 * unless NULL), then verify(). `what` describes the call.
 */
static void refused_at(const char *file, int line, enum kind kind, long long r, long long expected, const char *s1,
                       const char *s2, const char *what)
{
    err_check(r, expected, s1, what, file, line);
    if (s2 != NULL && strstr(qbm_last_error(), s2) == NULL) {
        fail_at(file, line, "%s: message \"%s\" does not name \"%s\"", what, qbm_last_error(), s2);
    }
    counts[kind]++;
    verify_at(file, line);
}

#define REFUSE2(kind, expr, e, s1, s2)                                                                    \
    do {                                                                                                  \
        long long r_;                                                                                     \
        err_prime();                                                                                      \
        r_ = (long long)(expr);                                                                           \
        refused_at(__FILE__, __LINE__, (kind), r_, (e), (s1), (s2), #expr);                               \
    } while (0)

/* Refused, with a message containing s1. */
#define REFUSE(kind, expr, e, s1) REFUSE2(kind, expr, e, s1, NULL)

/* Refused, with a message containing s1 and naming the image file. */
#define REFUSE_F(kind, expr, e, s1) REFUSE2(kind, expr, e, s1, cur.path)

/* Accepted, returning 0, and changing nothing. */
#define NOOP(expr)                                                                                        \
    do {                                                                                                  \
        expect_eq(ok(expr), 0);                                                                           \
        counts[K_NOOP]++;                                                                                 \
        verify();                                                                                         \
    } while (0)

/* ---- by-name functions, as one table so that every abuse hits every one ---- */

typedef int (*name_fn)(struct qbm_image *img, const char *name);

static int f_add(struct qbm_image *i, const char *n) { return qbm_bitmap_add(i, n, 0, 0); }
static int f_remove(struct qbm_image *i, const char *n) { return qbm_bitmap_remove(i, n); }
static int f_clear(struct qbm_image *i, const char *n) { return qbm_bitmap_clear(i, n); }
static int f_enable(struct qbm_image *i, const char *n) { return qbm_bitmap_enable(i, n); }
static int f_disable(struct qbm_image *i, const char *n) { return qbm_bitmap_disable(i, n); }
static int f_rename_old(struct qbm_image *i, const char *n) { return qbm_bitmap_rename(i, n, "fresh"); }
static int f_rename_new(struct qbm_image *i, const char *n) { return qbm_bitmap_rename(i, "a", n); }
static int f_merge_dst(struct qbm_image *i, const char *n) { return qbm_bitmap_merge(i, n, i, "b"); }
static int f_merge_src(struct qbm_image *i, const char *n) { return qbm_bitmap_merge(i, "a", i, n); }
static int f_set(struct qbm_image *i, const char *n) { return qbm_bitmap_set(i, n, 0, 4096); }
static int f_reset(struct qbm_image *i, const char *n) { return qbm_bitmap_reset(i, n, 0, 64 * KiB); }

/* Output functions also prove that a refused call writes no output. */
static int f_dirty(struct qbm_image *i, const char *n)
{
    uint64_t bytes = SENTINEL;
    int r = qbm_bitmap_dirty_bytes(i, n, &bytes);
    if (r < 0 && bytes != SENTINEL) {
        fail_at(__FILE__, __LINE__, "qbm_bitmap_dirty_bytes failed (%d) but wrote its output", r);
    }
    return r;
}

static int f_next(struct qbm_image *i, const char *n)
{
    uint64_t s = SENTINEL, l = SENTINEL;
    int r = qbm_bitmap_next_extent(i, n, 0, &s, &l);
    if (r <= 0 && (s != SENTINEL || l != SENTINEL)) {
        fail_at(__FILE__, __LINE__, "qbm_bitmap_next_extent returned %d but wrote its outputs", r);
    }
    return r;
}

enum { LOOKUP = 1, CREATES = 2, WRITES = 4, REMOVES = 8 };

static const struct {
    const char *what;
    name_fn fn;
    int how;
} name_fns[] = {
    {"qbm_bitmap_add", f_add, CREATES | WRITES},
    {"qbm_bitmap_remove", f_remove, LOOKUP | WRITES | REMOVES},
    {"qbm_bitmap_clear", f_clear, LOOKUP | WRITES},
    {"qbm_bitmap_enable", f_enable, LOOKUP | WRITES},
    {"qbm_bitmap_disable", f_disable, LOOKUP | WRITES},
    {"qbm_bitmap_rename(old_name)", f_rename_old, LOOKUP | WRITES},
    {"qbm_bitmap_rename(new_name)", f_rename_new, CREATES | WRITES},
    {"qbm_bitmap_merge(dst_name)", f_merge_dst, LOOKUP | WRITES},
    {"qbm_bitmap_merge(src_name)", f_merge_src, LOOKUP | WRITES},
    {"qbm_bitmap_set", f_set, LOOKUP | WRITES},
    {"qbm_bitmap_reset", f_reset, LOOKUP | WRITES},
    {"qbm_bitmap_dirty_bytes", f_dirty, LOOKUP},
    {"qbm_bitmap_next_extent", f_next, LOOKUP},
};
#define NFNS (sizeof name_fns / sizeof name_fns[0])

/* Calls name_fns[f] with `name`, expecting `e` and a message with s1 (and s2). */
static void refuse_name_at(const char *file, int line, enum kind kind, size_t f, const char *name, const char *desc,
                           long long e, const char *s1, const char *s2)
{
    char what[256];
    long long r;
    snprintf(what, sizeof what, "%s(name = %s)", name_fns[f].what, desc);
    err_prime();
    r = name_fns[f].fn(cur.img, name);
    refused_at(file, line, kind, r, e, s1, s2, what);
}

#define refuse_name(kind, f, name, desc, e, s1, s2)                                                       \
    refuse_name_at(__FILE__, __LINE__, (kind), (f), (name), (desc), (e), (s1), (s2))

/* ---- the phases ---- */

/*
 * Builds the image of the model, and the smaller other image. Small clusters
 * keep the files small: every check reads the whole file.
 */
static struct qbm_image *build(void)
{
    struct qbm_create_options opts = create_opts(SIZE);
    struct qbm_image *img = NULL, *o = NULL;
    opts.cluster_size = 4096;
    ok(qbm_create(test_path("abuse.qcow2"), &opts, &img));
    opts.virtual_size = OTHER_SIZE;
    ok(qbm_create(test_path("other.qcow2"), &opts, &o));
    expect(img != NULL && o != NULL);
    memset(max_name, 'm', QBM_NAME_MAX);
    max_name[QBM_NAME_MAX] = '\0';
    for (size_t i = 0; i < NMODEL; i++) {
        ok(qbm_bitmap_add(img, model[i].name, model[i].granularity, model[i].enabled ? 0 : QBM_BITMAP_DISABLED));
    }
    /* Unaligned marks that round out to the model's granules. */
    ok(qbm_bitmap_set(img, "a", 1 * MiB + 1, 100 * KiB));
    ok(qbm_bitmap_set(img, "a", 10 * MiB + 5, 1));
    ok(qbm_bitmap_set(img, "b", 4 * KiB, 8 * KiB));
    ok(qbm_bitmap_set(img, "b", SIZE - 1, 1));
    ok(qbm_bitmap_set(img, utf8_name, 0, 1));
    ok(qbm_bitmap_set(img, max_name, 32 * MiB + 1000, 1000));
    ok(qbm_flush(img));

    ok(qbm_bitmap_add(o, "x", 64 * KiB, 0));
    ok(qbm_bitmap_set(o, "x", 0, OTHER_SIZE));
    ok(qbm_close(o));
    other = open_image("other.qcow2", 0);
    other_bytes = read_whole(test_path("other.qcow2"), &other_len);
    return img;
}

static void null_pointers(void)
{
    struct qbm_image *img = cur.img;
    struct qbm_image_info ii;
    struct qbm_bitmap_info bi;
    uint32_t count = 7;
    uint64_t s = SENTINEL, l = SENTINEL, bytes = SENTINEL;

    memset(&ii, 0, sizeof ii);
    ii.struct_size = sizeof ii;
    memset(&bi, 0, sizeof bi);
    bi.struct_size = sizeof bi;

    /* The handle. */
    REFUSE(K_NULL, qbm_flush(NULL), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_image_get_info(NULL, &ii), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_count(NULL, &count), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_get_info(NULL, 0, &bi), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_add(NULL, "n", 0, 0), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_remove(NULL, "a"), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_clear(NULL, "a"), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_enable(NULL, "b"), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_disable(NULL, "a"), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_rename(NULL, "a", "n"), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_merge(NULL, "a", img, "b"), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_merge(img, "a", NULL, "b"), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_set(NULL, "a", 0, 1), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_reset(NULL, "a", 0, 64 * KiB), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_mark_dirty(NULL, 0, 1), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_dirty_bytes(NULL, "a", &bytes), -EINVAL, "handle is NULL");
    REFUSE(K_NULL, qbm_bitmap_next_extent(NULL, "a", 0, &s, &l), -EINVAL, "handle is NULL");

    /* Names. */
    REFUSE(K_NULL, qbm_bitmap_add(img, NULL, 0, 0), -EINVAL, "name is NULL");
    REFUSE(K_NULL, qbm_bitmap_remove(img, NULL), -EINVAL, "name is NULL");
    REFUSE(K_NULL, qbm_bitmap_clear(img, NULL), -EINVAL, "name is NULL");
    REFUSE(K_NULL, qbm_bitmap_enable(img, NULL), -EINVAL, "name is NULL");
    REFUSE(K_NULL, qbm_bitmap_disable(img, NULL), -EINVAL, "name is NULL");
    REFUSE(K_NULL, qbm_bitmap_rename(img, NULL, "n"), -EINVAL, "old bitmap name is NULL");
    REFUSE(K_NULL, qbm_bitmap_rename(img, "a", NULL), -EINVAL, "new bitmap name is NULL");
    REFUSE(K_NULL, qbm_bitmap_rename(img, NULL, NULL), -EINVAL, "name is NULL");
    REFUSE(K_NULL, qbm_bitmap_merge(img, NULL, img, "b"), -EINVAL, "destination bitmap name is NULL");
    REFUSE(K_NULL, qbm_bitmap_merge(img, "a", img, NULL), -EINVAL, "source bitmap name is NULL");
    REFUSE(K_NULL, qbm_bitmap_set(img, NULL, 0, 1), -EINVAL, "name is NULL");
    REFUSE(K_NULL, qbm_bitmap_reset(img, NULL, 0, 64 * KiB), -EINVAL, "name is NULL");
    REFUSE(K_NULL, qbm_bitmap_dirty_bytes(img, NULL, &bytes), -EINVAL, "name is NULL");
    REFUSE(K_NULL, qbm_bitmap_next_extent(img, NULL, 0, &s, &l), -EINVAL, "name is NULL");

    /* Outputs and structs. */
    REFUSE(K_NULL, qbm_image_get_info(img, NULL), -EINVAL, "qbm_image_info pointer is NULL");
    REFUSE(K_NULL, qbm_bitmap_count(img, NULL), -EINVAL, "count is NULL");
    REFUSE(K_NULL, qbm_bitmap_get_info(img, 0, NULL), -EINVAL, "qbm_bitmap_info pointer is NULL");
    REFUSE(K_NULL, qbm_bitmap_dirty_bytes(img, "a", NULL), -EINVAL, "output is NULL");
    REFUSE(K_NULL, qbm_bitmap_next_extent(img, "a", 0, NULL, &l), -EINVAL, "start output is NULL");
    REFUSE(K_NULL, qbm_bitmap_next_extent(img, "a", 0, &s, NULL), -EINVAL, "length output is NULL");
    REFUSE(K_NULL, qbm_bitmap_next_extent(img, "a", 0, NULL, NULL), -EINVAL, "output is NULL");

    /* No output was written by any of them. */
    expect_eq(count, 7);
    expect_eq(s, SENTINEL);
    expect_eq(l, SENTINEL);
    expect_eq(bytes, SENTINEL);

    /* Closing NULL is the one documented no-op. */
    NOOP(qbm_close(NULL));
}

/* A struct padded with a canary tail, to prove no byte past struct_size is written. */
#define CANARY 0xa5

union image_info_buf {
    struct qbm_image_info s;
    unsigned char raw[sizeof(struct qbm_image_info) + 64];
};

union bitmap_info_buf {
    struct qbm_bitmap_info s;
    unsigned char raw[sizeof(struct qbm_bitmap_info) + 64];
};

union create_buf {
    struct qbm_create_options s;
    unsigned char raw[sizeof(struct qbm_create_options) + 64];
};

static void expect_canary(const unsigned char *raw, size_t from, size_t to)
{
    for (size_t i = from; i < to; i++) {
        if (raw[i] != CANARY) {
            fail_at(__FILE__, __LINE__, "byte %zu of the caller's struct was written (0x%02x)", i, raw[i]);
        }
    }
}

static void struct_sizes(void)
{
    const size_t bad[] = {0, 1, sizeof(size_t), sizeof(struct qbm_image_info) - 1, 4097, 1 << 20, SIZE_MAX};
    const size_t bad_b[] = {0, 1, sizeof(size_t), sizeof(struct qbm_bitmap_info) - 1, 4097, 1 << 20, SIZE_MAX};
    union image_info_buf ii;
    union bitmap_info_buf bi;

    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        const char *substr = bad[k] > 4096 ? "more than 4096" : "expected at least";
        memset(ii.raw, CANARY, sizeof ii.raw);
        ii.s.struct_size = bad[k];
        REFUSE(K_STRUCT, qbm_image_get_info(cur.img, &ii.s), -EINVAL, substr);
        expect_eq(ii.s.struct_size, bad[k]);
        expect_canary(ii.raw, sizeof(size_t), sizeof ii.raw);

        substr = bad_b[k] > 4096 ? "more than 4096" : "expected at least";
        memset(bi.raw, CANARY, sizeof bi.raw);
        bi.s.struct_size = bad_b[k];
        REFUSE(K_STRUCT, qbm_bitmap_get_info(cur.img, 0, &bi.s), -EINVAL, substr);
        expect_eq(bi.s.struct_size, bad_b[k]);
        expect_canary(bi.raw, sizeof(size_t), sizeof bi.raw);
    }
    /* The message names the struct and the value. */
    ii.s.struct_size = 3;
    REFUSE(K_STRUCT, qbm_image_get_info(cur.img, &ii.s), -EINVAL, "qbm_image_info.struct_size is 3");
    bi.s.struct_size = 4097;
    REFUSE(K_STRUCT, qbm_bitmap_get_info(cur.img, 0, &bi.s), -EINVAL, "qbm_bitmap_info.struct_size is 4097");

    /* A newer caller's longer struct: filled up to what this version knows, the rest left alone. */
    memset(ii.raw, CANARY, sizeof ii.raw);
    ii.s.struct_size = sizeof ii.s + 16;
    ok(qbm_image_get_info(cur.img, &ii.s));
    expect_eq(ii.s.struct_size, sizeof ii.s + 16);
    expect_eq(ii.s.virtual_size, SIZE);
    expect_eq(ii.s.bitmap_count, NMODEL);
    expect_canary(ii.raw, sizeof ii.s, sizeof ii.raw);
    memset(bi.raw, CANARY, sizeof bi.raw);
    bi.s.struct_size = sizeof bi.s + 16;
    ok(qbm_bitmap_get_info(cur.img, 0, &bi.s));
    expect(strcmp(bi.s.name, "a") == 0);
    expect_eq(bi.s.granularity, 64 * KiB);
    expect_canary(bi.raw, sizeof bi.s, sizeof bi.raw);
    verify();
}

static void bad_names(void)
{
    static const struct {
        const char *name, *desc;
    } not_utf8[] = {
        {"\xff", "0xff"},
        {"bad-\x80-continuation", "lone continuation byte"},
        {"overlong-\xc0\xaf", "overlong /"},
        {"surrogate-\xed\xa0\x80", "UTF-16 surrogate"},
        {"cut-\xe2\x9c", "truncated sequence"},
        {"five-\xf8\x88\x80\x80\x80", "5-byte form"},
        {"past-max-\xf4\x90\x80\x80", "past U+10FFFF"},
        {"a\xff", "valid prefix of an existing name"},
    };
    const size_t long_lens[] = {QBM_NAME_MAX + 1, 4096, 65536};
    size_t maxlen = 65536;
    char *long_name = malloc(maxlen + 1);
    char *long_bad = malloc(2001);
    char desc[64];

    expect(long_name != NULL && long_bad != NULL);
    memset(long_bad, 'q', 2000);
    long_bad[1000] = '\xfe';
    long_bad[2000] = '\0';

    for (size_t f = 0; f < NFNS; f++) {
        refuse_name(K_NAME, f, "", "\"\"", -EINVAL, "empty", cur.path);
        for (size_t k = 0; k < sizeof long_lens / sizeof long_lens[0]; k++) {
            /* The valid maximum name, and one byte more: the limit is exact. */
            memset(long_name, 'm', long_lens[k]);
            long_name[long_lens[k]] = '\0';
            snprintf(desc, sizeof desc, "%zu bytes", long_lens[k]);
            refuse_name(K_NAME, f, long_name, desc, -EINVAL, "more than the limit of 1023", cur.path);
        }
        for (size_t k = 0; k < sizeof not_utf8 / sizeof not_utf8[0]; k++) {
            refuse_name(K_NAME, f, not_utf8[k].name, not_utf8[k].desc, -EINVAL, "not valid UTF-8", NULL);
        }
        refuse_name(K_NAME, f, long_bad, "2000 bytes, not UTF-8", -EINVAL, "not valid UTF-8", NULL);
    }
    free(long_name);
    free(long_bad);
}

static void unknown_and_taken(void)
{
    static const char *const unknown[] = {"zz", "A", "a ", " a", "aa", "sauvegarde-ete-", "m"};
    uint32_t count = 0;
    union bitmap_info_buf bi;

    for (size_t f = 0; f < NFNS; f++) {
        if (!(name_fns[f].how & LOOKUP)) {
            continue;
        }
        for (size_t k = 0; k < sizeof unknown / sizeof unknown[0]; k++) {
            char s1[64];
            snprintf(s1, sizeof s1, "'%s' not found", unknown[k]);
            refuse_name(K_NOENT, f, unknown[k], unknown[k], -ENOENT, s1, cur.path);
        }
    }
    /* Existing names refused by add and by rename's new name, whatever the case of the rest. */
    for (size_t f = 0; f < NFNS; f++) {
        if (!(name_fns[f].how & CREATES)) {
            continue;
        }
        for (size_t k = 0; k < NMODEL; k++) {
            if (name_fns[f].fn == f_rename_new && strcmp(model[k].name, "a") == 0) {
                continue; /* renaming a to a: a no-op, below */
            }
            refuse_name(K_EXIST, f, model[k].name, "an existing name", -EEXIST, "already exists", cur.path);
        }
    }
    REFUSE_F(K_EXIST, qbm_bitmap_add(cur.img, "b", 512, QBM_BITMAP_DISABLED), -EEXIST, "'b' already exists");
    REFUSE_F(K_EXIST, qbm_bitmap_rename(cur.img, "b", utf8_name), -EEXIST, "already exists");

    /* Indexes past the end. */
    ok(qbm_bitmap_count(cur.img, &count));
    expect_eq(count, NMODEL);
    for (uint32_t idx = NMODEL; idx != 0; idx = idx < 1000 ? idx + 1000 : (idx == UINT32_MAX ? 0 : UINT32_MAX)) {
        char s1[64];
        memset(bi.raw, CANARY, sizeof bi.raw);
        bi.s.struct_size = sizeof bi.s;
        snprintf(s1, sizeof s1, "no bitmap at index %" PRIu32, idx);
        REFUSE_F(K_NOENT, qbm_bitmap_get_info(cur.img, idx, &bi.s), -ENOENT, s1);
        expect_canary(bi.raw, sizeof(size_t), sizeof bi.raw);
    }
}

static void ranges(void)
{
    static const struct {
        uint64_t off, len;
    } past[] = {
        {SIZE, 1},
        {SIZE + 1, 0},
        {SIZE - 512, 1024}, /* straddles the end: nothing of it may be marked */
        {0, SIZE + 1},
        {1, SIZE},
        {0, UINT64_MAX},
        {1, UINT64_MAX},
        {UINT64_MAX, 0},
        {UINT64_MAX, 1},
        {UINT64_MAX, UINT64_MAX},
        {UINT64_C(1) << 63, UINT64_C(1) << 63}, /* offset + length wraps to 0 */
        {SIZE, UINT64_MAX - SIZE + 1},          /* ... wraps to 0 too */
        {4 * GiB, 4096},
    };
    uint64_t s, l;

    for (size_t k = 0; k < sizeof past / sizeof past[0]; k++) {
        uint64_t off = past[k].off, len = past[k].len;
        REFUSE_F(K_RANGE, qbm_mark_dirty(cur.img, off, len), -EINVAL, "past the end of the disk");
        REFUSE_F(K_RANGE, qbm_bitmap_set(cur.img, "b", off, len), -EINVAL, "past the end of the disk");
        REFUSE_F(K_RANGE, qbm_bitmap_set(cur.img, "a", off, len), -EINVAL, "past the end of the disk");
        REFUSE_F(K_RANGE, qbm_bitmap_reset(cur.img, "b", off, len), -EINVAL, "past the end of the disk");
        REFUSE_F(K_RANGE, qbm_bitmap_reset(cur.img, utf8_name, off, len), -EINVAL, "past the end of the disk");
    }
    /* The message names the bitmap and the values. */
    REFUSE_F(K_RANGE, qbm_bitmap_set(cur.img, "b", SIZE, 1), -EINVAL, "bitmap 'b': range at offset 67108864 of length 1");

    /* Resets must cover whole granules (or end at the end of the disk). */
    REFUSE_F(K_RANGE, qbm_bitmap_reset(cur.img, "a", 512, 64 * KiB), -EINVAL, "not aligned to the granularity 65536");
    REFUSE_F(K_RANGE, qbm_bitmap_reset(cur.img, "a", 0, 64 * KiB + 1), -EINVAL, "not aligned");
    REFUSE_F(K_RANGE, qbm_bitmap_reset(cur.img, "a", 1 * MiB, 1), -EINVAL, "not aligned");
    REFUSE_F(K_RANGE, qbm_bitmap_reset(cur.img, "a", 1 * MiB + 1, 0), -EINVAL, "not aligned");
    REFUSE_F(K_RANGE, qbm_bitmap_reset(cur.img, "b", 4 * KiB + 512, 4 * KiB), -EINVAL, "granularity 4096");
    REFUSE_F(K_RANGE, qbm_bitmap_reset(cur.img, "b", SIZE - 4 * KiB, 4 * KiB - 1), -EINVAL, "not aligned");

    /* Zero lengths anywhere up to the end are documented no-ops. */
    NOOP(qbm_mark_dirty(cur.img, 0, 0));
    NOOP(qbm_mark_dirty(cur.img, 1 * MiB + 3, 0));
    NOOP(qbm_mark_dirty(cur.img, SIZE, 0));
    NOOP(qbm_bitmap_set(cur.img, "b", 0, 0));
    NOOP(qbm_bitmap_set(cur.img, "b", SIZE, 0));
    NOOP(qbm_bitmap_reset(cur.img, "a", 1 * MiB, 0));
    NOOP(qbm_bitmap_reset(cur.img, "a", SIZE, 0));

    /* Walking from the end or past it finds nothing and writes no output. */
    const uint64_t froms[] = {SIZE, SIZE + 1, 4 * GiB, UINT64_MAX};
    for (size_t k = 0; k < sizeof froms / sizeof froms[0]; k++) {
        s = l = SENTINEL;
        expect_eq(ok(qbm_bitmap_next_extent(cur.img, "b", froms[k], &s, &l)), 0);
        expect_eq(s, SENTINEL);
        expect_eq(l, SENTINEL);
        counts[K_NOOP]++;
        verify();
    }
    /* The last byte still finds the last extent, clamped to where the walk started. */
    expect_eq(ok(qbm_bitmap_next_extent(cur.img, "b", SIZE - 1, &s, &l)), 1);
    expect_eq(s, SIZE - 1);
    expect_eq(l, 1);
}

static void granularities_and_flags(void)
{
    static const uint64_t bad[] = {1,    256,  511,  513,  3000, 3 * 4096, 64 * KiB + 512, 2 * GiB + 1,
                                   4 * GiB, UINT64_C(1) << 40, UINT64_C(1) << 63, UINT64_MAX};
    static const uint32_t bad_flags[] = {2, 4, 0x80000000u, UINT32_MAX};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        char s1[64];
        snprintf(s1, sizeof s1, "granularity %" PRIu64 " must be a power of two", bad[k]);
        REFUSE_F(K_GRAN, qbm_bitmap_add(cur.img, "g", bad[k], 0), -EINVAL, s1);
        REFUSE_F(K_GRAN, qbm_bitmap_add(cur.img, "g", bad[k], QBM_BITMAP_DISABLED), -EINVAL, "granularity");
    }
    for (size_t k = 0; k < sizeof bad_flags / sizeof bad_flags[0]; k++) {
        REFUSE_F(K_FLAGS, qbm_bitmap_add(cur.img, "f", 0, bad_flags[k]), -EINVAL, "unknown flags");
        REFUSE_F(K_FLAGS, qbm_bitmap_add(cur.img, "f", 4096, bad_flags[k] | QBM_BITMAP_DISABLED), -EINVAL,
                 "unknown flags");
    }
}

static void merges(void)
{
    /* Disk sizes differ: either way round. */
    REFUSE_F(K_MERGE, qbm_bitmap_merge(cur.img, "a", other, "x"), -EINVAL, "cannot merge bitmap 'x'");
    REFUSE_F(K_MERGE, qbm_bitmap_merge(cur.img, "b", other, "x"), -EINVAL, "33554432-byte disk");
    REFUSE(K_ROFS, qbm_bitmap_merge(other, "x", cur.img, "a"), -EROFS, "read-only");
    /* Names that are missing in the other image, or in this one. */
    REFUSE(K_NOENT, qbm_bitmap_merge(cur.img, "a", other, "a"), -ENOENT, "'a' not found");
    REFUSE_F(K_NOENT, qbm_bitmap_merge(cur.img, "x", other, "x"), -ENOENT, "'x' not found");
    REFUSE(K_NAME, qbm_bitmap_merge(cur.img, "a", other, ""), -EINVAL, "empty");

    /* A bitmap into itself, and renaming a bitmap to its own name: defined no-ops. */
    NOOP(qbm_bitmap_merge(cur.img, "a", cur.img, "a"));
    NOOP(qbm_bitmap_merge(cur.img, "b", cur.img, "b"));
    NOOP(qbm_bitmap_rename(cur.img, "a", "a"));
    /* Enabling the enabled and disabling the disabled change nothing either. */
    NOOP(qbm_bitmap_enable(cur.img, "a"));
    NOOP(qbm_bitmap_disable(cur.img, "b"));
}

static void open_and_create(void)
{
    static char dummy;
    struct qbm_image *const SENT = (struct qbm_image *)(void *)&dummy;
    struct qbm_image *out = SENT;
    const char *fresh = test_path("never-created.qcow2");
    const char *text = test_path("not-qcow2.txt");
    const char *dir = test_dir();
    char *long_path = malloc(PATH_MAX + 64);
    union create_buf cb;
    FILE *f;

    expect(long_path != NULL);
    f = fopen(text, "w");
    expect(f != NULL);
    fputs("this is not a qcow2 image, but it is long enough to hold a qcow2 header: "
          "................................................................................\n",
          f);
    fclose(f);

    /* qbm_open. */
    REFUSE(K_NULL, qbm_open(NULL, 0, &out), -EINVAL, "path is NULL");
    REFUSE(K_NULL, qbm_open(cur.path, 0, NULL), -EINVAL, "output image pointer is NULL");
    REFUSE(K_NULL, qbm_open(cur.path, QBM_OPEN_RDWR, NULL), -EINVAL, "output image pointer is NULL");
    REFUSE(K_OPEN, qbm_open("", 0, &out), -ENOENT, "cannot open");
    REFUSE(K_OPEN, qbm_open(fresh, 0, &out), -ENOENT, "never-created.qcow2");
    REFUSE(K_OPEN, qbm_open(fresh, QBM_OPEN_RDWR, &out), -ENOENT, "never-created.qcow2");
    REFUSE(K_OPEN, qbm_open("/tmp/\xff\xfe.qcow2", 0, &out), -EINVAL, "not valid UTF-8");
    REFUSE(K_OPEN, qbm_open(dir, 0, &out), -EINVAL, "not a regular file");
    REFUSE(K_OPEN, qbm_open(dir, QBM_OPEN_RDWR, &out), -EISDIR, "cannot open");
    REFUSE(K_OPEN, qbm_open(text, 0, &out), -EINVAL, "not-qcow2.txt");
    REFUSE(K_OPEN, qbm_open(text, QBM_OPEN_RDWR, &out), -EINVAL, "not-qcow2.txt");
    memset(long_path, 'p', PATH_MAX + 10);
    long_path[0] = '/';
    long_path[PATH_MAX + 10] = '\0';
    REFUSE(K_OPEN, qbm_open(long_path, 0, &out), -ENAMETOOLONG, "cannot open");
    /* The image is held read-write by this very process: locked. */
    REFUSE(K_OPEN, qbm_open(cur.path, QBM_OPEN_RDWR, &out), -EBUSY, "lock");
    REFUSE(K_OPEN, qbm_open(cur.path, 0, &out), -EBUSY, "lock");
    REFUSE(K_FLAGS, qbm_open(cur.path, QBM_OPEN_RDWR | QBM_OPEN_FORCE_SHARE, &out), -EINVAL, "force-share");
    REFUSE(K_FLAGS, qbm_open(cur.path, QBM_OPEN_RDWR | QBM_OPEN_LAZY | QBM_OPEN_WRITE_INTENT, &out), -EINVAL,
           "lazy");
    REFUSE(K_FLAGS, qbm_open(cur.path, 16, &out), -EINVAL, "unknown open flags 0x10");
    REFUSE(K_FLAGS, qbm_open(cur.path, UINT32_MAX, &out), -EINVAL, "unknown open flags");
    expect(out == SENT);

    /* qbm_create: nothing is created by a refused call, and nothing existing is overwritten. */
    memset(cb.raw, 0, sizeof cb.raw);
    cb.s = create_opts(SIZE);
    REFUSE(K_NULL, qbm_create(NULL, &cb.s, &out), -EINVAL, "path is NULL");
    REFUSE(K_NULL, qbm_create(fresh, NULL, &out), -EINVAL, "qbm_create_options pointer is NULL");
    REFUSE(K_NULL, qbm_create(fresh, &cb.s, NULL), -EINVAL, "output image pointer is NULL");
    REFUSE(K_OPEN, qbm_create(cur.path, &cb.s, &out), -EEXIST, "cannot create");
    REFUSE(K_OPEN, qbm_create(test_path("other.qcow2"), &cb.s, &out), -EEXIST, "other.qcow2");
    REFUSE(K_OPEN, qbm_create(text, &cb.s, &out), -EEXIST, "not-qcow2.txt");
    REFUSE(K_OPEN, qbm_create(dir, &cb.s, &out), -EEXIST, "cannot create");
    REFUSE(K_OPEN, qbm_create("", &cb.s, &out), -ENOENT, "cannot create");
    REFUSE(K_OPEN, qbm_create("/nonexistent-qbm-dir/x.qcow2", &cb.s, &out), -ENOENT, "cannot create");
    REFUSE(K_OPEN, qbm_create("/tmp/\xc0\xaf.qcow2", &cb.s, &out), -EINVAL, "not valid UTF-8");
    REFUSE(K_OPEN, qbm_create(long_path, &cb.s, &out), -ENAMETOOLONG, "cannot create");

    {
        const size_t bad[] = {0, 1, sizeof(size_t), sizeof cb.s - 1, 4097, SIZE_MAX};
        for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
            cb.s.struct_size = bad[k];
            REFUSE(K_STRUCT, qbm_create(fresh, &cb.s, &out), -EINVAL, "qbm_create_options.struct_size");
        }
        /* A longer struct whose unknown fields are set: refused, not ignored. */
        cb.s.struct_size = sizeof cb.s + 16;
        cb.raw[sizeof cb.s + 5] = 1;
        REFUSE(K_STRUCT, qbm_create(fresh, &cb.s, &out), -EINVAL, "is not 0");
        cb.raw[sizeof cb.s + 5] = 0;
    }
    {
        static const uint64_t bad_cluster[] = {256, 511, 3000, 4 * MiB, UINT64_C(1) << 32, UINT64_MAX};
        static const uint32_t bad_refcount[] = {3, 12, 128, UINT32_MAX};
        for (size_t k = 0; k < sizeof bad_cluster / sizeof bad_cluster[0]; k++) {
            cb.s = create_opts(SIZE);
            cb.s.cluster_size = bad_cluster[k];
            REFUSE(K_FLAGS, qbm_create(fresh, &cb.s, &out), -EINVAL, "cluster size");
        }
        for (size_t k = 0; k < sizeof bad_refcount / sizeof bad_refcount[0]; k++) {
            cb.s = create_opts(SIZE);
            cb.s.refcount_bits = bad_refcount[k];
            REFUSE(K_FLAGS, qbm_create(fresh, &cb.s, &out), -EINVAL, "refcount bits");
        }
        cb.s = create_opts(UINT64_MAX);
        REFUSE(K_FLAGS, qbm_create(fresh, &cb.s, &out), -EINVAL, "too big");
        cb.s = create_opts(UINT64_C(1) << 62);
        cb.s.cluster_size = 512;
        REFUSE(K_FLAGS, qbm_create(fresh, &cb.s, &out), -EINVAL, "too big");
        cb.s = create_opts(SIZE);
        cb.s.flags = 1;
        REFUSE(K_FLAGS, qbm_create(fresh, &cb.s, &out), -EINVAL, "unknown create flags 0x1");
        cb.s.flags = UINT32_MAX;
        REFUSE(K_FLAGS, qbm_create(fresh, &cb.s, &out), -EINVAL, "unknown create flags");
    }
    expect(out == SENT);
    expect(!file_exists(fresh));

    /* The longer struct with its unknown tail all zero is accepted. */
    cb.s = create_opts(SIZE);
    cb.s.struct_size = sizeof cb.s + 16;
    out = NULL;
    ok(qbm_create(fresh, &cb.s, &out));
    expect(out != NULL);
    ok(qbm_close(out));
    expect(unlink(fresh) == 0);
    verify();

    unlink(text);
    free(long_path);
}

/* Every write on a read-only handle: -EROFS, whatever else is wrong with the call. */
static void read_only(void)
{
    uint64_t bytes = 0;
    const char *ro_msg = "opened read-only";

    for (size_t f = 0; f < NFNS; f++) {
        if (!(name_fns[f].how & WRITES)) {
            continue;
        }
        /* A valid call, an unknown name, and (for add) a name that is taken. */
        refuse_name(K_ROFS, f, (name_fns[f].how & CREATES) ? "fresh" : "a", "valid", -EROFS, ro_msg, cur.path);
        refuse_name(K_ROFS, f, (name_fns[f].how & CREATES) ? "b" : "zz", "taken or unknown", -EROFS, ro_msg,
                    cur.path);
    }
    REFUSE_F(K_ROFS, qbm_mark_dirty(cur.img, 0, 1), -EROFS, ro_msg);
    REFUSE_F(K_ROFS, qbm_mark_dirty(cur.img, 0, SIZE), -EROFS, ro_msg);
    REFUSE_F(K_ROFS, qbm_mark_dirty(cur.img, SIZE, 0), -EROFS, ro_msg);
    REFUSE_F(K_ROFS, qbm_bitmap_add(cur.img, "new", 512, QBM_BITMAP_DISABLED), -EROFS, ro_msg);
    REFUSE_F(K_ROFS, qbm_bitmap_set(cur.img, "b", 0, SIZE), -EROFS, ro_msg);
    REFUSE_F(K_ROFS, qbm_bitmap_reset(cur.img, "b", 0, SIZE), -EROFS, ro_msg);
    REFUSE_F(K_ROFS, qbm_bitmap_rename(cur.img, "b", "a"), -EROFS, ro_msg);
    REFUSE_F(K_ROFS, qbm_bitmap_merge(cur.img, "a", other, "x"), -EROFS, ro_msg);
    REFUSE_F(K_ROFS, qbm_bitmap_merge(cur.img, utf8_name, cur.img, "a"), -EROFS, ro_msg);
    /* NULL pointers are still -EINVAL. */
    REFUSE(K_NULL, qbm_bitmap_add(cur.img, NULL, 0, 0), -EINVAL, "name is NULL");
    REFUSE(K_NULL, qbm_bitmap_remove(cur.img, NULL), -EINVAL, "name is NULL");
    REFUSE(K_NULL, qbm_bitmap_rename(cur.img, "a", NULL), -EINVAL, "name is NULL");
    /* Reads refuse what the read-write handle refused. */
    REFUSE_F(K_NOENT, qbm_bitmap_dirty_bytes(cur.img, "zz", &bytes), -ENOENT, "'zz' not found");
    REFUSE_F(K_NAME, qbm_bitmap_dirty_bytes(cur.img, "", &bytes), -EINVAL, "empty");
    REFUSE(K_NAME, qbm_bitmap_dirty_bytes(cur.img, "\xff", &bytes), -EINVAL, "not valid UTF-8");
    /* Flushing a read-only handle stores nothing and succeeds. */
    NOOP(qbm_flush(cur.img));
}

/*
 * A copy of the image taken while it was open read-write: every bitmap is
 * flagged in use. They can only be removed (not done here); everything else
 * is -EBUSY.
 */
static void in_use(void)
{
    const char *copy = test_path("in-use.qcow2");
    struct qbm_image *img;
    FILE *f = fopen(copy, "wb");
    expect(f != NULL);
    expect(fwrite(cur.bytes, 1, cur.len, f) == cur.len);
    expect(fclose(f) == 0);

    img = open_image("in-use.qcow2", QBM_OPEN_RDWR);
    use_handle(img, copy, 1, 1);
    verify();
    for (size_t f2 = 0; f2 < NFNS; f2++) {
        if ((name_fns[f2].how & (REMOVES | CREATES)) && name_fns[f2].fn != f_rename_new) {
            continue;
        }
        for (size_t k = 0; k < NMODEL; k++) {
            refuse_name(K_BUSY, f2, name_fns[f2].fn == f_rename_new ? "fresh" : model[k].name, "in use", -EBUSY,
                        "inconsistent", cur.path);
        }
    }
    REFUSE_F(K_BUSY, qbm_bitmap_merge(cur.img, "a", other, "x"), -EBUSY, "bitmap 'a' is inconsistent");
    REFUSE_F(K_BUSY, qbm_bitmap_set(cur.img, "b", SIZE, 1), -EBUSY, "inconsistent");
    REFUSE_F(K_EXIST, qbm_bitmap_add(cur.img, "a", 0, 0), -EEXIST, "already exists");
    /* mark_dirty has no enabled, usable bitmap to mark: a no-op. */
    NOOP(qbm_mark_dirty(cur.img, 0, SIZE));
    ok(qbm_close(img));
}

int main(void)
{
    const char *path = test_path("abuse.qcow2");
    struct qbm_image *img = build();
    unsigned total = 0;

    use_handle(img, path, 1, 0);
    verify();
    null_pointers();
    struct_sizes();
    bad_names();
    unknown_and_taken();
    ranges();
    granularities_and_flags();
    merges();
    open_and_create();

    /* Still the model after everything, then stored with in_use cleared. */
    verify();
    in_use();
    ok(qbm_close(img));

    img = open_image("abuse.qcow2", 0);
    use_handle(img, path, 0, 0);
    verify();
    read_only();
    ok(qbm_close(img));

    img = open_image("abuse.qcow2", QBM_OPEN_FORCE_SHARE);
    use_handle(img, path, 0, 0);
    read_only();
    ok(qbm_close(img));
    ok(qbm_close(other));
    other = NULL;

    /* The stored image still holds the model. */
    img = open_image("abuse.qcow2", QBM_OPEN_RDWR);
    use_handle(img, path, 1, 0);
    verify();
    ok(qbm_close(img));
    free(cur.bytes);
    free(other_bytes);

    for (int k = 0; k < K_COUNT; k++) {
        printf("  %-22s %4u cases\n", kind_names[k], counts[k]);
        total += counts[k];
    }
    printf("  %-22s %4u cases\n", "total", total);
    return test_pass("abuse", NULL);
}
