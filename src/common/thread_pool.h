// ThreadPool: a fork-join pool for CPU kernels. `run(fn)` calls fn(thread_idx, num_threads) on
// every thread — the caller is thread 0 — and returns when all have finished. Work is split
// statically by thread index inside fn, so which thread computes an element never changes its
// value (kernels stay deterministic).
//
// Workers spin briefly between jobs (a decode step runs hundreds of short parallel regions, and
// waking a sleeping thread costs tens of microseconds), then sleep on an atomic wait.
// Thread-safety: run() must be called from one thread at a time (the owner's engine thread).
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace pdserve {

class ThreadPool {
 public:
  // num_threads counts the caller; 0 means all hardware threads.
  explicit ThreadPool(int num_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  template <typename Fn>
  void run(Fn&& fn) {
    run_erased(&fn, [](void* f, int idx, int n) { (*static_cast<Fn*>(f))(idx, n); });
  }

  static int hardware_threads();

 private:
  using Trampoline = void (*)(void*, int, int);
  void run_erased(void* fn, Trampoline trampoline);
  void worker_loop(int idx);

  int num_threads_;
  std::vector<std::thread> workers_;
  void* job_fn_ = nullptr;                  // guarded by the generation_ handshake
  Trampoline job_trampoline_ = nullptr;     // guarded by the generation_ handshake
  std::atomic<uint64_t> generation_{0};     // bumped by run(); workers start on a change
  std::atomic<int> pending_{0};             // workers still running the current job
  std::atomic<bool> stop_{false};
};

}  // namespace pdserve
