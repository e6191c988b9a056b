// y = act(GroupNorm(h + add[:, :, None, None])) over (N, C, H, W), NCHW or NHWC (channels_last),
// h = x (N, C, H, W) or, with skip, cat([x, skip], dim=1) read in place: channels c < C1 from x
// (N, C1, H, W), the others from skip (N, C - C1, H, W) at channel c - C1. A group may straddle
// the boundary. add is read at its own strides (a broadcast (N, C) view included).
//
// A group (sample n, group g) is its C/G channels times H*W positions: M elements. A block
// loads a chunk of at most 16384 elements (x + add) into registers, 32 per thread, with
// 16-byte loads where the layout allows, and computes the statistics in float32 in two
// passes over the registers: the mean, then the sum of squares about it (never
// E[x^2] - E[x]^2). It then normalizes the registers, applies weight, bias and SiLU, and
// stores: one read and one write of the tensor.
//
// NCHW: a block takes a chunk of one group (its channels' H*W runs are contiguous).
// NHWC: a group's C/G channels are a short run at a stride of C (16 bytes at CIFAR10's 4
// channels per group in float32), so a block takes a tile of several whole groups of one
// sample (the tile's channels contiguous in memory) over a range of positions, and each
// thread loads 16 bytes along C (4 floats, 8 halves): every row of the tile is read by
// neighbouring threads at full width (group_norm_silu_nhwc_kernel).
//
// A group larger than a chunk, or too few blocks to fill the GPU, is split over several
// blocks: a first kernel writes each chunk's (mean, M2) to a workspace, a second merges a
// group's chunks with Chan et al.'s formula and normalizes its chunk.
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
constexpr int kGnVecBytes = 16;                               // NHWC: bytes each thread loads along C
constexpr int64_t kGnTileRowBytes = 128;                      // NHWC: a tile row of a cache line
constexpr int64_t kGnMinTileRowBytes = 32;                    // NHWC: at least a whole sector
// NHWC: blocks of up to 512 threads that keep an H100 busy (two per SM). A split does not add
// threads (each holds 32 elements either way), it spreads them over more SMs and costs a
// second read of x, so it pays only below this.
constexpr int64_t kGnNhwcTargetBlocks = 264;

struct GroupNormParams {
  const void* x;       // (N, C1, H, W), dtype T; C1 and skip in GroupNormInputs
  const void* add;     // (N, C) at GroupNormInputs' strides, or nullptr
  const void* weight;  // (C,)
  const void* bias;    // (C,)
  void* y;             // like x
  float2* partials;    // (N * G * splits) chunk (mean, M2), when splits > 1
  int64_t N, C, HW, G;
  int64_t M;       // elements per group
  int64_t chunk;   // elements per block, a multiple of 8 (NHWC kernel: positions per block)
  int64_t splits;  // blocks per group
  int Cg;           // channels per group (<= kGnMaxGroupChannels)
  int tile_groups;  // NHWC kernel: groups per block
  float eps;
  bool silu;
  int add_dtype, param_dtype;
};  // 128 bytes: at 136 (one more int64 field) ptxas 13.0 spills the NCHW fp32 kernels for sm_90

