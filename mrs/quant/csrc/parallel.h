// Splitting a kernel's work over XLA's intra-op thread pool (see qmatmul.cc, decode_attention.cc).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace mrs {

// Runs body(begin, end) over [0, units) in up to `chunks` pieces. Chunks are claimed from
// a shared counter by the caller and by tasks on the pool; the caller never waits for a
// chunk nobody has started, so a busy pool (several models stepping at once) cannot
// deadlock it, and a task that starts late finds no work. `body` must outlive the call
// only until it returns: late tasks touch the counter alone.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t units, int64_t chunks,
                        const std::function<void(int64_t, int64_t)>& body) {
  struct Counter {
    std::atomic<int64_t> next{0}, done{0};
  };
  chunks = std::max<int64_t>(1, std::min(chunks, units));
  auto counter = std::make_shared<Counter>();
  const auto* work = &body;
  auto run = [counter, work, units, chunks] {
    for (int64_t c; (c = counter->next.fetch_add(1)) < chunks;) {
      (*work)(c * units / chunks, (c + 1) * units / chunks);
      counter->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(run)(run));  // each task owns a copy
  run();
  while (counter->done.load(std::memory_order_acquire) < chunks) _mm_pause();
}

// A chunk count for `units` of work: a few per thread, each at least `min_units`.
inline int64_t ChunksFor(xla::ffi::ThreadPool& pool, int64_t units, int64_t min_units) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(4 * threads, units / min_units));
}

}  // namespace mrs
