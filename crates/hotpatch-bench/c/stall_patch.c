/* The patch of the stall target: work() gets an equivalent replacement. */
#include "hotpatch.h"

HOTPATCH_TARGET("stall", "");

long work_v2(long x)
{
    return x * 3 + 1;
}
HOTPATCH_REPLACE(work, work_v2);
