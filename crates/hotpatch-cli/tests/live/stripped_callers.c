/* Callers no symbol covers: `hot` is exported (-rdynamic), the static
 * functions that call it lose their symbols to `strip`. `sneaky` is code
 * with no symbol even before stripping (a .L label) that jumps into the
 * first bytes of `target2`. Reads numbers from stdin, prints the sum of
 * the three callers' results (each calls `hot`) and target2(x). */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) long hot(long x) { return x * 3 + 1; }

static __attribute__((noinline)) long c1(long x) { return hot(x) + 1; }
static __attribute__((noinline)) long c2(long x) { return hot(x ^ 7) * 2; }
static __attribute__((noinline)) long c3(long x) { return hot(x + 11) - hot(x - 5); }

long target2(long x);
__asm__(".text\n"
        ".globl target2\n"
        ".type target2, @function\n"
        "target2:\n"
        "  push %rbp\n"
        "  mov %rsp, %rbp\n"
        "  lea 1(%rdi), %rax\n"
        "  pop %rbp\n"
        "  ret\n"
        ".size target2, .-target2\n"
        ".Lsneaky:\n"
        "  jmp target2+1\n");

static long (*volatile callers[])(long) = {c1, c2, c3};

int main(void) {
    char line[64];
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long x = atol(line), sum = 0;
        for (int i = 0; i < 3; i++)
            sum += callers[i](x);
        printf("%ld %ld\n", sum, target2(x));
        fflush(stdout);
    }
    return 0;
}
