/* Patch of the rel64 target, standing in for what `hotpatch build` makes:
 * the target's static `counter` and static `helper` are reached through
 * 8-byte sites that the engine fills with `symbol + addend - anchor`.
 * (The builder's sites are in code, inside `movabs` instructions, with the
 * patch's GOT as base; plain C can only make data sites.)
 *
 * The counter's record carries an addend, as a compiler's S@GOTOFF+A
 * constant for a field at an offset does: the site holds
 * &counter - 0x40 - anchor, so the code adds 0x40 back. An engine that
 * forgot the addend, or the base, would make work_fixed miss the counter. */
#include "hotpatch.h"

long site_counter, site_helper;

void *anchor(void) { return 0; }

HOTPATCH_REL64(counter, site_counter, -0x40, anchor);
HOTPATCH_REL64(helper, site_helper, 0, anchor);

/* A `ref` with an addend (for tools too): &counter + 8. */
long *counter_plus_8;
HOTPATCH__RECORD("ref counter counter_plus_8 8");

int work_fixed(int x)
{
    long *counter = (long *)((char *)anchor + site_counter + 0x40);
    int (*helper)(int) = (int (*)(int))((char *)anchor + site_helper);
    __atomic_fetch_add(counter, 1L << 32, __ATOMIC_RELAXED);
    return 2 * helper(x);
}
HOTPATCH_REPLACE(work, work_fixed);
