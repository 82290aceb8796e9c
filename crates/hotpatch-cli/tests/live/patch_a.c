/* Patch A of target.c: f(x) = 5x + 2, g(x) = x ^ 0x1234. */
#include "hotpatch.h"

long f_a(long x) { return x * 5 + 2; }
long g_a(long x) { return x ^ 0x1234; }
HOTPATCH_REPLACE(f, f_a);
HOTPATCH_REPLACE(g, g_a);
