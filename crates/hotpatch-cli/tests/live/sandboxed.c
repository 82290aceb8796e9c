/*
 * A target that restricts itself the way sandboxed servers do, for the
 * preflight tests. f() is the function patch A replaces (f(x) = 3x + 1,
 * patched 5x + 2).
 *
 * Usage: sandboxed MODE
 *   none            no restriction
 *   kill-mprotect   a seccomp filter on every thread: mprotect -> KILL_PROCESS
 *   kill-memfd      a filter on the helper thread only: memfd_create -> KILL_PROCESS
 *   errno-mprotect  mprotect -> ERRNO(EPERM)
 *   allow           a filter that allows everything
 *   deny-wx         mmap or mprotect asking for PROT_WRITE|PROT_EXEC -> KILL_PROCESS
 *                   (every other call allowed)
 *   mdwe            prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)
 *   leader-exit     the main thread exits; the helper thread reads stdin
 * A helper thread sleeps in pause(). Prints "ready f=ADDR" once set up,
 * then answers "call X" lines from stdin with "call X f=F(X)", and
 * "restrict" (a filter on every thread: memfd_create -> KILL_PROCESS) with
 * "restricted".
 */
#define _GNU_SOURCE
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef PR_SET_MDWE
#define PR_SET_MDWE 65
#define PR_MDWE_REFUSE_EXEC_GAIN 1
#endif

__attribute__((noinline, noipa)) long f(long x) { return x * 3 + 1; }

static const char *mode;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int helper_ready;

#define LOAD(field) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, field))

static void install(struct sock_filter *code, unsigned short len, unsigned flags)
{
    struct sock_fprog prog = {len, code};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog) != 0) {
        perror("seccomp");
        exit(2);
    }
}

/* nr -> action, everything else allowed. */
static void one(int nr, unsigned action, unsigned flags)
{
    struct sock_filter code[] = {
        LOAD(arch),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        LOAD(nr),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, action),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    install(code, sizeof code / sizeof code[0], flags);
}

static void restrict_self(int helper)
{
    if (strcmp(mode, "kill-mprotect") == 0 && !helper)
        one(SYS_mprotect, SECCOMP_RET_KILL_PROCESS, SECCOMP_FILTER_FLAG_TSYNC);
    else if (strcmp(mode, "kill-memfd") == 0 && helper)
        one(SYS_memfd_create, SECCOMP_RET_KILL_PROCESS, 0);
    else if (strcmp(mode, "errno-mprotect") == 0 && !helper)
        one(SYS_mprotect, SECCOMP_RET_ERRNO | 1, SECCOMP_FILTER_FLAG_TSYNC);
    else if (strcmp(mode, "allow") == 0 && !helper) {
        struct sock_filter code[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
        install(code, 1, SECCOMP_FILTER_FLAG_TSYNC);
    } else if (strcmp(mode, "deny-wx") == 0 && !helper) {
        struct sock_filter code[] = {
            LOAD(nr),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mprotect, 1, 0),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mmap, 0, 4),
            LOAD(args[2]),
            BPF_STMT(BPF_ALU | BPF_AND | BPF_K, 6),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 6, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        install(code, sizeof code / sizeof code[0], SECCOMP_FILTER_FLAG_TSYNC);
    } else if (strcmp(mode, "mdwe") == 0 && !helper) {
        if (prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0) {
            perror("PR_SET_MDWE");
            exit(2);
        }
    }
}

static void serve(void)
{
    char line[128];
    printf("ready f=%p\n", (void *)f);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long x;
        if (sscanf(line, "call %ld", &x) == 1) {
            printf("call %ld f=%ld\n", x, f(x));
            fflush(stdout);
        } else if (strcmp(line, "restrict\n") == 0) {
            one(SYS_memfd_create, SECCOMP_RET_KILL_PROCESS, SECCOMP_FILTER_FLAG_TSYNC);
            printf("restricted\n");
            fflush(stdout);
        }
    }
    exit(0);
}

static void *helper(void *arg)
{
    (void)arg;
    restrict_self(1);
    pthread_mutex_lock(&lock);
    helper_ready = 1;
    pthread_cond_signal(&cond);
    pthread_mutex_unlock(&lock);
    if (strcmp(mode, "leader-exit") == 0)
        serve();
    for (;;)
        pause();
}

int main(int argc, char **argv)
{
    mode = argc > 1 ? argv[1] : "none";
    pthread_t t;
    if (pthread_create(&t, NULL, helper, NULL) != 0)
        return 2;
    pthread_mutex_lock(&lock);
    while (!helper_ready)
        pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    if (strcmp(mode, "leader-exit") == 0)
        pthread_exit(NULL);
    restrict_self(0);
    serve();
}
