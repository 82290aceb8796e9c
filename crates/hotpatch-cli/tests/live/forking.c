/*
 * A pre-forking server, as nginx runs: a master process and WORKERS
 * worker processes forked from it, all calling the prepared functions f()
 * and g() of target.c (so patch_a.c and patch_b.c patch them).
 *
 * Usage: forking WORKERS [legacy]
 * With "legacy", the master first maps a shared, empty state record
 * (memfd "hotpatch-state", 16 MiB, MAP_SHARED), as hotpatch versions
 * before private records left in a process, which its workers inherit.
 * Prints "ready master=PID f=ADDR g=ADDR", then "workers PID…" each time
 * it has forked a set of workers. SIGHUP makes the master "reload": it
 * kills its workers and forks new ones. Commands on stdin, one per line
 * (the master and its workers exit on EOF or "quit"):
 *   values     every process prints "value PID f=.. g=.." (f(11), g(11))
 *   reload     the same as SIGHUP
 *   share      the master maps a shared, empty state record now and
 *              prints "shared ADDR"
 * Workers die with the master (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if defined(__clang__)
#define PATCHABLE __attribute__((noinline))
#else
#define PATCHABLE __attribute__((noinline, noipa))
#endif

PATCHABLE long f(long x) { return x * 3 + 1; }
PATCHABLE long g(long x) { return x ^ 0x5a5a; }

#define MAX_WORKERS 16
static int nworkers;
static pid_t worker_pids[MAX_WORKERS];
static volatile sig_atomic_t reload_asked, report_asked;
static volatile long sink;

/* One write(2) per line: lines of several processes on one pipe never mix. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void say(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    if (write(1, buf, n) != n) _exit(3);
}

/* A shared, empty state record, as hotpatch versions before private
 * records mapped it; NULL if it cannot be made. */
static void *map_shared_record(void)
{
    size_t size = 16 << 20;
    int fd = memfd_create("hotpatch-state", MFD_CLOEXEC);
    if (fd < 0) return NULL;
    void *p = ftruncate(fd, size) == 0 ? mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
    close(fd);
    return p == MAP_FAILED ? NULL : p;
}

static void on_hup(int sig) { (void)sig; reload_asked = 1; }
static void on_usr1(int sig) { (void)sig; report_asked = 1; }

static void sleep_ms(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static void worker_loop(pid_t master)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != master) _exit(0);
    long k = 0;
    for (;;) {
        long x = k++ % 1000;
        sink = f(x) + g(x);
        if (report_asked) {
            report_asked = 0;
            long x = 11;
            say("value %d f=%ld g=%ld", (int)getpid(), f(x), g(x));
        }
        sleep_ms(1);
    }
}

static void fork_workers(void)
{
    char line[400] = "workers";
    pid_t master = getpid();
    for (int i = 0; i < nworkers; i++) {
        pid_t p = fork();
        if (p == 0) worker_loop(master);
        if (p < 0) { say("fork-error"); exit(2); }
        worker_pids[i] = p;
        snprintf(line + strlen(line), sizeof line - strlen(line), " %d", (int)p);
    }
    say("%s", line);
}

static void kill_workers(void)
{
    for (int i = 0; i < nworkers; i++) {
        kill(worker_pids[i], SIGKILL);
        waitpid(worker_pids[i], NULL, 0);
    }
}

int main(int argc, char **argv)
{
    nworkers = argc > 1 ? atoi(argv[1]) : 2;
    if (nworkers < 1 || nworkers > MAX_WORKERS) return 2;
    struct sigaction sa = {0};
    sa.sa_handler = on_hup;
    sigaction(SIGHUP, &sa, NULL);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    if (argc > 2 && strcmp(argv[2], "legacy") == 0 && !map_shared_record())
        return 4;
    say("ready master=%d f=%p g=%p", (int)getpid(), (void *)f, (void *)g);
    fork_workers();

    char line[256];
    size_t have = 0;
    for (;;) {
        if (reload_asked) {
            reload_asked = 0;
            kill_workers();
            fork_workers();
        }
        struct pollfd pfd = {0, POLLIN, 0};
        if (poll(&pfd, 1, 5) <= 0) continue;
        ssize_t n = read(0, line + have, sizeof line - 1 - have);
        if (n <= 0) break;
        have += n;
        line[have] = 0;
        char *nl;
        while ((nl = strchr(line, '\n'))) {
            *nl = 0;
            if (strcmp(line, "values") == 0) {
                long x = 11;
                for (int i = 0; i < nworkers; i++) kill(worker_pids[i], SIGUSR1);
                say("value %d f=%ld g=%ld", (int)getpid(), f(x), g(x));
            } else if (strcmp(line, "share") == 0) {
                say("shared %p", map_shared_record());
            } else if (strcmp(line, "reload") == 0) {
                reload_asked = 1;
            } else if (strcmp(line, "quit") == 0) {
                kill_workers();
                return 0;
            }
            have -= nl + 1 - line;
            memmove(line, nl + 1, have + 1);
        }
        if (have == sizeof line - 1) have = 0;
    }
    kill_workers();
    return 0;
}
