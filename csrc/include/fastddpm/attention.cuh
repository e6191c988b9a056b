// o = softmax(q k^T * scale) v over (B, heads, L, D), D <= 512, one pass over k and v with the
// online softmax (running max m and sum l per query row), float32 softmax and accumulation.
//
// fp16 / bf16: tensor cores through mma.sync m16n8k16 (sm_80+), FlashAttention-2's scheme.
//   A block takes 16 * WM query rows of one (batch, head); warp (wm, wd) owns rows
//   16 wm .. 16 wm + 15 and head-dim columns [wd * DT, (wd + 1) * DT) with DT <= 128, so the
//   float32 output tile stays in registers even at D = 512 (WD = 4 warps share the rows).
//   Per block of BN keys: S = Q K^T (each warp over its columns; for WD > 1 the partial S
//   are summed through shared memory in a fixed order, so the warps of a row agree bit for
//   bit), the online-softmax update, P = exp2(S - m) rounded to the input type as the A
//   operand straight from registers, and O += P V. K and V tiles arrive by cp.async; V's load
//   overlaps S, the next K's load overlaps P V. DMAX = 8 (diffusers' CIFAR10 heads): S by
//   mma m16n8k8 and O in one 8-column tile, so nothing is spent on padding.
// fp32: CUDA cores (tensor-core TF32 would miss the float32 tolerance). A block takes 16 query
//   rows; 8 threads per row share the keys of S, and the columns of O (DMAX >= 32) or, for
//   DMAX < 32, the columns and the keys of P V, summed across the row's threads at the end.
//
// Head dims are padded with zeros to the head-dim tile DMAX in {8, 16, 32, 64, 128, 256, 512}
// (attention_head_dim_tile): the work of S and of P V scales with DMAX, so at most 2x D.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "fastddpm/common.cuh"
#include "fastddpm/ptx.cuh"

namespace fastddpm {

constexpr int kAttentionMaxHeadDim = 512;

struct AttentionParams {
  const void* q;  // (B, H, Lq, D), strides below
  const void* k;  // (B, H, Lk, D)
  const void* v;  // (B, H, Lk, D)
  void* o;        // (B, H, Lq, D) contiguous
  int64_t B, H, Lq, Lk, D;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // batch, head, position, in elements
  float scale_log2;                               // scale * log2(e): softmax via exp2
  bool vec_ok;  // 16-byte row chunks: D, strides and pointers aligned to 16 bytes
};

// ---- tensor cores (fp16, bf16) ----------------------------------------------------------

template <int DMAX>
struct TcConfig {
  static constexpr int kWd = DMAX > 128 ? DMAX / 128 : 1;              // warps along the head dim
  static constexpr int kDt = DMAX / kWd;                              // head-dim columns per warp
  static constexpr int kWm = DMAX >= 512 ? 1 : (DMAX >= 256 ? 2 : 4);  // warps along the rows
  static constexpr int kBm = 16 * kWm;                                // query rows per block
  static constexpr int kBn = DMAX >= 256 ? 32 : 64;                   // keys per iteration
  static constexpr int kThreads = 32 * kWm * kWd;
  // Shared row stride in elements: +16 bytes, so ldmatrix's 8 rows fall in distinct banks; at
  // DMAX = 8 the 16-byte rows are already 8 consecutive bank quads.
  static constexpr int kStride = DMAX == 8 ? 8 : DMAX + 8;
  static constexpr int kXStride = kBn + 8;  // row stride of the partial-S exchange, floats
  static constexpr size_t kSmemBytes = static_cast<size_t>(kBm + 2 * kBn) * kStride * 2 +
                                       (kWd > 1 ? static_cast<size_t>(kWm * kWd) * 16 * kXStride * 4 : 0);
  static_assert((kDt % 16 == 0 || kDt == 8) && kBn % 32 == 0, "mma tiles");
};

// Rows [row0, row0 + ROWS) of a (num_rows, D) matrix into shared memory (row stride
// TcConfig<DMAX>::kStride), zero-filled past num_rows and past D. With vec_ok, 16-byte
// cp.async copies; otherwise element loads (and the caller's __syncthreads makes them visible).
template <typename T, int DMAX, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile_async(T* dst, const T* src, int64_t row_stride, int64_t row0,
                                                int64_t num_rows, int64_t D, bool vec_ok) {
  constexpr int kChunks = DMAX / 8;
  constexpr int kStride = TcConfig<DMAX>::kStride;
  for (int i = threadIdx.x; i < ROWS * kChunks; i += THREADS) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    T* d = dst + r * kStride + c;
    const int64_t row = row0 + r;
    if (vec_ok) {
      const bool valid = row < num_rows && c < D;
      ptx::cp_async_16(d, valid ? src + row * row_stride + c : src, valid ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        d[e] = row < num_rows && c + e < D ? src[row * row_stride + c + e] : from_float<T>(0.0f);
      }
    }
  }
}

