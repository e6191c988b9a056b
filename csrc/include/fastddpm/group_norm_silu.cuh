// y = act(GroupNorm(x + add[:, :, None, None])) over (N, C, H, W), NCHW or NHWC (channels_last).
//
// A group (sample n, group g) is its C/G channels times H*W positions: M elements. A block
// loads a chunk of at most 16384 of them (x + add) into registers, 32 per thread, with
// 16-byte loads where the layout allows, and computes the statistics in float32 in two
// passes over the registers: the mean, then the sum of squares about it (never
// E[x^2] - E[x]^2). It then normalizes the registers, applies weight, bias and SiLU, and
// stores: one read and one write of the tensor.
//
// A group larger than a chunk, or too few groups to fill the GPU (small N * G), is split
// over several blocks: a first kernel writes each chunk's (mean, M2) to a workspace, a
// second merges a group's chunks with Chan et al.'s formula and normalizes its chunk.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "fastddpm/common.cuh"

namespace fastddpm {

constexpr int kGnMaxThreads = 512;
constexpr int kGnPerThread = 32;                              // elements held in registers
constexpr int64_t kGnMaxChunk = kGnMaxThreads * kGnPerThread;  // 16384 elements per block
constexpr int64_t kGnTargetBlocks = 1024;                     // blocks that keep an H100 busy
constexpr int64_t kGnMinSplitChunk = 8192;                    // smallest chunk worth a split
constexpr int64_t kGnMaxGroupChannels = 2048;                 // add, weight, bias staged in smem
constexpr int64_t kGnMaxGroupElements = 0x7fffffff;           // 32-bit indices inside a group

struct GroupNormParams {
  const void* x;       // (N, C, H, W), dtype T
  const void* add;     // (N, C) or nullptr
  const void* weight;  // (C,)
  const void* bias;    // (C,)
  void* y;             // like x
  float2* partials;    // (N * G * splits) chunk (mean, M2), when splits > 1
  int64_t N, C, HW, G;
  int64_t Cg, M;  // channels and elements per group
  int64_t chunk;  // elements per block, a multiple of 8
  int64_t splits;  // blocks per group
  float eps;
  bool silu;
  int add_dtype, param_dtype;
};

// How the groups are cut into blocks; a function of the sizes only, so the workspace size
// is known before the launch and results do not depend on the device.
struct GroupNormPlan {
  int64_t chunk, splits;
  int threads;
  size_t workspace_bytes;
};

inline GroupNormPlan plan_group_norm(int64_t N, int64_t C, int64_t HW, int64_t G) {
  const int64_t groups = N * G, M = C / G * HW;
  GroupNormPlan plan{};
  if (groups == 0 || M == 0) return plan;
  int64_t splits = ceil_div(M, kGnMaxChunk);
  if (groups * splits < kGnTargetBlocks) {
    const int64_t want = ceil_div(kGnTargetBlocks, groups), by_size = M / kGnMinSplitChunk;
    const int64_t more = want < by_size ? want : by_size;
    if (more > splits) splits = more;
  }
  plan.chunk = ceil_div(ceil_div(M, splits), 8) * 8;
  plan.splits = ceil_div(M, plan.chunk);
  int threads = 32;
  while (threads < kGnMaxThreads && threads * kGnPerThread < plan.chunk) threads *= 2;
  plan.threads = threads;
  plan.workspace_bytes = plan.splits > 1 ? static_cast<size_t>(groups * plan.splits) * sizeof(float2) : 0;
  return plan;
}

enum GroupNormMode : int {
  kGnFused = 0,  // one block per group: statistics and output
  kGnStats = 1,  // split groups, first kernel: each chunk's (mean, M2)
  kGnApply = 2,  // split groups, second kernel: merged statistics, output
};

// The block's group and chunk, and the group's add, weight and bias staged as float.
struct GnBlock {
  int64_t group, split, n, c0;  // n * G + g, chunk index, sample, first channel
  uint32_t begin, end;          // the chunk: group elements [begin, end); M < 2^31
};

template <int MODE>
__device__ __forceinline__ GnBlock gn_block_setup(const GroupNormParams& p, float* s_add, float* s_weight,
                                                  float* s_bias) {
  GnBlock b;
  b.group = blockIdx.x / p.splits;
  b.split = blockIdx.x % p.splits;
  b.n = b.group / p.G;
  b.c0 = (b.group % p.G) * p.Cg;
  b.begin = static_cast<uint32_t>(b.split * p.chunk);
  const int64_t end = (b.split + 1) * p.chunk;
  b.end = static_cast<uint32_t>(end < p.M ? end : p.M);
  for (int64_t c = threadIdx.x; c < p.Cg; c += blockDim.x) {
    s_add[c] = p.add != nullptr ? load_as_float(p.add, p.add_dtype, b.n * p.C + b.c0 + c) : 0.0f;
    if (MODE != kGnStats) {
      s_weight[c] = load_as_float(p.weight, p.param_dtype, b.c0 + c);
      s_bias[c] = load_as_float(p.bias, p.param_dtype, b.c0 + c);
    }
  }
  __syncthreads();
  return b;
}

// The group's mean and 1/std from its chunks' (mean, M2), Chan et al.:
// mean = sum_s n_s mean_s / M;  M2 = sum_s M2_s + n_s (mean_s - mean)^2.
__device__ __forceinline__ void gn_merge_chunks(const GroupNormParams& p, int64_t group, float* scratch,
                                                float& mean, float& rstd) {
  const float2* parts = p.partials + group * p.splits;
  auto chunk_count = [&](int64_t s) {
    const int64_t left = p.M - s * p.chunk;
    return static_cast<float>(left < p.chunk ? left : p.chunk);
  };
  float acc = 0.0f;
  for (int64_t s = threadIdx.x; s < p.splits; s += blockDim.x) acc += chunk_count(s) * parts[s].x;
  mean = block_reduce_sum(acc, scratch) / static_cast<float>(p.M);
  acc = 0.0f;
  for (int64_t s = threadIdx.x; s < p.splits; s += blockDim.x) {
    const float d = parts[s].x - mean;
    acc += parts[s].y + chunk_count(s) * d * d;
  }
  rstd = rsqrtf(block_reduce_sum(acc, scratch) / static_cast<float>(p.M) + p.eps);
}

__device__ __forceinline__ float gn_output(float h, float mean, float rstd, float weight, float bias, bool silu) {
  const float y = (h - mean) * rstd * weight + bias;
  return silu ? y / (1.0f + __expf(-y)) : y;
}

// The fast path: VEC-element accesses (8 or 16 bytes), the chunk held in registers.
template <typename T, bool CHANNELS_LAST, int VEC, int MODE>
__global__ void __launch_bounds__(kGnMaxThreads) group_norm_silu_kernel(GroupNormParams p) {
  constexpr int kItems = kGnPerThread / VEC;  // vectors per thread
  FASTDDPM_DYNAMIC_SHARED(float, staged);     // add, weight, bias of the group's channels
  __shared__ float scratch[32];
  float* s_add = staged;
  float* s_weight = staged + p.Cg;
  float* s_bias = staged + 2 * p.Cg;
  const GnBlock b = gn_block_setup<MODE>(p, s_add, s_weight, s_bias);

  // Thread tid's vector i starts at group element e = begin + (i * blockDim + tid) * VEC.
  // NCHW: e runs over H*W within a channel (channel e / HW, offset base + e); NHWC: over the
  // group's channels within a position (channel e % Cg, offset base + (e / Cg) * C + e % Cg).
  // (e / div, e % div) is carried from one vector to the next rather than divided anew. A
  // vector never crosses a channel (NCHW: VEC divides H*W) nor a position (NHWC: VEC divides Cg).
  const uint32_t div = static_cast<uint32_t>(CHANNELS_LAST ? p.Cg : p.HW);
  const uint32_t step = blockDim.x * VEC, step_q = step / div, step_r = step % div;
  const int64_t base = CHANNELS_LAST ? b.n * p.HW * p.C + b.c0 : (b.n * p.C + b.c0) * p.HW;
  auto for_each_vector = [&](auto&& body) {  // body(i, channel, offset) for each vector in the chunk
    uint32_t e = b.begin + threadIdx.x * VEC, q = e / div, r = e % div;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (e < b.end) {
        if (CHANNELS_LAST) {
          body(i, r, base + static_cast<int64_t>(q) * p.C + r);
        } else {
          body(i, q, base + e);
        }
      }
      e += step;
      q += step_q;
      r += step_r;
      if (r >= div) {
        r -= div;
        ++q;
      }
    }
  };

