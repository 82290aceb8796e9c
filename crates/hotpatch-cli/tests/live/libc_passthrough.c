/*
 * Pass-through patch of libc functions that no code of libc calls
 * directly (`hotpatch check` shows no direct calls): each replacement
 * counts the call and runs the original through its trampoline
 * (HOTPATCH_ORIGINAL), so the program sees libc's own results.
 * live_libc.rs reads `passthrough_calls` out of the process.
 */
#include <stddef.h>
#include <stdlib.h>
#include "hotpatch.h"

HOTPATCH_TARGET("libc.so.6", "");

__attribute__((visibility("default"))) long passthrough_calls;
#define COUNT() __atomic_fetch_add(&passthrough_calls, 1, __ATOMIC_RELAXED)

typedef int (*cmp_fn)(const void *, const void *);
HOTPATCH_ORIGINAL(int, atoi, (const char *));
HOTPATCH_ORIGINAL(void *, bsearch, (const void *, const void *, size_t, size_t, cmp_fn));
HOTPATCH_ORIGINAL(div_t, div, (int, int));
HOTPATCH_ORIGINAL(int, rand_r, (unsigned *));
HOTPATCH_ORIGINAL(void *, realloc, (void *, size_t));
HOTPATCH_ORIGINAL(int, abs, (int));

int pt_atoi(const char *s)
{
    COUNT();
    return orig_atoi(s);
}
HOTPATCH_REPLACE(atoi, pt_atoi);

void *pt_bsearch(const void *key, const void *base, size_t n, size_t size, cmp_fn cmp)
{
    COUNT();
    return orig_bsearch(key, base, n, size, cmp);
}
HOTPATCH_REPLACE(bsearch, pt_bsearch);

div_t pt_div(int num, int den)
{
    COUNT();
    return orig_div(num, den);
}
HOTPATCH_REPLACE(div, pt_div);

int pt_rand_r(unsigned *seed)
{
    COUNT();
    return orig_rand_r(seed);
}
HOTPATCH_REPLACE(rand_r, pt_rand_r);

void *pt_realloc(void *p, size_t n)
{
    COUNT();
    return orig_realloc(p, n);
}
HOTPATCH_REPLACE(realloc, pt_realloc);

int pt_abs(int x)
{
    COUNT();
    return orig_abs(x);
}
HOTPATCH_REPLACE(abs, pt_abs);
