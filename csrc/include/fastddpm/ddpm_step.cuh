// The reverse step x_t -> x_{t-1}, elementwise over (N, C, H, W).
//
//   clip_x0:  x0 = clamp(a x_t - b eps, -1, 1),  mean = coef_x0 x0 + coef_xt x_t
//   direct:   mean = direct_xt x_t - direct_eps eps
//   x_{t-1} = mean + sigma z
//
// (a, b, coef_x0, coef_xt, direct_xt, direct_eps, sigma) is row t of the float32 step table
// (columns FASTDDPM_STEP_* of fastddpm.h) and t is read from device memory, so a step can be
// captured in a CUDA graph and replayed for every t. The arithmetic is the reference's, operation by
// operation and without fused multiply-adds, so with z given the float32 result equals
// fastddpm.reference.ddpm_step bit for bit; z is `noise` or in-kernel Philox (philox.cuh) at
// (seed, offset), each a launch argument or read from device memory (so a captured step can
// replay with a new offset).
//
// A step index outside [0, num_steps) read from device memory cannot raise (the launch has
// returned long before). It is never clamped to the table, which would silently run another
// step: every element of its sample is NaN (of every sample, for one t shared by the batch),
// the table is not read for it, and the other samples are computed as usual. The Triton
// kernel and the reference do the same; a host-side t is checked before the launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fastddpm/common.cuh"
#include "fastddpm/fastddpm.h"
#include "fastddpm/philox.cuh"

namespace fastddpm {

// The step table's columns (FASTDDPM_STEP_* of fastddpm.h), by their names in the kernels.
enum StepColumn : int {
  kSqrtRecipAbar = FASTDDPM_STEP_SQRT_RECIP_ABAR,
  kSqrtRecipm1Abar = FASTDDPM_STEP_SQRT_RECIPM1_ABAR,
  kCoefX0 = FASTDDPM_STEP_COEF_X0,
  kCoefXt = FASTDDPM_STEP_COEF_XT,
  kDirectXt = FASTDDPM_STEP_DIRECT_XT,
  kDirectEps = FASTDDPM_STEP_DIRECT_EPS,
  kSigma = FASTDDPM_STEP_SIGMA,
  kNumStepColumns = FASTDDPM_STEP_NUM_COEFS,
};

struct DdpmStepParams {
  const void* x;      // x_t (N, C, H, W)
  const void* eps;    // predicted noise, same layout
  const void* noise;  // z for FASTDDPM_NOISE_TENSOR, same layout
  void* out;          // x_{t-1}, same layout
  const float* coef;  // (num_steps, kNumStepColumns)
  int64_t num_steps;
  const int64_t* t;  // device step indices (t_numel = 1 or N), or nullptr: use t_host
  int64_t t_numel;
  int64_t t_host;
  uint64_t seed, offset;
  const int64_t* seed_device;    // or nullptr: use seed; else its bits are the seed
  const int64_t* offset_device;  // or nullptr: use offset; else its bits are the offset
  int64_t N, C, HW;
  bool clip_x0;
  bool channels_last;
};

struct StepRow {
  float c[kNumStepColumns];
  bool valid;
};

// Row t of the table for sample n; an invalid t reads nothing and gives zeros (step_out then
// writes NaN).
__device__ __forceinline__ StepRow load_step_row(const DdpmStepParams& p, int64_t n) {
  int64_t row = p.t_host;
  if (p.t != nullptr) row = __ldg(p.t + (p.t_numel == 1 ? 0 : n));
  StepRow r;
  r.valid = row >= 0 && row < p.num_steps;
#pragma unroll
  for (int k = 0; k < kNumStepColumns; ++k) r.c[k] = 0.0f;
  if (r.valid) {
#pragma unroll
    for (int k = 0; k < kNumStepColumns; ++k) r.c[k] = __ldg(p.coef + row * kNumStepColumns + k);
  }
  return r;
}

struct PhiloxKey {
  uint64_t seed, offset;
};

// The Philox seed and offset of this launch: from device memory where given.
__device__ __forceinline__ PhiloxKey load_philox_key(const DdpmStepParams& p) {
  PhiloxKey k{p.seed, p.offset};
  if (p.seed_device != nullptr) k.seed = static_cast<uint64_t>(__ldg(p.seed_device));
  if (p.offset_device != nullptr) k.offset = static_cast<uint64_t>(__ldg(p.offset_device));
  return k;
}

// The mean of one element, as fastddpm.reference computes it (no contraction into FMAs).
__device__ __forceinline__ float step_mean(const StepRow& r, float x, float eps, bool clip_x0) {
  if (clip_x0) {
    float x0 = __fsub_rn(__fmul_rn(r.c[kSqrtRecipAbar], x), __fmul_rn(r.c[kSqrtRecipm1Abar], eps));
    x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);  // keeps a NaN, as torch.clamp does
    return __fadd_rn(__fmul_rn(r.c[kCoefX0], x0), __fmul_rn(r.c[kCoefXt], x));
  }
  return __fsub_rn(__fmul_rn(r.c[kDirectXt], x), __fmul_rn(r.c[kDirectEps], eps));
}

__device__ __forceinline__ float step_out(const StepRow& r, float mean, float z) {
  return r.valid ? __fadd_rn(mean, __fmul_rn(r.c[kSigma], z)) : __int_as_float(0x7fc00000);  // NaN
}