  float h[kItems][VEC];  // x + add; zeros past the chunk's end
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) h[i][v] = 0.0f;
  }
  float sum = 0.0f;
  for_each_vector([&](int i, uint32_t c, int64_t off) {
    load_vec<T, VEC>(static_cast<const T*>(p.x) + off, h[i]);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      h[i][v] += s_add[CHANNELS_LAST ? c + v : c];
      sum += h[i][v];
    }
  });

  float mean, rstd;
  if constexpr (MODE == kGnApply) {
    gn_merge_chunks(p, b.group, scratch, mean, rstd);
  } else {
    const float count = static_cast<float>(b.end - b.begin);
    mean = block_reduce_sum(sum, scratch) / count;
    float m2 = 0.0f;
    for_each_vector([&](int i, uint32_t, int64_t) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) m2 += (h[i][v] - mean) * (h[i][v] - mean);
    });
    m2 = block_reduce_sum(m2, scratch);
    if constexpr (MODE == kGnStats) {
      if (threadIdx.x == 0) p.partials[blockIdx.x] = make_float2(mean, m2);
      return;
    }
    rstd = rsqrtf(m2 / count + p.eps);  // fused: the chunk is the whole group
  }

  for_each_vector([&](int i, uint32_t c, int64_t off) {
    float out[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const uint32_t cv = CHANNELS_LAST ? c + v : c;
      out[v] = gn_output(h[i][v], mean, rstd, s_weight[cv], s_bias[cv], p.silu);
    }
    store_vec<T, VEC>(static_cast<T*>(p.y) + off, out);
  });
}