// The A operand of P V for keys 16 kc .. 16 kc + 15: P = the S tiles 2 kc and 2 kc + 1 (their C
// fragments' rows and columns are A's), rounded to T.
template <typename T, int NB>
__device__ __forceinline__ void p_fragment(uint32_t (&a)[4], const float (&s)[NB][4], int kc) {
  a[0] = ptx::pack2<T>(s[2 * kc][0], s[2 * kc][1]);
  a[1] = ptx::pack2<T>(s[2 * kc][2], s[2 * kc][3]);
  a[2] = ptx::pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
  a[3] = ptx::pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(TcConfig<DMAX>::kThreads) attention_tc_kernel(AttentionParams p) {
  using Cfg = TcConfig<DMAX>;
  constexpr int kWd = Cfg::kWd, kDt = Cfg::kDt, kBm = Cfg::kBm, kBn = Cfg::kBn, kThreads = Cfg::kThreads;
  constexpr int kStride = Cfg::kStride, kXStride = Cfg::kXStride;

  FASTDDPM_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_k = s_q + kBm * kStride;
  T* s_v = s_k + kBn * kStride;
  float* s_x = reinterpret_cast<float*>(s_v + kBn * kStride);  // partial S, when kWd > 1

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / kWd, wd = warp % kWd;
  const int g = lane / 4, qd = lane % 4;  // fragment row and column pair (ptx.cuh)
  const int64_t b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kBm;
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];

  load_tile_async<T, DMAX, kBm, kThreads>(s_q, q, p.q_stride[2], row0, p.Lq, p.D, p.vec_ok);
  load_tile_async<T, DMAX, kBn, kThreads>(s_k, k, p.k_stride[2], 0, p.Lk, p.D, p.vec_ok);
  ptx::cp_async_commit();  // group: Q, K_0
  load_tile_async<T, DMAX, kBn, kThreads>(s_v, v, p.v_stride[2], 0, p.Lk, p.D, p.vec_ok);
  ptx::cp_async_commit();  // group: V_0

  float o[kDt / 8][4];
#pragma unroll
  for (int nd = 0; nd < kDt / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of rows g and g + 8 (log2 units)
  float l[2] = {0.0f, 0.0f};            // this thread's part of the running sums

  const int num_blocks = static_cast<int>(ceil_div(p.Lk, kBn));
  for (int j = 0; j < num_blocks; ++j) {
    ptx::cp_async_wait<1>();  // K_j (and Q) have landed
    __syncthreads();

    // S = Q K_j^T over this warp's head-dim columns.
    float s[kBn / 8][4];
#pragma unroll
    for (int nb = 0; nb < kBn / 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
    if constexpr (kDt == 8) {  // one k = 8 step: Q rows as A (x2), 32 keys per ldmatrix x4 of K
      uint32_t a[2];
      ptx::ldmatrix_x2(a, s_q + (wm * 16 + (lane & 15)) * kStride);
#pragma unroll
      for (int nb4 = 0; nb4 < kBn / 32; ++nb4) {
        uint32_t bk[4];
        ptx::ldmatrix_x4(bk, s_k + (nb4 * 32 + lane) * kStride);
#pragma unroll
        for (int i = 0; i < 4; ++i) ptx::mma_1688<T>(s[4 * nb4 + i], a, bk[i]);
      }
    }
#pragma unroll
    for (int kc = 0; kc < kDt / 16; ++kc) {
      const int col = wd * kDt + kc * 16;
      uint32_t a[4];
      ptx::ldmatrix_x4(a, s_q + (wm * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * kStride + col + (lane >> 4) * 8);
#pragma unroll
      for (int nb2 = 0; nb2 < kBn / 16; ++nb2) {
        uint32_t bk[4];
        ptx::ldmatrix_x4(bk, s_k + (nb2 * 16 + (lane >> 4) * 8 + (lane & 7)) * kStride + col +
                                 ((lane >> 3) & 1) * 8);
        ptx::mma_16816<T>(s[2 * nb2], a, bk[0], bk[1]);
        ptx::mma_16816<T>(s[2 * nb2 + 1], a, bk[2], bk[3]);
      }
    }
    if constexpr (kWd > 1) {  // sum the partial S of the row's kWd warps, in warp order
      float* mine = s_x + (wm * kWd + wd) * 16 * kXStride;
#pragma unroll
      for (int nb = 0; nb < kBn / 8; ++nb) {
        *reinterpret_cast<float2*>(mine + g * kXStride + nb * 8 + 2 * qd) = make_float2(s[nb][0], s[nb][1]);
        *reinterpret_cast<float2*>(mine + (g + 8) * kXStride + nb * 8 + 2 * qd) = make_float2(s[nb][2], s[nb][3]);
      }
      __syncthreads();
#pragma unroll
      for (int nb = 0; nb < kBn / 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
      for (int w = 0; w < kWd; ++w) {
        const float* part = s_x + (wm * kWd + w) * 16 * kXStride;
#pragma unroll
        for (int nb = 0; nb < kBn / 8; ++nb) {
          const float2 top = *reinterpret_cast<const float2*>(part + g * kXStride + nb * 8 + 2 * qd);
          const float2 bottom = *reinterpret_cast<const float2*>(part + (g + 8) * kXStride + nb * 8 + 2 * qd);
          s[nb][0] += top.x;
          s[nb][1] += top.y;
          s[nb][2] += bottom.x;
          s[nb][3] += bottom.y;
        }
      }
    }

    // Online softmax: scale, mask keys past Lk, new row max, rescale the running sums and O.
    const int64_t key0 = static_cast<int64_t>(j) * kBn;
    float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nb = 0; nb < kBn / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t key = key0 + nb * 8 + 2 * qd + (e & 1);
        s[nb][e] = key < p.Lk ? s[nb][e] * p.scale_log2 : -INFINITY;
        block_max[e >> 1] = fmaxf(block_max[e >> 1], s[nb][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the four threads of a quad hold one row
      block_max[r] = fmaxf(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 1));
      block_max[r] = fmaxf(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 2));
      const float m_new = fmaxf(m[r], block_max[r]);  // finite: every key block has a valid key
      alpha[r] = exp2f(m[r] - m_new);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int nb = 0; nb < kBn / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nb][e] = exp2f(s[nb][e] - m[e >> 1]);
        l[e >> 1] += s[nb][e];
      }
    }
#pragma unroll
    for (int nd = 0; nd < kDt / 8; ++nd) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nd][e] *= alpha[e >> 1];
    }

    ptx::cp_async_wait<0>();  // V_j has landed
    __syncthreads();          // and every warp is done with K_j and the exchange buffer
    if (j + 1 < num_blocks) {
      load_tile_async<T, DMAX, kBn, kThreads>(s_k, k, p.k_stride[2], key0 + kBn, p.Lk, p.D, p.vec_ok);
    }
    ptx::cp_async_commit();  // group: K_{j+1} (maybe empty)

    // O += P V_j over this warp's head-dim columns; P comes from the S registers.
    if constexpr (kDt == 8) {  // one 8-column tile; an x4 of V holds two key steps
#pragma unroll
      for (int kc2 = 0; kc2 < kBn / 32; ++kc2) {
        uint32_t bv[4];
        ptx::ldmatrix_x4_trans(bv, s_v + (kc2 * 32 + lane) * kStride);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t a[4];
          p_fragment<T>(a, s, 2 * kc2 + h);
          ptx::mma_16816<T>(o[0], a, bv[2 * h], bv[2 * h + 1]);
        }
      }
    } else {
#pragma unroll
      for (int kc = 0; kc < kBn / 16; ++kc) {
        uint32_t a[4];
        p_fragment<T>(a, s, kc);
#pragma unroll
        for (int nd2 = 0; nd2 < kDt / 16; ++nd2) {
          uint32_t bv[4];
          ptx::ldmatrix_x4_trans(bv, s_v + (kc * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * kStride + wd * kDt +
                                         nd2 * 16 + (lane >> 4) * 8);
          ptx::mma_16816<T>(o[2 * nd2], a, bv[0], bv[1]);
          ptx::mma_16816<T>(o[2 * nd2 + 1], a, bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with V_j
    if (j + 1 < num_blocks) {
      load_tile_async<T, DMAX, kBn, kThreads>(s_v, v, p.v_stride[2], key0 + kBn, p.Lk, p.D, p.vec_ok);
    }
    ptx::cp_async_commit();  // group: V_{j+1} (maybe empty)
  }

  // O / l, rows < Lq and columns < D.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = 1.0f / l[r];
  }
  T* out = static_cast<T*>(p.o) + static_cast<int64_t>(blockIdx.x) * p.Lq * p.D;
#pragma unroll
  for (int nd = 0; nd < kDt / 8; ++nd) {
    const int64_t col = wd * kDt + nd * 8 + 2 * qd;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = row0 + wm * 16 + g + 8 * r;
      if (row >= p.Lq || col >= p.D) continue;
      const float v0 = o[nd][2 * r] * inv[r], v1 = o[nd][2 * r + 1] * inv[r];
      T* dst = out + row * p.D + col;
      if (p.D % 2 == 0) {  // col is even, so the pair is 4-byte aligned and inside the row
        *reinterpret_cast<uint32_t*>(dst) = ptx::pack2<T>(v0, v1);
      } else {
        dst[0] = from_float<T>(v0);
        if (col + 1 < p.D) dst[1] = from_float<T>(v1);
      }
    }
  }
}

// ---- CUDA cores (fp32) ------------------------------------------------------------------

template <int DMAX>
struct SimtConfig {
  static constexpr int kBm = 16;        // query rows per block, 8 threads each
  static constexpr int kThreads = 128;
  static constexpr int kBn = 4096 / DMAX < 8 ? 8 : (4096 / DMAX > 64 ? 64 : 4096 / DMAX);
  static constexpr int kStride = DMAX + 4;  // floats; rows 16 bytes apart in banks
  static constexpr int kPStride = kBn + 1;
  // O's DMAX / 4 float4 column chunks over a row's 8 threads: kColThreads threads along the
  // columns, kCols chunks each; with fewer than 8 chunks the kKeySplit thread groups also split
  // the keys of P V (thread sub takes keys j with j % kKeySplit == sub / kColThreads).
  static constexpr int kColThreads = DMAX / 4 < 8 ? DMAX / 4 : 8;
  static constexpr int kCols = DMAX / 4 / kColThreads;
  static constexpr int kKeySplit = 8 / kColThreads;
  static constexpr size_t kSmemBytes =
      (static_cast<size_t>(kBm + 2 * kBn) * kStride + static_cast<size_t>(kBm) * kPStride) * sizeof(float);
  static_assert(DMAX >= 8 && kBn % 8 == 0 && kBn % kKeySplit == 0, "8 threads per row, 4 columns each");
};

template <int DMAX, int ROWS>
__device__ __forceinline__ void load_tile_f32(float* dst, const float* src, int64_t row_stride, int64_t row0,
                                              int64_t num_rows, int64_t D, bool vec_ok) {
  constexpr int kChunks = DMAX / 4, kStride = DMAX + 4;
  for (int i = threadIdx.x; i < ROWS * kChunks; i += SimtConfig<DMAX>::kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 4;
    const int64_t row = row0 + r;
    float4 val = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (row < num_rows) {
      const float* s = src + row * row_stride + c;
      if (vec_ok) {
        if (c < D) val = *reinterpret_cast<const float4*>(s);
      } else {
        if (c < D) val.x = s[0];
        if (c + 1 < D) val.y = s[1];
        if (c + 2 < D) val.z = s[2];
        if (c + 3 < D) val.w = s[3];
      }
    }
    *reinterpret_cast<float4*>(dst + r * kStride + c) = val;
  }
}

template <int DMAX>
__global__ void __launch_bounds__(SimtConfig<DMAX>::kThreads) attention_simt_kernel(AttentionParams p) {
  using Cfg = SimtConfig<DMAX>;
  constexpr int kBm = Cfg::kBm, kBn = Cfg::kBn, kStride = Cfg::kStride, kPStride = Cfg::kPStride;
  constexpr int kCols = Cfg::kCols, kColThreads = Cfg::kColThreads, kKeySplit = Cfg::kKeySplit;

  FASTDDPM_DYNAMIC_SHARED(float4, smem4);
  float* s_q = reinterpret_cast<float*>(smem4);
  float* s_k = s_q + kBm * kStride;
  float* s_v = s_k + kBn * kStride;
  float* s_p = s_v + kBn * kStride;

  const int r = threadIdx.x / 8, sub = threadIdx.x % 8;  // query row in the block; lane in the row
  const int col_lane = sub % kColThreads, key_lane = sub / kColThreads;
  const int64_t b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kBm;
  const float* q = static_cast<const float*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const float* k = static_cast<const float*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const float* v = static_cast<const float*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
  load_tile_f32<DMAX, kBm>(s_q, q, p.q_stride[2], row0, p.Lq, p.D, p.vec_ok);

  float acc[kCols][4];  // columns 4 (i kColThreads + col_lane) .. + 3 of row r
#pragma unroll
  for (int i = 0; i < kCols; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  float m = -INFINITY, l = 0.0f;

  for (int64_t key0 = 0; key0 < p.Lk; key0 += kBn) {
    __syncthreads();  // the previous K, V tiles are consumed (and Q has landed)
    load_tile_f32<DMAX, kBn>(s_k, k, p.k_stride[2], key0, p.Lk, p.D, p.vec_ok);
    load_tile_f32<DMAX, kBn>(s_v, v, p.v_stride[2], key0, p.Lk, p.D, p.vec_ok);
    __syncthreads();

    // S for keys sub, sub + 8, ...
    float s[kBn / 8];
    float block_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < kBn / 8; ++u) {
      const float* qr = s_q + r * kStride;
      const float* kr = s_k + (sub + 8 * u) * kStride;
      float dot = 0.0f;
#pragma unroll 8
      for (int d = 0; d < DMAX; d += 4) {
        const float4 a = *reinterpret_cast<const float4*>(qr + d);
        const float4 c = *reinterpret_cast<const float4*>(kr + d);
        dot += a.x * c.x + a.y * c.y + a.z * c.z + a.w * c.w;
      }
      s[u] = key0 + sub + 8 * u < p.Lk ? dot * p.scale_log2 : -INFINITY;
      block_max = fmaxf(block_max, s[u]);
    }
#pragma unroll
    for (int mask = 1; mask < 8; mask <<= 1) {
      block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, mask));
    }
    const float m_new = fmaxf(m, block_max);
    const float alpha = exp2f(m - m_new);
    m = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int u = 0; u < kBn / 8; ++u) {
      const float pu = exp2f(s[u] - m);
      s_p[r * kPStride + sub + 8 * u] = pu;
      sum += pu;
    }
