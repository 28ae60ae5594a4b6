/*
 * QEMU agrees with libqbm, both ways:
 * - bitmaps written by libqbm are listed by `qemu-img info` (name,
 *   granularity, flags), pass `qemu-img check`, show in-use while open, and
 *   export the same dirty extents through `qemu-nbd -B` (read with nbdinfo);
 * - bitmaps written by QEMU (`qemu-img bitmap`, `qemu-io` writes) are read by
 *   libqbm with the same extents, and libqbm's changes are seen by QEMU.
 * Skipped (77) without qemu-img; the nbd comparison is skipped without
 * qemu-nbd/nbdinfo (a failure under CI=true).
 */
#include "util.h"

#define MiB (UINT64_C(1) << 20)
#define SIZE (64 * MiB + 12800) /* a multiple of 512, not of 4 KiB */

#define N(a) (sizeof(a) / sizeof((a)[0]))

static int have_nbd;

/* `qemu-img info --output=json` with the whitespace outside strings removed. */
static char *info_json(const char *path, int force_share)
{
    char *json = run_capture("qemu-img info %s --output=json '%s'", force_share ? "-U" : "", path);
    char *w;
    int in_string = 0;
    if (json == NULL) {
        fprintf(stderr, "qemu-img info %s failed\n", path);
        exit(1);
    }
    w = json;
    for (char *r = json; *r; r++) {
        if (*r == '"' && (r == json || r[-1] != '\\')) {
            in_string = !in_string;
        }
        if (in_string || (*r != ' ' && *r != '\n' && *r != '\t' && *r != '\r')) {
            *w++ = *r;
        }
    }
    *w = '\0';
    return json;
}

static void expect_in_json(const char *json, const char *want)
{
    if (strstr(json, want) == NULL) {
        fprintf(stderr, "qemu-img info does not show %s in:\n%s\n", want, json);
        exit(1);
    }
}

static void qemu_check(const char *path)
{
    if (run_cmd("qemu-img check -q '%s'", path) != 0) {
        run_cmd("qemu-img check '%s' >&2", path);
        fprintf(stderr, "qemu-img check failed on %s\n", path);
        exit(1);
    }
}

/* The dirty extents QEMU exports for bitmap `name` (read through qemu-nbd). */
static size_t nbd_extents(const char *path, const char *name, struct extent *out, size_t max)
{
    char *map = run_capture("nbdinfo --map=qemu:dirty-bitmap:'%s' -- [ qemu-nbd -r -f qcow2 -B '%s' '%s' ]", name,
                            name, path);
    size_t n = 0;
    char *line;
    if (map == NULL) {
        fprintf(stderr, "nbdinfo --map of bitmap %s in %s failed\n", name, path);
        exit(1);
    }
    for (line = strtok(map, "\n"); line != NULL; line = strtok(NULL, "\n")) {
        uint64_t start, length;
        unsigned type;
        if (sscanf(line, "%" SCNu64 " %" SCNu64 " %u", &start, &length, &type) != 3) {
            fprintf(stderr, "unexpected nbdinfo line: %s\n", line);
            exit(1);
        }
        if (!(type & 1)) {
            continue;
        }
        if (n > 0 && out[n - 1].start + out[n - 1].length == start) {
            out[n - 1].length += length; /* one run, split by the server */
        } else {
            expect(n < max);
            out[n].start = start;
            out[n].length = length;
            n++;
        }
    }
    free(map);
    return n;
}

/* QEMU's view of a bitmap equals `want` (when qemu-nbd and nbdinfo exist). */
static void check_nbd(const char *path, const char *name, const struct extent *want, size_t n)
{
    struct extent got[64];
    size_t k;
    if (!have_nbd) {
        return;
    }
    k = nbd_extents(path, name, got, N(got));
    for (size_t i = 0; i < k || i < n; i++) {
        if (i >= k || i >= n || got[i].start != want[i].start || got[i].length != want[i].length) {
            fprintf(stderr, "bitmap %s in %s: QEMU exports:\n", name, path);
            for (size_t j = 0; j < k; j++) {
                fprintf(stderr, "    [%" PRIu64 ", +%" PRIu64 ")\n", got[j].start, got[j].length);
            }
            fprintf(stderr, "expected:\n");
            for (size_t j = 0; j < n; j++) {
                fprintf(stderr, "    [%" PRIu64 ", +%" PRIu64 ")\n", want[j].start, want[j].length);
            }
            exit(1);
        }
    }
}

static const struct extent backup_bits[] = {{65536, 65536}, {1 * MiB, 65536}, {64 * MiB, 12800}};
static const struct extent fine_bits[] = {{69632, 4096}, {1 * MiB, 65536}, {64 * MiB + 12288, 512}};
static const struct extent frozen_bits[] = {{5 * MiB, 65536}};

