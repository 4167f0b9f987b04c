#pragma once
// A fork-join loop over chunks, run on a process-wide pool of worker threads that stay between calls.
// Worker exceptions are caught and rethrown on the calling thread.
//
// Workers are started on first use and kept, so per-thread scratch (thread_local buffers) survives from one
// call to the next (docs/design-notes.md#thread-pool). One parallel section uses the pool at a time; a call
// that finds it busy (another Python thread, or a nested call), or wants more threads than the pool keeps,
// starts its own threads. A forked child starts a new pool.
#include <algorithm>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace rar {

namespace detail {

// The most helper threads the pool keeps: one fewer than the cores (at least 1, at most 63). A call wanting
// more starts threads of its own, which end with it (and free their scratch: the pool's threads keep theirs,
// e.g. crop's thread_local buffers up to kScratchKeepBytes each, for the life of the process).
std::size_t pool_max_helpers();

// Runs job(0) on the caller and job(1) .. job(helpers) on pool threads (any the pool could not start a thread
// for run on the caller), and returns once all are done. Returns false, running nothing, when the pool is in
// use by another call. job must not throw.
bool pool_run(std::size_t helpers, const std::function<void(std::size_t)>& job);

}  // namespace detail

// Calls fn(worker, begin, end) on `threads` contiguous chunks of [0, n); worker 0 runs on the caller.
template <class Fn>
void parallel_chunks(std::size_t n, int threads, Fn&& fn) {
  const std::size_t t = std::max<std::size_t>(1, std::min<std::size_t>(static_cast<std::size_t>(threads), n));
  if (t <= 1) {
    if (n > 0) fn(0, std::size_t{0}, n);
    return;
  }
  std::exception_ptr error;
  std::mutex mu;
  auto run = [&](std::size_t w) {
    const std::size_t b = n * w / t, e = n * (w + 1) / t;
    try {
      if (e > b) fn(static_cast<int>(w), b, e);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
    }
  };
  // std::ref: the std::function holds a reference, no copy of the lambda on the heap
  if (t - 1 > detail::pool_max_helpers() || !detail::pool_run(t - 1, std::ref(run))) {
    // Threads of this call's own, joined before returning.
    std::vector<std::thread> own;
    std::size_t next = 1;
    try {
      own.reserve(t - 1);
      for (; next < t; ++next) own.emplace_back(run, next);
    } catch (...) {
      // Thread creation failed (resource limits): the caller runs the chunks that have no thread.
    }
    run(0);
    for (std::size_t w = next; w < t; ++w) run(w);
    for (auto& th : own) th.join();
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace rar