#pragma unroll
    for (int mask = 1; mask < 8; mask <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, mask);
    l = l * alpha + sum;
    __syncwarp();  // row r's P is written by, and read by, the same 8 lanes

#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      acc[i][0] *= alpha;
      acc[i][1] *= alpha;
      acc[i][2] *= alpha;
      acc[i][3] *= alpha;
    }
#pragma unroll 4
    for (int j = key_lane; j < kBn; j += kKeySplit) {
      const float pj = s_p[r * kPStride + j];
#pragma unroll
      for (int i = 0; i < kCols; ++i) {
        const float4 vv = *reinterpret_cast<const float4*>(s_v + j * kStride + 4 * (i * kColThreads + col_lane));
        acc[i][0] += pj * vv.x;
        acc[i][1] += pj * vv.y;
        acc[i][2] += pj * vv.z;
        acc[i][3] += pj * vv.w;
      }
    }
  }

#pragma unroll
  for (int mask = kColThreads; mask < 8; mask <<= 1) {  // sum the key groups' parts of O (DMAX < 32)
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][e] += __shfl_xor_sync(0xffffffffu, acc[i][e], mask);
    }
  }
  const int64_t row = row0 + r;
  if (row >= p.Lq || key_lane != 0) return;
  const float inv = 1.0f / l;
  float* out = static_cast<float*>(p.o) + (static_cast<int64_t>(blockIdx.x) * p.Lq + row) * p.D;
