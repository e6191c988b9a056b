// C ABI launcher of GroupNorm + SiLU (fastddpm/group_norm_silu.cuh).
#include <cuda_runtime.h>

#include <exception>

#include "abi.h"
#include "fastddpm/fastddpm.h"
#include "fastddpm/group_norm_silu.cuh"

namespace {

// Shared checks of the sizes; FASTDDPM_SUCCESS when they describe a valid problem.
int check_sizes(int64_t N, int64_t C, int64_t H, int64_t W, int64_t num_groups) {
  FASTDDPM_CHECK_NONNEGATIVE(N);
  FASTDDPM_CHECK_NONNEGATIVE(C);
  FASTDDPM_CHECK_NONNEGATIVE(H);
  FASTDDPM_CHECK_NONNEGATIVE(W);
  FASTDDPM_CHECK(num_groups >= 1 && C % num_groups == 0, FASTDDPM_ERROR_INVALID_VALUE,
                 "num_groups = %lld must be positive and divide C = %lld", static_cast<long long>(num_groups),
                 static_cast<long long>(C));
  FASTDDPM_CHECK(C / num_groups <= fastddpm::kGnMaxGroupChannels, FASTDDPM_ERROR_NOT_SUPPORTED,
                 "%lld channels per group; the kernel takes at most %lld", static_cast<long long>(C / num_groups),
                 static_cast<long long>(fastddpm::kGnMaxGroupChannels));
  int64_t numel = 0;
  FASTDDPM_CHECK(!__builtin_mul_overflow(N * C, H * W, &numel) && N * C >= 0 && H * W >= 0,
                 FASTDDPM_ERROR_INVALID_VALUE, "N * C * H * W overflows int64");
  FASTDDPM_CHECK(fastddpm::group_norm_max_blocks(N, C, H * W, num_groups) <= 0x7fffffff, FASTDDPM_ERROR_NOT_SUPPORTED,
                 "N * num_groups = %lld groups need more blocks than a grid holds",
                 static_cast<long long>(N * num_groups));
  return FASTDDPM_SUCCESS;
}

// x's channels C1 of the C (skip holds the other C - C1); C1 = C = 0 is an empty problem.
int check_x_channels(int64_t C1, int64_t C) {
  FASTDDPM_CHECK(C1 <= C && (C1 > 0 || C == 0), FASTDDPM_ERROR_INVALID_VALUE,
                 "C1 = %lld channels of x must be in (0, C = %lld]", static_cast<long long>(C1),
                 static_cast<long long>(C));
  return FASTDDPM_SUCCESS;
}

}  // namespace

extern "C" int fastddpm_group_norm_silu_workspace_size(int64_t N, int64_t C, int64_t H, int64_t W,
                                                       int64_t num_groups, size_t* bytes) {
  FASTDDPM_API_BEGIN
  FASTDDPM_CHECK_NOT_NULL(bytes);
  const int status = check_sizes(N, C, H, W, num_groups);
  if (status != FASTDDPM_SUCCESS) return status;
  *bytes = fastddpm::group_norm_workspace_bytes(N, C, H * W, num_groups);
  return FASTDDPM_SUCCESS;
  FASTDDPM_API_END
}

