/*
 * Target for the detour tests: unprepared functions (no padding) whose
 * first bytes threads are often, or always, inside.
 *
 *   spin(x)   five 1-byte nops, then x + 1: SPINNERS threads call it in a
 *             tight loop, so a stop often finds one strictly inside the 5
 *             bytes a detour overwrites.
 *   parked(f) push rbx; call *f; ...: the parked thread calls it with a
 *             callee that blocks, so its return address (parked+3) sits on
 *             its stack, inside the bytes a detour would overwrite, until
 *             "release". After that it calls parked(quick) in a loop.
 *   tiny      3 bytes: too small for a detour.
 *   loopy     a loop branches back to its second instruction.
 *   jrcxz_first  starts with jrcxz, which has no relocatable form.
 *
 * Prints "ready spin=ADDR parked=ADDR tiny=ADDR loopy=ADDR jrcxz=ADDR",
 * then reads commands from stdin, one per line (exits on EOF):
 *   stats    "stats spin_old=.. spin_new=.. parked_old=.. parked_new=.. bad=.."
 *   reset    zero the counters, answers "reset"
 *   release  the parked thread returns and loops; answers "released"
 *   call     "call tiny=.. loopy=.. jrcxz=.." (each with argument 5)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define SPINNERS 3

extern long spin(long);
extern long parked(long (*)(void));
extern long tiny(long);
extern long loopy(long);
extern long jrcxz_first(long);

__asm__(".text\n"
        ".globl spin\n.type spin,@function\n"
        "spin:\n nop\n nop\n nop\n nop\n nop\n lea 1(%rdi), %rax\n ret\n"
        ".size spin, .-spin\n"
        ".globl parked\n.type parked,@function\n"
        "parked:\n push %rbx\n call *%rdi\n nopl 0(%rax)\n pop %rbx\n ret\n"
        ".size parked, .-parked\n"
        ".globl tiny\n.type tiny,@function\n"
        "tiny:\n xor %eax, %eax\n ret\n"
        ".size tiny, .-tiny\n"
        ".globl loopy\n.type loopy,@function\n"
        "loopy:\n xor %eax, %eax\n1:\n inc %eax\n cmp %edi, %eax\n jl 1b\n ret\n"
        ".size loopy, .-loopy\n"
        ".globl jrcxz_first\n.type jrcxz_first,@function\n"
        "jrcxz_first:\n mov %rdi, %rcx\n jrcxz 1f\n lea 2(%rdi), %rax\n ret\n1:\n xor %eax, %eax\n ret\n"
        ".size jrcxz_first, .-jrcxz_first\n");

static atomic_long spin_old, spin_new, parked_old, parked_new, bad;
static atomic_int released;
static int fds[2];

static void *spinner(void *arg)
{
    long x = (long)arg * 1000003;
    for (;;) {
        x++;
        long r = spin(x);
        if (r == x + 1)
            atomic_fetch_add_explicit(&spin_old, 1, memory_order_relaxed);
        else if (r == x + 2)
            atomic_fetch_add_explicit(&spin_new, 1, memory_order_relaxed);
        else
            atomic_fetch_add(&bad, 1);
    }
    return 0;
}

static long block(void)
{
    char c;
    while (read(fds[0], &c, 1) != 1) {
    }
    return 7;
}

static long quick(void) { return 7; }

static void count_parked(long r)
{
    if (r == 7)
        atomic_fetch_add_explicit(&parked_old, 1, memory_order_relaxed);
    else if (r == 1007)
        atomic_fetch_add_explicit(&parked_new, 1, memory_order_relaxed);
    else
        atomic_fetch_add(&bad, 1);
}

static void *parker(void *arg)
{
    (void)arg;
    count_parked(parked(block));
    atomic_store(&released, 1);
    for (;;) {
        count_parked(parked(quick));
        usleep(100);
    }
    return 0;
}

int main(void)
{
    setvbuf(stdout, 0, _IOLBF, 0);
    if (pipe(fds) != 0)
        return 1;
    pthread_t t;
    for (long i = 0; i < SPINNERS; i++)
        pthread_create(&t, 0, spinner, (void *)i);
    pthread_create(&t, 0, parker, 0);
    usleep(20000);
    printf("ready spin=%p parked=%p tiny=%p loopy=%p jrcxz=%p\n", (void *)spin, (void *)parked,
           (void *)tiny, (void *)loopy, (void *)jrcxz_first);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "stats", 5)) {
            printf("stats spin_old=%ld spin_new=%ld parked_old=%ld parked_new=%ld bad=%ld\n",
                   atomic_load(&spin_old), atomic_load(&spin_new), atomic_load(&parked_old),
                   atomic_load(&parked_new), atomic_load(&bad));
        } else if (!strncmp(line, "reset", 5)) {
            atomic_store(&spin_old, 0);
            atomic_store(&spin_new, 0);
            atomic_store(&parked_old, 0);
            atomic_store(&parked_new, 0);
            printf("reset\n");
        } else if (!strncmp(line, "release", 7)) {
            if (write(fds[1], "x", 1) != 1)
                return 1;
            while (!atomic_load(&released))
                usleep(100);
            printf("released\n");
        } else if (!strncmp(line, "call", 4)) {
            printf("call tiny=%ld loopy=%ld jrcxz=%ld\n", tiny(5), loopy(5), jrcxz_first(5));
        }
    }
    return 0;
}
