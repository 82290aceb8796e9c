/*
 * The target of the live-patching tests: worker threads call the prepared
 * functions f() and g() in a loop and classify every result as the
 * original, patch A's, patch B's, or bad (anything else). Optionally
 * threads blocked in read (a FIFO), nanosleep, pthread_cond_wait and
 * epoll_wait.
 *
 * Usage: target WORKERS [FIFO|-] [busy|idle|duty]
 * (busy, the default: the workers never pause; idle: they run at
 * SCHED_IDLE, using every idle cycle without delaying other threads; duty:
 * they pause for 50 µs after every 2,048 calls)
 * Prints "ready f=ADDR g=ADDR" once every thread runs, then reads commands
 * from stdin, one per line (it exits on EOF or "quit"):
 *   expect V   from now on every call must return version V (0 original,
 *              1 A, 2 B, -1 any); answers "expecting V" once every worker
 *              has seen it and made at least 100 more calls
 *   stats      "stats calls=.. old=.. a=.. b=.. bad=.. late=.. first_bad=.."
 *   call X     "call X f=.. g=.." (calls from the main thread)
 *   cond       wakes the pthread_cond_wait thread
 *   epoll      wakes the epoll_wait thread (eventfd)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#if defined(__clang__)
#define PATCHABLE __attribute__((noinline))
#else
#define PATCHABLE __attribute__((noinline, noipa))
#endif

/* The functions the patches replace. Versions: original, A, B. */
PATCHABLE long f(long x) { return x * 3 + 1; }
PATCHABLE long g(long x) { return x ^ 0x5a5a; }

static int version_f(long x, long r)
{
    if (r == x * 3 + 1) return 0;
    if (r == x * 5 + 2) return 1;
    if (r == x * 7 + 3) return 2;
    return -1;
}

static int version_g(long x, long r)
{
    if (r == (x ^ 0x5a5a)) return 0;
    if (r == (x ^ 0x1234)) return 1;
    if (r == (x ^ 0x4321)) return 2;
    return -1;
}

#define MAX_WORKERS 256
static int workers;
static int idle_workers, duty_workers;
static _Atomic long epoch;
static _Atomic int expected = -1;
static _Atomic long seen_epoch[MAX_WORKERS];
static _Atomic long worker_calls[MAX_WORKERS];
static _Atomic long calls, by_version[3], bad, late;
static _Atomic long first_bad_x = -1, first_bad_r;
static _Atomic int started;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&out_lock);
    vprintf(fmt, ap);
    putchar('\n');
    fflush(stdout);
    pthread_mutex_unlock(&out_lock);
    va_end(ap);
}

static void *worker(void *arg)
{
    long me = (long)arg;
    long my_epoch = -1;
    int my_expected = -1;
    long k = 0;
    if (idle_workers) {
        struct sched_param p = {0};
        if (pthread_setschedparam(pthread_self(), SCHED_IDLE, &p) != 0)
            say("sched-idle-error");
    }
    atomic_fetch_add(&started, 1);
    for (;;) {
        long e = atomic_load(&epoch);
        if (e != my_epoch) {
            my_expected = atomic_load(&expected);
            my_epoch = e;
            atomic_store(&seen_epoch[me], e);
        }
        if (duty_workers && (k & 2047) == 2047) {
            struct timespec pause = {0, 50000};
            nanosleep(&pause, NULL);
        }
        long x = (me * 7919 + k++) % 1000 + 1;
        long rf = f(x);
        long rg = g(x);
        int vf = version_f(x, rf), vg = version_g(x, rg);
        atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&worker_calls[me], 1, memory_order_relaxed);
        if (vf < 0 || vg < 0) {
            long none = -1;
            if (atomic_compare_exchange_strong(&first_bad_x, &none, x))
                atomic_store(&first_bad_r, vf < 0 ? rf : rg);
            atomic_fetch_add(&bad, 1);
            continue;
        }
        atomic_fetch_add_explicit(&by_version[vf], 1, memory_order_relaxed);
        if (my_expected >= 0 && (vf != my_expected || vg != my_expected))
            atomic_fetch_add(&late, 1);
    }
    return NULL;
}

/* ------------------------------------------------------- blocked threads */

static const char *fifo_path;
static pthread_mutex_t cond_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int cond_flag;
static int event_fd;

static void *reader(void *arg)
{
    (void)arg;
    int fd = open(fifo_path, O_RDWR); /* never blocks on a FIFO */
    if (fd < 0) {
        say("reader-error open errno=%d", errno);
        return NULL;
    }
    atomic_fetch_add(&started, 1);
    for (;;) {
        char buf[128];
        ssize_t n = read(fd, buf, sizeof buf - 1);
        if (n < 0) {
            say("pipe-read-error errno=%d", errno);
            continue;
        }
        buf[n] = 0;
        if (n > 0 && buf[n - 1] == '\n') buf[n - 1] = 0;
        say("pipe-read %zd %s", n, buf);
    }
}

