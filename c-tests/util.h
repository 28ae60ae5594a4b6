/*
 * Helpers shared by the C test programs (libblkio style).
 *
 *   ok(expr)                      expr must return >= 0; evaluates to its value
 *   err(expr, -EXXX)              expr must return exactly -EXXX and set its own
 *                                 non-empty qbm_last_error() message
 *   err_msg(expr, -EXXX, "text")  ... and the message must contain "text"
 *   expect(cond), expect_eq(a, b) plain assertions with file:line
 *   test_path("name")             a path inside $QBM_TEST_DIR
 *   test_pass("test", note)       prints "test ok", removes the test's files
 *   run_cmd(fmt, ...)             runs a shell command, returns its exit status
 *   run_capture(fmt, ...)         ... and returns its output (malloc'd)
 *   qemu_img_available()          1 if qemu-img runs; 0 (with a note) if not,
 *                                 a failure when CI=true
 *   require_qemu_img()            exits 77 (skipped) unless qemu-img runs
 *   create_image(), open_image()  a fresh image / an open handle, or fail
 *   check_extents(img, name, want, n), check_clean(img, name)
 *                                 walks qbm_bitmap_next_extent and compares
 *                                 every extent and the dirty byte count
 *
 * A test program exits 0 on success, 1 on failure and 77 when skipped.
 * Include this file first: it selects POSIX (popen, fork, pthreads).
 */
#ifndef QBM_TEST_UTIL_H
#define QBM_TEST_UTIL_H

#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "qbm.h"

#define EXIT_SKIP 77

/* Functions in this header are used by some tests and not by others. */
#if defined(__GNUC__)
#define UTIL_UNUSED __attribute__((unused))
#else
#define UTIL_UNUSED
#endif

