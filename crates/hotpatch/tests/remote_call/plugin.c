// A tiny shared library dlopen'ed into the target by tests/remote_call.rs.
extern volatile int plugin_flag;

__attribute__((constructor)) static void init(void) { plugin_flag += 42; }

long plugin_answer(long x, long y) { return x * 1000 + y; }
