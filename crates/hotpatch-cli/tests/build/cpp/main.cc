#include <cstdio>
#include <cstring>
#include <thread>
#include <unistd.h>
#include "counter.h"
int main()
{
    for (int i = 0; i < 4; i++)
        std::thread([] { for (;;) { the_counter().add(1); usleep(100); } }).detach();
    std::printf("ready\n"); std::fflush(stdout);
    char line[64];
    while (std::fgets(line, sizeof line, stdin)) {
        if (!std::strncmp(line, "step", 4)) std::printf("step %ld\n", the_counter().add(1));
        else if (!std::strncmp(line, "label", 5)) std::printf("%s\n", the_counter().label().c_str());
        std::fflush(stdout);
    }
}
