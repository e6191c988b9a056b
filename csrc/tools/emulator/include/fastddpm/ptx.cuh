// Host emulation of csrc/include/fastddpm/ptx.cuh (found first on the emulator's include path):
// cp.async, ldmatrix and mma.sync m16n8k16 / m16n8k8 with the fragment layouts of the PTX ISA,
//   A (16x16, row-major): a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
//   B (16x8, k x n):      b0 = (k 2q..2q+1, n g), b1 = (k 2q+8..2q+9, n g)
//   C (16x8, fp32):       c0, c1 = (g, 2q..2q+1), c2, c3 = (g+8, 2q..2q+1)
// (k = 8: A's a0, a1 and B's b0 alone)
// with g = lane / 4, q = lane % 4, computed from the values the 32 lanes hold.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastddpm {
namespace ptx {

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (!emu::in_shared(dst, 16) || reinterpret_cast<uintptr_t>(dst) % 16 != 0) {
    emu::fail("cp.async destination outside dynamic shared memory or not 16-byte aligned");
  }
  if (src_bytes != 0 && src_bytes != 16) emu::fail("cp.async of a partial 16-byte chunk");
  if (src_bytes != 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::fail("cp.async source not 16-byte aligned");
  const emu::CopyOp op{dst, src, src_bytes};
  if (emu::eager_cp_async()) {
    emu::complete_copy(op);
  } else {
    emu::current().cp_open.push_back(op);
  }
}

inline void cp_async_commit() {
  emu::Thread& t = emu::current();
  t.cp_groups.push_back(std::move(t.cp_open));
  t.cp_open.clear();
}

template <int N>
inline void cp_async_wait() {
  emu::Thread& t = emu::current();
  while (static_cast<int>(t.cp_groups.size()) > N) {
    for (const emu::CopyOp& op : t.cp_groups.front()) emu::complete_copy(op);
    t.cp_groups.erase(t.cp_groups.begin());
  }
}

namespace detail {

inline const uint16_t* posted_row(const emu::Warp& w, int lane) {
  const uint16_t* row;
  std::memcpy(&row, w.slots[lane], sizeof row);
  return row;
}

// COUNT matrices: lanes 0 .. 8 COUNT - 1 give the row addresses (the others are ignored).
template <bool TRANS, int COUNT>
inline void ldmatrix(uint32_t (&r)[COUNT], const void* row_addr) {
  emu::Warp& w = emu::full_warp("ldmatrix");
  const int lane = emu::current().lane, g = lane / 4, q = lane % 4;
  if (lane < 8 * COUNT &&
      (!emu::in_shared(row_addr, 16) || reinterpret_cast<uintptr_t>(row_addr) % 16 != 0)) {
    emu::fail("ldmatrix row address outside dynamic shared memory or not 16-byte aligned");
  }
  std::memcpy(w.slots[lane], &row_addr, sizeof row_addr);
  emu::barrier_wait(w.barrier);
  for (int i = 0; i < COUNT; ++i) {
    uint16_t lo, hi;
    if (TRANS) {  // (rows 2q and 2q + 1, column g) of matrix i
      lo = posted_row(w, 8 * i + 2 * q)[g];
      hi = posted_row(w, 8 * i + 2 * q + 1)[g];
    } else {  // (row g, columns 2q and 2q + 1) of matrix i
      lo = posted_row(w, 8 * i + g)[2 * q];
      hi = posted_row(w, 8 * i + g)[2 * q + 1];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  emu::barrier_wait(w.barrier);
}

template <typename T>
inline float element(uint32_t reg, int high) {
  const uint16_t bits = static_cast<uint16_t>(high ? reg >> 16 : reg & 0xffffu);
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__half{bits});
  } else {
    return __bfloat162float(__nv_bfloat16{bits});
  }
}

struct MmaFragments {
  uint32_t a[4], b[2];
};

}  // namespace detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) { detail::ldmatrix<false, 4>(r, row_addr); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row_addr) { detail::ldmatrix<false, 2>(r, row_addr); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) { detail::ldmatrix<true, 4>(r, row_addr); }

namespace detail {

// d = a * b + d for one 16x8xK tile, K = 16 (a0..a3, b0, b1) or 8 (a0, a1, b0).
template <typename T, int K>
inline void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(sizeof(detail::MmaFragments) <= 64, "one exchange slot per lane");
  emu::Warp& w = emu::full_warp("mma.sync");
  const int lane = emu::current().lane, g = lane / 4, q = lane % 4;
  const detail::MmaFragments mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  std::memcpy(w.slots[lane], &mine, sizeof mine);
  emu::barrier_wait(w.barrier);
  auto frag = [&](int l) {
    detail::MmaFragments f;
    std::memcpy(&f, w.slots[l], sizeof f);
    return f;
  };
  auto A = [&](int r, int k) {
    return detail::element<T>(frag((r % 8) * 4 + (k % 8) / 2).a[(r >= 8) + 2 * (k >= 8)], k % 2);
  };
  auto B = [&](int k, int n) { return detail::element<T>(frag(n * 4 + (k % 8) / 2).b[k >= 8], k % 2); };
  float out[4];
  for (int j = 0; j < 4; ++j) {
    const int row = g + 8 * (j / 2), col = 2 * q + j % 2;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) acc += A(row, k) * B(k, col);
    out[j] = d[j] + acc;
  }
  emu::barrier_wait(w.barrier);
  for (int j = 0; j < 4; ++j) d[j] = out[j];
}

}  // namespace detail

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  detail::mma<T, 16>(d, a, b0, b1);
}

template <typename T>
inline void mma_1688(float (&d)[4], const uint32_t (&a)[2], uint32_t b0) {
  const uint32_t a4[4] = {a[0], a[1], 0u, 0u};  // a2, a3 (k >= 8) unused
  detail::mma<T, 8>(d, a4, b0, 0u);
}

template <typename T>
inline uint32_t pack2(float lo, float hi) {
  uint16_t l, h;
  if constexpr (std::is_same_v<T, __half>) {
    l = __float2half_rn(lo).bits;
    h = __float2half_rn(hi).bits;
  } else {
    l = __float2bfloat16_rn(lo).bits;
    h = __float2bfloat16_rn(hi).bits;
  }
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

}  // namespace ptx
}  // namespace fastddpm
