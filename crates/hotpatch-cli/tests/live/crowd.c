/*
 * A crowd of threads, as a big server has: BUSY workers call the prepared
 * f() and g() of target.c's patches in a loop and classify each result;
 * EACH threads of each kind wait: in read() on a pipe, in
 * pthread_cond_wait (futex), in nanosleep (50 ms, each sleep checked to
 * last its full time: a restarted sleep must not be cut short), and in
 * epoll_wait on an eventfd.
 *
 * Usage: crowd BUSY EACH
 * Prints "ready f=ADDR g=ADDR threads=N" once every thread runs; then
 * reads commands, one per line:
 *   expect V   every call from now on must return version V (0 original,
 *              1 patch A, 2 patch B; -1 any: send it before an apply or
 *              revert); answers "expecting V" once every worker has made
 *              16 batches of calls since
 *   stats      "stats calls=.. bad=.. garbage=.. stale=.. short_sleeps=..
 *              eintr=..": bad counts garbage (results of no version),
 *              stale (another version than expected) and the main
 *              thread's wrong results
 *   finish     wakes every waiting thread with data it must receive
 *              intact: each reader one byte 'r', the cond waiters by
 *              broadcast, the epoll waiters by the eventfd; answers
 *              "finished readers=.. conds=.. epolls=.. sleepers=..
 *              short_sleeps=.." once every one of them has reported
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define PATCHABLE __attribute__((noinline, noipa))
PATCHABLE long f(long x) { return x * 3 + 1; }
PATCHABLE long g(long x) { return x ^ 0x5a5a; }

/* The version of f's result and of g's (-1: none); one call of each may
 * run different versions while an apply or revert is under way. */
static int version_f(long x, long r)
{
    return r == x * 3 + 1 ? 0 : r == x * 5 + 2 ? 1 : r == x * 7 + 3 ? 2 : -1;
}

static int version_g(long x, long r)
{
    return r == (x ^ 0x5a5a) ? 0 : r == (x ^ 0x1234) ? 1 : r == (x ^ 0x4321) ? 2 : -1;
}

#define MAX_BUSY 64
static atomic_int expected;
static atomic_long epoch, seen_epoch[MAX_BUSY], worker_calls[MAX_BUSY];
static atomic_long calls, bad, garbage, stale, short_sleeps, eintr, started;
static atomic_long readers_done, conds_done, epolls_done, sleepers_done;
static atomic_int finishing;
static int pipe_fds[2], event_fd;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int cond_flag;

static void *worker(void *arg)
{
    long i = (long)arg, x = i * 1000003;
    atomic_fetch_add(&started, 1);
    for (;;) {
        long e = atomic_load(&epoch);
        int want = atomic_load(&expected);
        long wrong = 0;
        for (int k = 0; k < 1024; k++, x++) {
            int vf = version_f(x, f(x)), vg = version_g(x, g(x));
            if (vf < 0 || vg < 0) atomic_fetch_add(&garbage, 1);
            else if (want >= 0 && (vf != want || vg != want)) wrong++;
        }
        /* A batch wholly inside one "expect V" window (which opens after
         * the apply or revert returned, and closes before the next one
         * starts) must have seen V only. */
        if (wrong && atomic_load(&epoch) == e) atomic_fetch_add(&stale, wrong);
        atomic_fetch_add(&calls, 1024);
        atomic_store(&seen_epoch[i], e);
        atomic_fetch_add(&worker_calls[i], 1024);
    }
    return NULL;
}

static void *reader(void *arg)
{
    (void)arg;
    atomic_fetch_add(&started, 1);
    char c;
    ssize_t n;
    while ((n = read(pipe_fds[0], &c, 1)) < 0)
        if (errno == EINTR) atomic_fetch_add(&eintr, 1);
    if (n == 1 && c == 'r') atomic_fetch_add(&readers_done, 1);
    return NULL;
}

static void *cond_waiter(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&lock);
    atomic_fetch_add(&started, 1);
    while (!cond_flag) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    atomic_fetch_add(&conds_done, 1);
    return NULL;
}

