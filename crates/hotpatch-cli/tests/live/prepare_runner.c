/* Loads the library argv[1], calls its `work` from two threads without
 * pause, and answers each number read on stdin with work(number). */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static long (*work)(long);
static volatile long sink;

static void *spin(void *arg) {
    (void)arg;
    for (long i = 0;; i++)
        sink += work(i);
    return NULL;
}

int main(int argc, char **argv) {
    void *h = dlopen(argc > 1 ? argv[1] : "", RTLD_NOW);
    if (!h || !(work = (long (*)(long))dlsym(h, "work"))) {
        fprintf(stderr, "%s\n", dlerror());
        return 1;
    }
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, spin, NULL);
    printf("ready\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        printf("work %ld\n", work(atol(line)));
        fflush(stdout);
    }
    return 0;
}
