/* The C++ project of the `hotpatch build` tests: a class with a mutex and a
 * vector, a function in an anonymous namespace inlined into a member. */
#include "counter.h"
namespace {
int scale(int x) { return x * 2; }
Counter counter;
}
long Counter::add(int x)
{
    std::lock_guard<std::mutex> g(m_);
    long v = scale(x);
    total_ += v;
    history_.push_back(x);
    if (history_.size() > 100) history_.erase(history_.begin());
    return v;
}
std::string Counter::label() const { return "counter:" + std::to_string(total()); }
Counter &the_counter() { return counter; }
