#include <string>
#include <vector>
#include <mutex>
class Counter {
public:
    long add(int x);
    long total() const { std::lock_guard<std::mutex> g(m_); return total_; }
    std::string label() const;
private:
    mutable std::mutex m_;
    long total_ = 0;
    std::vector<int> history_;
};
Counter &the_counter();
