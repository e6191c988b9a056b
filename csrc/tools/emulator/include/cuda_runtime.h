// A host emulator of the CUDA execution model, for testing fastddpm's kernels on machines
// without a GPU (tests/test_cuda_library.py compiles csrc/*.cu with g++ against these headers,
// with -DFASTDDPM_HOST_EMULATION, into a library with the same C ABI).
//
// Each block runs as one fiber per thread (ucontext), scheduled round-robin on one OS thread;
// blocks run one after another. __syncthreads is a barrier of the block's live threads; warp
// collectives (__shfl_xor_sync, and ldmatrix and mma.sync in fastddpm/ptx.cuh) exchange values
// between the 32 lanes through a barrier, and fail if a lane has exited. Dynamic shared memory
// starts as NaN bytes and has a guard checked after each block; cp.async copies land at
// cp.async.wait_group (or at issue, with FASTDDPM_EMU_CP_ASYNC=eager). Warps run in lockstep
// or, with FASTDDPM_EMU_SCHEDULE=forward|reverse, one after another between barriers. A block in
// which no thread can make progress is reported as a deadlock.
//
// What it cannot show: performance, register or occupancy limits, true concurrency between
// warps (the order of fibers is fixed), memory-model subtleties, or the hardware's own
// rounding in fast intrinsics (__expf, exp2f and rsqrtf are computed exactly here).
#pragma once

#include <math.h>
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define __CUDA_ARCH__ 800
#define CUDART_VERSION 13000

// ---- vector types ---------------------------------------------------------------------------

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ---- runtime API ----------------------------------------------------------------------------

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  int maxThreadsPerBlock;
};

namespace emu {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kMaxDynamicSmem = 101376;  // sm_86 / sm_89, the smallest of the targets
constexpr size_t kGuardBytes = 256;
constexpr int kEmulatedSms = 4;  // small, so grid-stride loops take several turns

struct CopyOp {
  void* dst;
  const void* src;
  int src_bytes;
};

struct Barrier {
  int arrived = 0, live = 0;
  unsigned generation = 0;
};

struct Thread {
  ucontext_t context;
  uint3 idx;
  int warp = 0, lane = 0;
  bool done = false;
  std::vector<std::vector<CopyOp>> cp_groups;  // committed cp.async groups, oldest first
  std::vector<CopyOp> cp_open;                 // issued since the last commit
};

struct Warp {
  Barrier barrier;
  alignas(16) unsigned char slots[32][64];  // one exchange slot per lane
};

struct State {
  ucontext_t scheduler;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  Barrier block_barrier;
  std::unique_ptr<unsigned char[]> smem;
  size_t smem_bytes = 0;
  uint64_t events = 0;  // arrivals and exits: a scheduling round without any is a deadlock
  Thread* current = nullptr;
  uint3 block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  std::function<void()> body;
  std::string fiber_error;
  std::map<const void*, size_t> max_dynamic_smem;
  cudaError_t last_error = cudaSuccess;
};

inline State& state() {
  static State s;
  return s;
}
inline Thread& current() { return *state().current; }

// A failure inside a kernel: recorded and reported by launch() as a C++ exception.
[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("emulator: " + what); }

inline void yield() { swapcontext(&current().context, &state().scheduler); }

inline void release_if_complete(Barrier& bar) {
  if (bar.arrived > 0 && bar.arrived == bar.live) {
    bar.arrived = 0;
    ++bar.generation;
  }
}

inline void barrier_wait(Barrier& bar) {
  ++state().events;
  const unsigned generation = bar.generation;
  ++bar.arrived;
  release_if_complete(bar);
  while (bar.generation == generation) yield();
}

inline Warp& full_warp(const char* op) {
  Warp& w = state().warps[current().warp];
  if (w.barrier.live != 32) fail(std::string(op) + " in a warp with exited or missing lanes");
  return w;
}

inline void* dynamic_shared_memory() { return state().smem.get(); }

inline bool in_shared(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= state().smem.get() && c + bytes <= state().smem.get() + state().smem_bytes;
}

// The order in which threads run between synchronizations (FASTDDPM_EMU_SCHEDULE): "lockstep"
// (default: every thread one step per turn), "forward" (warp 0 runs as far as it can, then warp 1,
// ...) or "reverse" (the last warp first). The skewed orders expose missing __syncthreads: a
// warp that runs ahead overwrites shared memory another warp still needs, or reads it too early.
enum class Schedule { kLockstep, kForward, kReverse };

inline Schedule schedule_from_env() {
  const char* name = std::getenv("FASTDDPM_EMU_SCHEDULE");
  if (name == nullptr || std::strcmp(name, "lockstep") == 0) return Schedule::kLockstep;
  if (std::strcmp(name, "forward") == 0) return Schedule::kForward;
  if (std::strcmp(name, "reverse") == 0) return Schedule::kReverse;
  fail(std::string("FASTDDPM_EMU_SCHEDULE=") + name + ": use lockstep, forward or reverse");
}

inline void fiber_main() {
  State& s = state();
  Thread& t = current();
  try {
    s.body();
  } catch (const std::exception& err) {
    s.fiber_error = err.what();
  }
  t.done = true;
  ++s.events;
  --s.block_barrier.live;
  release_if_complete(s.block_barrier);
  Barrier& w = s.warps[t.warp].barrier;
  --w.live;
  release_if_complete(w);
}  // returns to the scheduler through uc_link

inline void run_block(unsigned num_threads) {
  State& s = state();
  while (s.stacks.size() < num_threads) s.stacks.emplace_back(new char[kStackBytes]);
  s.threads.assign(num_threads, Thread{});
  s.warps.assign((num_threads + 31) / 32, Warp{});
  s.block_barrier = Barrier{};
  s.block_barrier.live = static_cast<int>(num_threads);
  for (unsigned i = 0; i < num_threads; ++i) {
    Thread& t = s.threads[i];
    t.idx = uint3{i % s.block_dim.x, i / s.block_dim.x % s.block_dim.y, i / (s.block_dim.x * s.block_dim.y)};
    t.warp = static_cast<int>(i / 32);
    t.lane = static_cast<int>(i % 32);
    ++s.warps[t.warp].barrier.live;
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = s.stacks[i].get();
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &s.scheduler;
    makecontext(&t.context, fiber_main, 0);
  }
  // One turn resumes each live thread of `warps` once; returns whether any is still live.
  auto turn = [&](int first_warp, int last_warp) {
    bool running = false;
    for (int w = first_warp; w <= last_warp; ++w) {
      for (int lane = 0; lane < 32 && 32 * w + lane < static_cast<int>(num_threads); ++lane) {
        Thread& t = s.threads[32 * w + lane];
        if (t.done) continue;
        running = true;
        s.current = &t;
        swapcontext(&s.scheduler, &t.context);
        if (!s.fiber_error.empty()) fail(s.fiber_error.substr(10));  // drop the "emulator: " prefix
      }
    }
    return running;
  };
  const Schedule schedule = schedule_from_env();
  const int num_warps = static_cast<int>(s.warps.size());
  for (;;) {
    const uint64_t before = s.events;
    bool running = false;
    if (schedule == Schedule::kLockstep) {
      running = turn(0, num_warps - 1);
    } else {  // each warp in turn runs until it waits at __syncthreads (or ends)
      for (int i = 0; i < num_warps; ++i) {
        const int w = schedule == Schedule::kForward ? i : num_warps - 1 - i;
        for (uint64_t seen = ~uint64_t{0}; seen != s.events;) {
          seen = s.events;
          running = turn(w, w) || running;
        }
      }
    }
    if (!running) return;
    if (s.events == before) {
      fail("deadlock in block (" + std::to_string(s.block_idx.x) + ", " + std::to_string(s.block_idx.y) +
           "): every live thread waits at a barrier that cannot complete");
    }
  }
}

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  State& s = state();
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu ||
      grid.y > 65535 || grid.z > 65535) {
    return s.last_error = cudaErrorInvalidConfiguration;
  }
  const auto limit = s.max_dynamic_smem.find(reinterpret_cast<const void*>(kernel));
  if (smem_bytes > (limit == s.max_dynamic_smem.end() ? kDefaultDynamicSmem : limit->second)) {
    return s.last_error = cudaErrorInvalidValue;
  }
  s.grid_dim = grid;
  s.block_dim = block;
  s.smem_bytes = smem_bytes;
  s.smem.reset(new unsigned char[smem_bytes + kGuardBytes]);
  s.body = [&] { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(s.smem.get(), 0xff, smem_bytes);  // NaN in every float type
        std::memset(s.smem.get() + smem_bytes, 0xa5, kGuardBytes);
        s.block_idx = uint3{x, y, z};
        run_block(static_cast<unsigned>(threads));
        for (size_t i = 0; i < kGuardBytes; ++i) {
          if (s.smem[smem_bytes + i] != 0xa5) fail("write past the end of dynamic shared memory");
        }
      }
    }
  }
  return cudaSuccess;
}

