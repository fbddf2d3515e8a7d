// The thread pool the CPU launchers hand to the torch-free kernels of csrc/common/cpu/: ATen's
// (at::parallel_for, so torch.set_num_threads and the no-nested-parallelism rule hold).
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>

namespace mmboat {

struct AtenParallel {
  // f(b, e) on disjoint chunks of [begin, end), chunks of at least `grain` items.
  template <typename Fn>
  void for_range(int64_t begin, int64_t end, int64_t grain, const Fn& f) const {
    at::parallel_for(begin, end, grain, f);
  }
  int num_threads() const { return at::get_num_threads(); }
  int thread_num() const { return at::get_thread_num(); }
};

}  // namespace mmboat