// The general path (odd sizes, unaligned pointers): one element at a time, reading the chunk
// from memory once per pass (mean, M2, output) instead of holding it in registers.
template <typename T, int MODE>
__global__ void __launch_bounds__(kGnMaxThreads) group_norm_silu_scalar_kernel(GroupNormParams p,
                                                                               bool channels_last) {
  FASTDDPM_DYNAMIC_SHARED(float, staged);
  __shared__ float scratch[32];
  float* s_add = staged;
  float* s_weight = staged + p.Cg;
  float* s_bias = staged + 2 * p.Cg;
  const GnBlock b = gn_block_setup<MODE>(p, s_add, s_weight, s_bias);
  const T* x = static_cast<const T*>(p.x);
  const uint32_t HW = static_cast<uint32_t>(p.HW), Cg = static_cast<uint32_t>(p.Cg);
  auto channel = [&](uint32_t e) { return channels_last ? e % Cg : e / HW; };
  auto offset = [&](uint32_t e) {
    return channels_last ? (b.n * p.HW + e / Cg) * p.C + b.c0 + e % Cg : (b.n * p.C + b.c0) * p.HW + e;
  };
  auto value = [&](uint32_t e) { return to_float(x[offset(e)]) + s_add[channel(e)]; };

  float mean, rstd;
  if constexpr (MODE == kGnApply) {
    gn_merge_chunks(p, b.group, scratch, mean, rstd);
  } else {
    const float count = static_cast<float>(b.end - b.begin);
    float acc = 0.0f;
    for (uint32_t e = b.begin + threadIdx.x; e < b.end; e += blockDim.x) acc += value(e);
    mean = block_reduce_sum(acc, scratch) / count;
    acc = 0.0f;
    for (uint32_t e = b.begin + threadIdx.x; e < b.end; e += blockDim.x) {
      const float d = value(e) - mean;
      acc += d * d;
    }
    const float m2 = block_reduce_sum(acc, scratch);
    if constexpr (MODE == kGnStats) {
      if (threadIdx.x == 0) p.partials[blockIdx.x] = make_float2(mean, m2);
      return;
    }
    rstd = rsqrtf(m2 / count + p.eps);
  }
  for (uint32_t e = b.begin + threadIdx.x; e < b.end; e += blockDim.x) {
    const uint32_t c = channel(e);
    static_cast<T*>(p.y)[offset(e)] = from_float<T>(gn_output(value(e), mean, rstd, s_weight[c], s_bias[c], p.silu));
  }
}

