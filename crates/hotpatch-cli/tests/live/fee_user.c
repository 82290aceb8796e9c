/* A program linked against libfee.so: two threads call fee() without
 * pause and count results that are neither the original (3x + 1) nor the
 * patched (5x + 2) answer; each number read on stdin is answered with
 * "fee=F bad=B", and "exit" ends it. WHO makes different executables of
 * one source; with IDLE there are no threads (many processes at once). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef WHO
#define WHO "a"
#endif

int fee(int x);
static volatile long bad;

static void *spin(void *arg) {
    (void)arg;
    for (int i = 0;; i = (i + 1) & 0xffff) {
        int r = fee(i);
        if (r != 3 * i + 1 && r != 5 * i + 2 && r != 3 * i + 2)
            bad++;
    }
    return NULL;
}

int main(void) {
#ifndef IDLE
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, spin, NULL);
#else
    (void)spin;
#endif
    printf("ready " WHO "\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'e')
            return 0;
        printf("fee=%d bad=%ld\n", fee(atoi(line)), bad);
        fflush(stdout);
    }
    return 0;
}