inline bool eager_cp_async() {
  const char* mode = std::getenv("FASTDDPM_EMU_CP_ASYNC");
  return mode != nullptr && std::strcmp(mode, "eager") == 0;
}

inline void complete_copy(const CopyOp& op) {
  std::memcpy(op.dst, op.src, static_cast<size_t>(op.src_bytes));
  std::memset(static_cast<unsigned char*>(op.dst) + op.src_bytes, 0, 16 - static_cast<size_t>(op.src_bytes));
}

inline float fast_exp(float x) { return std::exp(x); }

}  // namespace emu

#define threadIdx (::emu::current().idx)
#define blockIdx (::emu::state().block_idx)
#define blockDim (::emu::state().block_dim)
#define gridDim (::emu::state().grid_dim)
#define __expf(x) ::emu::fast_exp(x)

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = emu::state().last_error;
  emu::state().last_error = cudaSuccess;
  return err;
}
inline const char* cudaGetErrorString(cudaError_t err) { return err == cudaSuccess ? "no error" : "emulated error"; }
inline const char* cudaGetErrorName(cudaError_t err) { return err == cudaSuccess ? "cudaSuccess" : "cudaError"; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? emu::kEmulatedSms : (attr == cudaDevAttrComputeCapabilityMajor ? 8 : 0);
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel) {
  attributes->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute, int value) {
  if (value < 0 || static_cast<size_t>(value) > emu::kMaxDynamicSmem) return cudaErrorInvalidValue;
  emu::state().max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

// ---- device functions -------------------------------------------------------------------------

inline void __syncthreads() { emu::barrier_wait(emu::state().block_barrier); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::barrier_wait(emu::full_warp("__syncwarp").barrier); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask, int = 32) {
  emu::Warp& w = emu::full_warp("__shfl_xor_sync");
  const int lane = emu::current().lane;
  std::memcpy(w.slots[lane], &v, sizeof v);
  emu::barrier_wait(w.barrier);
  float other;
  std::memcpy(&other, w.slots[lane ^ lane_mask], sizeof other);
  emu::barrier_wait(w.barrier);
  return other;
}

inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline void sincospif(float x, float* s, float* c) {
  const double a = 3.141592653589793 * static_cast<double>(x);
  *s = static_cast<float>(std::sin(a));
  *c = static_cast<float>(std::cos(a));
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
