/*
 * Disk sizes at the edges, where QEMU must still agree with libqbm:
 * - a size that is not a multiple of 512: qemu-img rounds it up (1000 ->
 *   1024); libqbm must either do the same or refuse it (-EINVAL), never
 *   write a size QEMU reads differently (QEMU would see 512 bytes and then
 *   fail to store the bitmaps);
 * - a 0-byte disk: the image is fine, but QEMU cannot store a bitmap over
 *   it, so qbm_bitmap_add must refuse (-EINVAL) rather than write an image
 *   QEMU can no longer open.
 */
#include "util.h"

#include <sys/types.h>

static uint64_t virtual_size(struct qbm_image *img)
{
    struct qbm_image_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    ok(qbm_image_get_info(img, &info));
    return info.virtual_size;
}

/* QEMU opens the image and reports this virtual size. */
static void qemu_sees_size(const char *path, uint64_t size)
{
    char *json = run_capture("qemu-img info --output=json '%s'", path);
    char want[64];
    if (json == NULL) {
        fprintf(stderr, "qemu-img info cannot open %s\n", path);
        exit(1);
    }
    snprintf(want, sizeof want, "\"virtual-size\": %" PRIu64 ",", size);
    if (strstr(json, want) == NULL) {
        fprintf(stderr, "QEMU does not see %s for %s:\n%s\n", want, path, json);
        exit(1);
    }
    free(json);
    if (run_cmd("qemu-img check -q '%s'", path) != 0) {
        run_cmd("qemu-img check '%s' >&2", path);
        fprintf(stderr, "qemu-img check failed on %s\n", path);
        exit(1);
    }
}

static void unaligned_size(int have_qemu)
{
    struct qbm_create_options o = create_opts(1000);
    struct qbm_image *img = NULL;
    const char *path = test_path("size-1000.qcow2");
    long long r = qbm_create(path, &o, &img);
    uint64_t size;

    if (r < 0) {
        err(qbm_create(path, &o, &img), -EINVAL);
        expect(!file_exists(path));
        return;
    }
    size = virtual_size(img);
    if (size != 1024) {
        fprintf(stderr, "qbm_create(virtual_size=1000): the image has %" PRIu64
                        " bytes; QEMU reads that as %" PRIu64 " (expected -EINVAL, or 1024 as qemu-img makes)\n",
                size, size & ~UINT64_C(511));
        exit(1);
    }
    ok(qbm_bitmap_add(img, "b", 512, 0));
    ok(qbm_mark_dirty(img, size - 1, 1));
    ok(qbm_close(img));
    if (have_qemu) {
        qemu_sees_size(path, size);
    }
}

static void empty_disk(int have_qemu)
{
    struct qbm_image *img = create_image("size-0.qcow2", 0);
    const char *path = test_path("size-0.qcow2");
    uint32_t count = 1;

    expect_eq(virtual_size(img), 0);
    err(qbm_mark_dirty(img, 0, 1), -EINVAL);
    err(qbm_bitmap_add(img, "b", 0, 0), -EINVAL);
    ok(qbm_bitmap_count(img, &count));
    expect_eq(count, 0);
    ok(qbm_close(img));
    if (have_qemu) {
        qemu_sees_size(path, 0);
    }
}

/* Runs one independent part in a child process; returns 1 if it passed. */
static int part(void (*fn)(int), int have_qemu)
{
    pid_t pid;
    int status;
    fflush(NULL);
    pid = fork();
    expect(pid >= 0);
    if (pid == 0) {
        fn(have_qemu);
        exit(0);
    }
    expect(waitpid(pid, &status, 0) == pid);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

int main(void)
{
    int have_qemu = qemu_img_available();
    int passed;
    /* The parts make their files in child processes: name them here too, so
       that test_pass() (in this process) removes them. */
    test_path("size-0.qcow2");
    test_path("size-1000.qcow2");
    passed = part(empty_disk, have_qemu);
    passed &= part(unaligned_size, have_qemu);
    if (!passed) {
        return 1;
    }
    return test_pass("sizes", have_qemu ? NULL : " (qemu-img checks skipped)");
}
