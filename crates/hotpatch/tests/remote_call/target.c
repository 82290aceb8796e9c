// Target for tests/remote_call.rs. Threads:
//  - "busy" workers: call compute() in a loop, check the result against a
//    second computation in AVX-512 registers, count errors;
//  - a reader blocked in read(0) (the test's pipe);
//  - a sleeper in nanosleep(1.5 s), reporting how long each sleep took;
//  - a waiter in pthread_cond_wait (futex), woken on SIGUSR1;
//  - an epoll_wait waiter on an eventfd, woken on SIGUSR1 (retries EINTR);
//  - main: sigwait(SIGUSR1) then signals the cond and the eventfd.
// With argument "busy", only busy workers run (main too): a remote call
// must then interrupt a running thread.
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BUSY 3

volatile int plugin_flag; // set by the test plugin's constructor
volatile long busy_errors;
volatile long busy_iters[BUSY + 1];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int cond_flag;
static int efd;

__attribute__((noinline)) uint64_t compute(uint64_t x) {
    __asm__ volatile("" : "+r"(x));
    return x * 0x9E3779B97F4A7C15ull + (x >> 7);
}

typedef double v8d __attribute__((vector_size(64)));

static void say_tid(const char *what) {
    printf("tid %s %ld\n", what, (long)syscall(SYS_gettid));
    fflush(stdout);
}

static void *busy(void *arg) {
    long k = (long)arg;
    say_tid("busy");
    v8d acc = {0, 1, 2, 3, 4, 5, 6, 7};
    const v8d one = {1, 1, 1, 1, 1, 1, 1, 1};
    for (uint64_t i = 1;; i++) {
        uint64_t want = i * 0x9E3779B97F4A7C15ull + (i >> 7);
        int e = errno;
        if (compute(i) != want) busy_errors++;
        acc += one;
        // acc[j] == j + i, exactly, in zmm registers across iterations.
        for (int j = 0; j < 8; j++)
            if (acc[j] != (double)(j + (int64_t)((i - 1) % (1 << 20)) + 1)) busy_errors++;
        if (errno != e) busy_errors++;
        if (i % (1 << 20) == 0) acc -= (v8d){1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20};
        busy_iters[k]++;
    }
    return NULL;
}

static void *reader(void *arg) {
    (void)arg;
    say_tid("reader");
    char buf[64];
    ssize_t n;
    do n = read(0, buf, sizeof buf - 1);
    while (n < 0 && errno == EINTR);
    if (n < 0) n = 0;
    buf[n] = 0;
    printf("pipe-read %zd %s\n", n, buf);
    fflush(stdout);
    return NULL;
}

static void *sleeper(void *arg) {
    (void)arg;
    say_tid("sleeper");
    for (;;) {
        struct timespec a, b, req = {1, 500000000};
        clock_gettime(CLOCK_MONOTONIC, &a);
        int r = nanosleep(&req, NULL);
        int e = errno;
        clock_gettime(CLOCK_MONOTONIC, &b);
        long long ns = (b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec);
        printf("slept %lld r=%d errno=%d\n", ns, r, r ? e : 0);
        fflush(stdout);
    }
    return NULL;
}

static void *waiter(void *arg) {
    (void)arg;
    say_tid("waiter");
    pthread_mutex_lock(&mu);
    while (!cond_flag) pthread_cond_wait(&cond, &mu);
    pthread_mutex_unlock(&mu);
    printf("cond-woke\n");
    fflush(stdout);
    return NULL;
}

static void *poller(void *arg) {
    (void)arg;
    say_tid("poller");
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = efd}, out;
    epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev);
    int eintr = 0, n;
    for (;;) {
        n = epoll_wait(ep, &out, 1, -1);
        if (n < 0 && errno == EINTR) {
            eintr++;
            continue;
        }
        break;
    }
    printf("epoll-woke n=%d eintr=%d\n", n, eintr);
    fflush(stdout);
    return NULL;
}

int main(int argc, char **argv) {
    int busy_only = argc > 1 && strcmp(argv[1], "busy") == 0;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    efd = eventfd(0, 0);
    pthread_t t;
    for (long k = 0; k < BUSY; k++) pthread_create(&t, NULL, busy, (void *)k);
    if (!busy_only) {
        pthread_create(&t, NULL, reader, NULL);
        pthread_create(&t, NULL, sleeper, NULL);
        pthread_create(&t, NULL, waiter, NULL);
        pthread_create(&t, NULL, poller, NULL);
    }
    printf("ready pid=%d flag=%p errors=%p iters=%p compute=%p\n", getpid(), (void *)&plugin_flag,
           (void *)&busy_errors, (void *)busy_iters, (void *)compute);
    fflush(stdout);
    if (busy_only) busy((void *)(long)BUSY);
    say_tid("main");
    int sig;
    while (sigwait(&set, &sig) != 0) {
    }
    pthread_mutex_lock(&mu);
    cond_flag = 1;
    pthread_cond_signal(&cond);
    pthread_mutex_unlock(&mu);
    uint64_t one = 1;
    if (write(efd, &one, sizeof one) != sizeof one) return 1;
    printf("signalled\n");
    fflush(stdout);
    for (;;) pause();
}
