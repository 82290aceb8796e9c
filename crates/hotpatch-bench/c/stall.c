/*
 * stall: a cyclictest-style target for hotpatch-bench.
 *
 *   stall WORKERS BUSY PERIOD_US [BLOCKED]
 *
 * WORKERS threads wake on absolute deadlines every PERIOD_US
 * (clock_nanosleep TIMER_ABSTIME on CLOCK_MONOTONIC), record how late they
 * woke in a per-thread histogram, then call work() and work_unprep(), the
 * functions under patch: work() is prepared (built with the padding),
 * work_unprep() is not (the attribute overrides the command line's
 * -fpatchable-function-entry), so hotpatch detours it. A deadline missed
 * entirely is skipped (counted in `missed`), so a long stall shows as one
 * late wake, not a burst of catch-up wakes. BUSY threads spin calling both.
 * BLOCKED threads (default 0) block in read() on a pipe nobody writes, as
 * a server's idle connection threads do; WORKERS may be 0.
 *
 * Commands, one per line on stdin; each answer ends with a line "end":
 *   reset   start a new window: every worker clears its figures
 *   report  "count N", "missed N", "max_ns N", "alt N" (calls that ran
 *           work_alt), then "hist BUCKET:COUNT ..." (non-zero
 *           buckets, see bucket_of)
 *   trace   start recording every wake (its CLOCK_MONOTONIC time and its
 *           lateness, ns), up to TRACE_CAP per worker
 *   samples stop recording; print "sample WORKER TIME_NS LATE_NS" for
 *           each wake recorded since `trace`
 *   quit
 * Prints "ready work=0x... work_alt=0x... work_unprep=0x..." once every
 * worker runs.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sys/prctl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <errno.h>
#include <unistd.h>

#define LINEAR 2048    /* 1 us buckets below 2048 us */
#define COARSE 4096    /* then 64 us buckets, up to ~264 ms */
#define BUCKETS (LINEAR + COARSE)

#define TRACE_CAP 32768 /* wakes per worker per trace: 6.5 s at 200 us */

struct worker {
    uint32_t hist[BUCKETS];
    uint64_t count, missed, max_ns;
    unsigned epoch;
    /* The trace: its epoch (odd while recording), wakes recorded. */
    unsigned trace_epoch, trace_n;
    int64_t *trace_t, *trace_late;
} __attribute__((aligned(64)));

/* Odd while a trace records; bumped by `trace` and by `samples`. */
static unsigned trace_epoch;

static struct worker *workers;
static unsigned epoch;
static long period_ns;
static volatile long sink;
static long alt_calls;

__attribute__((noinline)) long work(long x)
{
    return x * 3 + 1;
}

/*
 * Unprepared: no padding, so hotpatch writes a 5-byte jump at its entry
 * with every thread stopped. noipa: callers assume the full ABI clobber set
 * (no IPA register allocation across the call), so a replacement built
 * elsewhere is safe to call from here; hotpatch still counts the direct
 * calls, and the bench applies with allow_direct_calls.
 */
__attribute__((noipa, patchable_function_entry(0, 0))) long work_unprep(long x)
{
    return (x ^ (x >> 7)) + 3;
}

/* Where the side-by-side section sends work() (a jump in its padding). */
__attribute__((noinline)) long work_alt(long x)
{
    __atomic_add_fetch(&alt_calls, 1, __ATOMIC_RELAXED);
    return x * 3 + 2;
}

static unsigned bucket_of(uint64_t ns)
{
    uint64_t us = ns / 1000;
    if (us < LINEAR)
        return (unsigned)us;
    uint64_t b = LINEAR + (us - LINEAR) / 64;
    return b >= BUCKETS ? BUCKETS - 1 : (unsigned)b;
}

static int64_t ts_ns(const struct timespec *t)
{
    return (int64_t)t->tv_sec * 1000000000 + t->tv_nsec;
}

static void ts_add(struct timespec *t, long ns)
{
    t->tv_nsec += ns;
    while (t->tv_nsec >= 1000000000) {
        t->tv_nsec -= 1000000000;
        t->tv_sec++;
    }
}

static int started;

static void *worker_main(void *arg)
{
    struct worker *me = arg;
    struct timespec next, now;
    /* As cyclictest: no timer slack (the default 50 us would count as lateness). */
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    __atomic_add_fetch(&started, 1, __ATOMIC_RELEASE);
    clock_gettime(CLOCK_MONOTONIC, &next);
    ts_add(&next, period_ns);
    for (;;) {
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
            ;
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t late = ts_ns(&now) - ts_ns(&next);
        if (late < 0)
            late = 0;
        unsigned e = __atomic_load_n(&epoch, __ATOMIC_ACQUIRE);
        if (e != me->epoch) {
            for (unsigned i = 0; i < BUCKETS; i++)
                __atomic_store_n(&me->hist[i], 0, __ATOMIC_RELAXED);
            __atomic_store_n(&me->count, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&me->missed, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&me->max_ns, 0, __ATOMIC_RELAXED);
            me->epoch = e;
        }
        unsigned b = bucket_of((uint64_t)late);
        __atomic_store_n(&me->hist[b], me->hist[b] + 1, __ATOMIC_RELAXED);
        __atomic_store_n(&me->count, me->count + 1, __ATOMIC_RELAXED);
        if ((uint64_t)late > me->max_ns)
            __atomic_store_n(&me->max_ns, (uint64_t)late, __ATOMIC_RELAXED);
        unsigned te = __atomic_load_n(&trace_epoch, __ATOMIC_ACQUIRE);
        if (te & 1) {
            if (__atomic_load_n(&me->trace_epoch, __ATOMIC_RELAXED) != te) {
                __atomic_store_n(&me->trace_n, 0, __ATOMIC_RELAXED);
                __atomic_store_n(&me->trace_epoch, te, __ATOMIC_RELEASE);
            }
            unsigned k = me->trace_n;
            if (k < TRACE_CAP) {
                me->trace_t[k] = ts_ns(&now);
                me->trace_late[k] = late;
                __atomic_store_n(&me->trace_n, k + 1, __ATOMIC_RELEASE);
            }
        }
        sink = work(sink);
        sink = work_unprep(sink);
        ts_add(&next, period_ns);
        while (ts_ns(&next) <= ts_ns(&now)) {
            ts_add(&next, period_ns);
            __atomic_store_n(&me->missed, me->missed + 1, __ATOMIC_RELAXED);
        }
    }
    return NULL;
}

