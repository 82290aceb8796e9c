/*
 * fee-server: a small multi-threaded TCP service on loopback, the example
 * target of `hotpatch demo`.
 *
 * Protocol: one request per line, "FEE <amount-in-cents>\n"; the answer is
 * "<fee-in-cents>\n". The fee is 1% of the amount, at least 1 cent.
 * "STATS\n" answers "served <n> worst_late_us <us>": requests served, and
 * the worst lateness of a ticker thread that wakes every millisecond on
 * absolute deadlines (how much the server's threads were held up).
 * "RESET\n" zeroes the worst lateness and answers "ok".
 *
 * The bug: compute_fee() forgets the fee for amounts of 1,000,000 cents
 * and more (a truncation in a "large amount" branch). The fix lives in
 * fix.c and is applied to the running server.
 *
 * Usage: fee-server [PORT [THREADS]]   (PORT 0 picks a free port)
 * Prints "listening on PORT" once ready. Build with
 *   -fpatchable-function-entry=8,6 so every function is prepared.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Counters a patch may read: requests served and fees charged. */
long requests_served;
static long fees_charged;

__attribute__((noinline)) long compute_fee(long amount)
{
    if (amount <= 0)
        return 0;
    if (amount >= 1000000)
        return (amount / 100) * 0; /* BUG: large amounts pay no fee */
    long fee = amount / 100;
    return fee > 0 ? fee : 1;
}

static __attribute__((noinline)) void account(long fee)
{
    __atomic_add_fetch(&requests_served, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&fees_charged, fee, __ATOMIC_RELAXED);
}

static long worst_late_ns;

static long ns_of(const struct timespec *t)
{
    return t->tv_sec * 1000000000L + t->tv_nsec;
}

/* Wakes every millisecond on an absolute deadline; records the lateness. */
static void *ticker(void *arg)
{
    (void)arg;
    struct timespec next, now;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        next.tv_nsec += 1000000;
        if (next.tv_nsec >= 1000000000) {
            next.tv_nsec -= 1000000000;
            next.tv_sec++;
        }
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
            ;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long late = ns_of(&now) - ns_of(&next);
        long seen = __atomic_load_n(&worst_late_ns, __ATOMIC_RELAXED);
        while (late > seen &&
               !__atomic_compare_exchange_n(&worst_late_ns, &seen, late, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            ;
    }
    return NULL;
}

static void serve(int fd)
{
    char buf[4096];
    size_t used = 0;
    for (;;) {
        ssize_t n = read(fd, buf + used, sizeof buf - 1 - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        used += (size_t)n;
        buf[used] = 0;
        char *line = buf, *nl;
        while ((nl = strchr(line, '\n')) != NULL) {
            *nl = 0;
            char out[64];
            int len;
            long amount;
            if (sscanf(line, "FEE %ld", &amount) == 1) {
                long fee = compute_fee(amount);
                account(fee);
                len = snprintf(out, sizeof out, "%ld\n", fee);
            } else if (strcmp(line, "STATS") == 0) {
                len = snprintf(out, sizeof out, "served %ld worst_late_us %ld\n",
                               __atomic_load_n(&requests_served, __ATOMIC_RELAXED),
                               __atomic_load_n(&worst_late_ns, __ATOMIC_RELAXED) / 1000);
            } else if (strcmp(line, "RESET") == 0) {
                __atomic_store_n(&worst_late_ns, 0, __ATOMIC_RELAXED);
                len = snprintf(out, sizeof out, "ok\n");
            } else {
                len = snprintf(out, sizeof out, "ERR\n");
            }
            for (int off = 0; off < len;) {
                ssize_t w = write(fd, out + off, (size_t)(len - off));
                if (w < 0 && errno == EINTR)
                    continue;
                if (w <= 0)
                    return;
                off += (int)w;
            }
            line = nl + 1;
        }
        used = strlen(line);
        memmove(buf, line, used);
        if (used == sizeof buf - 1)
            used = 0; /* overlong line: drop it */
    }
}

static int listener;

static void *worker(void *arg)
{
    (void)arg;
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            perror("accept");
            return NULL;
        }
        serve(fd);
        close(fd);
    }
}

int main(int argc, char **argv)
{
    int port = argc > 1 ? atoi(argv[1]) : 0;
    int threads = argc > 2 ? atoi(argv[2]) : 4;
    signal(SIGPIPE, SIG_IGN);
    listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 128)) {
        perror("bind/listen");
        return 1;
    }
    socklen_t alen = sizeof addr;
    getsockname(listener, (struct sockaddr *)&addr, &alen);
    printf("listening on %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    pthread_t t;
    pthread_create(&t, NULL, ticker, NULL);
    for (int i = 0; i < threads; i++)
        pthread_create(&t, NULL, worker, NULL);
    for (;;)
        pause();
}
