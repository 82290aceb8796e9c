/* A program using liblz4 (linked against the liblz4.so built by the test):
 * worker threads compress and decompress buffers through several of the
 * library's entry points and check every round trip, and commands probe
 * the behaviour lz4 commit 8301a21 (CVE-2021-3520) changes.
 *
 *   stats    -> "stats ok=N bad=M"    round trips so far, and wrong ones
 *   safe     -> "safe R"              LZ4_decompress_safe() with a negative
 *                                     capacity (-2 before the fix, -1 after)
 *   partial  -> "partial exit=E signal=S"  a child calls
 *                                     LZ4_decompress_safe_partial() with a
 *                                     negative capacity: exit 2 if it wrote
 *                                     anything (before the fix it writes
 *                                     hundreds of bytes around the buffer),
 *                                     0 if it wrote nothing and returned -1
 *   corpus   -> "corpus H"            a hash of what every decompression entry
 *                                     point returns and writes for a fixed
 *                                     corpus (the test compares it with the
 *                                     fixed release's)
 */
#include <lz4.h>
#include <lz4hc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static long ok, bad;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void fill(char *in, size_t n, unsigned *seed)
{
    static const char words[] = "patch live fix lz4 thread round trip ";
    for (size_t i = 0; i < n; i++)
        in[i] = rand_r(seed) % 4 ? words[i % (sizeof words - 1)] : (char)rand_r(seed);
}

static void *worker(void *arg)
{
    unsigned seed = (unsigned)(unsigned long)arg;
    for (;;) {
        char dict[1024], in[4096], packed[LZ4_COMPRESSBOUND(4096)], out[4096];
        int n = 512 + rand_r(&seed) % 3000, good = 0;
        fill(in, (size_t)n, &seed);
        fill(dict, sizeof dict, &seed);
        switch (rand_r(&seed) % 3) {
        case 0: {
            int p = LZ4_compress_fast(in, packed, n, sizeof packed, 1 + rand_r(&seed) % 8);
            good = p > 0 && LZ4_decompress_safe(packed, out, p, sizeof out) == n && !memcmp(in, out, (size_t)n);
            break;
        }
        case 1: {
            int p = LZ4_compress_HC(in, packed, n, sizeof packed, 1 + rand_r(&seed) % 12);
            int part = 1 + rand_r(&seed) % n;
            good = p > 0 && LZ4_decompress_safe_partial(packed, out, p, part, sizeof out) >= part &&
                   !memcmp(in, out, (size_t)part);
            break;
        }
        default: {
            LZ4_stream_t s;
            LZ4_initStream(&s, sizeof s);
            LZ4_loadDict(&s, dict, sizeof dict);
            int p = LZ4_compress_fast_continue(&s, in, packed, n, sizeof packed, 1);
            good = p > 0 && LZ4_decompress_safe_usingDict(packed, out, p, sizeof out, dict, sizeof dict) == n &&
                   !memcmp(in, out, (size_t)n);
            break;
        }
        }
        pthread_mutex_lock(&lock);
        if (good)
            ok++;
        else
            bad++;
        pthread_mutex_unlock(&lock);
        usleep(200);
    }
    return NULL;
}

/* A literals-only block: 10 literals. */
static int tiny(char *packed, int cap)
{
    return LZ4_compress_default("abcdefghij", packed, 10, cap);
}

static int negative_safe(void)
{
    char packed[64], out[64];
    return LZ4_decompress_safe(packed, out, tiny(packed, sizeof packed), -1);
}

static void negative_partial(void)
{
    static char area[1 << 16];
    char packed[64];
    memset(area, 0x55, sizeof area);
    int n = tiny(packed, sizeof packed);
    int r = LZ4_decompress_safe_partial(packed, area + 4096, n, 5, -1);
    for (size_t i = 0; i < sizeof area; i++)
        if (area[i] != 0x55)
            _exit(2); /* wrote where it had no room */
    _exit(r == -1 ? 0 : 1);
}

static unsigned long long mix(unsigned long long h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ULL;
    return h;
}

static unsigned long long corpus(void)
{
    unsigned long long h = 14695981039346656037ULL;
    unsigned seed = 7;
    char dict[2048];
    fill(dict, sizeof dict, &seed);
    for (int size = 0; size <= 70000; size = size * 3 + 7) {
        char *in = malloc((size_t)size + 1), *out = malloc((size_t)size + 64);
        int bound = LZ4_compressBound(size);
        char *packed = malloc((size_t)bound + 1);
        fill(in, (size_t)size, &seed);
        for (int level = 0; level < 3; level++) {
            int p = level == 0   ? LZ4_compress_default(in, packed, size, bound)
                    : level == 1 ? LZ4_compress_HC(in, packed, size, bound, 9)
                                 : LZ4_compress_fast(in, packed, size, bound, 5);
            h = mix(h, &p, sizeof p);
            h = mix(h, packed, (size_t)(p > 0 ? p : 0));
            int caps[] = {-1, -7, 0, size / 2, size, size + 64};
            for (unsigned c = 0; c < sizeof caps / sizeof caps[0]; c++) {
                int cap = caps[c];
                int r = LZ4_decompress_safe(packed, out, p, cap);
                h = mix(h, &r, sizeof r);
                if (r > 0)
                    h = mix(h, out, (size_t)r);
                if (cap >= 0) {
                    for (int target = 0; target <= cap; target += cap / 3 + 1) {
                        r = LZ4_decompress_safe_partial(packed, out, p, target, cap);
                        h = mix(h, &r, sizeof r);
                        if (r > 0)
                            h = mix(h, out, (size_t)r);
                    }
                }
                r = LZ4_decompress_safe_usingDict(packed, out, p, cap, dict, sizeof dict);
                h = mix(h, &r, sizeof r);
            }
        }
        free(in);
        free(out);
        free(packed);
    }
    return h;
}

int main(void)
{
    pthread_t t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (unsigned long i = 1; i <= 4; i++)
        pthread_create(&t, NULL, worker, (void *)i);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (!strcmp(line, "stats")) {
            pthread_mutex_lock(&lock);
            printf("stats ok=%ld bad=%ld\n", ok, bad);
            pthread_mutex_unlock(&lock);
        } else if (!strcmp(line, "safe")) {
            printf("safe %d\n", negative_safe());
        } else if (!strcmp(line, "partial")) {
            pid_t child = fork();
            if (child == 0)
                negative_partial();
            int status = 0;
            waitpid(child, &status, 0);
            printf("partial exit=%d signal=%d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1,
                   WIFSIGNALED(status) ? WTERMSIG(status) : 0);
        } else if (!strcmp(line, "corpus")) {
            printf("corpus %llx\n", corpus());
        } else {
            printf("unknown %s\n", line);
        }
    }
    return 0;
}
