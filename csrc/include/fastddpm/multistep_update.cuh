// One few-step solver step (fastddpm/solver_table.py), elementwise over flat float32 tensors:
//
//   D      = clamp?(W[ROW_D][X] x + W[ROW_D][EPS] eps)
//   keep_a = W[ROW_KEEP_A] . [x, eps, D, z, slot_0 .. slot_{M-1}]   -> history[dest[i][0]]
//   keep_b = W[ROW_KEEP_B] . [...]                                   -> history[dest[i][1]]
//   x_next = W[ROW_X] . [...]
//
// W is row i of the (num_steps, FASTDDPM_MULTISTEP_NUM_ROWS, FASTDDPM_MULTISTEP_NUM_INPUTS + M)
// float32 weights and dest row i of the (num_steps, 2) int64 destinations, i read from device
// memory, so a CUDA graph replays the step with a new i (each block loads the row into shared
// memory once). Each thread reads every input of its
// elements before it writes a slot (a slot may be read and written in one step); a destination
// outside 0..M-1 (-1: none) writes nothing. A slot, or z, that no row weighs is not read (drawn).
// Each dot product is summed column by column as fastddpm.reference sums it, without fused
// multiply-adds, so with z given the result equals the reference bit for bit.
//
// A device step index outside [0, num_steps) cannot raise: x_next is NaN everywhere, no slot is
// written and the table is not read, as in the Triton kernel; a host-side i is checked before
// the launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fastddpm/common.cuh"
#include "fastddpm/fastddpm.h"
#include "fastddpm/philox.cuh"

namespace fastddpm {

enum MultistepColumn : int {
  kColX = FASTDDPM_MULTISTEP_COL_X,
  kColEps = FASTDDPM_MULTISTEP_COL_EPS,
  kColD = FASTDDPM_MULTISTEP_COL_D,
  kColZ = FASTDDPM_MULTISTEP_COL_Z,
  kNumInputs = FASTDDPM_MULTISTEP_NUM_INPUTS,
};
enum MultistepRow : int {
  kRowD = FASTDDPM_MULTISTEP_ROW_D,
  kRowKeepA = FASTDDPM_MULTISTEP_ROW_KEEP_A,
  kRowKeepB = FASTDDPM_MULTISTEP_ROW_KEEP_B,
  kRowX = FASTDDPM_MULTISTEP_ROW_X,
  kNumRows = FASTDDPM_MULTISTEP_NUM_ROWS,
};
constexpr int kMaxSlots = FASTDDPM_MULTISTEP_MAX_SLOTS;
constexpr int kMaxColumns = kNumInputs + kMaxSlots;

struct MultistepParams {
  const float* x;       // (numel,)
  const float* eps;     // (numel,)
  const float* noise;   // z for FASTDDPM_NOISE_TENSOR, (numel,)
  float* history;       // (num_slots, numel), read and written in place
  float* out;           // x_next, (numel,)
  const float* weights; // (num_steps, kNumRows, kNumInputs + num_slots)
  const int64_t* dest;  // (num_steps, 2)
  int64_t num_steps;
  int num_slots;
  const int64_t* i;     // the device step index, or nullptr: use i_host
  int64_t i_host;
  uint64_t seed, offset;
  const int64_t* seed_device;    // or nullptr: use seed; else its bits are the seed
  const int64_t* offset_device;  // or nullptr: use offset
  int64_t numel;
  bool clip_x0;
};

// Row i of the table, loaded once per block into shared memory: the weights, zero past the
// table's columns and for an invalid i, and the destinations, -1 for an invalid i.
struct MultistepRowWeights {
  float w[kNumRows][kMaxColumns];
  int64_t dest[2];
};

__device__ __forceinline__ int64_t multistep_index(const MultistepParams& p) {
  return p.i != nullptr ? __ldg(p.i) : p.i_host;
}

__device__ __forceinline__ bool multistep_index_valid(const MultistepParams& p, int64_t i) {
  return i >= 0 && i < p.num_steps;
}

// Every thread of the block calls this; the row is in `r` after it returns.
__device__ __forceinline__ void load_multistep_row(const MultistepParams& p, MultistepRowWeights& r) {
  const int64_t i = multistep_index(p);
  const bool valid = multistep_index_valid(p, i);
  const int columns = kNumInputs + p.num_slots;
  for (int k = threadIdx.x; k < kNumRows * kMaxColumns; k += blockDim.x) {
    const int row = k / kMaxColumns, c = k - row * kMaxColumns;
    r.w[row][c] = valid && c < columns ? __ldg(p.weights + (i * kNumRows + row) * columns + c) : 0.0f;
  }
  if (threadIdx.x < 2) r.dest[threadIdx.x] = valid ? __ldg(p.dest + 2 * i + threadIdx.x) : -1;
  __syncthreads();
}

// Whether any of the three combined rows weighs column c.
__device__ __forceinline__ bool weighed(const MultistepRowWeights& r, int c) {
  return r.w[kRowKeepA][c] != 0.0f || r.w[kRowKeepB][c] != 0.0f || r.w[kRowX][c] != 0.0f;
}

__device__ __forceinline__ float clamp_unit(float v) {
  return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);  // keeps a NaN, as torch.clamp does
}

