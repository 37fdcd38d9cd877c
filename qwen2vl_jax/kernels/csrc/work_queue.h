// Work items shared by the calling thread and XLA's intra-op pool: the dispatch both CPU kernels use.
//
// Items 0..count-1 are taken from a shared counter by the calling thread and by the pool tasks it schedules. The
// caller never waits on a task that has not started: XLA may run several kernel calls at once on pool threads, and
// waiting there for queued work would deadlock the pool (found with 21 concurrent gemv calls). It waits only for
// items other threads are already computing. The job is held by shared_ptr: a task may start after the call has
// returned (it then finds no item left and only drops its reference).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace qwen2vl_jax {

struct WorkQueue {
  int64_t count = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;

  // Runs item(i) for every item this thread can still claim.
  template <class F>
  void drain(F&& item) {
    for (int64_t i; (i = next.fetch_add(1)) < count;) {
      item(i);
      if (done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

// job->work() (which drains job->queue) on `tasks` pool tasks and on this thread; returns when every item is done.
template <class Job>
void run_on_pool(xla::ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, int64_t tasks) {
  for (int64_t t = 0; t < tasks; ++t) pool.Schedule([job] { job->work(); });
  job->work();
  std::unique_lock<std::mutex> lock(job->queue.mu);
  job->queue.cv.wait(lock, [&] { return job->queue.done.load() == job->queue.count; });
}

}  // namespace qwen2vl_jax
