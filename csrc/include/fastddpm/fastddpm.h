/* The C ABI of the fastddpm CUDA library (libfastddpm_cuda.so).
 *
 * Every entry point returns a status code (FASTDDPM_SUCCESS = 0) and never throws; after a
 * failure, fastddpm_last_error() names the problem in one line. Inputs are checked before
 * anything touches a device: a null pointer, a bad size or an unsupported dtype returns
 * FASTDDPM_ERROR_INVALID_VALUE or FASTDDPM_ERROR_NOT_SUPPORTED without a CUDA call.
 *
 * Tensors are raw device pointers with sizes (and, where a kernel takes them, strides) in
 * elements. Kernels are launched on `stream` (a cudaStream_t; NULL is the legacy default
 * stream) on the calling thread's current device, asynchronously: a launch is
 * capturable in a CUDA graph, and nothing here allocates or synchronizes.
 */
#ifndef FASTDDPM_FASTDDPM_H_
#define FASTDDPM_FASTDDPM_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FASTDDPM_ABI_VERSION 5

/* The library is compiled with hidden visibility; only these entry points are exported. */
#if defined(__GNUC__)
#define FASTDDPM_API __attribute__((visibility("default")))
#else
#define FASTDDPM_API
#endif

/* Status codes. */
#define FASTDDPM_SUCCESS 0
#define FASTDDPM_ERROR_INVALID_VALUE 1 /* null pointer, negative or inconsistent size */
#define FASTDDPM_ERROR_NOT_SUPPORTED 2 /* a dtype, layout or size the kernels do not take */
#define FASTDDPM_ERROR_CUDA 3          /* the CUDA runtime reported an error */
#define FASTDDPM_ERROR_INTERNAL 4      /* anything else (a bug: please report it) */

/* Element types. */
#define FASTDDPM_FLOAT32 0
#define FASTDDPM_FLOAT16 1
#define FASTDDPM_BFLOAT16 2

/* Columns of the step table that fastddpm_ddpm_step reads, one row per step index (the column
 * constants of fastddpm/schedule.py):
 *   clipped x0:  x0 = clamp(sqrt(1/abar) x_t - sqrt(1/abar - 1) eps, -1, 1),
 *                mean = coef_x0 x0 + coef_xt x_t
 *   direct eps:  mean = direct_xt x_t - direct_eps eps
 *   x_{t-1} = mean + sigma z */
#define FASTDDPM_STEP_SQRT_RECIP_ABAR 0
#define FASTDDPM_STEP_SQRT_RECIPM1_ABAR 1
#define FASTDDPM_STEP_COEF_X0 2
#define FASTDDPM_STEP_COEF_XT 3
#define FASTDDPM_STEP_DIRECT_XT 4
#define FASTDDPM_STEP_DIRECT_EPS 5
#define FASTDDPM_STEP_SIGMA 6
#define FASTDDPM_STEP_NUM_COEFS 7

/* The solver table that fastddpm_multistep_update reads (fastddpm/solver_table.py): per step a
 * (NUM_ROWS, NUM_INPUTS + M) block of weights over the columns [x, eps, D, z, slot_0 .. slot_{M-1}]:
 *   D = clamp?(W[ROW_D][COL_X] x + W[ROW_D][COL_EPS] eps); keep_a, keep_b, x_next = rows
 *   ROW_KEEP_A, ROW_KEEP_B, ROW_X over every column; M <= MAX_SLOTS. */
#define FASTDDPM_MULTISTEP_COL_X 0
#define FASTDDPM_MULTISTEP_COL_EPS 1
#define FASTDDPM_MULTISTEP_COL_D 2
#define FASTDDPM_MULTISTEP_COL_Z 3
#define FASTDDPM_MULTISTEP_NUM_INPUTS 4
#define FASTDDPM_MULTISTEP_ROW_D 0
#define FASTDDPM_MULTISTEP_ROW_KEEP_A 1
#define FASTDDPM_MULTISTEP_ROW_KEEP_B 2
#define FASTDDPM_MULTISTEP_ROW_X 3
#define FASTDDPM_MULTISTEP_NUM_ROWS 4
#define FASTDDPM_MULTISTEP_MAX_SLOTS 8