// The rows combined over every input, k = 0, 1, 2.
__device__ __forceinline__ constexpr int combined_row(int k) { return k == 0 ? kRowKeepA : k == 1 ? kRowKeepB : kRowX; }

// acc[k][v] = W[combined_row(k)] . [x, eps, D, z] for N elements, column by column.
template <int N>
__device__ __forceinline__ void combine_inputs(const MultistepRowWeights& r, bool clip_x0, const float (&x)[N],
                                               const float (&eps)[N], const float (&z)[N], float (&acc)[3][N]) {
#pragma unroll
  for (int v = 0; v < N; ++v) {
    float d = __fadd_rn(__fmul_rn(r.w[kRowD][kColX], x[v]), __fmul_rn(r.w[kRowD][kColEps], eps[v]));
    if (clip_x0) d = clamp_unit(d);
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const float* w = r.w[combined_row(k)];
      float a = __fmul_rn(w[kColX], x[v]);
      a = __fadd_rn(a, __fmul_rn(w[kColEps], eps[v]));
      a = __fadd_rn(a, __fmul_rn(w[kColD], d));
      acc[k][v] = __fadd_rn(a, __fmul_rn(w[kColZ], z[v]));
    }
  }
}

// acc += slot s's column times h, for N elements.
template <int N>
__device__ __forceinline__ void add_slot(const MultistepRowWeights& r, int s, const float (&h)[N],
                                         float (&acc)[3][N]) {
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    const float w = r.w[combined_row(k)][kNumInputs + s];
#pragma unroll
    for (int v = 0; v < N; ++v) acc[k][v] = __fadd_rn(acc[k][v], __fmul_rn(w, h[v]));
  }
}

__device__ __forceinline__ uint64_t device_or(const int64_t* device, uint64_t host) {
  return device != nullptr ? static_cast<uint64_t>(__ldg(device)) : host;
}

