/*
 * A metadata companion for a raw disk through the C API: qbm_create with
 * options.data_file, qbm_image_get_data_file, and callers compiled against
 * the 0.1 struct (no data_file field) still creating plain images.
 */
#define _XOPEN_SOURCE 700 /* realpath */
#include "util.h"

#include <fcntl.h>
#include <stddef.h>

#define SIZE (UINT64_C(24) << 20)

int main(void)
{
    const char *raw = test_path("disk.raw");
    int fd = open(raw, O_CREAT | O_RDWR | O_TRUNC, 0644);
    expect(fd >= 0);
    expect(ftruncate(fd, (off_t)SIZE) == 0);
    expect(close(fd) == 0);

    char abs[4096];
    expect(realpath(raw, abs) != NULL);
    struct qbm_create_options o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.data_file = abs;
    struct qbm_image *img = NULL;
    ok(qbm_create(test_path("disk.qcow2"), &o, &img));
    struct qbm_image_info info;
    info.struct_size = sizeof info;
    ok(qbm_image_get_info(img, &info));
    expect_eq(info.virtual_size, SIZE);

    char name[8];
    int n = ok(qbm_image_get_data_file(img, NULL, 0));
    expect_eq((size_t)n, strlen(abs));
    expect_eq(ok(qbm_image_get_data_file(img, name, sizeof name)), n);
    expect(strlen(name) == sizeof name - 1 && strncmp(name, abs, sizeof name - 1) == 0);
    err_msg(qbm_image_get_data_file(img, NULL, 5), -EINVAL, "NULL");
    ok(qbm_bitmap_add(img, "b", 65536, 0));
    ok(qbm_mark_dirty(img, 1 << 20, 1));
    ok(qbm_close(img));

    /* Too small a raw file, and a missing one. */
    o.virtual_size = SIZE * 2;
    err_msg(qbm_create(test_path("big.qcow2"), &o, &img), -EINVAL, "smaller than the virtual size");
    o.virtual_size = 0;
    o.data_file = test_path("missing.raw");
    err_msg(qbm_create(test_path("m.qcow2"), &o, &img), -ENOENT, "missing.raw");

    /* A 0.1 caller: the struct ends before data_file. */
    memset(&o, 0, sizeof o);
    o.struct_size = offsetof(struct qbm_create_options, data_file);
    o.virtual_size = SIZE;
    ok(qbm_create(test_path("plain.qcow2"), &o, &img));
    expect_eq(ok(qbm_image_get_data_file(img, name, sizeof name)), 0);
    expect_eq(name[0], '\0');
    ok(qbm_close(img));

    if (qemu_img_available()) {
        char *out = run_capture("qemu-img info --output=json '%s'", test_path("disk.qcow2"));
        expect(out != NULL);
        expect(strstr(out, "\"data-file\"") != NULL && strstr(out, abs) != NULL);
        expect(strstr(out, "\"name\": \"b\"") != NULL);
        free(out);
        expect(run_cmd("qemu-img check -q '%s'", test_path("disk.qcow2")) == 0);
    }
    return test_pass("raw_companion", NULL);
}
