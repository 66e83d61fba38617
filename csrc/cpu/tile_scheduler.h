// Work-stealing scheduler of the CPU kernels' tiles, for kernels whose work items are tiles of
// uneven cost or whose neighbouring tiles share data in cache: each thread works through an even,
// contiguous share of the tiles in order, and one that runs out takes tiles from the end of the
// share with the most left, so that a thread the machine slows down does not hold back the call.
// at::parallel_for supplies the threads (OpenMP). Per capability (cpu/per_isa.h).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "cpu/per_isa.h"

namespace tokenmix {
namespace cpu {
inline namespace CPU_CAPABILITY {

// A contiguous range of tiles [front, back) that its owner takes from the front and other
// threads from the back; both ends live in one atomic word.
class TileShare {
  std::atomic<uint64_t> ends{0};
  static uint64_t pack(uint64_t front, uint64_t back) { return front << 32 | back; }

 public:
  void reset(int64_t front, int64_t back) {
    TORCH_INTERNAL_ASSERT(0 <= front && front <= back && back < (int64_t(1) << 32));
    ends.store(pack(front, back));
  }
  int64_t left() const {
    const uint64_t e = ends.load(std::memory_order_relaxed);
    return static_cast<int64_t>(e & 0xffffffffu) - static_cast<int64_t>(e >> 32);
  }
  // The tile taken, or -1 when none is left.
  int64_t take_front() {
    uint64_t e = ends.load();
    for (;;) {
      const uint64_t front = e >> 32, back = e & 0xffffffffu;
      if (front >= back) return -1;
      if (ends.compare_exchange_weak(e, pack(front + 1, back))) return static_cast<int64_t>(front);
    }
  }
  int64_t take_back() {
    uint64_t e = ends.load();
    for (;;) {
      const uint64_t front = e >> 32, back = e & 0xffffffffu;
      if (front >= back) return -1;
      if (ends.compare_exchange_weak(e, pack(front, back - 1))) return static_cast<int64_t>(back - 1);
    }
  }
};

// Runs make_worker()(t) on every tile t < T; make_worker() builds a thread's callable, once per
// thread. Who runs a tile must never change a result: tiles write disjoint outputs and partials.
template <class MakeWorker>
void for_each_tile(int64_t T, const MakeWorker& make_worker) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), T);
  if (workers <= 1) {
    auto work = make_worker();
    for (int64_t t = 0; t < T; ++t) work(t);
    return;
  }
  std::unique_ptr<TileShare[]> shares(new TileShare[workers]);
  for (int64_t i = 0; i < workers; ++i) shares[i].reset(i * T / workers, (i + 1) * T / workers);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    auto work = make_worker();
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t t; (t = shares[i].take_front()) >= 0;) work(t);
    }
    for (;;) {
      int64_t victim = -1, most = 0;
      for (int64_t i = 0; i < workers; ++i) {
        const int64_t left = shares[i].left();
        if (left > most) {
          victim = i;
          most = left;
        }
      }
      if (victim < 0) break;
      const int64_t t = shares[victim].take_back();
      if (t >= 0) work(t);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace tokenmix
