/* A small shared library several programs link: `fee` is what the
 * host-wide tests patch. VARIANT makes another build of it (another
 * build-id, same name). */
#ifndef VARIANT
#define VARIANT 1
#endif
int fee(int x) { return x * 3 + VARIANT; }
