/*
 * qbm_create / qbm_open / qbm_image_get_info / qbm_close: every cluster size
 * and refcount width, read-only vs read-write, and the ways they fail.
 */
#include "util.h"

#include <fcntl.h>

#define GiB (UINT64_C(1) << 30)
#define MiB (UINT64_C(1) << 20)

static struct qbm_image_info image_info(struct qbm_image *img)
{
    struct qbm_image_info info;
    memset(&info, 0xa5, sizeof info); /* garbage: every field must be written */
    info.struct_size = sizeof info;
    ok(qbm_image_get_info(img, &info));
    expect_eq(info.struct_size, sizeof info); /* the caller's value is kept */
    return info;
}

static void check_info(struct qbm_image *img, uint64_t size, uint64_t cluster, uint32_t refcount_bits, int writable)
{
    struct qbm_image_info info = image_info(img);
    uint32_t count = 99;
    expect_eq(info.virtual_size, size);
    expect_eq(info.cluster_size, cluster);
    expect_eq(info.refcount_bits, refcount_bits);
    expect_eq(info.version, 3);
    expect_eq(info.bitmap_count, 0);
    expect_eq(info.flags, writable ? QBM_IMAGE_WRITABLE : 0);
    ok(qbm_bitmap_count(img, &count));
    expect_eq(count, 0);
}

/* Every valid cluster size and refcount width, checked by us and by qemu-img. */
static void valid_geometries(int have_qemu)
{
    static const uint64_t clusters[] = {0, 512, 4096, 65536, 2 * MiB};
    static const uint32_t widths[] = {0, 1, 2, 4, 8, 16, 32, 64};
    for (size_t c = 0; c < sizeof clusters / sizeof clusters[0]; c++) {
        for (size_t w = 0; w < sizeof widths / sizeof widths[0]; w++) {
            struct qbm_create_options o = create_opts(GiB + 3 * 512);
            struct qbm_image *img = NULL;
            char name[64];
            const char *path;
            uint64_t want_cluster = clusters[c] ? clusters[c] : 65536; /* 0: 64 KiB */
            uint32_t want_width = widths[w] ? widths[w] : 16;          /* 0: 16 bits */

            snprintf(name, sizeof name, "geom-%" PRIu64 "-%u.qcow2", clusters[c], widths[w]);
            path = test_path(name);
            o.cluster_size = clusters[c];
            o.refcount_bits = widths[w];
            ok(qbm_create(path, &o, &img));
            expect(img != NULL);
            check_info(img, o.virtual_size, want_cluster, want_width, 1);
            ok(qbm_close(img));

            /* Read-only, then read-write: the same facts, the writable flag differs. */
            img = NULL;
            ok(qbm_open(path, 0, &img));
            expect(img != NULL);
            check_info(img, o.virtual_size, want_cluster, want_width, 0);
            ok(qbm_close(img));
            img = NULL;
            ok(qbm_open(path, QBM_OPEN_RDWR, &img));
            expect(img != NULL);
            check_info(img, o.virtual_size, want_cluster, want_width, 1);
            ok(qbm_flush(img));
            ok(qbm_close(img));

            if (have_qemu && run_cmd("qemu-img check -q '%s'", path) != 0) {
                fprintf(stderr, "qemu-img check failed on %s (cluster %" PRIu64 ", refcount_bits %u)\n", path,
                        want_cluster, want_width);
                exit(1);
            }
            if (have_qemu) {
                char *json = run_capture("qemu-img info --output=json '%s'", path);
                char want[64];
                expect(json != NULL);
                snprintf(want, sizeof want, "\"cluster-size\": %" PRIu64, want_cluster);
                expect(strstr(json, want) != NULL);
                snprintf(want, sizeof want, "\"virtual-size\": %" PRIu64, o.virtual_size);
                expect(strstr(json, want) != NULL);
                snprintf(want, sizeof want, "\"refcount-bits\": %u", want_width);
                expect(strstr(json, want) != NULL);
                free(json);
            }
        }
    }
}

/* A bad option must fail with -EINVAL and leave no file behind. */
static void create_fails(const char *name, const struct qbm_create_options *o)
{
    struct qbm_image *img = NULL;
    const char *path = test_path(name);
    err(qbm_create(path, o, &img), -EINVAL);
    expect(img == NULL);
    if (file_exists(path)) {
        fprintf(stderr, "%s: a failed qbm_create left the file behind\n", path);
        exit(1);
    }
}

static void bad_options(void)
{
    static const uint64_t bad_clusters[] = {1, 256, 511, 513, 3000, 4 * MiB, UINT64_C(1) << 40};
    static const uint32_t bad_widths[] = {3, 5, 7, 12, 128, UINT32_MAX};
    struct qbm_create_options o;

    for (size_t i = 0; i < sizeof bad_clusters / sizeof bad_clusters[0]; i++) {
        o = create_opts(GiB);
        o.cluster_size = bad_clusters[i];
        create_fails("bad-cluster.qcow2", &o);
    }
    for (size_t i = 0; i < sizeof bad_widths / sizeof bad_widths[0]; i++) {
        o = create_opts(GiB);
        o.refcount_bits = bad_widths[i];
        create_fails("bad-width.qcow2", &o);
    }
    /* Reserved flags must be 0. */
    o = create_opts(GiB);
    o.flags = 1;
    create_fails("bad-flags.qcow2", &o);
    /* struct_size smaller than any version of the struct. */
    o = create_opts(GiB);
    o.struct_size = 0;
    create_fails("bad-size.qcow2", &o);
    o.struct_size = sizeof(size_t);
    create_fails("bad-size.qcow2", &o);
    o.struct_size = sizeof o - 1;
    create_fails("bad-size.qcow2", &o);
}

