/* Patch of the rel64 target, standing in for what `hotpatch build` makes:
 * the target's static `counter` and static `helper` are reached through
 * 8-byte sites that the engine fills with `symbol + addend - base`.
 *
 * Two data sites (site_counter, site_helper, base anchor), and one site in
 * code as the builder makes them: the immediate of a `movabs` in
 * counter_offset(), base the patch's GOT (__hotpatch_got, exported with
 * -Wl,--defsym,__hotpatch_got=ADDR(.got.plt)).
 *
 * The counter's records carry an addend, as a compiler's S@GOTOFF+A
 * constant for a field at an offset does: the sites hold
 * &counter - 0x40 - base, so the code adds 0x40 back. An engine that
 * forgot the addend, or the base, would make work_fixed miss the counter;
 * if the two routes to the counter disagree, work_fixed returns -1, which
 * the target counts as bad. */
#include "hotpatch.h"

long site_counter, site_helper;

void *anchor(void) { return 0; }

HOTPATCH_REL64(counter, site_counter, -0x40, anchor);
HOTPATCH_REL64(helper, site_helper, 0, anchor);

/* long counter_offset(void) { return <site_text>; }: movabs rax, imm64. */
__asm__(".text\n"
        ".globl counter_offset\n"
        ".type counter_offset, @function\n"
        "counter_offset:\n"
        "  .byte 0x48, 0xb8\n"
        ".globl site_text\n"
        ".type site_text, @object\n"
        ".size site_text, 8\n"
        "site_text: .quad 0\n"
        "  ret\n"
        ".size counter_offset, . - counter_offset\n");
long counter_offset(void);
extern char __hotpatch_got[];
HOTPATCH_REL64(counter, site_text, -0x40, __hotpatch_got);

/* A `ref` with an addend (for tools too): &counter + 8. */
long *counter_plus_8;
HOTPATCH__RECORD("ref counter counter_plus_8 8");

int work_fixed(int x)
{
    long *counter = (long *)((char *)anchor + site_counter + 0x40);
    int (*helper)(int) = (int (*)(int))((char *)anchor + site_helper);
    long *from_code = (long *)(__hotpatch_got + counter_offset() + 0x40);
    if (from_code != counter)
        return -1;
    __atomic_fetch_add(from_code, 1L << 32, __ATOMIC_RELAXED);
    return 2 * helper(x);
}
HOTPATCH_REPLACE(work, work_fixed);
