/* qbm_resize: grows and shrinks the disk and its bitmaps; refusals say why. */
#include "util.h"

#define MIB (UINT64_C(1) << 20)

int main(void)
{
    struct qbm_image *img = create_image("r.qcow2", 64 * MIB);
    ok(qbm_bitmap_add(img, "b", 65536, 0));
    ok(qbm_mark_dirty(img, MIB, 1));
    ok(qbm_mark_dirty(img, 60 * MIB, 1));
    err_msg(qbm_resize(NULL, MIB), -EINVAL, "");
    err_msg(qbm_resize(img, MIB + 1), -EINVAL, "multiple of 512");
    ok(qbm_resize(img, 16 * MIB));
    struct qbm_image_info info;
    info.struct_size = sizeof info;
    ok(qbm_image_get_info(img, &info));
    expect_eq(info.virtual_size, 16 * MIB);
    struct extent want[] = {{MIB, 65536}};
    check_extents(img, "b", want, 1);
    err_msg(qbm_mark_dirty(img, 20 * MIB, 1), -EINVAL, "past the end");
    ok(qbm_resize(img, 32 * MIB));
    ok(qbm_mark_dirty(img, 20 * MIB, 1));
    ok(qbm_close(img));

    img = open_image("r.qcow2", 0);
    err_msg(qbm_resize(img, 8 * MIB), -EROFS, "read-only");
    struct extent after[] = {{MIB, 65536}, {20 * MIB, 65536}};
    check_extents(img, "b", after, 2);
    ok(qbm_close(img));
    if (qemu_img_available()) {
        expect(run_cmd("qemu-img check -q '%s'", test_path("r.qcow2")) == 0);
    }
    return test_pass("resize", NULL);
}
