/*
 * The target of live_libc.rs: worker threads call libc functions in a
 * loop and check every result against an independent computation. Built
 * with plain `gcc -O2 -pthread` (no padding): what gets patched is libc.
 *
 * Usage: libc_hammer WORKERS
 * Prints "ready threads=N tids=T0,T1,.. tight=K atoi=ADDR ..." (the
 * workers' thread ids, how many of them run tight rounds, the entries of
 * the functions it calls, in libc) once every worker runs, then reads commands from stdin,
 * one per line (it exits on EOF or "quit"):
 *   stats   the main thread makes one checked round of calls itself, then
 *           prints "stats rounds=.. plain=.. alloc=.. per=R0,R1,..":
 *           rounds completed (all threads), calls made to the functions
 *           of the plain set (atoi bsearch div rand_r realloc abs) and of
 *           the alloc set (malloc free strtol), and rounds per worker.
 *           A round of workers 0..K-1 (tight) is TIGHT_PER_ROUND calls of
 *           div and abs; of the others, PLAIN_PER_ROUND plain calls and
 *           ALLOC_PER_ROUND alloc calls.
 *   quit    exits 0
 * On any wrong result it prints "WRONG thread=T what=.." and exits 3.
 *
 * The functions are called through volatile pointers holding their libc
 * entries: at -O2, <stdlib.h> defines atoi and bsearch inline and gcc
 * treats abs, malloc and free as builtins, and neither may bypass libc's
 * code here.
 */
#define _GNU_SOURCE
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef int (*cmp_fn)(const void *, const void *);
static int (*volatile call_atoi)(const char *) = atoi;
static void *(*volatile call_bsearch)(const void *, const void *, size_t, size_t, cmp_fn) = bsearch;
static div_t (*volatile call_div)(int, int) = div;
static int (*volatile call_rand_r)(unsigned *) = rand_r;
static void *(*volatile call_realloc)(void *, size_t) = realloc;
static int (*volatile call_abs)(int) = abs;
static void *(*volatile call_malloc)(size_t) = malloc;
static void (*volatile call_free)(void *) = free;
static long (*volatile call_strtol)(const char *, char **, int) = strtol;

/* Calls per round of one_round(), by set (the counters are bumped once per
 * round, after its calls). */
#define PLAIN_PER_ROUND 7 /* atoi bsearch div abs rand_r realloc realloc */
#define ALLOC_PER_ROUND 6 /* strtol strtol malloc malloc free free */
/* The first TIGHT workers run tight_round() instead: div and abs only, so
 * that a stop of all threads often finds one of them inside the first
 * bytes of div (at its slow idiv) or abs. */
#define TIGHT 2
#define TIGHT_CALLS 256
#define TIGHT_PER_ROUND (2 * TIGHT_CALLS)

#define MAX_THREADS 65
struct counters {
    _Atomic unsigned long rounds, plain, alloc;
    char pad[64 - 3 * sizeof(unsigned long)];
};
static struct counters counters[MAX_THREADS];
static int workers;
static _Atomic int started;
static long tids[MAX_THREADS];

static void wrong(int t, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void wrong(int t, const char *fmt, ...)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "WRONG thread=%d ", t);
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    (void)!write(1, buf, n);
    _exit(3);
}

static uint64_t next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Decimal digits of v, by hand. */
static size_t decimal(char *out, long v)
{
    char tmp[24];
    size_t n = 0, len = 0;
    unsigned long u = v < 0 ? 0UL - (unsigned long)v : (unsigned long)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) out[len++] = '-';
    while (n) out[len++] = tmp[--n];
    out[len] = 0;
    return len;
}

/* glibc's rand_r, reimplemented (stdlib/rand_r.c). */
static int my_rand_r(unsigned *seed)
{
    unsigned next = *seed;
    int result;
    next *= 1103515245;
    next += 12345;
    result = (unsigned)(next / 65536) % 2048;
    next *= 1103515245;
    next += 12345;
    result <<= 10;
    result ^= (unsigned)(next / 65536) % 1024;
    next *= 1103515245;
    next += 12345;
    result <<= 10;
    result ^= (unsigned)(next / 65536) % 1024;
    *seed = next;
    return result;
}

#define TABLE 4096
static int table[TABLE]; /* table[i] = 3 i + 1 */
static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

