/* A program using zlib (linked against the libz.so built by the test):
 * worker threads compress and uncompress buffers and check every round
 * trip, and commands probe the behaviours three upstream fixes change.
 *
 *   stats   -> "stats ok=N bad=M"   round trips so far, and wrong ones
 *   rawend  -> "rawend RC"          deflateEnd() right after a raw deflateInit2()
 *                                   (Z_DATA_ERROR before zlib c376a41, Z_OK after)
 *   extra   -> "extra exit=E signal=S"  a child inflates a gzip header whose
 *                                   extra field is longer than the buffer given
 *                                   to inflateGetHeader(), in two pieces
 *                                   (CVE-2022-37434: a wild memcpy before
 *                                   eff308a, ignored after)
 *   stored  -> "stored ok=B"        level-0 deflate of 200 KiB in small pieces
 *                                   (deflate_stored), round-tripped
 *   corpus  -> "corpus H"           a hash of the compressed bytes of a fixed
 *                                   corpus at every level, strategy and format
 *                                   (the test compares it with the fixed
 *                                   release's)
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

static long ok, bad;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void *worker(void *arg)
{
    unsigned seed = (unsigned)(unsigned long)arg;
    static const char words[] = "patch live fix zlib thread round trip ";
    for (;;) {
        unsigned char in[4096], packed[8192], out[4096];
        size_t n = 512 + rand_r(&seed) % 3000;
        for (size_t i = 0; i < n; i++)
            in[i] = rand_r(&seed) % 4 ? (unsigned char)words[i % (sizeof words - 1)] : (unsigned char)rand_r(&seed);
        uLongf plen = sizeof packed, olen = sizeof out;
        int good = compress2(packed, &plen, in, n, 1 + rand_r(&seed) % 9) == Z_OK &&
                   uncompress(out, &olen, packed, plen) == Z_OK && olen == n && !memcmp(in, out, n);
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

static int raw_end(void)
{
    z_stream s;
    memset(&s, 0, sizeof s);
    if (deflateInit2(&s, 6, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY) != Z_OK)
        return 99;
    return deflateEnd(&s);
}

static void long_extra(void)
{
    /* gzip header: magic, deflate, FEXTRA; XLEN 16, then the extra field. */
    unsigned char gz[10 + 2 + 16] = {0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 3, 16, 0};
    memset(gz + 12, 'x', 16);
    unsigned char *extra = malloc(4);
    unsigned char out[64];
    gz_header head;
    z_stream s;
    memset(&head, 0, sizeof head);
    memset(&s, 0, sizeof s);
    head.extra = extra;
    head.extra_max = 4;
    if (inflateInit2(&s, 16 + 15) != Z_OK)
        _exit(3);
    inflateGetHeader(&s, &head);
    /* The header and half the extra field, then the rest. */
    s.next_in = gz;
    s.avail_in = 20;
    s.next_out = out;
    s.avail_out = sizeof out;
    inflate(&s, Z_NO_FLUSH);
    s.next_in = gz + 20;
    s.avail_in = 8;
    inflate(&s, Z_NO_FLUSH);
    inflateEnd(&s);
    _exit(0);
}

static int stored(void)
{
    size_t n = 200 * 1024;
    unsigned char *in = malloc(n), *packed = malloc(n + 1024), *out = malloc(n);
    for (size_t i = 0; i < n; i++)
        in[i] = (unsigned char)(i * 7 + i / 13);
    z_stream s;
    memset(&s, 0, sizeof s);
    if (deflateInit(&s, 0) != Z_OK)
        return 0;
    s.next_out = packed;
    s.avail_out = (uInt)(n + 1024);
    for (size_t at = 0; at < n; at += 1000) {
        s.next_in = in + at;
        s.avail_in = (uInt)(n - at < 1000 ? n - at : 1000);
        deflate(&s, Z_NO_FLUSH);
    }
    int done = deflate(&s, Z_FINISH) == Z_STREAM_END;
    uLongf olen = n;
    done = done && uncompress(out, &olen, packed, s.total_out) == Z_OK && olen == n && !memcmp(in, out, n);
    deflateEnd(&s);
    free(in);
    free(packed);
    free(out);
    return done;
}

/* FNV-1a over the deflate output of every (level, strategy, format) of a
 * corpus that mixes text, runs and noise, fed in uneven pieces. */
static unsigned long long corpus(void)
{
    size_t n = 96 * 1024;
    unsigned char *mixed = malloc(n), *noise = malloc(n), *out = malloc(2 * n + 1024);
    unsigned seed = 7;
    for (size_t i = 0; i < n; i++) {
        size_t block = i / 4096;
        mixed[i] = block % 3 == 0   ? (unsigned char)"the quick brown fox "[i % 20]
                   : block % 3 == 1 ? (unsigned char)(i / 500)
                                    : (unsigned char)rand_r(&seed);
        noise[i] = (unsigned char)rand_r(&seed);
    }
    static const int strategies[] = {Z_DEFAULT_STRATEGY, Z_FILTERED, Z_HUFFMAN_ONLY, Z_RLE, Z_FIXED};
    static const int windows[] = {-15, 15, 31, 9};
    unsigned long long h = 1469598103934665603ULL;
    for (int input = 0; input < 2; input++)
    for (int level = 0; level <= 9; level++)
        for (int st = 0; st < 5; st++)
            for (int w = 0; w < 4; w++) {
                z_stream s;
                memset(&s, 0, sizeof s);
                if (deflateInit2(&s, level, Z_DEFLATED, windows[w], 8, strategies[st]) != Z_OK) {
                    h = (h ^ 0xff) * 1099511628211ULL;
                    continue;
                }
                unsigned char *in = input ? noise : mixed;
                s.next_out = out;
                s.avail_out = (uInt)(2 * n + 1024);
                size_t at = 0, piece = 1;
                while (at < n) {
                    size_t take = piece < n - at ? piece : n - at;
                    s.next_in = in + at;
                    s.avail_in = (uInt)take;
                    deflate(&s, (piece % 7 == 0) ? Z_SYNC_FLUSH : Z_NO_FLUSH);
                    at += take;
                    piece = piece * 3 + 1 > 20000 ? 1 : piece * 3 + 1;
                }
                int rc = deflate(&s, Z_FINISH);
                h = (h ^ (unsigned)rc) * 1099511628211ULL;
                for (uLong i = 0; i < s.total_out; i++)
                    h = (h ^ out[i]) * 1099511628211ULL;
                h = (h ^ (unsigned)deflateEnd(&s)) * 1099511628211ULL;
            }
    free(mixed);
    free(noise);
    free(out);
    return h;
}

int main(void)
{
    pthread_t t[4];
    for (long i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, worker, (void *)(i + 1));
    printf("ready\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "stats", 5)) {
            pthread_mutex_lock(&lock);
            printf("stats ok=%ld bad=%ld\n", ok, bad);
            pthread_mutex_unlock(&lock);
        } else if (!strncmp(line, "rawend", 6)) {
            printf("rawend %d\n", raw_end());
        } else if (!strncmp(line, "extra", 5)) {
            pid_t child = fork();
            if (child == 0)
                long_extra();
            int status = 0;
            waitpid(child, &status, 0);
            printf("extra exit=%d signal=%d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1,
                   WIFSIGNALED(status) ? WTERMSIG(status) : 0);
        } else if (!strncmp(line, "corpus", 6)) {
            printf("corpus %llx\n", corpus());
        } else if (!strncmp(line, "stored", 6)) {
            printf("stored ok=%d\n", stored());
        }
        fflush(stdout);
    }
    return 0;
}
