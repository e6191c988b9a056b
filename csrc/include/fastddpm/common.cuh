// Shared device helpers of the fastddpm kernels: element types, vector loads, reductions.
// Torch-free: only the CUDA runtime and its fp16/bf16 headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fastddpm/fastddpm.h"

namespace fastddpm {

// ---- element types ----------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One element of a tensor whose dtype is known only at run time (small parameter vectors).
__device__ __forceinline__ float load_as_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case FASTDDPM_FLOAT16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case FASTDDPM_BFLOAT16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// N elements of T moved as one aligned access (N * sizeof(T) is 2, 4, 8 or 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// The host emulator checks the alignment the hardware requires (a CPU would not fault).
#ifdef FASTDDPM_HOST_EMULATION
#define FASTDDPM_CHECK_VEC_ALIGNED(p, bytes)                                                   \
  do {                                                                                         \
    if (reinterpret_cast<uintptr_t>(p) % (bytes) != 0) ::emu::fail("misaligned vector access"); \
  } while (0)
#else
#define FASTDDPM_CHECK_VEC_ALIGNED(p, bytes) \
  do {                                       \
  } while (0)
#endif

template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  FASTDDPM_CHECK_VEC_ALIGNED(p, sizeof(Vec<T, N>));
  const Vec<T, N> packed = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(packed.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  FASTDDPM_CHECK_VEC_ALIGNED(p, sizeof(Vec<T, N>));
  Vec<T, N> packed;
#pragma unroll
  for (int i = 0; i < N; ++i) packed.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = packed;
}

// ---- reductions -------------------------------------------------------------------------

__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
  return v;
}

// Sum over the block; every thread gets the same value (every warp adds the per-warp partials
// in the same order). `scratch` holds 32 floats of shared memory; blockDim.x is a multiple of 32.
__device__ __forceinline__ float block_reduce_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  v = warp_reduce_sum(v);
  __syncthreads();  // the previous call's readers are done with `scratch`
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_reduce_sum(lane < num_warps ? scratch[lane] : 0.0f);
}

// ---- launching ----------------------------------------------------------------------------
// Every kernel is launched through launch_kernel and declares its dynamic shared memory with
// FASTDDPM_DYNAMIC_SHARED: the two seams through which csrc/tools/emulator runs the kernels on
// the CPU (FASTDDPM_HOST_EMULATION) for the tests of machines without a GPU.

#ifdef FASTDDPM_HOST_EMULATION
#define FASTDDPM_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::emu::dynamic_shared_memory())
#else
#define FASTDDPM_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

template <typename... Params, typename... Args>
inline cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                                 cudaStream_t stream, Args... args) {
#ifdef FASTDDPM_HOST_EMULATION
  return ::emu::launch(kernel, grid, block, smem_bytes, args...);
#else
  kernel<<<grid, block, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
#endif
}

// ---- host helpers -------------------------------------------------------------------------

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int element_size(int dtype) { return dtype == FASTDDPM_FLOAT32 ? 4 : 2; }

}  // namespace fastddpm