// Where h's channels and add's elements are, a kernel argument of its own (GroupNormParams
// stays at 128 bytes).
struct GroupNormInputs {
  const void* skip;        // (N, C - C1, H, W) like x, or nullptr (then C1 = C)
  int64_t C1;              // x's channels
  int64_t add_sn, add_sc;  // add's element strides
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

// The NHWC kernel's plan: a block takes `groups_per_block` whole groups (the tile: TC of
// their channels) of one sample over `positions` positions, with `rows` positions in flight
// (rows * TC / VEC threads, VEC = 16 bytes of elements), `splits` blocks per tile. The tile
// is the narrowest whose rows fill a 128-byte line if one block holds it over all H*W
// positions; else the widest of at least a 32-byte sector that one block holds; else the
// 128-byte one, split over positions. groups_per_block = 0: no 16-byte layout exists (the
// tile's channels are never a multiple of VEC), the per-group scalar kernel runs instead.
struct GroupNormNhwcPlan {
  int64_t groups_per_block, positions, splits;
  int rows, threads;
  size_t workspace_bytes;
};

inline GroupNormNhwcPlan plan_group_norm_nhwc(int64_t N, int64_t C, int64_t HW, int64_t G, int elem_bytes) {
  GroupNormNhwcPlan plan{};
  if (N * C * HW == 0 || G < 1 || C % G != 0) return plan;
  const int64_t Cg = C / G, vec = kGnVecBytes / elem_bytes, items = kGnPerThread / vec;
  auto threads_per_row = [&](int64_t gb) { return gb * Cg / vec; };
  auto capacity = [&](int64_t gb) { return kGnMaxThreads / threads_per_row(gb) * items; };  // positions
  auto row_bytes = [&](int64_t gb) { return gb * Cg * elem_bytes; };
  int64_t wide = 0, fused = 0;
  for (int64_t gb = 1; gb <= G && threads_per_row(gb) <= kGnMaxThreads; ++gb) {
    if (G % gb != 0 || gb * Cg % vec != 0) continue;
    if (wide != 0 && row_bytes(wide) >= kGnTileRowBytes) break;
    wide = gb;
    if (capacity(gb) >= HW && row_bytes(gb) >= kGnMinTileRowBytes) fused = gb;
  }
  if (wide == 0) return plan;
  const int64_t gb = capacity(wide) >= HW || fused == 0 ? wide : fused;
  const int64_t tiles = N * (G / gb);
  int64_t splits = ceil_div(HW, capacity(gb));
  if (tiles * splits < kGnNhwcTargetBlocks) {  // too few blocks: split positions, chunks staying large
    const int64_t want = ceil_div(kGnNhwcTargetBlocks, tiles), by_size = gb * Cg * HW / kGnMinSplitChunk;
    const int64_t more = want < by_size ? want : by_size;
    if (more > splits) splits = more;
  }
  plan.groups_per_block = gb;
  plan.positions = ceil_div(HW, splits);
  plan.splits = ceil_div(HW, plan.positions);
  plan.rows = static_cast<int>(ceil_div(plan.positions, items));
  plan.threads = static_cast<int>(ceil_div(plan.rows * threads_per_row(gb), 32) * 32);
  plan.workspace_bytes = plan.splits > 1 ? static_cast<size_t>(N * G * plan.splits) * sizeof(float2) : 0;
  return plan;
}

// Every plan a launch may take (NCHW, NHWC in 4- or 2-byte elements), so the workspace size
// and the grid checks need neither layout nor dtype.
inline size_t group_norm_workspace_bytes(int64_t N, int64_t C, int64_t HW, int64_t G) {
  size_t bytes = plan_group_norm(N, C, HW, G).workspace_bytes;
  for (int elem_bytes : {4, 2}) {
    const size_t nhwc = plan_group_norm_nhwc(N, C, HW, G, elem_bytes).workspace_bytes;
    if (nhwc > bytes) bytes = nhwc;
  }
  return bytes;
}

inline int64_t group_norm_max_blocks(int64_t N, int64_t C, int64_t HW, int64_t G) {
  int64_t blocks = N * G * plan_group_norm(N, C, HW, G).splits;
  for (int elem_bytes : {4, 2}) {
    const GroupNormNhwcPlan plan = plan_group_norm_nhwc(N, C, HW, G, elem_bytes);
    if (plan.groups_per_block > 0 && N * (G / plan.groups_per_block) * plan.splits > blocks) {
      blocks = N * (G / plan.groups_per_block) * plan.splits;
    }
  }
  return blocks;
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
__device__ __forceinline__ GnBlock gn_block_setup(const GroupNormParams& p, const GroupNormInputs& in,
                                                  float* s_add, float* s_weight, float* s_bias) {
  GnBlock b;
  b.group = blockIdx.x / p.splits;
  b.split = blockIdx.x % p.splits;
  b.n = b.group / p.G;
  b.c0 = (b.group % p.G) * p.Cg;
  b.begin = static_cast<uint32_t>(b.split * p.chunk);
  const int64_t end = (b.split + 1) * p.chunk;
  b.end = static_cast<uint32_t>(end < p.M ? end : p.M);
  for (int64_t c = threadIdx.x; c < p.Cg; c += blockDim.x) {
    const int64_t a = b.n * in.add_sn + (b.c0 + c) * in.add_sc;
    s_add[c] = p.add != nullptr ? load_as_float(p.add, p.add_dtype, a) : 0.0f;
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

// The NCHW fast path: 16-byte accesses along a channel's H*W positions, the chunk held in
// registers.
template <typename T, int VEC, int MODE, bool SKIP>
__global__ void __launch_bounds__(kGnMaxThreads) group_norm_silu_kernel(GroupNormParams p, GroupNormInputs in) {
  constexpr int kItems = kGnPerThread / VEC;  // vectors per thread
  FASTDDPM_DYNAMIC_SHARED(float, staged);     // add, weight, bias of the group's channels
  __shared__ float scratch[32];
  float* s_add = staged;
  float* s_weight = staged + p.Cg;
  float* s_bias = staged + 2 * p.Cg;
  const GnBlock b = gn_block_setup<MODE>(p, in, s_add, s_weight, s_bias);

  // Thread tid's vector i starts at group element e = begin + (i * blockDim + tid) * VEC, in
  // channel e / HW at offset base + e; the channel is carried from one vector to the next
  // rather than divided anew. A vector never crosses a channel (VEC divides H*W).
  const uint32_t div = static_cast<uint32_t>(p.HW);
  const uint32_t step = blockDim.x * VEC, step_q = step / div, step_r = step % div;
  const int64_t base = (b.n * p.C + b.c0) * p.HW;
  auto for_each_vector = [&](auto&& body) {  // body(i, channel, offset) for each vector in the chunk
    uint32_t e = b.begin + threadIdx.x * VEC, q = e / div, r = e % div;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (e < b.end) body(i, q, base + e);
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
  auto add_and_sum = [&](int i, uint32_t c) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      h[i][v] += s_add[c];
      sum += h[i][v];
    }
  };
  if constexpr (!SKIP) {
    for_each_vector([&](int i, uint32_t c, int64_t off) {
      load_vec<T, VEC>(static_cast<const T*>(p.x) + off, h[i]);
      add_and_sum(i, c);
    });
  } else {
    // The group's channel q (h's c0 + q) is x's c0 + q for q < q_skip, else skip's c0 + q - C1:
    // the element at y + off is at x + off + x_shift, or skip + off + skip_shift. A group on one
    // side of the boundary reads from one pointer chosen once; one that straddles it picks one
    // per vector.
    const int64_t q_skip = in.C1 - b.c0;
    const int64_t x_shift = (b.n * in.C1 + b.c0) * p.HW - base;
    const int64_t skip_shift = (b.n * (p.C - in.C1) + b.c0 - in.C1) * p.HW - base;
    const T* x = static_cast<const T*>(p.x);
    const T* skip = static_cast<const T*>(in.skip);
    if (q_skip >= p.Cg || q_skip <= 0) {
      const int64_t shift = q_skip > 0 ? x_shift : skip_shift;
      const T* src = q_skip > 0 ? x : skip;
      for_each_vector([&](int i, uint32_t c, int64_t off) {
        load_vec<T, VEC>(src + (off + shift), h[i]);
        add_and_sum(i, c);
      });
    } else {
      for_each_vector([&](int i, uint32_t c, int64_t off) {
        load_vec<T, VEC>(c < q_skip ? x + (off + x_shift) : skip + (off + skip_shift), h[i]);
        add_and_sum(i, c);
      });
    }
  }

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
    for (int v = 0; v < VEC; ++v) out[v] = gn_output(h[i][v], mean, rstd, s_weight[c], s_bias[c], p.silu);
    store_vec<T, VEC>(static_cast<T*>(p.y) + off, out);
  });
}

// Sums the (rows, width) row-major floats at s into its first row, the block's threads
// together, in a fixed order (so every launch of the same sizes gives the same bits). Every
// thread calls it after writing its part of s; on return s[0, width) is visible to all.
__device__ __forceinline__ void gn_sum_rows(float* s, int rows, int width) {
  __syncthreads();
  for (int n = rows; n > 1;) {
    const int half = (n + 1) / 2;  // rows [half, n) are added onto rows [0, n - half)
    for (int i = threadIdx.x; i < (n - half) * width; i += blockDim.x) s[i] += s[i + half * width];
    n = half;
    __syncthreads();
  }
}

// NHWC, 16-byte vectors along C (plan_group_norm_nhwc): block (sample n, tile of tile_groups
// groups from g0, split) covers positions [pos0, pos0 + npos). Thread (row, col) holds channels
// c0 + col VEC .. + VEC - 1 at positions pos0 + row + i rows, i < kItems: a warp reads whole
// tile rows, TC contiguous elements each. Statistics: each thread's per-channel partial sums
// go through shared memory (TC channels by `rows` rows), summed over rows and then over each
// group's channels.
template <typename T, int MODE, bool SKIP>
__global__ void __launch_bounds__(kGnMaxThreads) group_norm_silu_nhwc_kernel(GroupNormParams p, GroupNormInputs in) {
  constexpr int VEC = kGnVecBytes / sizeof(T);
  constexpr int kItems = kGnPerThread / VEC;
  const int Gb = p.tile_groups, Cg = p.Cg, TC = Gb * Cg, tpr = TC / VEC;
  const int rows = static_cast<int>(ceil_div(p.chunk, kItems));  // positions in flight
  FASTDDPM_DYNAMIC_SHARED(float, s_red);  // (rows, TC) per-channel partials, rows 16-byte aligned; then
  float* s_mean = s_red + rows * TC;      // the groups' mean and 1/std, Gb each
  float* s_rstd = s_mean + Gb;

  const int64_t tile = blockIdx.x / p.splits, split = blockIdx.x % p.splits;
  const int64_t n = tile / (p.G / Gb), g0 = tile % (p.G / Gb) * Gb;
  const int col = threadIdx.x % tpr, row = threadIdx.x / tpr;
  const bool active = row < rows;  // the threads past rows * tpr only help reduce
  const int64_t c = g0 * Cg + col * VEC;  // this thread's first channel
  const int64_t pos0 = split * p.chunk;
  const int64_t npos = p.HW - pos0 < p.chunk ? p.HW - pos0 : p.chunk;
  const int64_t first = (n * p.HW + pos0 + row) * p.C + c;  // y's element offset of item 0
  const int64_t item_stride = static_cast<int64_t>(rows) * p.C;
  auto valid = [&](int i) { return active && row + static_cast<int64_t>(i) * rows < npos; };

  int grp[VEC];  // the tile-local group of each of this thread's channels
  float add[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) grp[v] = (col * VEC + v) / Cg;
  const int64_t add0 = n * in.add_sn + c * in.add_sc;  // add's element of channel c
  auto load_add = [&](int64_t add_sc) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      add[v] = p.add != nullptr && active ? load_as_float(p.add, p.add_dtype, add0 + v * add_sc) : 0.0f;
    }
  };
  if (in.add_sc == 1) {  // contiguous channels (a broadcast row too): constant offsets
    load_add(1);
  } else {
    load_add(in.add_sc);
  }
  float h[kItems][VEC];  // x + add; zeros where not valid
  auto load = [&](const T* src, int64_t stride) {  // item i at src + i * stride
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (valid(i)) {
        load_vec<T, VEC>(src + i * stride, h[i]);
#pragma unroll
        for (int v = 0; v < VEC; ++v) h[i][v] += add[v];
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) h[i][v] = 0.0f;
      }
    }
  };
  if constexpr (!SKIP) {
    load(static_cast<const T*>(p.x) + first, item_stride);
  } else {  // the thread's VEC channels all x's or all skip's: the launch takes VEC | C1
    const bool from_x = c < in.C1;
    const int64_t Cs = from_x ? in.C1 : p.C - in.C1, cs = from_x ? c : c - in.C1;  // channels, channel there
    const T* src = static_cast<const T*>(from_x ? p.x : in.skip) + (n * p.HW + pos0 + row) * Cs + cs;
    load(src, static_cast<int64_t>(rows) * Cs);
  }

  // out[g] = sum over the block of `part` for group g's channels (out: s_mean or s_rstd).
  auto group_sums = [&](const float (&part)[VEC], float* out) {
    if (active) {  // 16-byte stores, neighbouring threads in neighbouring bank quads
#pragma unroll
      for (int v = 0; v < VEC; v += 4) {
        *reinterpret_cast<float4*>(s_red + row * TC + col * VEC + v) =
            make_float4(part[v], part[v + 1], part[v + 2], part[v + 3]);
      }
    }
    gn_sum_rows(s_red, rows, TC);
    for (int g = threadIdx.x; g < Gb; g += blockDim.x) {
      float acc = 0.0f;
      for (int k = 0; k < Cg; ++k) acc += s_red[g * Cg + k];
      out[g] = acc;
    }
    __syncthreads();
  };

  if constexpr (MODE == kGnApply) {
    // The groups' statistics from their chunks' (mean, M2), Chan et al. (gn_merge_chunks),
    // R rows of partial sums per group through s_red.
    const float2* parts = p.partials + (n * p.G + g0) * p.splits;
    const int64_t cap = static_cast<int64_t>(rows) * TC / Gb;
    const int R = static_cast<int>(p.splits < cap ? p.splits : cap);
    auto count = [&](int64_t s) {
      const int64_t left = p.HW - s * p.chunk;
      return static_cast<float>(Cg * (left < p.chunk ? left : p.chunk));
    };
    const float M = static_cast<float>(Cg * p.HW);
    for (int i = threadIdx.x; i < R * Gb; i += blockDim.x) {
      const int g = i % Gb;
      float acc = 0.0f;
      for (int64_t s = i / Gb; s < p.splits; s += R) acc += count(s) * parts[g * p.splits + s].x;
      s_red[i] = acc;
    }
    gn_sum_rows(s_red, R, Gb);
    for (int g = threadIdx.x; g < Gb; g += blockDim.x) s_mean[g] = s_red[g] / M;
    __syncthreads();
    for (int i = threadIdx.x; i < R * Gb; i += blockDim.x) {
      const int g = i % Gb;
      float acc = 0.0f;
      for (int64_t s = i / Gb; s < p.splits; s += R) {
        const float2 part = parts[g * p.splits + s];
        const float d = part.x - s_mean[g];
        acc += part.y + count(s) * d * d;
      }
      s_red[i] = acc;
    }
    gn_sum_rows(s_red, R, Gb);
    for (int g = threadIdx.x; g < Gb; g += blockDim.x) s_rstd[g] = rsqrtf(s_red[g] / M + p.eps);
    __syncthreads();
  } else {
    const float count = static_cast<float>(Cg * npos);
    float part[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      part[v] = 0.0f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) part[v] += h[i][v];
    }
    group_sums(part, s_mean);
    for (int g = threadIdx.x; g < Gb; g += blockDim.x) s_mean[g] /= count;
    __syncthreads();
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float mean = s_mean[grp[v]];
      part[v] = 0.0f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (valid(i)) part[v] += (h[i][v] - mean) * (h[i][v] - mean);
      }
    }
    group_sums(part, s_rstd);  // M2
    if constexpr (MODE == kGnStats) {
      for (int g = threadIdx.x; g < Gb; g += blockDim.x) {
        p.partials[((n * p.G + g0 + g) * p.splits + split)] = make_float2(s_mean[g], s_rstd[g]);
      }
      return;
    } else {
      for (int g = threadIdx.x; g < Gb; g += blockDim.x) s_rstd[g] = rsqrtf(s_rstd[g] / count + p.eps);
      __syncthreads();
    }
  }

  if (!active) return;
  // y = (h - mean) rstd weight + bias = h scale + shift: two registers per channel, not four.
  float scale[VEC], shift[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    scale[v] = s_rstd[grp[v]] * load_as_float(p.weight, p.param_dtype, c + v);
    shift[v] = load_as_float(p.bias, p.param_dtype, c + v) - s_mean[grp[v]] * scale[v];
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (!valid(i)) continue;
    float out[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float y = h[i][v] * scale[v] + shift[v];
      out[v] = p.silu ? y / (1.0f + __expf(-y)) : y;
    }
    store_vec<T, VEC>(static_cast<T*>(p.y) + first + i * item_stride, out);
  }
}

