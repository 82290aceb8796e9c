/* statics target, file b.c: another `static int counter`, and main.
 * Prints "ready"; then for each "call X" on stdin prints
 * "call X r=compute(X) a=<a.c:counter> b=<b.c:counter>". */
#include <stdio.h>
#include <string.h>

static int counter = 1000;

long compute(long x);
int a_counter(void);
long a_helper(long x);

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready helper(1)=%ld\n", a_helper(1));
    char line[128];
    long x;
    while (fgets(line, sizeof line, stdin)) {
        if (sscanf(line, "call %ld", &x) == 1) {
            long r = compute(x);
            counter++;
            printf("call %ld r=%ld a=%d b=%d\n", x, r, a_counter(), counter);
        }
    }
    return 0;
}
