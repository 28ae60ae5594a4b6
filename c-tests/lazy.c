/* QBM_OPEN_LAZY: bitmap data read only when a call needs it. Walks,
 * counts, streamed merges and clears give what a loading open gives; the
 * open itself writes nothing (no in_use flags) and marks are refused. */
#include "util.h"

#define MIB (UINT64_C(1) << 20)
#define GIB (UINT64_C(1) << 30)

static int file_equals(const char *a, const char *b)
{
    return run_cmd("cmp -s '%s' '%s'", a, b) == 0;
}

int main(void)
{
    const uint64_t size = 64 * GIB;
    struct qbm_image *img = create_image("l.qcow2", size);
    ok(qbm_bitmap_add(img, "a", 65536, 0));
    ok(qbm_bitmap_add(img, "b", 65536, QBM_BITMAP_DISABLED));
    ok(qbm_mark_dirty(img, MIB, 4096));
    ok(qbm_mark_dirty(img, 40 * GIB, 33 * GIB / 8)); /* whole bitmap clusters */
    ok(qbm_bitmap_set(img, "b", 7 * GIB, 3 * 65536));
    ok(qbm_close(img));
    char *copy = strdup(test_path("copy.qcow2"));
    expect(run_cmd("cp '%s' '%s'", test_path("l.qcow2"), copy) == 0);

    img = open_image("l.qcow2", QBM_OPEN_RDWR | QBM_OPEN_LAZY);
    expect(file_equals(test_path("l.qcow2"), copy));
    struct extent want_a[] = {{MIB, 65536}, {40 * GIB, 33 * GIB / 8}};
    check_extents(img, "a", want_a, 2);
    err_msg(qbm_mark_dirty(img, 0, 4096), -EINVAL, "lazily");
    ok(qbm_bitmap_merge(img, "a", img, "b")); /* streamed, same granularity */
    struct extent want_m[] = {{MIB, 65536}, {7 * GIB, 3 * 65536}, {40 * GIB, 33 * GIB / 8}};
    check_extents(img, "a", want_m, 3);
    ok(qbm_bitmap_clear(img, "b"));
    check_clean(img, "b");
    ok(qbm_close(img));

    img = open_image("l.qcow2", 0);
    check_extents(img, "a", want_m, 3);
    check_clean(img, "b");
    ok(qbm_close(img));

    struct qbm_image *h = NULL;
    err_msg(qbm_open(test_path("l.qcow2"), QBM_OPEN_RDWR | QBM_OPEN_LAZY | QBM_OPEN_WRITE_INTENT, &h),
            -EINVAL, "lazy");
    expect(h == NULL);
    if (qemu_img_available()) {
        expect(run_cmd("qemu-img check -q '%s'", test_path("l.qcow2")) == 0);
    }
    free(copy);
    return test_pass("lazy", NULL);
}
