/* rel64 target: a static counter and a static helper, used by work(), the
 * function patched, which worker threads call in a loop.
 *
 * work(x) adds 1 to counter and returns helper(x) = 3x + 1. The patch
 * (rel64_patch.c) reaches both statics through rel64 sites: it adds 1<<32
 * to counter and returns 2 * helper(x). So counter's high half counts
 * patched calls, its low half original ones.
 *
 * argv[1]: number of worker threads. Prints "ready"; then on stdin:
 *   "counter"  -> "counter patched=<high> original=<low> bad=<n>"
 *   "call X"   -> "call X r=<work(X)>"
 * A worker counts as bad any result that is neither version's. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static long counter;
static long bad;

static __attribute__((noinline, noclone, used)) int helper(int x)
{
    return 3 * x + 1;
}

__attribute__((noinline)) int work(int x)
{
    __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED);
    return helper(x);
}

static void *worker(void *arg)
{
    (void)arg;
    for (unsigned i = 0;; i++) {
        int x = (int)(i & 1023);
        int r = work(x);
        if (r != 3 * x + 1 && r != 2 * (3 * x + 1))
            __atomic_fetch_add(&bad, 1, __ATOMIC_RELAXED);
        /* Leave the cores some room. */
        if ((i & 255) == 0)
            sched_yield();
    }
    return NULL;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int workers = argc > 1 ? atoi(argv[1]) : 3;
    for (int i = 0; i < workers; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, NULL) != 0)
            return 1;
    }
    printf("ready workers=%d\n", workers);
    char line[128];
    int x;
    while (fgets(line, sizeof line, stdin)) {
        if (sscanf(line, "call %d", &x) == 1) {
            printf("call %d r=%d\n", x, work(x));
        } else if (line[0] == 'c') {
            unsigned long c = (unsigned long)__atomic_load_n(&counter, __ATOMIC_RELAXED);
            printf("counter patched=%lu original=%lu bad=%ld\n", c >> 32, c & 0xffffffffUL,
                   __atomic_load_n(&bad, __ATOMIC_RELAXED));
        }
    }
    return 0;
}
