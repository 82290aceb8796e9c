#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "counter.h"

static void *worker(void *arg)
{
    (void)arg;
    for (;;) {
        add(1);
        usleep(100);
    }
    return NULL;
}

int main(void)
{
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, worker, NULL);
    printf("ready\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "total", 5)) {
            printf("total %ld\n", total_now());
            fflush(stdout);
        } else if (!strncmp(line, "step", 4)) {
            printf("step %ld\n", add(1));
            fflush(stdout);
        }
    }
    return 0;
}
