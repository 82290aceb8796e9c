/*
 * A patch of the Debian package's redis-server (/usr/bin/redis-check-rdb,
 * stripped, built with -rdynamic and without padding: every function is
 * reached through a 5-byte detour). Redis calls `xxxCommand(client *c)`
 * through the function pointers of its command table; `client *` is
 * declared `void *` here. No HOTPATCH_TARGET: the main executable.
 *
 * - PING answers "+PATCHED-<TAG> <n>", n = the ECHO commands this patch
 *   has seen, through a pointer to the target's addReplyStatus.
 * - ECHO goes through a pass-through that counts the call and runs the
 *   original (its displaced instructions relocated into a trampoline).
 *
 * Build it with -DTAG=1, -DTAG=2... for patches that tell which one runs.
 */
#include "hotpatch.h"
#include <stdio.h>

#ifndef TAG
#define TAG 1
#endif

HOTPATCH_FUNCTION(void, addReplyStatus, (void *, const char *));
HOTPATCH_ORIGINAL(void, echoCommand, (void *));

/* Commands run on redis's main thread; atomic all the same. */
static unsigned long echoes;

void ping_patched(void *c) {
    char status[64];
    snprintf(status, sizeof status, "PATCHED-%d %lu", TAG, __atomic_load_n(&echoes, __ATOMIC_RELAXED));
    call_addReplyStatus(c, status);
}

void echo_counted(void *c) {
    __atomic_fetch_add(&echoes, 1, __ATOMIC_RELAXED);
    orig_echoCommand(c);
}

HOTPATCH_REPLACE(pingCommand, ping_patched);
HOTPATCH_REPLACE(echoCommand, echo_counted);
