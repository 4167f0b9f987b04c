#pragma once
// A minimal fork-join loop: worker exceptions are caught and rethrown on the calling thread.
#include <algorithm>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace rar {

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
  std::vector<std::thread> pool;
  std::size_t next = 1;
  try {
    pool.reserve(t - 1);
    for (; next < t; ++next) pool.emplace_back(run, next);
  } catch (...) {
    // Thread creation failed (resource limits): the caller runs the chunks that have no thread.
  }
  run(0);
  for (std::size_t w = next; w < t; ++w) run(w);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace rar
