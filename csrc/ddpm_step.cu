// C ABI launcher of the reverse step (fastddpm/ddpm_step.cuh).
#include <cuda_runtime.h>

#include <exception>

#include "abi.h"
#include "fastddpm/ddpm_step.cuh"
#include "fastddpm/fastddpm.h"

namespace {

using fastddpm::DdpmStepParams;

template <typename T, typename TNoise, int NOISE>
cudaError_t launch(const DdpmStepParams& p, cudaStream_t stream) {
  return fastddpm::launch_ddpm_step<T, TNoise, NOISE>(p, fastddpm::abi::num_sms(), stream);
}

template <typename T>
cudaError_t launch_for_noise(const DdpmStepParams& p, int noise_mode, int noise_dtype, cudaStream_t stream) {
  switch (noise_mode) {
    case FASTDDPM_NOISE_NONE:
      return launch<T, float, FASTDDPM_NOISE_NONE>(p, stream);
    case FASTDDPM_NOISE_PHILOX:
      return launch<T, float, FASTDDPM_NOISE_PHILOX>(p, stream);
    default:
      switch (noise_dtype) {
        case FASTDDPM_FLOAT16:
          return launch<T, __half, FASTDDPM_NOISE_TENSOR>(p, stream);
        case FASTDDPM_BFLOAT16:
          return launch<T, __nv_bfloat16, FASTDDPM_NOISE_TENSOR>(p, stream);
        default:
          return launch<T, float, FASTDDPM_NOISE_TENSOR>(p, stream);
      }
  }
}

}  // namespace

extern "C" int fastddpm_ddpm_step(const void* x, const void* eps, const void* noise, void* out, const float* coef,
                                  int64_t num_steps, const int64_t* t, int64_t t_numel, int64_t t_host,
                                  int noise_mode, int noise_dtype, uint64_t seed, uint64_t offset,
                                  const int64_t* seed_device, const int64_t* offset_device, int clip_x0,
                                  int64_t N, int64_t C, int64_t H, int64_t W, int channels_last, int dtype,
                                  void* stream) {
  FASTDDPM_API_BEGIN
  FASTDDPM_CHECK_NONNEGATIVE(N);
  FASTDDPM_CHECK_NONNEGATIVE(C);
  FASTDDPM_CHECK_NONNEGATIVE(H);
  FASTDDPM_CHECK_NONNEGATIVE(W);
  FASTDDPM_CHECK_DTYPE(dtype);
  FASTDDPM_CHECK(noise_mode == FASTDDPM_NOISE_NONE || noise_mode == FASTDDPM_NOISE_TENSOR ||
                     noise_mode == FASTDDPM_NOISE_PHILOX,
                 FASTDDPM_ERROR_INVALID_VALUE, "noise_mode = %d is not 0 (none), 1 (tensor) or 2 (philox)",
                 noise_mode);
  FASTDDPM_CHECK(num_steps >= 1, FASTDDPM_ERROR_INVALID_VALUE, "num_steps = %lld: the step table is empty",
                 static_cast<long long>(num_steps));
  if (t != nullptr) {
    FASTDDPM_CHECK(t_numel == 1 || t_numel == N, FASTDDPM_ERROR_INVALID_VALUE,
                   "t_numel = %lld must be 1 or N = %lld", static_cast<long long>(t_numel),
                   static_cast<long long>(N));
  } else {
    FASTDDPM_CHECK(t_host >= 0 && t_host < num_steps, FASTDDPM_ERROR_INVALID_VALUE,
                   "t_host = %lld is outside the step table's 0..%lld", static_cast<long long>(t_host),
                   static_cast<long long>(num_steps - 1));
  }
  if (noise_mode == FASTDDPM_NOISE_TENSOR) FASTDDPM_CHECK_DTYPE(noise_dtype);
  int64_t numel = 0;
  FASTDDPM_CHECK(!__builtin_mul_overflow(N * C, H * W, &numel) && N * C >= 0 && H * W >= 0,
                 FASTDDPM_ERROR_INVALID_VALUE, "N * C * H * W overflows int64");
  if (numel == 0) return FASTDDPM_SUCCESS;
  FASTDDPM_CHECK_NOT_NULL(x);
  FASTDDPM_CHECK_NOT_NULL(eps);
  FASTDDPM_CHECK_NOT_NULL(out);
  FASTDDPM_CHECK_NOT_NULL(coef);
  if (noise_mode == FASTDDPM_NOISE_TENSOR) FASTDDPM_CHECK_NOT_NULL(noise);

  DdpmStepParams p{};
  p.x = x;
  p.eps = eps;
  p.noise = noise;
  p.out = out;
  p.coef = coef;
  p.num_steps = num_steps;
  p.t = t;
  p.t_numel = t_numel;
  p.t_host = t_host;
  p.seed = seed;
  p.offset = offset;
  p.seed_device = seed_device;
  p.offset_device = offset_device;
  p.N = N;
  p.C = C;
  p.HW = H * W;
  p.clip_x0 = clip_x0 != 0;
  p.channels_last = channels_last != 0;
  const auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (dtype) {
    case FASTDDPM_FLOAT16:
      err = launch_for_noise<__half>(p, noise_mode, noise_dtype, s);
      break;
    case FASTDDPM_BFLOAT16:
      err = launch_for_noise<__nv_bfloat16>(p, noise_mode, noise_dtype, s);
      break;
    default:
      err = launch_for_noise<float>(p, noise_mode, noise_dtype, s);
  }
  return fastddpm::abi::cuda_status(err, "ddpm_step launch");
  FASTDDPM_API_END
}
