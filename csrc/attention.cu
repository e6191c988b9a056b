// C ABI launcher of attention (fastddpm/attention.cuh).
#include <cuda_runtime.h>

#include <exception>

#include "abi.h"
#include "fastddpm/attention.cuh"
#include "fastddpm/fastddpm.h"

extern "C" int fastddpm_attention(const void* q, const void* k, const void* v, void* o, int64_t B, int64_t heads,
                                  int64_t Lq, int64_t Lk, int64_t D, const int64_t* q_strides,
                                  const int64_t* k_strides, const int64_t* v_strides, float scale, int dtype,
                                  void* stream) {
  FASTDDPM_API_BEGIN
  FASTDDPM_CHECK_NONNEGATIVE(B);
  FASTDDPM_CHECK_NONNEGATIVE(heads);
  FASTDDPM_CHECK_NONNEGATIVE(Lq);
  FASTDDPM_CHECK_NONNEGATIVE(Lk);
  FASTDDPM_CHECK_NONNEGATIVE(D);
  FASTDDPM_CHECK_DTYPE(dtype);
  FASTDDPM_CHECK(D <= fastddpm::kAttentionMaxHeadDim, FASTDDPM_ERROR_NOT_SUPPORTED,
                 "head dim D = %lld; the kernels take D <= %d", static_cast<long long>(D),
                 fastddpm::kAttentionMaxHeadDim);
  FASTDDPM_CHECK(B * heads <= 0x7fffffff, FASTDDPM_ERROR_NOT_SUPPORTED,
                 "B * heads = %lld exceeds the grid's 2^31 - 1", static_cast<long long>(B * heads));
  FASTDDPM_CHECK(fastddpm::ceil_div(Lq, fastddpm::kAttentionMinRowsPerBlock) <= 65535,
                 FASTDDPM_ERROR_NOT_SUPPORTED, "Lq = %lld exceeds the kernels' %d query positions",
                 static_cast<long long>(Lq), 65535 * fastddpm::kAttentionMinRowsPerBlock);
  FASTDDPM_CHECK_NOT_NULL(q_strides);
  FASTDDPM_CHECK_NOT_NULL(k_strides);
  FASTDDPM_CHECK_NOT_NULL(v_strides);
  if (B * heads * Lq * D == 0) return FASTDDPM_SUCCESS;
  FASTDDPM_CHECK_NOT_NULL(q);
  FASTDDPM_CHECK_NOT_NULL(o);
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t elem = fastddpm::element_size(dtype);
  if (Lk == 0) {  // softmax over no keys: the reference's empty matmul gives zeros
    return fastddpm::abi::cuda_status(cudaMemsetAsync(o, 0, B * heads * Lq * D * elem, s), "attention (Lk = 0)");
  }
  FASTDDPM_CHECK_NOT_NULL(k);
  FASTDDPM_CHECK_NOT_NULL(v);

  fastddpm::AttentionParams p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.o = o;
  p.B = B;
  p.H = heads;
  p.Lq = Lq;
  p.Lk = Lk;
  p.D = D;
  const int64_t chunk = 16 / elem;  // elements per 16-byte access
  bool vec_ok = D % chunk == 0 && fastddpm::is_aligned(q, 16) && fastddpm::is_aligned(k, 16) &&
                fastddpm::is_aligned(v, 16);
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q_strides[i];
    p.k_stride[i] = k_strides[i];
    p.v_stride[i] = v_strides[i];
    vec_ok = vec_ok && q_strides[i] % chunk == 0 && k_strides[i] % chunk == 0 && v_strides[i] % chunk == 0;
  }
  p.vec_ok = vec_ok;
  p.scale_log2 = scale * 1.4426950408889634f;
  cudaError_t err;
  switch (dtype) {
    case FASTDDPM_FLOAT16:
      err = fastddpm::launch_attention<__half>(p, s);
      break;
    case FASTDDPM_BFLOAT16:
      err = fastddpm::launch_attention<__nv_bfloat16>(p, s);
      break;
    default:
      err = fastddpm::launch_attention<float>(p, s);
  }
  return fastddpm::abi::cuda_status(err, "attention launch");
  FASTDDPM_API_END
}

extern "C" int fastddpm_attention_plan(int64_t D, int dtype, int64_t* head_dim_tile, int64_t* rows_per_block,
                                       int64_t* threads_per_block) {
  FASTDDPM_API_BEGIN
  FASTDDPM_CHECK_DTYPE(dtype);
  FASTDDPM_CHECK(D >= 1 && D <= fastddpm::kAttentionMaxHeadDim, FASTDDPM_ERROR_NOT_SUPPORTED,
                 "head dim D = %lld; the kernels take 1 <= D <= %d", static_cast<long long>(D),
                 fastddpm::kAttentionMaxHeadDim);
  FASTDDPM_CHECK_NOT_NULL(head_dim_tile);
  FASTDDPM_CHECK_NOT_NULL(rows_per_block);
  FASTDDPM_CHECK_NOT_NULL(threads_per_block);
  const fastddpm::AttentionPlan plan = fastddpm::plan_attention(D, dtype);
  *head_dim_tile = plan.head_dim_tile;
  *rows_per_block = plan.rows_per_block;
  *threads_per_block = plan.threads;
  return FASTDDPM_SUCCESS;
  FASTDDPM_API_END
}
