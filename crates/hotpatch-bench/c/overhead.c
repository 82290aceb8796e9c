/*
 * overhead: the cost of one call, by kind of callee. Built with
 * -fpatchable-function-entry=8,6 (every function prepared) except
 * unprep() and detoured(), which opt out with the per-function attribute.
 *
 *   overhead serve PATCH.so     commands on stdin (answers end with "end"):
 *       time NAME N    "ns T": wall time of N calls in a dependent chain
 *       bytes          "bytes HEX": entry-6 .. entry+2 of patched()
 *       dbytes         "dbytes HEX": the 5 bytes at detoured()'s entry,
 *                      then, if they are a jmp rel32, "at HEX": the 6
 *                      bytes where it lands
 *   overhead count NAME N PATCH.so
 *       N calls of NAME in loop_NAME (for callgrind --toggle-collect or
 *       perf stat); NAME "patched" first patches patched() itself, with the
 *       byte layout hotpatch writes (slot, jmp [rip+slot], jmp -8); NAME
 *       "detoured" first detours detoured() itself as hotpatch does (jmp
 *       rel32 at the entry to a dispatcher jmp [rip+slot]).
 *
 * NAME: inline (body inlined, no call), unprep, prep (prepared, not
 * patched), patched, detoured (unprepared, patched), direct (the
 * replacement, called through the pointer dlsym gives), unprep_ptr (unprep
 * called through a pointer).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define BODY(x) ((x) * 3 + 1)

__attribute__((noinline, patchable_function_entry(0, 0))) long unprep(long x) { return BODY(x); }
__attribute__((noinline)) long prep(long x) { return BODY(x); }
__attribute__((noinline)) long patched(long x) { return BODY(x); }
/*
 * Unprepared, and detoured by the patch. noipa: its callers assume the full
 * ABI clobber set (no IPA register allocation across the call), so the
 * replacement is safe to call from here; the loop's code is the same as
 * loop_unprep's.
 */
__attribute__((noipa, patchable_function_entry(0, 0))) long detoured(long x) { return BODY(x); }

/*
 * For the self-detour of `count detoured`: the dispatcher hotpatch writes
 * near the image (jmp [rip+slot]), here in this program's own text.
 */
static void *detour_slot __attribute__((used));
__asm__(".text\n"
        "\t.p2align 3\n"
        "detour_dispatcher:\n"
        "\tjmp *detour_slot(%rip)\n");
extern const unsigned char detour_dispatcher[];

static long (*direct_ptr)(long);
static long (*detoured_v2_ptr)(long);
static long (*volatile unprep_ptr_v)(long) = unprep;
static void *self_slot;

#define LOOP(NAME, CALL)                                                      \
    __attribute__((noinline)) long loop_##NAME(long n)                        \
    {                                                                         \
        long s = 0;                                                           \
        for (long i = 0; i < n; i++)                                          \
            s = CALL(s ^ i);                                                  \
        return s;                                                             \
    }

static inline long inline_body(long x) { return BODY(x); }
LOOP(inline, inline_body)
LOOP(unprep, unprep)
LOOP(prep, prep)
LOOP(patched, patched)
LOOP(detoured, detoured)
__attribute__((noinline)) long loop_direct(long n)
{
    long (*f)(long) = direct_ptr;
    long s = 0;
    for (long i = 0; i < n; i++)
        s = f(s ^ i);
    return s;
}
__attribute__((noinline)) long loop_unprep_ptr(long n)
{
    long (*f)(long) = unprep_ptr_v;
    long s = 0;
    for (long i = 0; i < n; i++)
        s = f(s ^ i);
    return s;
}

static long (*loop_of(const char *name))(long)
{
    if (!strcmp(name, "inline")) return loop_inline;
    if (!strcmp(name, "unprep")) return loop_unprep;
    if (!strcmp(name, "prep")) return loop_prep;
    if (!strcmp(name, "patched")) return loop_patched;
    if (!strcmp(name, "detoured")) return loop_detoured;
    if (!strcmp(name, "direct")) return loop_direct;
    if (!strcmp(name, "unprep_ptr")) return loop_unprep_ptr;
    return NULL;
}

static int load_patch(const char *path)
{
    void *h = dlopen(path, RTLD_NOW);
    if (!h) {
        fprintf(stderr, "dlopen %s: %s\n", path, dlerror());
        return -1;
    }
    direct_ptr = (long (*)(long))dlsym(h, "patched_v2");
    if (!direct_ptr) {
        fprintf(stderr, "dlsym patched_v2: %s\n", dlerror());
        return -1;
    }
    detoured_v2_ptr = (long (*)(long))dlsym(h, "detoured_v2");
    if (!detoured_v2_ptr) {
        fprintf(stderr, "dlsym detoured_v2: %s\n", dlerror());
        return -1;
    }
    return 0;
}

