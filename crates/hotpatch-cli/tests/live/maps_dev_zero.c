/* Maps /dev/zero three ways: 2 GiB shared (a shmem file, seen as
 * "/dev/zero (deleted)" and readable through /proc/PID/map_files),
 * private read+exec (the character device itself), shared read-only.
 * `f` is prepared for a patch; each number on stdin is answered with
 * f(number). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

__attribute__((noinline)) long f(long x) { return x * 3 + 1; }

int main(void) {
    int rw = open("/dev/zero", O_RDWR), ro = open("/dev/zero", O_RDONLY);
    void *shared = mmap(NULL, 2UL << 30, PROT_READ | PROT_WRITE | PROT_EXEC,
                        MAP_SHARED | MAP_NORESERVE, rw, 0);
    void *exec = mmap(NULL, 64UL << 20, PROT_READ | PROT_EXEC, MAP_PRIVATE, ro, 0);
    void *plain = mmap(NULL, 64UL << 20, PROT_READ, MAP_SHARED, ro, 0);
    if (rw < 0 || ro < 0 || shared == MAP_FAILED || exec == MAP_FAILED || plain == MAP_FAILED) {
        perror("maps_dev_zero");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        printf("f %ld\n", f(atol(line)));
        fflush(stdout);
    }
    return 0;
}
