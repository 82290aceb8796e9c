/* statics target, file a.c: a static counter (b.c has another one of the
 * same name), a static helper, and compute(), the function patched. */
static int counter;

static __attribute__((noinline, noclone, used)) long helper(long x)
{
    return x * 100;
}

__attribute__((noinline)) long compute(long x)
{
    counter++;
    return x + 1;
}

int a_counter(void) { return counter; }
long a_helper(long x) { return helper(x); }
