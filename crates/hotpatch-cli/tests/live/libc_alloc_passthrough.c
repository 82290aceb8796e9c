/*
 * Pass-through patch of malloc, free and strtol, which code of libc calls
 * directly (call rel32): `hotpatch apply` refuses it unless given
 * --allow-direct-calls. Each replacement counts the call and runs the
 * original through its trampoline. live_libc.rs reads `alloc_calls` out
 * of the process.
 */
#include <stddef.h>
#include "hotpatch.h"

HOTPATCH_TARGET("libc.so.6", "");

__attribute__((visibility("default"))) long alloc_calls;
#define COUNT() __atomic_fetch_add(&alloc_calls, 1, __ATOMIC_RELAXED)

HOTPATCH_ORIGINAL(void *, malloc, (size_t));
HOTPATCH_ORIGINAL(void, free, (void *));
HOTPATCH_ORIGINAL(long, strtol, (const char *, char **, int));

void *pt_malloc(size_t n)
{
    COUNT();
    return orig_malloc(n);
}
HOTPATCH_REPLACE(malloc, pt_malloc);

void pt_free(void *p)
{
    COUNT();
    orig_free(p);
}
HOTPATCH_REPLACE(free, pt_free);

long pt_strtol(const char *s, char **end, int base)
{
    COUNT();
    return orig_strtol(s, end, base);
}
HOTPATCH_REPLACE(strtol, pt_strtol);
