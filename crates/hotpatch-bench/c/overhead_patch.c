/*
 * The patch of the overhead target: patched() (prepared) and detoured()
 * (unprepared: a detour) get equal replacements.
 */
#include "hotpatch.h"

HOTPATCH_TARGET("overhead", "");

long patched_v2(long x)
{
    return x * 3 + 1;
}
HOTPATCH_REPLACE(patched, patched_v2);

long detoured_v2(long x)
{
    return x * 3 + 1;
}
HOTPATCH_REPLACE(detoured, detoured_v2);
