/*
 * qbm_check: counts a leak and an inconsistent bitmap on an image we broke by
 * hand, agrees with qemu-img check, repairs only what its flags ask for, and
 * refuses bad arguments without touching the image.
 */
#include "util.h"

#include <fcntl.h>
#include <sys/types.h>

#define SIZE (UINT64_C(64) << 20)

static uint64_t be64_at(int fd, off_t at)
{
    unsigned char b[8];
    uint64_t v = 0;
    expect(pread(fd, b, 8, at) == 8);
    for (int i = 0; i < 8; i++)
        v = (v << 8) | b[i];
    return v;
}

/* Sets the 16-bit refcount of cluster 0 (the header) to `value`. */
static void set_header_refcount(const char *path, unsigned value)
{
    int fd = open(path, O_RDWR);
    expect(fd >= 0);
    uint64_t table = be64_at(fd, 48);
    uint64_t block = be64_at(fd, (off_t)table) & ~UINT64_C(0x1ff);
    unsigned char rc[2] = {(unsigned char)(value >> 8), (unsigned char)value};
    expect(pwrite(fd, rc, 2, (off_t)block) == 2);
    expect(close(fd) == 0);
}

/* A child creates bitmaps and dies after a flush: "crashed" stays in use. */
static void crash_with_bitmap(void)
{
    fflush(NULL);
    pid_t pid = fork();
    expect(pid >= 0);
    if (pid == 0) {
        struct qbm_image *img = open_image("c.qcow2", QBM_OPEN_RDWR);
        ok(qbm_bitmap_add(img, "crashed", 65536, 0));
        ok(qbm_flush(img));
        _exit(0);
    }
    int status;
    expect(waitpid(pid, &status, 0) == pid);
    expect(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* The whole file, for comparing before and after a refused call. */
static char *slurp(const char *path, long *len)
{
    FILE *f = fopen(path, "rb");
    expect(f != NULL);
    expect(fseek(f, 0, SEEK_END) == 0);
    *len = ftell(f);
    rewind(f);
    char *buf = malloc((size_t)*len + 1);
    expect(buf != NULL);
    expect(fread(buf, 1, (size_t)*len, f) == (size_t)*len);
    fclose(f);
    return buf;
}

static void expect_check(struct qbm_image *img, uint32_t flags, uint64_t leaks, uint64_t fixed,
                         uint64_t inconsistent, uint64_t removed)
{
    struct qbm_check_result r;
    memset(&r, 0xff, sizeof r);
    r.struct_size = sizeof r;
    ok(qbm_check(img, flags, &r));
    expect_eq(r.struct_size, sizeof r);
    expect_eq(r.corruptions, 0);
    expect_eq(r.check_errors, 0);
    expect_eq(r.leaks, leaks);
    expect_eq(r.leaks_fixed, fixed);
    expect_eq(r.inconsistent_bitmaps, inconsistent);
    expect_eq(r.removed_bitmaps, removed);
    expect_eq(r.total_clusters, SIZE / 65536);
    expect(r.image_end_offset >= 4 * 65536);
}

int main(void)
{
    const char *path = test_path("c.qcow2");
    struct qbm_image *img = create_image("c.qcow2", SIZE);
    expect_check(img, 0, 0, 0, 0, 0);
    ok(qbm_close(img));
    crash_with_bitmap();
    img = open_image("c.qcow2", QBM_OPEN_RDWR);
    ok(qbm_bitmap_add(img, "kept", 4096, QBM_BITMAP_DISABLED));
    ok(qbm_bitmap_set(img, "kept", 1 << 20, 8192));
    ok(qbm_close(img));
    set_header_refcount(path, 3);

    if (qemu_img_available()) {
        char *out = run_capture("qemu-img check --output=json '%s' 2>/dev/null || true", path); /* exits 3: leaks */
        expect(out != NULL);
        expect(strstr(out, "\"leaks\": 1") != NULL);
        expect(strstr(out, "corruptions") == NULL);
        free(out);
    }

    /* Read-only: counts, repairs nothing, refuses repair flags. */
    img = open_image("c.qcow2", 0);
    expect_check(img, 0, 1, 0, 1, 0);
    struct qbm_check_result r;
    r.struct_size = sizeof r;
    err_msg(qbm_check(img, QBM_CHECK_REPAIR_LEAKS, &r), -EROFS, "read-write");
    err_msg(qbm_check(img, 1u << 7, &r), -EINVAL, "flags");
    err_msg(qbm_check(img, 0, NULL), -EINVAL, "qbm_check_result");
    r.struct_size = 8;
    err_msg(qbm_check(img, 0, &r), -EINVAL, "struct_size");
    err_msg(qbm_check(NULL, 0, &r), -EINVAL, "");
    ok(qbm_close(img));

    /* Read-write: each flag repairs its own part only. */
    long before_len, after_len;
    char *before = slurp(path, &before_len);
    img = open_image("c.qcow2", QBM_OPEN_RDWR);
    ok(qbm_flush(img)); /* the open's own in_use writes are done */
    free(before);
    before = slurp(path, &before_len);
    r.struct_size = 8;
    err_msg(qbm_check(img, QBM_CHECK_REPAIR_LEAKS, &r), -EINVAL, "struct_size");
    r.struct_size = SIZE_MAX;
    err_msg(qbm_check(img, QBM_CHECK_REPAIR_LEAKS | QBM_CHECK_REMOVE_INCONSISTENT, &r), -EINVAL, "struct_size");
    err_msg(qbm_check(img, QBM_CHECK_REPAIR_LEAKS | (1u << 9), &r), -EINVAL, "flags");
    char *after = slurp(path, &after_len);
    expect(before_len == after_len && memcmp(before, after, (size_t)before_len) == 0);
    free(before);
    free(after);
    expect_check(img, 0, 1, 0, 1, 0);
    expect_check(img, QBM_CHECK_REPAIR_LEAKS, 0, 1, 1, 0);
    expect_check(img, QBM_CHECK_REMOVE_INCONSISTENT, 0, 0, 0, 1);
    expect_check(img, QBM_CHECK_REPAIR_LEAKS | QBM_CHECK_REMOVE_INCONSISTENT, 0, 0, 0, 0);
    struct extent want[] = {{1 << 20, 8192}};
    check_extents(img, "kept", want, 1);
    ok(qbm_close(img));

    if (qemu_img_available()) {
        expect(run_cmd("qemu-img check -q '%s'", path) == 0);
    }
    return test_pass("check", " (a leak and an in-use bitmap found and repaired)");
}