extern "C" int fastddpm_group_norm_silu(const void* x, const void* skip, const void* add, const void* weight,
                                        const void* bias, void* y, void* workspace, size_t workspace_bytes,
                                        int64_t N, int64_t C1, int64_t C, int64_t H, int64_t W, int64_t num_groups,
                                        int64_t add_stride_n, int64_t add_stride_c, float eps, int silu,
                                        int channels_last, int dtype, int add_dtype, int param_dtype,
                                        void* stream) {
  FASTDDPM_API_BEGIN
  int status = check_sizes(N, C, H, W, num_groups);
  if (status != FASTDDPM_SUCCESS) return status;
  status = check_x_channels(C1, C);
  if (status != FASTDDPM_SUCCESS) return status;
  FASTDDPM_CHECK(skip == nullptr || C1 < C, FASTDDPM_ERROR_INVALID_VALUE,
                 "skip is given but C1 = C = %lld leaves it no channels", static_cast<long long>(C));
  FASTDDPM_CHECK_DTYPE(dtype);
  FASTDDPM_CHECK_DTYPE(param_dtype);
  if (add != nullptr) {
    FASTDDPM_CHECK_DTYPE(add_dtype);
    FASTDDPM_CHECK_NONNEGATIVE(add_stride_n);
    FASTDDPM_CHECK_NONNEGATIVE(add_stride_c);
  }
  if (N * C * H * W == 0) return FASTDDPM_SUCCESS;
  FASTDDPM_CHECK_NOT_NULL(x);
  FASTDDPM_CHECK(skip != nullptr || C1 == C, FASTDDPM_ERROR_INVALID_VALUE,
                 "skip is a null pointer but C1 = %lld < C = %lld", static_cast<long long>(C1),
                 static_cast<long long>(C));
  FASTDDPM_CHECK_NOT_NULL(weight);
  FASTDDPM_CHECK_NOT_NULL(bias);
  FASTDDPM_CHECK_NOT_NULL(y);
  const size_t needed = fastddpm::group_norm_workspace_bytes(N, C, H * W, num_groups);
  if (needed > 0) {
    FASTDDPM_CHECK(workspace != nullptr && workspace_bytes >= needed, FASTDDPM_ERROR_INVALID_VALUE,
                   "these sizes need a workspace of %zu bytes (fastddpm_group_norm_silu_workspace_size); got %zu",
                   needed, workspace != nullptr ? workspace_bytes : static_cast<size_t>(0));
    FASTDDPM_CHECK(fastddpm::is_aligned(workspace, 8), FASTDDPM_ERROR_INVALID_VALUE,
                   "workspace must be 8-byte aligned");
  }

  fastddpm::GroupNormParams p{};
  p.x = x;
  p.add = add;
  p.weight = weight;
  p.bias = bias;
  p.y = y;
  p.partials = static_cast<float2*>(workspace);
  p.N = N;
  p.C = C;
  p.HW = H * W;
  p.G = num_groups;
  p.eps = eps;
  p.silu = silu != 0;
  p.add_dtype = add_dtype;
  p.param_dtype = param_dtype;
  const fastddpm::GroupNormInputs in{skip, C1, add_stride_n, add_stride_c};
  const bool cl = channels_last != 0;
  const auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (dtype) {
    case FASTDDPM_FLOAT16:
      err = fastddpm::launch_group_norm_silu<__half>(p, in, cl, s);
      break;
    case FASTDDPM_BFLOAT16:
      err = fastddpm::launch_group_norm_silu<__nv_bfloat16>(p, in, cl, s);
      break;
    default:
      err = fastddpm::launch_group_norm_silu<float>(p, in, cl, s);
  }
  return fastddpm::abi::cuda_status(err, "group_norm_silu launch");
  FASTDDPM_API_END
}

extern "C" int fastddpm_group_norm_silu_plan(int64_t N, int64_t C1, int64_t C, int64_t H, int64_t W,
                                             int64_t num_groups, int channels_last, int dtype,
                                             int64_t* groups_per_block, int64_t* blocks,
                                             int64_t* threads_per_block, int64_t* vector_bytes) {
  FASTDDPM_API_BEGIN
  int status = check_sizes(N, C, H, W, num_groups);
  if (status != FASTDDPM_SUCCESS) return status;
  status = check_x_channels(C1, C);
  if (status != FASTDDPM_SUCCESS) return status;
  FASTDDPM_CHECK_DTYPE(dtype);
  FASTDDPM_CHECK_NOT_NULL(groups_per_block);
  FASTDDPM_CHECK_NOT_NULL(blocks);
  FASTDDPM_CHECK_NOT_NULL(threads_per_block);
  FASTDDPM_CHECK_NOT_NULL(vector_bytes);
  const int elem = fastddpm::element_size(dtype);
  const fastddpm::GroupNormPlan plan = fastddpm::plan_group_norm(N, C, H * W, num_groups);
  *groups_per_block = 1;
  *blocks = N * num_groups * plan.splits;
  *threads_per_block = plan.threads;
  *vector_bytes = fastddpm::kGnVecBytes;
  switch (fastddpm::group_norm_path(N, C1, C, H * W, num_groups, channels_last != 0, elem, true)) {
    case fastddpm::GroupNormPath::kNhwcVec: {
      const fastddpm::GroupNormNhwcPlan nhwc = fastddpm::plan_group_norm_nhwc(N, C, H * W, num_groups, elem);
      *groups_per_block = nhwc.groups_per_block;
      *blocks = N * (num_groups / nhwc.groups_per_block) * nhwc.splits;
      *threads_per_block = nhwc.threads;
      break;
    }
    case fastddpm::GroupNormPath::kScalar:
      *vector_bytes = elem;
      break;
    default:
      break;
  }
  return FASTDDPM_SUCCESS;
  FASTDDPM_API_END
}
