#include "parallel.hpp"

#include <atomic>
#include <condition_variable>
#include <cstdint>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace rar {
namespace detail {

namespace {

// Helper threads wait for a generation number to change; those with an id the current job covers run it.
// Never destroyed: its threads live until the process ends (a static destructor joining them at exit could
// hang, and one destroying joinable std::threads would terminate the process).
class Pool {
 public:
  bool run(std::size_t helpers, const std::function<void(std::size_t)>& job) {
    // A flag, not a mutex: a nested call from the thread that holds the pool must see "busy", and try_lock
    // on a mutex the thread already owns is undefined.
    bool idle = false;
    if (!busy_.compare_exchange_strong(idle, true, std::memory_order_acquire)) return false;
    struct Release {
      std::atomic<bool>& flag;
      ~Release() { flag.store(false, std::memory_order_release); }
    } release{busy_};
    std::size_t started;
    {
      std::lock_guard<std::mutex> lk(mu_);
      try {
        while (threads_.size() < helpers) {
          const std::size_t id = threads_.size() + 1;
          threads_.emplace_back([this, id] { work(id); });
        }
      } catch (...) {
        // Thread creation failed (resource limits): the threads there are take part, the caller does the rest.
      }
      started = std::min(helpers, threads_.size());
      job_ = &job;
      active_ = started;
      pending_ = started;
      ++generation_;
    }
    if (started > 0) work_cv_.notify_all();
    job(0);
    for (std::size_t w = started + 1; w <= helpers; ++w) job(w);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return pending_ == 0; });
    job_ = nullptr;
    return true;
  }

 private:
  void work(std::size_t id) {
    std::uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      work_cv_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (id > active_) continue;  // a job for fewer helpers than the pool has
      const std::function<void(std::size_t)>* job = job_;
      lk.unlock();
      (*job)(id);
      lk.lock();
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  std::atomic<bool> busy_{false};  // one job at a time
  std::mutex mu_;                  // guards everything below
  std::condition_variable work_cv_, done_cv_;
  std::vector<std::thread> threads_;
  const std::function<void(std::size_t)>* job_ = nullptr;
  std::size_t active_ = 0, pending_ = 0;
  std::uint64_t generation_ = 0;
};

std::mutex g_pool_mu;
Pool* g_pool = nullptr;

#if defined(__unix__) || defined(__APPLE__)
// fork: g_pool_mu is held across it (so the child never inherits it held by a thread it does not have),
// and a forked child, which has none of the parent's threads, starts a new pool on first use. The old one is
// left behind, never touched again. Registered when the library loads, before any thread can use the pool.
void lock_before_fork() { g_pool_mu.lock(); }
void unlock_after_fork() { g_pool_mu.unlock(); }
void forget_pool_in_child() {
  g_pool = nullptr;
  g_pool_mu.unlock();
}
[[maybe_unused]] const bool g_fork_handlers = (pthread_atfork(lock_before_fork, unlock_after_fork, forget_pool_in_child), true);
#endif

Pool& pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (g_pool == nullptr) g_pool = new Pool();
  return *g_pool;
}

}  // namespace

std::size_t pool_max_helpers() {
  static const std::size_t n = [] {
    const std::size_t cores = std::thread::hardware_concurrency();
    return std::min<std::size_t>(63, cores > 1 ? cores - 1 : 1);
  }();
  return n;
}

bool pool_run(std::size_t helpers, const std::function<void(std::size_t)>& job) {
  return pool().run(helpers, job);
}

}  // namespace detail
}  // namespace rar
