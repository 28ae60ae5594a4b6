/* spawn: time whole processes without a harness in between (make bench).
 *
 * usage: spawn [-n RUNS] [-w WARMUP] [--copy SRC DST] [--server SOCKET]
 *              -- CMD ARGS... [-- CMD ARGS...]...
 *
 * Each run fork+execs the commands one after the other (no shell), stdout to
 * /dev/null, stderr inherited. A command's wall time is CLOCK_MONOTONIC from
 * just before fork() to just after wait4() reaps it; its peak RSS is wait4's
 * ru_maxrss (KiB). Linux counts the pre-exec image of the forked child in
 * ru_maxrss, which is why this is a small, statically linked C process and
 * not the Python harness. A run's time is the sum over its commands, its
 * peak the maximum.
 *
 * --copy SRC DST  before each run (warm-ups included), untimed: copy SRC to
 *                 DST and fdatasync it (a fresh image, already on disk, for
 *                 commands that modify it).
 * --server SOCK   the first command is a server (qemu-nbd) listening on the
 *                 Unix socket SOCK: the run's time goes from its fork until
 *                 the last command exits, server startup included (this
 *                 process polls SOCK with connect() every 50 us and starts
 *                 the next command once it is accepted); the server must
 *                 then exit by itself (it is waited for untimed, killed after
 *                 10 s); its ru_maxrss counts in the run's peak. Its entry
 *                 in "cmds" is the time from its fork until it accepted.
 *
 * Prints one JSON line per measured run, {"run":I,"seconds":S,"maxrss_kib":K,
 * "cmds":[[S,K],...]}, then {"median_s":S,"min_s":S,"max_s":S,
 * "max_maxrss_kib":K,"runs":N}. Exit status 1 if any command fails. */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_CMDS 8

static int devnull;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    fprintf(stderr, "spawn: %s: %s\n", what, strerror(errno));
    exit(1);
}

static pid_t start(char **argv)
{
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        dup2(devnull, STDOUT_FILENO);
        execvp(argv[0], argv);
        fprintf(stderr, "spawn: exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    return pid;
}

/* Reaps pid; returns its ru_maxrss, or -1 if it did not exit with status 0. */
static long reap(pid_t pid, char **argv)
{
    int status;
    struct rusage ru;
    while (wait4(pid, &status, 0, &ru) < 0)
        if (errno != EINTR)
            die("wait4");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "spawn: %s %s\n", argv[0], WIFEXITED(status) ? "exited non-zero" : "was killed");
        return -1;
    }
    return ru.ru_maxrss;
}

static void copy(const char *src, const char *dst)
{
    int in = open(src, O_RDONLY), out;
    static char buf[1 << 20];
    ssize_t n;
    if (in < 0)
        die(src);
    out = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out < 0)
        die(dst);
    while ((n = read(in, buf, sizeof buf)) > 0)
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(out, buf + off, n - off);
            if (w < 0)
                die(dst);
            off += w;
        }
    if (n < 0)
        die(src);
    /* On disk before the clock starts: the measured command's own flushes
     * must not also write back this copy's dirty pages. */
    if (fdatasync(out) < 0)
        die(dst);
    close(in);
    close(out);
}

static int accepting(const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    int s, ok;
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        die("socket");
    ok = connect(s, (struct sockaddr *)&a, sizeof a) == 0;
    close(s);
    return ok;
}