/* libqbm writes, QEMU reads. */
static void libqbm_to_qemu(void)
{
    const char *path = test_path("from-libqbm.qcow2");
    struct qbm_image *img = create_image("from-libqbm.qcow2", SIZE);
    char *json;

    ok(qbm_bitmap_add(img, "backup", 65536, 0));
    ok(qbm_bitmap_add(img, "fine", 4096, 0));
    ok(qbm_bitmap_add(img, "frozen", 65536, QBM_BITMAP_DISABLED));
    ok(qbm_mark_dirty(img, 70000, 1));
    ok(qbm_mark_dirty(img, 1 * MiB, 65536));
    ok(qbm_mark_dirty(img, SIZE - 1, 1));
    ok(qbm_bitmap_set(img, "frozen", 5 * MiB, 1));
    ok(qbm_flush(img));

    /* While open read-write, QEMU sees the bitmaps as in use. */
    json = info_json(path, 1);
    expect_in_json(json, "{\"flags\":[\"in-use\",\"auto\"],\"name\":\"backup\",\"granularity\":65536}");
    expect_in_json(json, "{\"flags\":[\"in-use\"],\"name\":\"frozen\",\"granularity\":65536}");
    free(json);
    ok(qbm_close(img));

    json = info_json(path, 0);
    expect_in_json(json, "{\"flags\":[\"auto\"],\"name\":\"backup\",\"granularity\":65536}");
    expect_in_json(json, "{\"flags\":[\"auto\"],\"name\":\"fine\",\"granularity\":4096}");
    expect_in_json(json, "{\"flags\":[],\"name\":\"frozen\",\"granularity\":65536}");
    expect(strstr(json, "in-use") == NULL);
    expect_in_json(json, "\"virtual-size\":67121664");
    free(json);
    qemu_check(path);
    check_nbd(path, "backup", backup_bits, N(backup_bits));
    check_nbd(path, "fine", fine_bits, N(fine_bits));
    check_nbd(path, "frozen", frozen_bits, N(frozen_bits));

    /* QEMU can change what libqbm wrote, and libqbm reads QEMU's change. */
    expect(run_cmd("qemu-img bitmap --remove '%s' fine", path) == 0);
    expect(run_cmd("qemu-img bitmap --merge backup '%s' frozen", path) == 0);
    qemu_check(path);
    img = open_image("from-libqbm.qcow2", 0);
    {
        uint32_t count = 0;
        static const struct extent want[] = {{65536, 65536}, {1 * MiB, 65536}, {5 * MiB, 65536}, {64 * MiB, 12800}};
        ok(qbm_bitmap_count(img, &count));
        expect_eq(count, 2);
        check_extents(img, "frozen", want, N(want));
        check_extents(img, "backup", backup_bits, N(backup_bits));
    }
    ok(qbm_close(img));
}

/* QEMU writes, libqbm reads and changes, QEMU reads again. */
static void qemu_to_libqbm(void)
{
    const char *path = test_path("from-qemu.qcow2");
    struct qbm_image *img;
    struct qbm_bitmap_info info;
    char *json;
    static const struct extent written[] = {{69632, 4096}, {1 * MiB, 65536}};
    static const struct extent after[] = {{69632, 4096}, {1 * MiB, 65536}, {3 * MiB, 4096}};

    expect(run_cmd("qemu-img create -q -f qcow2 '%s' 64M", path) == 0);
    expect(run_cmd("qemu-img bitmap --add -g 4096 '%s' qb", path) == 0);
    expect(run_cmd("qemu-img bitmap --add --disable '%s' qd", path) == 0);
    if (run_cmd("qemu-io --version >/dev/null 2>&1") != 0) {
        if (ci_mode()) {
            fprintf(stderr, "FAIL: qemu-io is not installed and CI=true\n");
            exit(1);
        }
        fprintf(stderr, "SKIP: qemu-io is not installed: skipping QEMU-written dirty bits\n");
        return;
    }
    expect(run_cmd("qemu-io -f qcow2 -c 'write 70000 1' -c 'write 1M 64k' '%s' >/dev/null", path) == 0);

    img = open_image("from-qemu.qcow2", 0);
    expect(find_bitmap(img, "qb", &info));
    expect_eq(info.granularity, 4096);
    expect_eq(info.flags, QBM_BITMAP_ENABLED);
    expect(find_bitmap(img, "qd", &info));
    expect_eq(info.granularity, 65536);
    expect_eq(info.flags, 0);
    check_extents(img, "qb", written, N(written));
    check_clean(img, "qd");
    ok(qbm_close(img));

    img = open_image("from-qemu.qcow2", QBM_OPEN_RDWR);
    ok(qbm_mark_dirty(img, 3 * MiB, 1));
    ok(qbm_close(img));

    qemu_check(path);
    json = info_json(path, 0);
    expect_in_json(json, "{\"flags\":[\"auto\"],\"name\":\"qb\",\"granularity\":4096}");
    expect_in_json(json, "{\"flags\":[],\"name\":\"qd\",\"granularity\":65536}");
    free(json);
    check_nbd(path, "qb", after, N(after));
    check_nbd(path, "qd", NULL, 0);
}

int main(void)
{
    require_qemu_img();
    have_nbd = run_cmd("command -v qemu-nbd >/dev/null && command -v nbdinfo >/dev/null") == 0;
    if (!have_nbd) {
        if (ci_mode()) {
            fprintf(stderr, "FAIL: qemu-nbd or nbdinfo is not installed and CI=true\n");
            return 1;
        }
        fprintf(stderr, "SKIP: qemu-nbd or nbdinfo missing: not comparing extents with QEMU's export\n");
    }
    libqbm_to_qemu();
    qemu_to_libqbm();
    return test_pass("qemu_interop", have_nbd ? NULL : " (nbd comparison skipped)");
}