// Launches the fused kernel, or the statistics and output kernels of split groups.
template <typename LaunchMode>
cudaError_t launch_group_norm_modes(const GroupNormParams& p, LaunchMode launch_mode) {
  if (p.splits == 1) return launch_mode(std::integral_constant<int, kGnFused>());
  const cudaError_t err = launch_mode(std::integral_constant<int, kGnStats>());
  return err != cudaSuccess ? err : launch_mode(std::integral_constant<int, kGnApply>());
}

template <typename T, bool CHANNELS_LAST, int VEC>
cudaError_t launch_group_norm_silu_vec(const GroupNormParams& p, int threads, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(p.N * p.G * p.splits);
  const size_t smem = 3 * static_cast<size_t>(p.Cg) * sizeof(float);
  return launch_group_norm_modes(p, [&](auto mode) {
    return launch_kernel(group_norm_silu_kernel<T, CHANNELS_LAST, VEC, decltype(mode)::value>, dim3(blocks),
                         dim3(threads), smem, stream, p);
  });
}

template <typename T>
cudaError_t launch_group_norm_silu_scalar(const GroupNormParams& p, bool channels_last, int threads,
                                          cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(p.N * p.G * p.splits);
  const size_t smem = 3 * static_cast<size_t>(p.Cg) * sizeof(float);
  return launch_group_norm_modes(p, [&](auto mode) {
    return launch_kernel(group_norm_silu_scalar_kernel<T, decltype(mode)::value>, dim3(blocks), dim3(threads),
                         smem, stream, p, channels_last);
  });
}

// The widest access that fits the layout and the pointers' alignment: 16 bytes (4 floats or
// 8 halves), 8 bytes (4 halves, channels_last with 4 channels per group), else one element.
template <typename T>
cudaError_t launch_group_norm_silu(GroupNormParams p, bool channels_last, cudaStream_t stream) {
  const GroupNormPlan plan = plan_group_norm(p.N, p.C, p.HW, p.G);
  if (plan.splits == 0) return cudaSuccess;
  p.Cg = p.C / p.G;
  p.M = p.Cg * p.HW;
  p.chunk = plan.chunk;
  p.splits = plan.splits;
  auto fits = [&](int vec) {
    return (channels_last ? p.Cg : p.HW) % vec == 0 && is_aligned(p.x, vec * sizeof(T)) &&
           is_aligned(p.y, vec * sizeof(T));
  };
  constexpr int kWide = 16 / sizeof(T);
  if (channels_last) {
    if (fits(kWide)) return launch_group_norm_silu_vec<T, true, kWide>(p, plan.threads, stream);
    if constexpr (kWide == 8) {
      if (fits(4)) return launch_group_norm_silu_vec<T, true, 4>(p, plan.threads, stream);
    }
  } else if (fits(kWide)) {
    return launch_group_norm_silu_vec<T, false, kWide>(p, plan.threads, stream);
  }
  return launch_group_norm_silu_scalar<T>(p, channels_last, plan.threads, stream);
}

}  // namespace fastddpm
