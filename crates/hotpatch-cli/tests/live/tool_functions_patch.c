/* A pass-through patch of every C library function hotpatch calls inside
 * a target: refused before anything touches the target. */
#include <dlfcn.h>
#include "hotpatch.h"

HOTPATCH_TARGET("libc.so.6", "");

HOTPATCH_ORIGINAL(void *, dlopen, (const char *, int));
HOTPATCH_ORIGINAL(void *, dlsym, (void *, const char *));
HOTPATCH_ORIGINAL(char *, dlerror, (void));
HOTPATCH_ORIGINAL(int, dlclose, (void *));
HOTPATCH_ORIGINAL(int *, __errno_location, (void));

void *pt_dlopen(const char *p, int f) { return orig_dlopen(p, f); }
void *pt_dlsym(void *h, const char *n) { return orig_dlsym(h, n); }
char *pt_dlerror(void) { return orig_dlerror(); }
int pt_dlclose(void *h) { return orig_dlclose(h); }
int *pt_errno(void) { return orig___errno_location(); }

HOTPATCH_REPLACE(dlopen, pt_dlopen);
HOTPATCH_REPLACE(dlsym, pt_dlsym);
HOTPATCH_REPLACE(dlerror, pt_dlerror);
HOTPATCH_REPLACE(dlclose, pt_dlclose);
HOTPATCH_REPLACE(__errno_location, pt_errno);
