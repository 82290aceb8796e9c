/* The patch of the overhead target: patched() gets an equal replacement. */
#include "hotpatch.h"

HOTPATCH_TARGET("overhead", "");

long patched_v2(long x)
{
    return x * 3 + 1;
}
HOTPATCH_REPLACE(patched, patched_v2);