/* Make [from, to) writable (1) or executable again (0). */
static int code_writable(void *from, void *to, int writable)
{
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t lo = (uintptr_t)from & ~(uintptr_t)(page - 1);
    uintptr_t hi = ((uintptr_t)to + page - 1) & ~(uintptr_t)(page - 1);
    return mprotect((void *)lo, hi - lo, PROT_READ | PROT_EXEC | (writable ? PROT_WRITE : 0));
}

/* What hotpatch does to an unprepared function, done to ourselves. */
static int self_detour(void)
{
    unsigned char *entry = (unsigned char *)detoured;
    if (detour_dispatcher[0] != 0xff || detour_dispatcher[1] != 0x25)
        return -1;
    detour_slot = (void *)detoured_v2_ptr;
    int64_t disp = (int64_t)((uintptr_t)detour_dispatcher - ((uintptr_t)entry + 5));
    if (disp != (int32_t)disp)
        return -1;
    if (code_writable(entry, entry + 5, 1))
        return -1;
    int32_t d = (int32_t)disp;
    entry[0] = 0xe9;
    memcpy(entry + 1, &d, 4);
    return code_writable(entry, entry + 5, 0);
}

/* What hotpatch does to a prepared function, done to ourselves. */
static int self_patch(void)
{
    unsigned char *entry = (unsigned char *)patched;
    unsigned char *pad = entry - 6;
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t lo = (uintptr_t)pad & ~(uintptr_t)(page - 1);
    uintptr_t hi = ((uintptr_t)entry + 2 + page - 1) & ~(uintptr_t)(page - 1);
    self_slot = (void *)direct_ptr;
    int64_t disp = (int64_t)((uintptr_t)&self_slot - (uintptr_t)entry);
    if (disp != (int32_t)disp)
        return -1;
    if (mprotect((void *)lo, hi - lo, PROT_READ | PROT_WRITE | PROT_EXEC))
        return -1;
    int32_t d = (int32_t)disp;
    pad[0] = 0xff;
    pad[1] = 0x25;
    memcpy(pad + 2, &d, 4);
    entry[0] = 0xeb;
    entry[1] = 0xf8;
    return mprotect((void *)lo, hi - lo, PROT_READ | PROT_EXEC);
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

volatile long sink;

int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], "serve")) {
        if (load_patch(argv[2]))
            return 1;
        printf("ready patched=%p\n", (void *)patched);
        fflush(stdout);
        char line[256], name[64];
        long n;
        while (fgets(line, sizeof line, stdin)) {
            if (sscanf(line, "time %63s %ld", name, &n) == 2) {
                long (*loop)(long) = loop_of(name);
                if (!loop) {
                    printf("error unknown function %s\n", name);
                } else {
                    int64_t t0 = now_ns();
                    sink = loop(n);
                    printf("ns %lld\n", (long long)(now_ns() - t0));
                }
            } else if (!strncmp(line, "bytes", 5)) {
                unsigned char *p = (unsigned char *)patched - 6;
                printf("bytes");
                for (int i = 0; i < 8; i++)
                    printf(" %02x", p[i]);
                printf("\n");
            } else if (!strncmp(line, "dbytes", 6)) {
                unsigned char *p = (unsigned char *)detoured;
                printf("dbytes");
                for (int i = 0; i < 5; i++)
                    printf(" %02x", p[i]);
                printf("\n");
                if (p[0] == 0xe9) {
                    int32_t d;
                    memcpy(&d, p + 1, 4);
                    unsigned char *to = p + 5 + d;
                    printf("at");
                    for (int i = 0; i < 6; i++)
                        printf(" %02x", to[i]);
                    printf("\n");
                }
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
    if (argc == 5 && !strcmp(argv[1], "count")) {
        long (*loop)(long) = loop_of(argv[2]);
        long n = atol(argv[3]);
        if (!loop || n < 0 || load_patch(argv[4]))
            return 2;
        if (!strcmp(argv[2], "patched") && self_patch()) {
            perror("self-patch");
            return 1;
        }
        if (!strcmp(argv[2], "detoured") && self_detour()) {
            perror("self-detour");
            return 1;
        }
        sink = loop(n);
        return 0;
    }
    fprintf(stderr, "usage: overhead serve PATCH.so | overhead count NAME N PATCH.so\n");
    return 2;
}