// The general path (odd sizes, unaligned pointers): one element at a time, reading the chunk
// from memory once per pass (mean, M2, output) instead of holding it in registers.
template <typename T, int MODE>
__global__ void __launch_bounds__(kGnMaxThreads) group_norm_silu_scalar_kernel(GroupNormParams p,
                                                                               GroupNormInputs in,
                                                                               bool channels_last) {
  FASTDDPM_DYNAMIC_SHARED(float, staged);
  __shared__ float scratch[32];
  float* s_add = staged;
  float* s_weight = staged + p.Cg;
  float* s_bias = staged + 2 * p.Cg;
  const GnBlock b = gn_block_setup<MODE>(p, in, s_add, s_weight, s_bias);
  const T* x = static_cast<const T*>(p.x);
  const T* skip = static_cast<const T*>(in.skip);
  const uint32_t HW = static_cast<uint32_t>(p.HW), Cg = static_cast<uint32_t>(p.Cg);
  auto channel = [&](uint32_t e) { return channels_last ? e % Cg : e / HW; };
  // Group element e's offset in a tensor of Cs channels whose channel 0 is channel `first` of h.
  auto offset = [&](uint32_t e, int64_t Cs, int64_t first) {
    const int64_t c0 = b.c0 - first;
    return channels_last ? (b.n * p.HW + e / Cg) * Cs + c0 + e % Cg : (b.n * Cs + c0) * p.HW + e;
  };
  auto load = [&](uint32_t e) {  // h's element: x's channel, or skip's from channel C1 on
    if (skip == nullptr) return x[offset(e, p.C, 0)];
    return b.c0 + channel(e) < in.C1 ? x[offset(e, in.C1, 0)] : skip[offset(e, p.C - in.C1, in.C1)];
  };
  auto value = [&](uint32_t e) { return to_float(load(e)) + s_add[channel(e)]; };

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
    static_cast<T*>(p.y)[offset(e, p.C, 0)] =
        from_float<T>(gn_output(value(e), mean, rstd, s_weight[c], s_bias[c], p.silu));
  }
}

