/* qbm_version() matches the version macros of the header it was built with. */
#include "util.h"

#define STR_(x) #x
#define STR(x) STR_(x)

int main(void)
{
    const char *want = STR(QBM_VERSION_MAJOR) "." STR(QBM_VERSION_MINOR) "." STR(QBM_VERSION_PATCH);
    const char *got = qbm_version();

    expect(got != NULL);
    if (strcmp(got, want) != 0) {
        fprintf(stderr, "qbm_version() is \"%s\", the header says \"%s\"\n", got, want);
        return 1;
    }
    /* Stable: the same string every time, and no message is set by it. */
    expect(strcmp(qbm_version(), got) == 0);
    expect(qbm_last_error() != NULL);
    expect(strcmp(qbm_last_error(), "") == 0);
    printf("qbm_version() = %s\n", got);
    return test_pass("version", NULL);
}
