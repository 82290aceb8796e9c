/*
 * The second patch of the stall target: work_unprep(), built without
 * padding, gets an equivalent replacement through a detour.
 */
#include "hotpatch.h"

HOTPATCH_TARGET("stall", "");

long work_unprep_v2(long x)
{
    return (x ^ (x >> 7)) + 3;
}
HOTPATCH_REPLACE(work_unprep, work_unprep_v2);