static unsigned char pattern(uint64_t seed, size_t i) { return (unsigned char)(seed * 131 + i * 7 + (i >> 8)); }
static void fill(unsigned char *p, size_t from, size_t to, uint64_t seed)
{
    for (size_t i = from; i < to; i++) p[i] = pattern(seed, i);
}
static void verify(int t, const char *what, const unsigned char *p, size_t n, uint64_t seed)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != pattern(seed, i))
            wrong(t, "what=%s byte %zu of %zu is %#x, want %#x", what, i, n, p[i], pattern(seed, i));
}

/* Blocks each thread keeps alive across rounds, checked before freeing. */
#define SLOTS 16
struct slot {
    unsigned char *p;
    size_t n;
    uint64_t seed;
};

static void one_round(int t, uint64_t *rng, struct slot *slots)
{
    char buf[48];
    uint64_t r = next(rng);

    /* atoi and strtol on a decimal string. */
    long v = (int)(uint32_t)r;
    size_t len = decimal(buf, v);
    int a = call_atoi(buf);
    if (a != v) wrong(t, "what=atoi(\"%s\") got=%d", buf, a);
    char *end = NULL;
    long l = call_strtol(buf, &end, 10);
    if (l != v || end != buf + len) wrong(t, "what=strtol(\"%s\") got=%ld end=+%td", buf, l, end - buf);
    long big = (long)r / 2;
    len = decimal(buf, big);
    memcpy(buf + len, "xyz", 4);
    l = call_strtol(buf, &end, 10);
    if (l != big || end != buf + len) wrong(t, "what=strtol(\"%s\") got=%ld end=+%td", buf, l, end - buf);

    /* bsearch: present (3 i + 1) or absent. */
    int key = (int)((r >> 32) % (3 * TABLE + 10));
    int *found = call_bsearch(&key, table, TABLE, sizeof table[0], cmp_int);
    int *want = key % 3 == 1 && key / 3 < TABLE ? &table[key / 3] : NULL;
    if (found != want) wrong(t, "what=bsearch(%d) got=%p want=%p", key, (void *)found, (void *)want);

    /* div and abs. */
    int num = (int)(uint32_t)(r >> 16), den = (int)(r % 2001) - 1000;
    if (den == 0) den = 7;
    if (num == INT_MIN) num = INT_MIN + 1;
    div_t d = call_div(num, den);
    if (d.quot != num / den || d.rem != num % den)
        wrong(t, "what=div(%d,%d) got=%d,%d want=%d,%d", num, den, d.quot, d.rem, num / den, num % den);
    int ab = call_abs(num);
    if (ab != (num < 0 ? -num : num)) wrong(t, "what=abs(%d) got=%d", num, ab);

    /* rand_r against the reimplementation, seed included. */
    unsigned s1 = (unsigned)r, s2 = (unsigned)r;
    int x1 = call_rand_r(&s1), x2 = my_rand_r(&s2);
    if (x1 != x2 || s1 != s2) wrong(t, "what=rand_r(%u) got=%d,%u want=%d,%u", (unsigned)r, x1, s1, x2, s2);

    /* malloc, realloc (grow, shrink), free; the slot's old block is
     * checked before it is freed (free(NULL) the first time). */
    struct slot *sl = &slots[r % SLOTS];
    if (sl->p) verify(t, "slot", sl->p, sl->n, sl->seed);
    uint64_t seed = next(rng);
    size_t n = 1 + seed % 400;
    unsigned char *p = call_malloc(n);
    if (!p || (uintptr_t)p % 16) wrong(t, "what=malloc(%zu) got=%p", n, (void *)p);
    fill(p, 0, n, seed);
    size_t grown = n + 1 + (seed >> 20) % 600;
    unsigned char *q = call_realloc(p, grown);
    if (!q || (uintptr_t)q % 16) wrong(t, "what=realloc(%zu->%zu) got=%p", n, grown, (void *)q);
    verify(t, "realloc-grow", q, n, seed);
    fill(q, n, grown, seed);
    size_t shrunk = grown / 2 + 1;
    p = call_realloc(q, shrunk);
    if (!p) wrong(t, "what=realloc(%zu->%zu) got=NULL", grown, shrunk);
    verify(t, "realloc-shrink", p, shrunk, seed);
    call_free(sl->p);
    sl->p = p;
    sl->n = shrunk;
    sl->seed = seed;
    unsigned char *tmp = call_malloc(24);
    if (!tmp) wrong(t, "what=malloc(24) got=NULL");
    memset(tmp, 0x5a, 24);
    call_free(tmp);

    atomic_fetch_add_explicit(&counters[t].plain, PLAIN_PER_ROUND, memory_order_relaxed);
    atomic_fetch_add_explicit(&counters[t].alloc, ALLOC_PER_ROUND, memory_order_relaxed);
    atomic_fetch_add_explicit(&counters[t].rounds, 1, memory_order_relaxed);
}

