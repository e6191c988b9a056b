// Counter-based Gaussian noise: Philox4x32-10 (Salmon et al., SC'11) with fastddpm's
// (seed, offset) counter layout, identical to fastddpm.reference.philox_normal:
//
//   element j of the logical row-major (N, C, H, W) tensor takes lane j % 4 of
//   philox(counter = (j/4 lo, j/4 hi, offset lo, offset hi), key = (seed lo, seed hi));
//   lanes (0, 1) and (2, 3) are Box-Muller pairs of u = float(x) * 2^-32 + 2^-33:
//   z_even = sqrt(-2 ln u_even) cos(2 pi u_odd), z_odd = sqrt(-2 ln u_even) sin(2 pi u_odd).
//
// The rounds are curand's Philox4x32-10 (curand_Philox4x32_10 in curand_philox4x32_x.h):
// same multipliers, Weyl key increments and word permutation. They are written out here
// because CUDA installs without the curand headers (pip's nvidia-cuda-* wheels, CI) must
// build the library too. Everything is __host__ __device__, so the host entry point
// fastddpm_philox_normal_host runs this very code on the CPU.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace fastddpm {

struct PhiloxWords {
  uint32_t x[4];
};

__host__ __device__ __forceinline__ void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#ifdef __CUDA_ARCH__
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds on counter (c0, c1, c2, c3) and key (k0, k1).
__host__ __device__ __forceinline__ PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2,
                                                              uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c0, hi0, lo0);
    philox_mulhilo(kM1, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The four 32-bit words for logical elements 4g .. 4g+3.
__host__ __device__ __forceinline__ PhiloxWords philox_group(uint64_t seed, uint64_t offset, uint64_t g) {
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), static_cast<uint32_t>(offset),
                       static_cast<uint32_t>(offset >> 32), static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// u in (0, 1]: float32(x) * 2^-32 + 2^-33, rounded as the reference rounds it (the product is
// exact, so a fused multiply-add gives the same float).
__host__ __device__ __forceinline__ float philox_uniform(uint32_t x) {
  return static_cast<float>(x) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
}

// Box-Muller of the pair (u_even, u_odd) -> (z_even, z_odd).
__host__ __device__ __forceinline__ void box_muller(uint32_t x_even, uint32_t x_odd, float& z_even,
                                                    float& z_odd) {
  const float u0 = philox_uniform(x_even), u1 = philox_uniform(x_odd);
#ifdef __CUDA_ARCH__
  const float radius = sqrtf(-2.0f * logf(u0));
  float s, c;
  sincospif(2.0f * u1, &s, &c);
  z_even = radius * c;
  z_odd = radius * s;
#else  // the reference's float64 arithmetic
  const double radius = std::sqrt(-2.0 * std::log(static_cast<double>(u0)));
  const double theta = 6.283185307179586 * static_cast<double>(u1);
  z_even = static_cast<float>(radius * std::cos(theta));
  z_odd = static_cast<float>(radius * std::sin(theta));
#endif
}

// The four normals of logical elements 4g .. 4g+3.
__host__ __device__ __forceinline__ void philox_normal4(uint64_t seed, uint64_t offset, uint64_t g,
                                                        float (&z)[4]) {
  const PhiloxWords w = philox_group(seed, offset, g);
  box_muller(w.x[0], w.x[1], z[0], z[1]);
  box_muller(w.x[2], w.x[3], z[2], z[3]);
}

// The normal of one logical element j (computes its whole group; use philox_normal4 when a
// thread owns the group).
__host__ __device__ __forceinline__ float philox_normal1(uint64_t seed, uint64_t offset, uint64_t j) {
  const PhiloxWords w = philox_group(seed, offset, j >> 2);
  const int pair = static_cast<int>(j & 2);
  float z_even, z_odd;
  box_muller(w.x[pair], w.x[pair + 1], z_even, z_odd);
  return (j & 1) ? z_odd : z_even;
}

}  // namespace fastddpm