#pragma unroll
  for (int i = 0; i < kCols; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t col = 4 * (i * kColThreads + col_lane) + e;
      if (col < p.D) out[col] = acc[i][e] * inv;
    }
  }
}

// ---- launch -----------------------------------------------------------------------------

template <typename Kernel>
cudaError_t launch_attention_kernel(Kernel kernel, const AttentionParams& p, int threads, int rows_per_block,
                                    size_t smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(p.B * p.H), static_cast<unsigned>(ceil_div(p.Lq, rows_per_block)));
  return launch_kernel(kernel, grid, dim3(threads), smem, stream, p);
}

template <typename T, int DMAX>
cudaError_t launch_attention_dim(const AttentionParams& p, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    using Cfg = SimtConfig<DMAX>;
    return launch_attention_kernel(attention_simt_kernel<DMAX>, p, Cfg::kThreads, Cfg::kBm, Cfg::kSmemBytes,
                                   stream);
  } else {
    using Cfg = TcConfig<DMAX>;
    return launch_attention_kernel(attention_tc_kernel<T, DMAX>, p, Cfg::kThreads, Cfg::kBm, Cfg::kSmemBytes,
                                   stream);
  }
}

// The fewest query rows a block takes, whatever D: grid.y = ceil(Lq / 16) must be <= 65535.
constexpr int kAttentionMinRowsPerBlock = 16;