static void tight_round(int t, uint64_t *rng)
{
    for (int i = 0; i < TIGHT_CALLS; i++) {
        uint64_t r = next(rng);
        int num = (int)(uint32_t)r, den = (int)((r >> 32) % 199) - 99;
        if (den == 0) den = 3;
        if (num == INT_MIN) num = 0;
        div_t d = call_div(num, den);
        if (d.quot != num / den || d.rem != num % den)
            wrong(t, "what=div(%d,%d) got=%d,%d want=%d,%d", num, den, d.quot, d.rem, num / den, num % den);
        int ab = call_abs(num);
        if (ab != (num < 0 ? -num : num)) wrong(t, "what=abs(%d) got=%d", num, ab);
    }
    atomic_fetch_add_explicit(&counters[t].plain, TIGHT_PER_ROUND, memory_order_relaxed);
    atomic_fetch_add_explicit(&counters[t].rounds, 1, memory_order_relaxed);
}

static void *worker(void *arg)
{
    int t = (int)(intptr_t)arg;
    uint64_t rng = 0x9e3779b97f4a7c15ULL * (uint64_t)(t + 1);
    struct slot slots[SLOTS] = {0};
    tids[t] = syscall(SYS_gettid);
    atomic_fetch_add(&started, 1);
    if (t < TIGHT)
        for (;;) tight_round(t, &rng);
    for (;;) one_round(t, &rng, slots);
    return NULL;
}

int main(int argc, char **argv)
{
    workers = argc > 1 ? atoi(argv[1]) : 8;
    if (workers <= TIGHT || workers >= MAX_THREADS) {
        fprintf(stderr, "usage: libc_hammer WORKERS (%d..%d)\n", TIGHT + 1, MAX_THREADS - 1);
        return 2;
    }
    for (int i = 0; i < TABLE; i++) table[i] = 3 * i + 1;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int t = 0; t < workers; t++) {
        pthread_t th;
        if (pthread_create(&th, NULL, worker, (void *)(intptr_t)t) != 0) {
            perror("pthread_create");
            return 2;
        }
    }
    while (atomic_load(&started) < workers) usleep(1000);
    char tid_list[MAX_THREADS * 21 + 1];
    size_t at = 0;
    for (int t = 0; t < workers; t++) at += (size_t)snprintf(tid_list + at, sizeof tid_list - at, "%s%ld", t ? "," : "", tids[t]);
    printf("ready threads=%d tids=%s tight=%d atoi=%p bsearch=%p div=%p rand_r=%p realloc=%p abs=%p malloc=%p free=%p strtol=%p\n",
           workers, tid_list, TIGHT, (void *)call_atoi, (void *)call_bsearch, (void *)call_div, (void *)call_rand_r,
           (void *)call_realloc, (void *)call_abs, (void *)call_malloc, (void *)call_free, (void *)call_strtol);

    uint64_t rng = 0x2545f4914f6cdd1dULL;
    struct slot slots[SLOTS] = {0};
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "stats", 5) == 0) {
            one_round(workers, &rng, slots);
            unsigned long rounds = 0, plain = 0, alloc = 0;
            char per[MAX_THREADS * 21 + 1];
            size_t used = 0;
            for (int t = 0; t <= workers; t++) {
                unsigned long r = atomic_load_explicit(&counters[t].rounds, memory_order_relaxed);
                rounds += r;
                plain += atomic_load_explicit(&counters[t].plain, memory_order_relaxed);
                alloc += atomic_load_explicit(&counters[t].alloc, memory_order_relaxed);
                if (t < workers) used += (size_t)snprintf(per + used, sizeof per - used, "%s%lu", t ? "," : "", r);
            }
            printf("stats rounds=%lu plain=%lu alloc=%lu per=%s\n", rounds, plain, alloc, per);
        } else if (strncmp(line, "quit", 4) == 0) {
            fflush(stdout);
            _exit(0);
        }
    }
    return 0;
}
