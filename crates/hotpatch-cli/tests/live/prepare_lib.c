/* A library for `prepare LIB -o LIB` while a process runs it: `work`
 * reads one byte of every page of an 8 MiB initialised array, so a
 * process calling it touches the whole file (a truncated file kills it
 * with SIGBUS). */
unsigned char blob[8 << 20] = {1, 2, 3};

__attribute__((noinline)) long work(long x) {
    long s = 0;
    for (long i = 0; i < (long)sizeof blob; i += 4096)
        s += blob[i];
    return s + x;
}
