"""Launch every kernel variant of the CUDA library once on small inputs (for compute-sanitizer:
csrc/tools/sanitize.sh). Checks each result against the reference, so a run that the
sanitizer passes also computed the right numbers."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.cuda_cases

from tests import cuda_cases  # noqa: E402

DTYPES = cuda_cases.DTYPES


def main() -> None:
    gpu = cuda_cases.GpuRunner()
    for dtype in DTYPES:
        for channels_last in (False, True):
            for param in cuda_cases.GROUP_NORM_SHAPES:
                shape, groups = param.values
                cuda_cases.check_group_norm_silu(gpu, shape, groups, dtype, channels_last)
            cuda_cases.check_group_norm_silu(gpu, (2, 64, 4, 4), 16, dtype, channels_last, misaligned=True)
        for param in cuda_cases.NHWC_GROUP_NORM_SHAPES:  # channels_last tiles, 16-byte and element-wise
            shape, groups = param.values
            cuda_cases.check_group_norm_silu(gpu, shape, groups, dtype, True)
        cuda_cases.check_group_norm_silu(gpu, (1, 384, 4, 4), 32, dtype, True, misaligned=True)
        for param in cuda_cases.ATTENTION_SHAPES:
            cuda_cases.check_attention(gpu, param.values[0], dtype)
        cuda_cases.check_attention(gpu, (1, 1, 24, 30, 64), dtype, "padded-rows")
        cuda_cases.check_attention(gpu, (2, 4, 100, 100, 8), dtype, "unet")  # head-dim tile 8, strided
        for param in cuda_cases.BAD_T_CASES:  # device step indices outside the table: no read past it
            t, bad = param.values
            for channels_last in (False, True):
                for noise in ("tensor", "seed"):
                    table = cuda_cases.step_table("cuda")
                    cuda_cases.check_out_of_range_t(gpu, table, t, bad, dtype, channels_last, noise)
        for param in cuda_cases.STEP_SHAPES:
            for channels_last in (False, True):
                for noise in cuda_cases.NOISE_KINDS:
                    cuda_cases.check_ddpm_step(gpu, param.values[0], dtype, channels_last, noise=noise)
    torch.cuda.synchronize()
    print("exercised every kernel variant: results equal the reference")


if __name__ == "__main__":
    main()
