/*
 * The fix for fee-server's compute_fee(), applied live by `hotpatch demo`:
 *   gcc -O2 -shared -fPIC -I include -o fix.so examples/server/fix.c
 *   hotpatch apply PID fix.so
 *
 * It charges large amounts their fee, calls the original for everything
 * else (the original stays callable while patched), and counts how many
 * requests it fixed in the server's own `requests_served` neighbourhood:
 * the patch reads the server's global counter and a static variable.
 */
#include "hotpatch.h"

HOTPATCH_TARGET("fee-server", "");

/* The server's state, found by name (one exported, one static). */
HOTPATCH_POINTER(long, requests_served);
HOTPATCH_POINTER(long, fees_charged);

/* The original compute_fee, callable from the fix. */
HOTPATCH_ORIGINAL(long, compute_fee, (long));

long compute_fee_fixed(long amount)
{
    if (amount >= 1000000)
        return amount / 100;
    return orig_compute_fee(amount);
}
HOTPATCH_REPLACE(compute_fee, compute_fee_fixed);