static void image_info_struct_size(void)
{
    struct qbm_image *img = create_image("info-size.qcow2", GiB);
    struct qbm_image_info info;
    /* A newer caller's larger struct: the known part is filled, the rest untouched. */
    union {
        struct qbm_image_info info;
        unsigned char bytes[sizeof(struct qbm_image_info) + 32];
    } big;

    memset(&info, 0, sizeof info);
    info.struct_size = 0;
    err(qbm_image_get_info(img, &info), -EINVAL);
    info.struct_size = sizeof info - 1;
    err(qbm_image_get_info(img, &info), -EINVAL);

    memset(&big, 0xee, sizeof big);
    big.info.struct_size = sizeof big;
    ok(qbm_image_get_info(img, &big.info));
    expect_eq(big.info.struct_size, sizeof big);
    expect_eq(big.info.virtual_size, GiB);
    for (size_t i = sizeof(struct qbm_image_info); i < sizeof big; i++) {
        expect(big.bytes[i] == 0xee);
    }
    ok(qbm_close(img));
}

static void write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    expect(f != NULL);
    expect(fwrite(data, 1, len, f) == len);
    expect(fclose(f) == 0);
}

static void open_failures(void)
{
    struct qbm_image *img = NULL;
    struct qbm_create_options o = create_opts(GiB);
    const char *path = test_path("exists.qcow2");
    struct stat before, after;
    char text[4096];

    /* Creating over an existing image fails and leaves it alone. */
    ok(qbm_create(path, &o, &img));
    ok(qbm_close(img));
    expect(stat(path, &before) == 0);
    img = NULL;
    err(qbm_create(path, &o, &img), -EEXIST);
    expect(img == NULL);
    expect(stat(path, &after) == 0);
    expect_eq(after.st_size, before.st_size);
    img = NULL;
    ok(qbm_open(path, 0, &img));
    ok(qbm_close(img));
    img = NULL;

    /* ... and over any other existing file. */
    write_file(test_path("exists.txt"), "x", 1);
    err(qbm_create(test_path("exists.txt"), &o, &img), -EEXIST);

    /* A missing file. */
    err(qbm_open(test_path("missing.qcow2"), 0, &img), -ENOENT);
    err(qbm_open(test_path("missing.qcow2"), QBM_OPEN_RDWR, &img), -ENOENT);
    expect(!file_exists(test_path("missing.qcow2"))); /* open never creates */
    /* A missing directory for create. */
    err(qbm_create(test_path("no-such-dir/new.qcow2"), &o, &img), -ENOENT);

    /* Files that are not qcow2. */
    memset(text, 0, sizeof text);
    snprintf(text, sizeof text, "This is a text file, not a qcow2 image.\n");
    write_file(test_path("text.img"), text, sizeof text);
    err(qbm_open(test_path("text.img"), 0, &img), -EINVAL);
    err(qbm_open(test_path("text.img"), QBM_OPEN_RDWR, &img), -EINVAL);

    /* Unknown open flags, even on a good image. */
    err_msg(qbm_open(path, 1u << 4, &img), -EINVAL, "flags");
    err(qbm_open(path, QBM_OPEN_RDWR | 0x80000000u, &img), -EINVAL);
    err(qbm_open(path, UINT32_MAX, &img), -EINVAL);
    expect(img == NULL);

    /* Non-UTF-8 path bytes are rejected as the header's conventions say. */
    err(qbm_open("\xff\xfe.qcow2", 0, &img), -EINVAL);
}

/*
 * Files too short for a qcow2 header: without the qcow2 magic they are "not
 * qcow2" (-EINVAL) like any other file; with the magic they are truncated
 * images (-EUCLEAN, corrupt).
 */
static void short_files(void)
{
    static const unsigned char magic_only[40] = {'Q', 'F', 'I', 0xfb, 0, 0, 0, 3};
    struct qbm_image *img = NULL;

    write_file(test_path("truncated.qcow2"), magic_only, sizeof magic_only);
    err(qbm_open(test_path("truncated.qcow2"), 0, &img), -EUCLEAN);
    write_file(test_path("short.txt"), "hello\n", 6);
    err(qbm_open(test_path("short.txt"), 0, &img), -EINVAL);
    write_file(test_path("empty.img"), "", 0);
    err(qbm_open(test_path("empty.img"), 0, &img), -EINVAL);
    expect(img == NULL);
}

int main(void)
{
    int have_qemu = qemu_img_available();
    valid_geometries(have_qemu);
    bad_options();
    image_info_struct_size();
    open_failures();
    short_files();
    return test_pass("create_open", have_qemu ? NULL : " (qemu-img checks skipped)");
}