/* Waits up to `limit` seconds for pid to become a zombie, leaving it unreaped. */
static int exited(pid_t pid, double limit)
{
    double end = now() + limit;
    do {
        siginfo_t si = {0};
        if (waitid(P_PID, pid, &si, WEXITED | WNOHANG | WNOWAIT) < 0)
            die("waitid");
        if (si.si_pid == pid)
            return 1;
        usleep(1000);
    } while (now() < end);
    return 0;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int runs = 5, warmup = 0, ncmds = 0, i = 1;
    const char *src = NULL, *dst = NULL, *sock = NULL;
    char **cmds[MAX_CMDS];

    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (!strcmp(argv[i], "-n") && i + 1 < argc)
            runs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-w") && i + 1 < argc)
            warmup = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--copy") && i + 2 < argc) {
            src = argv[++i];
            dst = argv[++i];
        } else if (!strcmp(argv[i], "--server") && i + 1 < argc)
            sock = argv[++i];
        else
            goto usage;
    }
    /* Split the rest at each "--" into NULL-terminated argvs. */
    while (i < argc && !strcmp(argv[i], "--")) {
        argv[i++] = NULL;
        if (i == argc || !strcmp(argv[i], "--") || ncmds == MAX_CMDS)
            goto usage;
        cmds[ncmds++] = &argv[i];
        while (i < argc && strcmp(argv[i], "--") != 0)
            i++;
    }
    if (ncmds == 0 || runs < 1 || warmup < 0 || (sock && ncmds < 2))
        goto usage;

    devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (devnull < 0)
        die("/dev/null");

    double *times = calloc(runs, sizeof *times);
    long peak_all = 0;
    for (int r = -warmup; r < runs; r++) {
        double t[MAX_CMDS], total = 0;
        long rss[MAX_CMDS], peak = 0;
        int first = 0;
        if (src)
            copy(src, dst);
        if (sock) {
            pid_t srv;
            unlink(sock);
            double t0 = now();
            srv = start(cmds[0]);
            while (!accepting(sock)) {
                int status;
                if (waitpid(srv, &status, WNOHANG) == srv) {
                    fprintf(stderr, "spawn: server %s exited before accepting\n", cmds[0][0]);
                    return 1;
                }
                usleep(50);
            }
            t[0] = now() - t0;
            for (int c = 1; c < ncmds; c++) {
                double s = now();
                pid_t pid = start(cmds[c]);
                rss[c] = reap(pid, cmds[c]);
                t[c] = now() - s;
                if (rss[c] < 0) {
                    kill(srv, SIGTERM);
                    return 1;
                }
            }
            total = now() - t0;
            /* The server exits by itself after its one client; untimed. */
            if (!exited(srv, 10.0)) {
                fprintf(stderr, "spawn: server %s did not exit; killed\n", cmds[0][0]);
                kill(srv, SIGKILL);
            }
            struct rusage ru;
            int status;
            if (wait4(srv, &status, 0, &ru) < 0)
                die("wait4 server");
            rss[0] = ru.ru_maxrss;
            unlink(sock);
            first = 1;
            peak = rss[0];
        }
        for (int c = first; c < ncmds && !sock; c++) {
            double s = now();
            pid_t pid = start(cmds[c]);
            rss[c] = reap(pid, cmds[c]);
            t[c] = now() - s;
            if (rss[c] < 0)
                return 1;
            total += t[c];
        }
        for (int c = 0; c < ncmds; c++)
            if (rss[c] > peak)
                peak = rss[c];
        if (r < 0)
            continue;
        times[r] = total;
        if (peak > peak_all)
            peak_all = peak;
        printf("{\"run\":%d,\"seconds\":%.9f,\"maxrss_kib\":%ld,\"cmds\":[", r, total, peak);
        for (int c = 0; c < ncmds; c++)
            printf("%s[%.9f,%ld]", c ? "," : "", t[c], rss[c]);
        printf("]}\n");
    }
    qsort(times, runs, sizeof *times, cmp);
    double median = runs % 2 ? times[runs / 2] : (times[runs / 2 - 1] + times[runs / 2]) / 2;
    printf("{\"median_s\":%.9f,\"min_s\":%.9f,\"max_s\":%.9f,\"max_maxrss_kib\":%ld,\"runs\":%d}\n", median,
           times[0], times[runs - 1], peak_all, runs);
    return 0;

usage:
    fprintf(stderr, "usage: spawn [-n RUNS] [-w WARMUP] [--copy SRC DST] [--server SOCKET] "
                    "-- CMD ARGS... [-- CMD ARGS...]...\n");
    return 2;
}
