/*
 * A stand-in debugger for the preflight tests: PTRACE_SEIZEs every thread
 * of the process given (nothing is stopped), prints "tracing N", then
 * waits until it is killed (the kernel then detaches and resumes them).
 *
 * Usage: tracer PID
 */
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    char path[64];
    snprintf(path, sizeof path, "/proc/%s/task", argv[1]);
    DIR *d = opendir(path);
    if (!d) {
        perror(path);
        return 2;
    }
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        int tid = atoi(e->d_name);
        if (tid <= 0)
            continue;
        if (ptrace(PTRACE_SEIZE, tid, 0, 0) != 0) {
            perror("PTRACE_SEIZE");
            return 2;
        }
        n++;
    }
    closedir(d);
    printf("tracing %d\n", n);
    fflush(stdout);
    for (;;)
        pause();
}
