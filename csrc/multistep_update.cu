// C ABI launcher of the few-step solver step (fastddpm/multistep_update.cuh).
#include <cuda_runtime.h>

#include <exception>

#include "abi.h"
#include "fastddpm/fastddpm.h"
#include "fastddpm/multistep_update.cuh"

extern "C" int fastddpm_multistep_update(const float* x, const float* eps, const float* noise, float* history,
                                         float* out, const float* weights, const int64_t* dest, int64_t num_steps,
                                         int64_t num_slots, const int64_t* i, int64_t i_host, int noise_mode,
                                         uint64_t seed, uint64_t offset, const int64_t* seed_device,
                                         const int64_t* offset_device, int clip_x0, int64_t numel, void* stream) {
  FASTDDPM_API_BEGIN
  FASTDDPM_CHECK_NONNEGATIVE(numel);
  FASTDDPM_CHECK(num_slots >= 0 && num_slots <= FASTDDPM_MULTISTEP_MAX_SLOTS, FASTDDPM_ERROR_NOT_SUPPORTED,
                 "num_slots = %lld is not in 0..%d", static_cast<long long>(num_slots),
                 FASTDDPM_MULTISTEP_MAX_SLOTS);
  FASTDDPM_CHECK(noise_mode == FASTDDPM_NOISE_NONE || noise_mode == FASTDDPM_NOISE_TENSOR ||
                     noise_mode == FASTDDPM_NOISE_PHILOX,
                 FASTDDPM_ERROR_INVALID_VALUE, "noise_mode = %d is not 0 (none), 1 (tensor) or 2 (philox)",
                 noise_mode);
  FASTDDPM_CHECK(num_steps >= 1, FASTDDPM_ERROR_INVALID_VALUE, "num_steps = %lld: the solver table is empty",
                 static_cast<long long>(num_steps));
  if (i == nullptr) {
    FASTDDPM_CHECK(i_host >= 0 && i_host < num_steps, FASTDDPM_ERROR_INVALID_VALUE,
                   "i_host = %lld is outside the solver table's 0..%lld", static_cast<long long>(i_host),
                   static_cast<long long>(num_steps - 1));
  }
  int64_t history_numel = 0;
  FASTDDPM_CHECK(!__builtin_mul_overflow(num_slots, numel, &history_numel), FASTDDPM_ERROR_INVALID_VALUE,
                 "num_slots * numel overflows int64");
  if (numel == 0) return FASTDDPM_SUCCESS;
  FASTDDPM_CHECK_NOT_NULL(x);
  FASTDDPM_CHECK_NOT_NULL(eps);
  FASTDDPM_CHECK_NOT_NULL(out);
  FASTDDPM_CHECK_NOT_NULL(weights);
  FASTDDPM_CHECK_NOT_NULL(dest);
  if (num_slots > 0) FASTDDPM_CHECK_NOT_NULL(history);
  if (noise_mode == FASTDDPM_NOISE_TENSOR) FASTDDPM_CHECK_NOT_NULL(noise);

  fastddpm::MultistepParams p{};
  p.x = x;
  p.eps = eps;
  p.noise = noise;
  p.history = history;
  p.out = out;
  p.weights = weights;
  p.dest = dest;
  p.num_steps = num_steps;
  p.num_slots = static_cast<int>(num_slots);
  p.i = i;
  p.i_host = i_host;
  p.seed = seed;
  p.offset = offset;
  p.seed_device = seed_device;
  p.offset_device = offset_device;
  p.numel = numel;
  p.clip_x0 = clip_x0 != 0;
  const auto s = static_cast<cudaStream_t>(stream);
  const int sms = fastddpm::abi::num_sms();
  cudaError_t err;
  switch (noise_mode) {
    case FASTDDPM_NOISE_TENSOR:
      err = fastddpm::launch_multistep_update<FASTDDPM_NOISE_TENSOR>(p, sms, s);
      break;
    case FASTDDPM_NOISE_PHILOX:
      err = fastddpm::launch_multistep_update<FASTDDPM_NOISE_PHILOX>(p, sms, s);
      break;
    default:
      err = fastddpm::launch_multistep_update<FASTDDPM_NOISE_NONE>(p, sms, s);
  }
  return fastddpm::abi::cuda_status(err, "multistep_update launch");
  FASTDDPM_API_END
}