// Launches the fused kernel, or the statistics and output kernels of split groups:
// launch_mode(mode, skip), mode a kGn* and skip whether h has skip's channels, as
// std::integral_constant (the vectorized kernels' template arguments).
template <typename LaunchMode>
cudaError_t launch_group_norm_modes(const GroupNormParams& p, const GroupNormInputs& in, LaunchMode launch_mode) {
  auto modes = [&](auto skip) {
    if (p.splits == 1) return launch_mode(std::integral_constant<int, kGnFused>(), skip);
    const cudaError_t err = launch_mode(std::integral_constant<int, kGnStats>(), skip);
    return err != cudaSuccess ? err : launch_mode(std::integral_constant<int, kGnApply>(), skip);
  };
  return in.skip != nullptr ? modes(std::true_type()) : modes(std::false_type());
}

template <typename T, int VEC>
cudaError_t launch_group_norm_silu_vec(const GroupNormParams& p, const GroupNormInputs& in, int threads,
                                       cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(p.N * p.G * p.splits);
  const size_t smem = 3 * static_cast<size_t>(p.Cg) * sizeof(float);
  return launch_group_norm_modes(p, in, [&](auto mode, auto skip) {
    return launch_kernel(group_norm_silu_kernel<T, VEC, decltype(mode)::value, decltype(skip)::value>, dim3(blocks),
                         dim3(threads), smem, stream, p, in);
  });
}