/* Noise sources of fastddpm_ddpm_step and fastddpm_multistep_update. */
#define FASTDDPM_NOISE_NONE 0   /* no noise term (tables whose sigmas are all 0) */
#define FASTDDPM_NOISE_TENSOR 1 /* z is read from `noise` */
#define FASTDDPM_NOISE_PHILOX 2 /* z = Philox4x32-10 normals at (seed, offset), see philox.cuh */

FASTDDPM_API int fastddpm_abi_version(void);
/* "fastddpm-cuda <version>; CUDA <x.y>; targets sm_80 sm_90 compute_90" */
FASTDDPM_API const char* fastddpm_build_info(void);
/* The compiled targets alone, space separated: "sm_80 sm_86 sm_89 sm_90 compute_90". */
FASTDDPM_API const char* fastddpm_build_targets(void);
FASTDDPM_API const char* fastddpm_status_name(int status);
/* The message of the last failing call on this thread ("" after a successful call). */
FASTDDPM_API const char* fastddpm_last_error(void);

/* FASTDDPM_SUCCESS if the kernels have code for the current CUDA device; touches the device. */
FASTDDPM_API int fastddpm_check_device(void);

/* y = act(GroupNorm(h + add[:, :, None, None])) over (N, C, H, W), statistics in float32, where
 * h = x, or with skip the channel concatenation cat([x, skip], dim=1) read in place: x is
 * (N, C1, H, W), skip (N, C - C1, H, W) or NULL (then C1 = C; else 0 < C1 < C; a group may
 * straddle channel C1). x, skip and y: dtype, contiguous (NCHW) or, with channels_last = 1,
 * NHWC-strided, each over its own channels. add: (N, C) of add_dtype at element strides
 * (add_stride_n, add_stride_c) >= 0 (0: a broadcast row or column), or NULL. weight, bias: (C,)
 * of param_dtype. silu: 1 applies SiLU. Large groups split across blocks use `workspace`, at
 * least fastddpm_group_norm_silu_workspace_size() bytes of device memory (may be NULL when 0). */
FASTDDPM_API int fastddpm_group_norm_silu_workspace_size(int64_t N, int64_t C, int64_t H, int64_t W,
                                                         int64_t num_groups, size_t* bytes);
FASTDDPM_API int fastddpm_group_norm_silu(const void* x, const void* skip, const void* add, const void* weight,
                                          const void* bias, void* y, void* workspace, size_t workspace_bytes,
                                          int64_t N, int64_t C1, int64_t C, int64_t H, int64_t W,
                                          int64_t num_groups, int64_t add_stride_n, int64_t add_stride_c, float eps,
                                          int silu, int channels_last, int dtype, int add_dtype, int param_dtype,
                                          void* stream);

/* The launch fastddpm_group_norm_silu makes for these sizes (C1 of the C channels in x, the rest
 * in skip), layout and dtype with 16-byte aligned x, skip and y (else one element per access):
 * the groups each block normalizes (channels_last tiles of several whole groups), the blocks
 * (with a split, those of both kernels' grids each), the threads per block, and the bytes of
 * each load and store of x, skip and y (16, or one element: channels_last with 16 bytes of
 * elements not dividing C1). Touches no device. */
FASTDDPM_API int fastddpm_group_norm_silu_plan(int64_t N, int64_t C1, int64_t C, int64_t H, int64_t W,
                                               int64_t num_groups, int channels_last, int dtype,
                                               int64_t* groups_per_block, int64_t* blocks,
                                               int64_t* threads_per_block, int64_t* vector_bytes);

/* o = softmax(q k^T * scale) v. q: (B, heads, Lq, D); k, v: (B, heads, Lk, D); o: (B, heads, Lq, D)
 * contiguous. q_strides, k_strides, v_strides: 3 element strides each (batch, head, position);
 * the last dimension is contiguous. D <= 512. fp16/bf16 use tensor cores (sm_80+), fp32 CUDA
 * cores; softmax and accumulation are float32. */
