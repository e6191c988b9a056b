"""Launch every kernel variant of the CUDA library once on small inputs (for compute-sanitizer:
csrc/tools/sanitize.sh). Checks each result against the reference (the op tests of tests/ops, run
on the GPU), so a run that the sanitizer passes also computed the right numbers."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.ops

from tests.ops import test_attention as attention  # noqa: E402
from tests.ops import test_ddpm_step as step  # noqa: E402
from tests.ops import test_group_norm_silu as norm  # noqa: E402
from tests.ops.backends import Backend  # noqa: E402
from tests.ops.tolerance import DTYPES  # noqa: E402


def main() -> None:
    gpu = Backend("cuda", torch.device("cuda"))
    for dtype in DTYPES:
        for layout in norm.LAYOUTS:
            for param in norm.CUDA_SHAPES:
                norm.test_cuda_launch_paths(gpu, *param.values, dtype, layout)
            for param in norm.CUDA_SKIP_SHAPES:  # h = cat([x, skip]) read in place
                norm.test_cuda_skip_launch_paths(gpu, *param.values, dtype, layout, "broadcast")
        for param in norm.CUDA_NHWC_SHAPES:  # channels_last tiles, 16-byte and element-wise
            norm.test_cuda_channels_last_tiles(gpu, *param.values, dtype)
        norm.test_cuda_channels_last_tile_variants(gpu, (1, 384, 4, 4), 32, "misaligned", dtype)
        for param in attention.SHAPES:
            attention.test_head_dims_and_lengths(gpu, param.values[0], dtype)
        attention.test_layouts_and_scale(gpu, "padded-rows", dtype)
        attention.test_layouts_and_scale(gpu, "unet", dtype)  # head-dim tile 8, strided
    for layout in norm.LAYOUTS:  # in every dtype
        norm.test_variants(gpu, "misaligned", layout)
        norm.test_cuda_skip_misaligned(gpu, layout)
    for param in step.BAD_INDICES:  # device step indices outside the table: no read past it
        for noise in ("tensor", "seed"):
            step.test_step_index_outside_the_table_gives_nan_samples(gpu, *param.values, noise)
    for param in step.STEP_SHAPES:  # in every dtype and layout
        for noise in ("float32", "same-dtype", "seed"):
            step.test_dtypes_and_layouts(gpu, param.values[0], noise)
    torch.cuda.synchronize()
    print("exercised every kernel variant: results equal the reference")


if __name__ == "__main__":
    main()