// Four consecutive elements (one Philox group) per thread and iteration, in 16-byte accesses:
// numel a multiple of 4 and every pointer 16-byte aligned.
template <int NOISE>
__global__ void multistep_update_vec_kernel(MultistepParams p) {
  __shared__ MultistepRowWeights r;
  load_multistep_row(p, r);
  const bool valid = multistep_index_valid(p, multistep_index(p));
  const bool draw = NOISE != FASTDDPM_NOISE_NONE && weighed(r, kColZ);
  const uint64_t seed = device_or(p.seed_device, p.seed), offset = device_or(p.offset_device, p.offset);
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < p.numel / 4;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first = 4 * g;
    float x[4], eps[4], z[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc[3][4];
    load_vec<float, 4>(p.x + first, x);
    load_vec<float, 4>(p.eps + first, eps);
    if (draw && NOISE == FASTDDPM_NOISE_TENSOR) load_vec<float, 4>(p.noise + first, z);
    if (draw && NOISE == FASTDDPM_NOISE_PHILOX) philox_normal4(seed, offset, static_cast<uint64_t>(g), z);
    combine_inputs<4>(r, p.clip_x0, x, eps, z, acc);
    for (int s = 0; s < p.num_slots; ++s) {  // every slot read before any is written
      if (!weighed(r, kNumInputs + s)) continue;
      float h[4];
      load_vec<float, 4>(p.history + s * p.numel + first, h);
      add_slot<4>(r, s, h, acc);
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (r.dest[k] >= 0 && r.dest[k] < p.num_slots) store_vec<float, 4>(p.history + r.dest[k] * p.numel + first, acc[k]);
    }
    if (!valid) acc[2][0] = acc[2][1] = acc[2][2] = acc[2][3] = __int_as_float(0x7fc00000);  // NaN
    store_vec<float, 4>(p.out + first, acc[2]);
  }
}

// Any size and alignment: one element per thread and iteration.
template <int NOISE>
__global__ void multistep_update_scalar_kernel(MultistepParams p) {
  __shared__ MultistepRowWeights r;
  load_multistep_row(p, r);
  const bool valid = multistep_index_valid(p, multistep_index(p));
  const bool draw = NOISE != FASTDDPM_NOISE_NONE && weighed(r, kColZ);
  const uint64_t seed = device_or(p.seed_device, p.seed), offset = device_or(p.offset_device, p.offset);
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < p.numel;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float x[1] = {p.x[j]}, eps[1] = {p.eps[j]}, z[1] = {0.0f}, acc[3][1];
    if (draw && NOISE == FASTDDPM_NOISE_TENSOR) z[0] = p.noise[j];
    if (draw && NOISE == FASTDDPM_NOISE_PHILOX) z[0] = philox_normal1(seed, offset, static_cast<uint64_t>(j));
    combine_inputs<1>(r, p.clip_x0, x, eps, z, acc);
    for (int s = 0; s < p.num_slots; ++s) {
      if (!weighed(r, kNumInputs + s)) continue;
      const float h[1] = {p.history[s * p.numel + j]};
      add_slot<1>(r, s, h, acc);
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (r.dest[k] >= 0 && r.dest[k] < p.num_slots) p.history[r.dest[k] * p.numel + j] = acc[k][0];
    }
    p.out[j] = valid ? acc[2][0] : __int_as_float(0x7fc00000);  // NaN
  }
}

// Launch on `stream`: 16-byte accesses where every tensor allows them, else element by element.
template <int NOISE>
cudaError_t launch_multistep_update(const MultistepParams& p, int num_sms, cudaStream_t stream) {
  constexpr int kThreads = 256;
  if (p.numel == 0) return cudaSuccess;
  const bool vec_ok = p.numel % 4 == 0 && is_aligned(p.x, 16) && is_aligned(p.eps, 16) &&
                      is_aligned(p.out, 16) && (p.num_slots == 0 || is_aligned(p.history, 16)) &&
                      (NOISE != FASTDDPM_NOISE_TENSOR || is_aligned(p.noise, 16));
  const int64_t work = vec_ok ? p.numel / 4 : p.numel;
  const int64_t blocks = ceil_div(work, kThreads);
  const int64_t max_blocks = static_cast<int64_t>(num_sms > 0 ? num_sms : 132) * 16;
  const unsigned grid = static_cast<unsigned>(blocks < max_blocks ? blocks : max_blocks);
  if (vec_ok) {
    return launch_kernel(multistep_update_vec_kernel<NOISE>, dim3(grid), dim3(kThreads), 0, stream, p);
  }
  return launch_kernel(multistep_update_scalar_kernel<NOISE>, dim3(grid), dim3(kThreads), 0, stream, p);
}

}  // namespace fastddpm