FASTDDPM_API int fastddpm_attention(const void* q, const void* k, const void* v, void* o, int64_t B,
                                    int64_t heads, int64_t Lq, int64_t Lk, int64_t D, const int64_t* q_strides,
                                    const int64_t* k_strides, const int64_t* v_strides, float scale, int dtype,
                                    void* stream);

/* The launch fastddpm_attention makes for head dim D (1..512) in dtype: the head-dim tile its
 * kernel computes with (the smallest of 8, 16, ..., 512 >= D: the work of q k^T and of p v is
 * proportional to it), and the query rows and threads of each block. Touches no device. */
FASTDDPM_API int fastddpm_attention_plan(int64_t D, int dtype, int64_t* head_dim_tile, int64_t* rows_per_block,
                                         int64_t* threads_per_block);

/* One reverse step x_{t-1} = mean + sigma z at step index t, elementwise over (N, C, H, W).
 * x, eps, out: dtype, all contiguous or all channels_last. coef: the (num_steps,
 * FASTDDPM_STEP_NUM_COEFS) float32 step table (columns FASTDDPM_STEP_*). t: int64 device array
 * of t_numel = 1 or N step indices, or NULL to use t_host (checked: outside [0, num_steps) is an
 * error). A device t outside [0, num_steps) is never clamped: every element of its sample (of
 * every sample, when t_numel = 1) is NaN, the table is not read for it, the other samples are
 * unaffected.
 * noise_mode: FASTDDPM_NOISE_*; a noise tensor has the layout of x and noise_dtype.
 * FASTDDPM_NOISE_PHILOX draws at (seed, offset); seed_device / offset_device, where not NULL, are
 * int64 device scalars read by the kernel instead (their bits are the uint64 value), so a step
 * captured in a CUDA graph replays with the values they hold at replay time. */
FASTDDPM_API int fastddpm_ddpm_step(const void* x, const void* eps, const void* noise, void* out,
                                    const float* coef, int64_t num_steps, const int64_t* t, int64_t t_numel,
                                    int64_t t_host, int noise_mode, int noise_dtype, uint64_t seed,
                                    uint64_t offset, const int64_t* seed_device,
                                    const int64_t* offset_device, int clip_x0, int64_t N, int64_t C,
                                    int64_t H, int64_t W, int channels_last, int dtype, void* stream);

/* One few-step solver step at step index i over numel float32 elements (all tensors contiguous):
 * returns x_next in `out` and writes the kept rows into `history` (num_slots, numel) at slots
 * dest[i][0], dest[i][1] (-1, or any index outside 0..num_slots-1: not kept), every input read
 * before any slot is written. weights: the (num_steps, FASTDDPM_MULTISTEP_NUM_ROWS,
 * FASTDDPM_MULTISTEP_NUM_INPUTS + num_slots) float32 table, dest its (num_steps, 2) int64
 * destinations. i: an int64 device scalar, or NULL to use i_host (checked: outside
 * [0, num_steps) is an error); a device i outside the table makes x_next NaN and writes no slot.
 * noise_mode, seed, offset, seed_device, offset_device: as fastddpm_ddpm_step's (a noise tensor is
 * float32 (numel,)); a slot, or z, that no row of step i weighs is not read. history may be NULL
 * when num_slots = 0. */
FASTDDPM_API int fastddpm_multistep_update(const float* x, const float* eps, const float* noise, float* history,
                                           float* out, const float* weights, const int64_t* dest,
                                           int64_t num_steps, int64_t num_slots, const int64_t* i, int64_t i_host,
                                           int noise_mode, uint64_t seed, uint64_t offset,
                                           const int64_t* seed_device, const int64_t* offset_device, int clip_x0,
                                           int64_t numel, void* stream);

/* The in-kernel noise computed on the host: out[j] = z_j for j < n (see philox.cuh). */
FASTDDPM_API int fastddpm_philox_normal_host(uint64_t seed, uint64_t offset, int64_t n, float* out);

#ifdef __cplusplus
}
#endif

#endif /* FASTDDPM_FASTDDPM_H_ */