static void *busy_main(void *arg)
{
    (void)arg;
    long x = 0;
    for (;;)
        x = work_unprep(work(x));
    return NULL;
}

static int blocked_pipe[2];

static void *blocked_main(void *arg)
{
    (void)arg;
    char c;
    __atomic_add_fetch(&started, 1, __ATOMIC_RELEASE);
    for (;;)
        if (read(blocked_pipe[0], &c, 1) == 0)
            return NULL;
}

static uint32_t total[BUCKETS];

static void report(int n)
{
    uint64_t count = 0, missed = 0, max_ns = 0;
    memset(total, 0, sizeof total);
    for (int i = 0; i < n; i++) {
        struct worker *w = &workers[i];
        count += __atomic_load_n(&w->count, __ATOMIC_RELAXED);
        missed += __atomic_load_n(&w->missed, __ATOMIC_RELAXED);
        uint64_t m = __atomic_load_n(&w->max_ns, __ATOMIC_RELAXED);
        if (m > max_ns)
            max_ns = m;
        for (unsigned b = 0; b < BUCKETS; b++)
            total[b] += __atomic_load_n(&w->hist[b], __ATOMIC_RELAXED);
    }
    printf("count %llu\nmissed %llu\nmax_ns %llu\nalt %ld\nhist",
           (unsigned long long)count, (unsigned long long)missed, (unsigned long long)max_ns,
           __atomic_load_n(&alt_calls, __ATOMIC_RELAXED));
    for (unsigned b = 0; b < BUCKETS; b++)
        if (total[b])
            printf(" %u:%u", b, total[b]);
    printf("\n");
}

/* Start a trace (buffers allocated once, on the first; never freed, so
   a worker late to see the end of a trace writes into live memory). */
static int trace_start(int n)
{
    for (int i = 0; i < n; i++) {
        struct worker *w = &workers[i];
        if (!w->trace_t) {
            w->trace_t = calloc(TRACE_CAP, sizeof *w->trace_t);
            w->trace_late = calloc(TRACE_CAP, sizeof *w->trace_late);
            if (!w->trace_t || !w->trace_late)
                return -1;
        }
    }
    if (!(trace_epoch & 1))
        __atomic_add_fetch(&trace_epoch, 1, __ATOMIC_RELEASE);
    return 0;
}

/* End the trace and print what each worker recorded in it. */
static void trace_samples(int n)
{
    unsigned te = trace_epoch;
    if (te & 1)
        __atomic_add_fetch(&trace_epoch, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < n; i++) {
        struct worker *w = &workers[i];
        if (!(te & 1) || __atomic_load_n(&w->trace_epoch, __ATOMIC_ACQUIRE) != te)
            continue;
        unsigned k = __atomic_load_n(&w->trace_n, __ATOMIC_ACQUIRE);
        for (unsigned j = 0; j < k && j < TRACE_CAP; j++)
            printf("sample %d %lld %lld\n", i, (long long)w->trace_t[j], (long long)w->trace_late[j]);
    }
}

int main(int argc, char **argv)
{
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: stall WORKERS BUSY PERIOD_US [BLOCKED]\n");
        return 2;
    }
    int n = atoi(argv[1]), busy = atoi(argv[2]), blocked = argc == 5 ? atoi(argv[4]) : 0;
    period_ns = atol(argv[3]) * 1000;
    if (n < 0 || busy < 0 || blocked < 0 || period_ns <= 0)
        return 2;
    if (blocked && pipe(blocked_pipe))
        return 1;
    workers = aligned_alloc(64, sizeof *workers * (size_t)(n ? n : 1));
    if (!workers)
        return 1;
    memset(workers, 0, sizeof *workers * (size_t)n);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (int i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, worker_main, &workers[i]))
            return 1;
    }
    for (int i = 0; i < blocked; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, blocked_main, NULL))
            return 1;
    }
    for (int i = 0; i < busy; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, busy_main, NULL))
            return 1;
    }
    while (__atomic_load_n(&started, __ATOMIC_ACQUIRE) < n + blocked) {
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    printf("ready work=%p work_alt=%p work_unprep=%p\n", (void *)work, (void *)work_alt,
           (void *)work_unprep);
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "reset", 5)) {
            __atomic_add_fetch(&epoch, 1, __ATOMIC_RELEASE);
        } else if (!strncmp(line, "report", 6)) {
            report(n);
        } else if (!strncmp(line, "trace", 5)) {
            if (trace_start(n))
                printf("error cannot allocate the trace\n");
        } else if (!strncmp(line, "samples", 7)) {
            trace_samples(n);
        } else if (!strncmp(line, "quit", 4)) {
            return 0;
        } else {
            printf("error unknown command\n");
        }
        printf("end\n");
        fflush(stdout);
    }
    return 0;
}