// The head-dim tile DMAX of a head dim D in [1, 512]: the smallest of 8, 16, ..., 512 >= D.
inline int attention_head_dim_tile(int64_t D) {
  int tile = 8;
  while (tile < D) tile *= 2;
  return tile;
}

// What launch_attention runs for head dim D in dtype (FASTDDPM_*): the head-dim tile, the
// query rows and threads of a block.
struct AttentionPlan {
  int head_dim_tile, rows_per_block, threads;
};

template <int DMAX>
AttentionPlan attention_plan_dim(int dtype) {
  if (dtype == FASTDDPM_FLOAT32) return {DMAX, SimtConfig<DMAX>::kBm, SimtConfig<DMAX>::kThreads};
  return {DMAX, TcConfig<DMAX>::kBm, TcConfig<DMAX>::kThreads};
}

inline AttentionPlan plan_attention(int64_t D, int dtype) {
  switch (attention_head_dim_tile(D)) {
    case 8:
      return attention_plan_dim<8>(dtype);
    case 16:
      return attention_plan_dim<16>(dtype);
    case 32:
      return attention_plan_dim<32>(dtype);
    case 64:
      return attention_plan_dim<64>(dtype);
    case 128:
      return attention_plan_dim<128>(dtype);
    case 256:
      return attention_plan_dim<256>(dtype);
    default:
      return attention_plan_dim<512>(dtype);
  }
}

// T is float, __half or __nv_bfloat16; p.D in [1, 512], p.Lk >= 1.
template <typename T>
cudaError_t launch_attention(const AttentionParams& p, cudaStream_t stream) {
  if (p.B * p.H == 0 || p.Lq == 0) return cudaSuccess;
  switch (attention_head_dim_tile(p.D)) {
    case 8:
      return launch_attention_dim<T, 8>(p, stream);
    case 16:
      return launch_attention_dim<T, 16>(p, stream);
    case 32:
      return launch_attention_dim<T, 32>(p, stream);
    case 64:
      return launch_attention_dim<T, 64>(p, stream);
    case 128:
      return launch_attention_dim<T, 128>(p, stream);
    case 256:
      return launch_attention_dim<T, 256>(p, stream);
    default:
      return launch_attention_dim<T, 512>(p, stream);
  }
}

}  // namespace fastddpm