// Contiguous NCHW tensors, VEC elements per access (VEC a multiple of 4, so each vector holds
// whole Philox groups, and C*H*W a multiple of VEC, so a vector lies inside one sample).
template <typename T, typename TNoise, int NOISE, int VEC>
__global__ void ddpm_step_vec_kernel(DdpmStepParams p) {
  static_assert(VEC % 4 == 0, "a vector holds whole Philox groups");
  const int64_t chw = p.C * p.HW;
  const int64_t num_vecs = p.N * chw / VEC;
  const PhiloxKey key = NOISE == FASTDDPM_NOISE_PHILOX ? load_philox_key(p) : PhiloxKey{0, 0};
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < num_vecs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first = i * VEC;
    const StepRow r = load_step_row(p, first / chw);
    float x[VEC], eps[VEC], z[VEC];
    load_vec<T, VEC>(static_cast<const T*>(p.x) + first, x);
    load_vec<T, VEC>(static_cast<const T*>(p.eps) + first, eps);
    if constexpr (NOISE == FASTDDPM_NOISE_TENSOR) {
      load_vec<TNoise, VEC>(static_cast<const TNoise*>(p.noise) + first, z);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) z[v] = 0.0f;
      if (NOISE == FASTDDPM_NOISE_PHILOX && r.c[kSigma] != 0.0f) {
#pragma unroll
        for (int q = 0; q < VEC / 4; ++q) {
          float z4[4];
          philox_normal4(key.seed, key.offset, static_cast<uint64_t>(first / 4 + q), z4);
#pragma unroll
          for (int v = 0; v < 4; ++v) z[4 * q + v] = z4[v];
        }
      }
    }
    float out[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = step_out(r, step_mean(r, x[v], eps[v], p.clip_x0), z[v]);
    store_vec<T, VEC>(static_cast<T*>(p.out) + first, out);
  }
}

// Any shape, contiguous or channels_last: one element per thread and iteration. The Philox
// element index is the logical NCHW index, whatever the memory layout.
template <typename T, typename TNoise, int NOISE>
__global__ void ddpm_step_scalar_kernel(DdpmStepParams p) {
  const int64_t chw = p.C * p.HW;
  const int64_t numel = p.N * chw;
  const PhiloxKey key = NOISE == FASTDDPM_NOISE_PHILOX ? load_philox_key(p) : PhiloxKey{0, 0};
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / chw;
    int64_t logical = i;
    if (p.channels_last) {  // i = (n * HW + hw) * C + c  ->  (n * C + c) * HW + hw
      const int64_t rest = i - n * chw, hw = rest / p.C, c = rest - hw * p.C;
      logical = (n * p.C + c) * p.HW + hw;
    }
    const StepRow r = load_step_row(p, n);
    const float x = to_float(static_cast<const T*>(p.x)[i]);
    const float eps = to_float(static_cast<const T*>(p.eps)[i]);
    float z = 0.0f;
    if constexpr (NOISE == FASTDDPM_NOISE_TENSOR) {
      z = to_float(static_cast<const TNoise*>(p.noise)[i]);
    } else if constexpr (NOISE == FASTDDPM_NOISE_PHILOX) {
      if (r.c[kSigma] != 0.0f) z = philox_normal1(key.seed, key.offset, static_cast<uint64_t>(logical));
    }
    static_cast<T*>(p.out)[i] = from_float<T>(step_out(r, step_mean(r, x, eps, p.clip_x0), z));
  }
}

// Launch on `stream`: the vectorized kernel where layout and alignment allow, else the
// scalar one. noise_dtype picks TNoise for FASTDDPM_NOISE_TENSOR.
template <typename T, typename TNoise, int NOISE>
cudaError_t launch_ddpm_step(const DdpmStepParams& p, int num_sms, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T) < 4 ? 4 : 16 / sizeof(T);  // 4 floats or 8 halves
  constexpr int kThreads = 256;
  const int64_t numel = p.N * p.C * p.HW;
  if (numel == 0) return cudaSuccess;
  const bool vec_ok = !p.channels_last && (p.C * p.HW) % kVec == 0 &&
                      is_aligned(p.x, kVec * sizeof(T)) && is_aligned(p.eps, kVec * sizeof(T)) &&
                      is_aligned(p.out, kVec * sizeof(T)) &&
                      (NOISE != FASTDDPM_NOISE_TENSOR || is_aligned(p.noise, kVec * sizeof(TNoise)));
  const int64_t work = vec_ok ? numel / kVec : numel;
  // Enough blocks to fill the device several times over; the loops stride over the rest.
  const int64_t blocks = work < 1 ? 1 : ceil_div(work, kThreads);
  const int64_t max_blocks = static_cast<int64_t>(num_sms > 0 ? num_sms : 132) * 16;
  const unsigned grid = static_cast<unsigned>(blocks < max_blocks ? blocks : max_blocks);
  if (vec_ok) {
    return launch_kernel(ddpm_step_vec_kernel<T, TNoise, NOISE, kVec>, dim3(grid), dim3(kThreads), 0, stream, p);
  }
  return launch_kernel(ddpm_step_scalar_kernel<T, TNoise, NOISE>, dim3(grid), dim3(kThreads), 0, stream, p);
}

}  // namespace fastddpm
