/* Patch B of target.c: f(x) = 7x + 3, g(x) = x ^ 0x4321. */
#include "hotpatch.h"

long f_b(long x) { return x * 7 + 3; }
long g_b(long x) { return x ^ 0x4321; }
HOTPATCH_REPLACE(f, f_b);
HOTPATCH_REPLACE(g, g_b);