static long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

#define SLEEP_NS 300000000L
static void *sleeper(void *arg)
{
    (void)arg;
    atomic_fetch_add(&started, 1);
    for (;;) {
        struct timespec req = {0, SLEEP_NS};
        long t0 = now_ns();
        errno = 0;
        int r = nanosleep(&req, NULL);
        int err = errno;
        long t1 = now_ns();
        say("slept %ld requested %ld r=%d errno=%d start=%ld", t1 - t0, SLEEP_NS, r, err, t0);
    }
}

static void *cond_waiter(void *arg)
{
    (void)arg;
    int wakeups = 0;
    pthread_mutex_lock(&cond_lock);
    atomic_fetch_add(&started, 1);
    while (!cond_flag) {
        pthread_cond_wait(&cond, &cond_lock);
        wakeups++;
    }
    pthread_mutex_unlock(&cond_lock);
    say("cond-woke wakeups=%d", wakeups);
    return NULL;
}

static void *epoll_waiter(void *arg)
{
    (void)arg;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 7};
    epoll_ctl(ep, EPOLL_CTL_ADD, event_fd, &ev);
    int eintr = 0;
    atomic_fetch_add(&started, 1);
    for (;;) {
        struct epoll_event out;
        int n = epoll_wait(ep, &out, 1, -1);
        if (n < 0 && errno == EINTR) {
            eintr++;
            say("epoll-eintr %d", eintr);
            continue;
        }
        say("epoll-woke n=%d data=%llu eintr=%d", n, (unsigned long long)out.data.u64, eintr);
        return NULL;
    }
}

static void sleep_ms(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

int main(int argc, char **argv)
{
    workers = argc > 1 ? atoi(argv[1]) : 4;
    if (workers < 0 || workers > MAX_WORKERS) return 2;
    fifo_path = argc > 2 && strcmp(argv[2], "-") != 0 ? argv[2] : NULL;
    idle_workers = argc > 3 && strcmp(argv[3], "idle") == 0;
    duty_workers = argc > 3 && strcmp(argv[3], "duty") == 0;
    int expect_started = workers;
    pthread_t t;
    for (long i = 0; i < workers; i++)
        pthread_create(&t, NULL, worker, (void *)i);
    if (fifo_path) {
        event_fd = eventfd(0, 0);
        pthread_create(&t, NULL, reader, NULL);
        pthread_create(&t, NULL, sleeper, NULL);
        pthread_create(&t, NULL, cond_waiter, NULL);
        pthread_create(&t, NULL, epoll_waiter, NULL);
        expect_started += 4;
    }
    while (atomic_load(&started) < expect_started)
        sleep_ms(1);
    say("ready f=%p g=%p", (void *)f, (void *)g);

    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        int v;
        long x;
        if (sscanf(line, "expect %d", &v) == 1) {
            atomic_store(&expected, v);
            long e = atomic_fetch_add(&epoch, 1) + 1;
            long before[MAX_WORKERS];
            for (int i = 0; i < workers; i++) {
                while (atomic_load(&seen_epoch[i]) != e)
                    sleep_ms(1);
                before[i] = atomic_load(&worker_calls[i]);
            }
            for (int i = 0; i < workers; i++)
                while (atomic_load(&worker_calls[i]) < before[i] + 100)
                    sleep_ms(1);
            say("expecting %d", v);
        } else if (strncmp(line, "stats", 5) == 0) {
            say("stats calls=%ld old=%ld a=%ld b=%ld bad=%ld late=%ld first_bad=%ld:%ld",
                atomic_load(&calls), atomic_load(&by_version[0]), atomic_load(&by_version[1]),
                atomic_load(&by_version[2]), atomic_load(&bad), atomic_load(&late),
                atomic_load(&first_bad_x), atomic_load(&first_bad_r));
        } else if (sscanf(line, "call %ld", &x) == 1) {
            say("call %ld f=%ld g=%ld", x, f(x), g(x));
        } else if (strncmp(line, "cond", 4) == 0) {
            pthread_mutex_lock(&cond_lock);
            cond_flag = 1;
            pthread_cond_signal(&cond);
            pthread_mutex_unlock(&cond_lock);
        } else if (strncmp(line, "epoll", 5) == 0) {
            unsigned long long one = 1;
            if (write(event_fd, &one, sizeof one) != sizeof one)
                say("eventfd-write-error errno=%d", errno);
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        } else {
            say("unknown %s", line);
        }
    }
    return 0;
}