template <typename T>
cudaError_t launch_group_norm_silu_nhwc(GroupNormParams p, const GroupNormInputs& in, const GroupNormNhwcPlan& plan,
                                        cudaStream_t stream) {
  p.chunk = plan.positions;
  p.splits = plan.splits;
  p.tile_groups = static_cast<int>(plan.groups_per_block);
  const unsigned blocks = static_cast<unsigned>(p.N * (p.G / plan.groups_per_block) * plan.splits);
  const size_t smem = (static_cast<size_t>(plan.rows) * plan.groups_per_block * p.Cg +
                       2 * static_cast<size_t>(plan.groups_per_block)) * sizeof(float);
  return launch_group_norm_modes(p, in, [&](auto mode, auto skip) {
    return launch_kernel(group_norm_silu_nhwc_kernel<T, decltype(mode)::value, decltype(skip)::value>, dim3(blocks),
                         dim3(plan.threads), smem, stream, p, in);
  });
}

template <typename T>
cudaError_t launch_group_norm_silu_scalar(const GroupNormParams& p, const GroupNormInputs& in, bool channels_last,
                                          int threads, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(p.N * p.G * p.splits);
  const size_t smem = 3 * static_cast<size_t>(p.Cg) * sizeof(float);
  return launch_group_norm_modes(p, in, [&](auto mode, auto) {  // skip: a branch per element here
    return launch_kernel(group_norm_silu_scalar_kernel<T, decltype(mode)::value>, dim3(blocks), dim3(threads),
                         smem, stream, p, in, channels_last);
  });
}

