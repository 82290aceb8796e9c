/* Patch of the statics target: reads and writes a.c's static `counter`
 * (named by file: b.c has one too), calls the static helper() and the
 * original compute(). compute(x) becomes (x + 1) * 1000 + helper(x), and
 * each call adds 10 to a.c:counter on top of the original's 1. */
#include "hotpatch.h"

__attribute__((visibility("default"))) int *a_counter_ptr;
HOTPATCH_REF_NAMED("statics_a.c:counter", a_counter_ptr);
HOTPATCH_FUNCTION(long, helper, (long));
HOTPATCH_ORIGINAL(long, compute, (long));

long compute_patched(long x)
{
    *a_counter_ptr += 10;
    return orig_compute(x) * 1000 + call_helper(x);
}
HOTPATCH_REPLACE(compute, compute_patched);
