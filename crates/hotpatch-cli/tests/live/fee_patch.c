/* The fix of libfee.so's fee: 5x + 2. BUILD_ID is the build-id of the
 * library it was made for (given on the compiler's command line). */
#include "hotpatch.h"

HOTPATCH_TARGET("libfee.so", BUILD_ID);
int fee_fixed(int x) { return x * 5 + 2; }
HOTPATCH_REPLACE(fee, fee_fixed);