enum class GroupNormPath { kScalar, kNchwVec, kNhwcVec };

// 16-byte accesses (4 floats or 8 halves) where the layout and the pointers' alignment allow:
// NCHW when VEC divides H*W, NHWC when a tile of whole groups spans a multiple of VEC
// channels (so VEC divides C, and every row of a tile starts 16-byte aligned) and VEC divides
// C1, x's channels (so x's and skip's rows start aligned too, and no vector straddles the two);
// else one element at a time (odd sizes, or a view whose data is not 16-byte aligned).
inline GroupNormPath group_norm_path(int64_t N, int64_t C1, int64_t C, int64_t HW, int64_t G, bool channels_last,
                                     int elem_bytes, bool aligned) {
  if (!aligned) return GroupNormPath::kScalar;
  if (channels_last) {
    const bool vec = plan_group_norm_nhwc(N, C, HW, G, elem_bytes).groups_per_block > 0 &&
                     C1 % (kGnVecBytes / elem_bytes) == 0;
    return vec ? GroupNormPath::kNhwcVec : GroupNormPath::kScalar;
  }
  return HW % (kGnVecBytes / elem_bytes) == 0 ? GroupNormPath::kNchwVec : GroupNormPath::kScalar;
}

template <typename T>
cudaError_t launch_group_norm_silu(GroupNormParams p, const GroupNormInputs& in, bool channels_last,
                                   cudaStream_t stream) {
  const GroupNormPlan plan = plan_group_norm(p.N, p.C, p.HW, p.G);
  if (plan.splits == 0) return cudaSuccess;
  p.Cg = static_cast<int>(p.C / p.G);
  p.M = p.Cg * p.HW;
  p.chunk = plan.chunk;
  p.splits = plan.splits;
  const bool aligned = is_aligned(p.x, kGnVecBytes) && is_aligned(in.skip, kGnVecBytes) &&
                       is_aligned(p.y, kGnVecBytes);  // a null skip is aligned
  switch (group_norm_path(p.N, in.C1, p.C, p.HW, p.G, channels_last, sizeof(T), aligned)) {
    case GroupNormPath::kNhwcVec:
      return launch_group_norm_silu_nhwc<T>(p, in, plan_group_norm_nhwc(p.N, p.C, p.HW, p.G, sizeof(T)), stream);
    case GroupNormPath::kNchwVec:
      return launch_group_norm_silu_vec<T, kGnVecBytes / sizeof(T)>(p, in, plan.threads, stream);
    default:
      return launch_group_norm_silu_scalar<T>(p, in, channels_last, plan.threads, stream);
  }
}

}  // namespace fastddpm