static long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void *sleeper(void *arg)
{
    (void)arg;
    atomic_fetch_add(&started, 1);
    while (!atomic_load(&finishing)) {
        struct timespec req = {0, 50000000L};
        long t0 = now_ns();
        int r = nanosleep(&req, NULL);
        if (r != 0 || now_ns() - t0 < 50000000L) atomic_fetch_add(&short_sleeps, 1);
    }
    atomic_fetch_add(&sleepers_done, 1);
    return NULL;
}

static void *epoll_waiter(void *arg)
{
    (void)arg;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 7};
    epoll_ctl(ep, EPOLL_CTL_ADD, event_fd, &ev);
    atomic_fetch_add(&started, 1);
    for (;;) {
        struct epoll_event out;
        int n = epoll_wait(ep, &out, 1, -1);
        if (n < 0 && errno == EINTR) {
            atomic_fetch_add(&eintr, 1);
            continue;
        }
        if (n == 1 && out.data.u64 == 7) atomic_fetch_add(&epolls_done, 1);
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
    if (argc != 3) return 2;
    int busy = atoi(argv[1]), each = atoi(argv[2]);
    if (busy < 1 || busy > MAX_BUSY || each < 0) return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pipe(pipe_fds) != 0) return 3;
    event_fd = eventfd(0, 0);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_t t;
    for (long i = 0; i < busy; i++) pthread_create(&t, &attr, worker, (void *)i);
    for (int i = 0; i < each; i++) {
        pthread_create(&t, &attr, reader, NULL);
        pthread_create(&t, &attr, cond_waiter, NULL);
        pthread_create(&t, &attr, sleeper, NULL);
        pthread_create(&t, &attr, epoll_waiter, NULL);
    }
    long total = busy + 4L * each;
    while (atomic_load(&started) < total) sleep_ms(1);
    printf("ready f=%p g=%p threads=%ld\n", (void *)f, (void *)g, total + 1);

    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        int v;
        if (sscanf(line, "expect %d", &v) == 1) {
            atomic_store(&expected, v);
            long e = atomic_fetch_add(&epoch, 1) + 1;
            long before[MAX_BUSY];
            for (int i = 0; i < busy; i++) {
                while (atomic_load(&seen_epoch[i]) < e) sleep_ms(1);
                before[i] = atomic_load(&worker_calls[i]);
            }
            int wrong = 0;
            for (int k = 0; v >= 0 && k < 100; k++) {
                long x = 7 + k;
                if (version_f(x, f(x)) != v || version_g(x, g(x)) != v) wrong++;
            }
            if (wrong) atomic_fetch_add(&bad, wrong);
            for (int i = 0; i < busy; i++)
                while (atomic_load(&worker_calls[i]) < before[i] + 16 * 1024) sleep_ms(1);
            printf("expecting %d\n", v);
        } else if (strncmp(line, "stats", 5) == 0) {
            printf("stats calls=%ld bad=%ld garbage=%ld stale=%ld short_sleeps=%ld eintr=%ld\n",
                   atomic_load(&calls), atomic_load(&bad) + atomic_load(&garbage) + atomic_load(&stale),
                   atomic_load(&garbage), atomic_load(&stale), atomic_load(&short_sleeps),
                   atomic_load(&eintr));
        } else if (strncmp(line, "finish", 6) == 0) {
            atomic_store(&finishing, 1);
            for (int i = 0; i < each; i++)
                if (write(pipe_fds[1], "r", 1) != 1) printf("pipe-write-error %d\n", errno);
            pthread_mutex_lock(&lock);
            cond_flag = 1;
            pthread_cond_broadcast(&cond);
            pthread_mutex_unlock(&lock);
            unsigned long long one = 1;
            if (write(event_fd, &one, sizeof one) != sizeof one) printf("eventfd-write-error %d\n", errno);
            long deadline = now_ns() + 20000000000L;
            while (now_ns() < deadline &&
                   (atomic_load(&readers_done) < each || atomic_load(&conds_done) < each ||
                    atomic_load(&epolls_done) < each || atomic_load(&sleepers_done) < each))
                sleep_ms(5);
            printf("finished readers=%ld conds=%ld epolls=%ld sleepers=%ld short_sleeps=%ld\n",
                   atomic_load(&readers_done), atomic_load(&conds_done), atomic_load(&epolls_done),
                   atomic_load(&sleepers_done), atomic_load(&short_sleeps));
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        }
    }
    return 0;
}
