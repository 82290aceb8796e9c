/* The bundled project of the `hotpatch build` tests: a counter with static
 * state, a static function inlined into its caller and one that is not. */
#include <pthread.h>
#include <stdlib.h>
#include "counter.h"
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static long total;
static long calls;
static const char *label = "total";

static int scale(int x)
{
    return x * 2;
}

/* Not inlined: a fix to it replaces it by its own name. */
static __attribute__((noinline)) long weigh(long x)
{
    static long weighed;
    weighed++;
    return x + (weighed < 0);
}

long add(int x)
{
    pthread_mutex_lock(&lock);
    calls++;
    long v = weigh(scale(x));
    total += v;
    pthread_mutex_unlock(&lock);
    return v;
}

long total_now(void)
{
    pthread_mutex_lock(&lock);
    long t = total;
    pthread_mutex_unlock(&lock);
    return t + (label[0] == 't' ? 0 : 1);
}

/* What a function swap cannot change, for the refusal tests. */
static __thread long per_thread;
static long started;

__attribute__((constructor)) static void start(void)
{
    started = 1;
}

long per_thread_add(void)
{
    return ++per_thread + started;
}

long zero(void)
{
    return 0;
}

/* A type the refusal tests change: objects of it live on the heap. */
struct stats {
    long adds;
    long last;
};
static struct stats *stats;

long note(long x)
{
    if (!stats)
        stats = calloc(1, sizeof *stats);
    if (!stats)
        return -1;
    stats->adds++;
    stats->last = x;
    return stats->adds;
}
