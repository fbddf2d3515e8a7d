// Host emulation of the small CUDA subset the neighborhood-attention kernels use, so that the
// kernels in csrc/common/cuda/*.cuh can be executed (slowly, exactly) on machines without a GPU.
// One std::thread per CUDA thread (a pool reused by every block), blocks run one after another; __syncthreads is a std::barrier
// (exited threads drop out, as on the GPU); group-masked __shfl_xor_sync exchanges through a
// per-block buffer with one barrier per (warp, mask); atomicAdd takes a global lock. Dynamic
// shared memory is filled with NaN bytes so reading unstaged data shows up in the results.
#pragma once
#define MMBOAT_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

// cudaStream_t and cudaFuncAttribute come from cuda_runtime_api.h (pulled in by cuda_fp16.h);
// only the call needs a host stand-in (no libcudart here).
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) {
  return cudaSuccess;
}

namespace mmboat_emu {

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<double> shfl;
  std::mutex mu;
  std::map<std::pair<int, unsigned>, std::unique_ptr<std::barrier<>>> groups;
  std::vector<unsigned char> smem;
  unsigned char* smem_ptr = nullptr;
};

inline Block* g_block = nullptr;
inline thread_local uint3 t_thread;
inline thread_local uint3 t_block;
inline dim3 g_block_dim;
inline dim3 g_grid_dim;
inline std::mutex g_atomic_mu;

inline unsigned char* dynamic_smem() { return g_block->smem_ptr; }

template <typename V>
inline V shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  const int tid = static_cast<int>(t_thread.x);
  const int lane = tid & 31, warp = tid >> 5, src = lane ^ lane_mask;
  if (!((mask >> lane) & 1u) || !((mask >> src) & 1u)) {
    std::fprintf(stderr, "emulation: shuffle lane %d/%d outside mask %08x\n", lane, src, mask);
    std::abort();
  }
  std::barrier<>* b;
  {
    std::lock_guard<std::mutex> lock(g_block->mu);
    auto& entry = g_block->groups[{warp, mask}];
    if (!entry) entry = std::make_unique<std::barrier<>>(std::popcount(mask));
    b = entry.get();
  }
  g_block->shfl[tid] = v;
  b->arrive_and_wait();
  const V r = static_cast<V>(g_block->shfl[warp * 32 + src]);
  b->arrive_and_wait();
  return r;
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args... args) {
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x > 1024) {
    std::fprintf(stderr, "emulation: unsupported block shape\n");
    std::abort();
  }
  g_grid_dim = grid;
  g_block_dim = block;
  const unsigned nthreads = block.x;
  // One pool of nthreads workers runs every block in turn; the main thread sets each block up
  // between the `start` and `done` rendezvous.
  std::barrier<> start(nthreads + 1), done(nthreads + 1);
  uint3 block_idx{0, 0, 0};
  bool finished = false;
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (unsigned t = 0; t < nthreads; ++t)
    threads.emplace_back([&, t] {
      t_thread = uint3{t, 0, 0};
      for (;;) {
        start.arrive_and_wait();
        if (finished) return;
        t_block = block_idx;
        kernel(args...);
        g_block->bar->arrive_and_drop();
        done.arrive_and_wait();
      }
    });
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block blk;
        blk.bar = std::make_unique<std::barrier<>>(nthreads);
        blk.shfl.assign(nthreads, 0.0);
        blk.smem.assign(smem + 16, 0xFF);
        blk.smem_ptr = blk.smem.data() + (16 - reinterpret_cast<uintptr_t>(blk.smem.data()) % 16);
        g_block = &blk;
        block_idx = uint3{x, y, z};
        start.arrive_and_wait();
        done.arrive_and_wait();
        g_block = nullptr;
      }
  finished = true;
  start.arrive_and_wait();
  for (auto& th : threads) th.join();
}

}  // namespace mmboat_emu

inline void __syncthreads() { mmboat_emu::g_block->bar->arrive_and_wait(); }

inline float atomicAdd(float* address, float v) {
  std::lock_guard<std::mutex> lock(mmboat_emu::g_atomic_mu);
  const float old = *address;
  *address = old + v;
  return old;
}
inline double atomicAdd(double* address, double v) {
  std::lock_guard<std::mutex> lock(mmboat_emu::g_atomic_mu);
  const double old = *address;
  *address = old + v;
  return old;
}

#define threadIdx (::mmboat_emu::t_thread)
#define blockIdx (::mmboat_emu::t_block)
#define blockDim (::mmboat_emu::g_block_dim)
#define gridDim (::mmboat_emu::g_grid_dim)