static UTIL_UNUSED void fail_at(const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* Name of a (positive or negative) errno value, for messages. */
static UTIL_UNUSED const char *errno_str(long long r)
{
    return strerror((int)(r < 0 ? -r : r));
}

static UTIL_UNUSED long long ok_check(long long r, const char *expr, const char *file, int line)
{
    if (r < 0) {
        fail_at(file, line, "%s returned %lld (%s); qbm_last_error: \"%s\"", expr, r, errno_str(r),
                qbm_last_error());
    }
    return r;
}

/* Asserts that expr returns >= 0; the value of ok(...) is expr's value. */
#define ok(expr) ok_check((long long)(expr), #expr, __FILE__, __LINE__)

/*
 * Before an expected failure, err() makes a call that is known to fail with a
 * message naming a sentinel path; if the message afterwards still names the
 * sentinel, the call under test failed without setting its own message.
 */
#define ERR_SENTINEL "/nonexistent-qbm-dir/err-sentinel.qcow2"

static UTIL_UNUSED void err_prime(void)
{
    struct qbm_image *img = NULL;
    if (qbm_open(ERR_SENTINEL, 0, &img) >= 0) {
        qbm_close(img);
    }
}

static UTIL_UNUSED void err_check(long long r, long long expected, const char *substr, const char *expr,
                                  const char *file, int line)
{
    const char *msg = qbm_last_error();
    if (r != expected) {
        fail_at(file, line, "%s returned %lld (%s), expected %lld (%s); qbm_last_error: \"%s\"", expr, r,
                r < 0 ? errno_str(r) : "success", expected, errno_str(expected), msg ? msg : "(NULL)");
    }
    if (msg == NULL || msg[0] == '\0') {
        fail_at(file, line, "%s returned %lld as expected but qbm_last_error() is empty", expr, r);
    }
    if (strstr(msg, ERR_SENTINEL) != NULL) {
        fail_at(file, line, "%s returned %lld as expected but did not set its own message (still \"%s\")",
                expr, r, msg);
    }
    if (substr != NULL && strstr(msg, substr) == NULL) {
        fail_at(file, line, "%s: message \"%s\" does not contain \"%s\"", expr, msg, substr);
    }
}

/* Asserts that expr returns exactly the negative errno `expected` with a message. */
#define err(expr, expected) (err_prime(), err_check((long long)(expr), (expected), NULL, #expr, __FILE__, __LINE__))

/* As err(), and the message must contain `substr`. */
#define err_msg(expr, expected, substr)                                                                  \
    (err_prime(), err_check((long long)(expr), (expected), (substr), #expr, __FILE__, __LINE__))

/* A plain assertion. */
#define expect(cond)                                                                                     \
    do {                                                                                                 \
        if (!(cond)) {                                                                                   \
            fail_at(__FILE__, __LINE__, "assertion failed: %s", #cond);                                  \
        }                                                                                                \
    } while (0)

/* Asserts that two unsigned 64-bit values are equal, printing both. */
#define expect_eq(a, b)                                                                                  \
    do {                                                                                                 \
        uint64_t a_ = (uint64_t)(a), b_ = (uint64_t)(b);                                                 \
        if (a_ != b_) {                                                                                  \
            fail_at(__FILE__, __LINE__, "%s == %" PRIu64 ", expected %s == %" PRIu64, #a, a_, #b, b_);  \
        }                                                                                                \
    } while (0)

/* Every path test_path() handed out, so that a passing test can remove them. */
static const char *test_paths[512];
static size_t test_path_count;

/* $QBM_TEST_DIR (created if a previous test removed it), or /tmp. */
static UTIL_UNUSED const char *test_dir(void)
{
    const char *dir = getenv("QBM_TEST_DIR");
    if (dir == NULL || dir[0] == '\0') {
        return "/tmp";
    }
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        fail_at(__FILE__, __LINE__, "cannot create QBM_TEST_DIR %s: %s", dir, strerror(errno));
    }
    return dir;
}

/*
 * The path of `name` inside $QBM_TEST_DIR (or /tmp when unset). The string
 * stays valid for the whole run.
 */
static UTIL_UNUSED const char *test_path(const char *name)
{
    char buf[4096];
    char *copy;
    if ((size_t)snprintf(buf, sizeof buf, "%s/%s", test_dir(), name) >= sizeof buf) {
        fail_at(__FILE__, __LINE__, "test path too long: %s/%s", test_dir(), name);
    }
    for (size_t i = 0; i < test_path_count; i++) {
        if (strcmp(test_paths[i], buf) == 0) {
            return test_paths[i];
        }
    }
    copy = malloc(strlen(buf) + 1);
    if (copy == NULL) {
        fail_at(__FILE__, __LINE__, "out of memory");
    }
    strcpy(copy, buf);
    if (test_path_count < sizeof test_paths / sizeof test_paths[0]) {
        test_paths[test_path_count++] = copy;
    }
    return copy;
}

/*
 * Ends a passing test: prints "<name> ok<note>", removes the files it made
 * (failing tests keep them for a look) and $QBM_TEST_DIR if that is then
 * empty (test_dir() makes it again for the next test). Returns 0, the exit code.
 */
static UTIL_UNUSED int test_pass(const char *name, const char *note)
{
    for (size_t i = 0; i < test_path_count; i++) {
        unlink(test_paths[i]);
    }
    if (getenv("QBM_TEST_DIR") != NULL) {
        rmdir(test_dir());
    }
    printf("%s ok%s\n", name, note ? note : "");
    return 0;
}

static UTIL_UNUSED int file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* Runs a shell command built from fmt; returns its exit status (-1 if it did not exit). */
static UTIL_UNUSED int run_cmd(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    int status;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    fflush(NULL);
    status = system(cmd);
    if (status == -1 || !WIFEXITED(status)) {
        return -1;
    }
    return WEXITSTATUS(status);
}

/*
 * Runs a shell command and returns its standard output (malloc'd, NUL
 * terminated; the caller frees it), or NULL if it could not be run or exited
 * non-zero.
 */
static UTIL_UNUSED char *run_capture(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    FILE *p;
    char *out = NULL;
    size_t len = 0, cap = 0;
    int c;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    fflush(NULL);
    p = popen(cmd, "r");
    if (p == NULL) {
        return NULL;
    }
    while ((c = fgetc(p)) != EOF) {
        if (len + 1 >= cap) {
            cap = cap ? cap * 2 : 4096;
            out = realloc(out, cap);
            if (out == NULL) {
                pclose(p);
                return NULL;
            }
        }
        out[len++] = (char)c;
    }
    if (out == NULL) {
        out = calloc(1, 1);
    } else {
        out[len] = '\0';
    }
    if (pclose(p) != 0) {
        free(out);
        return NULL;
    }
    return out;
}

static UTIL_UNUSED int ci_mode(void)
{
    const char *ci = getenv("CI");
    return ci != NULL && strcmp(ci, "true") == 0;
}

/*
 * 1 if qemu-img can be run. Otherwise prints a loud note and returns 0, or
 * fails the test when CI=true (interop tests must run under CI).
 */
static UTIL_UNUSED int qemu_img_available(void)
{
    if (run_cmd("qemu-img --version >/dev/null 2>&1") == 0) {
        return 1;
    }
    if (ci_mode()) {
        fprintf(stderr, "FAIL: qemu-img is not installed and CI=true\n");
        exit(1);
    }
    fprintf(stderr, "SKIP: qemu-img is not installed: skipping the QEMU interop checks\n");
    return 0;
}

/* Exits with 77 (skipped) unless qemu-img can be run (fails under CI=true). */
static UTIL_UNUSED void require_qemu_img(void)
{
    if (!qemu_img_available()) {
        exit(EXIT_SKIP);
    }
}

/* Default creation options: size bytes, 64 KiB clusters, 16-bit refcounts. */
static UTIL_UNUSED struct qbm_create_options create_opts(uint64_t size)
{
    struct qbm_create_options o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.virtual_size = size;
    return o;
}

/* Creates a fresh image test_path(name) of `size` bytes (default options). */
static UTIL_UNUSED struct qbm_image *create_image(const char *name, uint64_t size)
{
    struct qbm_create_options o = create_opts(size);
    struct qbm_image *img = NULL;
    const char *path = test_path(name);
    unlink(path);
    ok(qbm_create(path, &o, &img));
    if (img == NULL) {
        fail_at(__FILE__, __LINE__, "qbm_create(%s) succeeded but returned a NULL handle", path);
    }
    return img;
}

/* Opens test_path(name) with flags. */
static UTIL_UNUSED struct qbm_image *open_image(const char *name, uint32_t flags)
{
    struct qbm_image *img = NULL;
    ok(qbm_open(test_path(name), flags, &img));
    if (img == NULL) {
        fail_at(__FILE__, __LINE__, "qbm_open(%s) succeeded but returned a NULL handle", name);
    }
    return img;
}

/* A half-open byte range [start, start + length). */
struct extent {
    uint64_t start;
    uint64_t length;
};

/* Prints the extents of a bitmap (at most 64; stops at a malformed one). */
static UTIL_UNUSED void print_extents(FILE *f, struct qbm_image *img, const char *name)
{
    uint64_t from = 0, s, l;
    int r, n = 0;
    while ((r = qbm_bitmap_next_extent(img, name, from, &s, &l)) == 1) {
        fprintf(f, "    [%" PRIu64 ", %" PRIu64 ") length %" PRIu64 "\n", s, s + l, l);
        if (l == 0 || s < from) {
            fprintf(f, "    (malformed extent: stopping)\n");
            return;
        }
        if (++n == 64) {
            fprintf(f, "    ...\n");
            return;
        }
        from = s + l;
    }
    if (r < 0) {
        fprintf(f, "    (next_extent failed: %d %s)\n", r, qbm_last_error());
    }
}

/*
 * Walks every extent of bitmap `name` and asserts they are exactly want[0..n),
 * in order, and that qbm_bitmap_dirty_bytes is their total.
 */
static UTIL_UNUSED void check_extents_at(const char *file, int line, struct qbm_image *img, const char *name,
                                         const struct extent *want, size_t n)
{
    uint64_t from = 0, s = 0, l = 0, total = 0, bytes = 0;
    size_t i;
    for (i = 0;; i++) {
        int r = qbm_bitmap_next_extent(img, name, from, &s, &l);
        if (r < 0) {
            fail_at(file, line, "qbm_bitmap_next_extent(%s, from=%" PRIu64 ") returned %d (%s): %s", name, from,
                    r, errno_str(r), qbm_last_error());
        }
        if (r == 0) {
            break;
        }
        if (r != 1) {
            fail_at(file, line, "qbm_bitmap_next_extent(%s) returned %d, expected 0 or 1", name, r);
        }
        if (l == 0 || s < from || s + l < s) {
            fprintf(stderr, "bitmap '%s': extents found:\n", name);
            print_extents(stderr, img, name);
            fail_at(file, line,
                    "qbm_bitmap_next_extent(%s, from=%" PRIu64 ") returned 1 with a malformed extent [%" PRIu64
                    ", +%" PRIu64 ")",
                    name, from, s, l);
        }
        if (i >= n || s != want[i].start || l != want[i].length) {
            fprintf(stderr, "bitmap '%s': extents found:\n", name);
            print_extents(stderr, img, name);
            fprintf(stderr, "expected:\n");
            for (size_t k = 0; k < n; k++) {
                fprintf(stderr, "    [%" PRIu64 ", %" PRIu64 ") length %" PRIu64 "\n", want[k].start,
                        want[k].start + want[k].length, want[k].length);
            }
            if (i >= n) {
                fail_at(file, line, "bitmap '%s': unexpected extent #%zu [%" PRIu64 ", +%" PRIu64 ")", name, i,
                        s, l);
            }
            fail_at(file, line,
                    "bitmap '%s': extent #%zu is [%" PRIu64 ", +%" PRIu64 "), expected [%" PRIu64 ", +%" PRIu64
                    ")",
                    name, i, s, l, want[i].start, want[i].length);
        }
        total += l;
        from = s + l;
    }
    if (i != n) {
        fprintf(stderr, "bitmap '%s': extents found:\n", name);
        print_extents(stderr, img, name);
        fail_at(file, line, "bitmap '%s': %zu extents, expected %zu", name, i, n);
    }
    if (qbm_bitmap_dirty_bytes(img, name, &bytes) < 0) {
        fail_at(file, line, "qbm_bitmap_dirty_bytes(%s) failed: %s", name, qbm_last_error());
    }
    if (bytes != total) {
        fail_at(file, line, "bitmap '%s': dirty_bytes %" PRIu64 " but extents total %" PRIu64, name, bytes,
                total);
    }
}

#define check_extents(img, name, want, n) check_extents_at(__FILE__, __LINE__, (img), (name), (want), (n))

/* Asserts that bitmap `name` has no dirty extent at all. */
#define check_clean(img, name) check_extents_at(__FILE__, __LINE__, (img), (name), NULL, 0)

/* Looks a bitmap up by name: fills *info and returns 1, or returns 0. */
static UTIL_UNUSED int find_bitmap(struct qbm_image *img, const char *name, struct qbm_bitmap_info *info)
{
    uint32_t count = 0;
    ok(qbm_bitmap_count(img, &count));
    for (uint32_t i = 0; i < count; i++) {
        memset(info, 0, sizeof *info);
        info->struct_size = sizeof *info;
        ok(qbm_bitmap_get_info(img, i, info));
        if (strcmp(info->name, name) == 0) {
            return 1;
        }
    }
    return 0;
}

#endif /* QBM_TEST_UTIL_H */
