"""Cases of the CUDA library's ops, shared by its two test runs:

- on the host emulator (csrc/tools/emulator), on every machine with g++: tests/test_cuda_library.py
  compiles csrc/*.cu against the emulator's headers and runs the kernels' own code on the CPU;
- on a GPU: tests/test_cuda_ops.py runs the same cases through fastddpm.ops with backend="cuda".

Each `check_*` builds its inputs on the runner's device, runs the op, and compares the result
with fastddpm.reference under DESIGN.md's tolerances (float32: 1e-4 absolute, 1e-5 for the step;
float16 2e-3 and bfloat16 2e-2 relative to the output's scale).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastddpm import cuda, ops, reference
from fastddpm.schedule import Schedule, StepTable

from .test_reference_ops import TOLERANCE  # DESIGN.md, "Equal means"

ROOT = Path(__file__).parent.parent
STEP_FP32_TOLERANCE = 1e-5
DTYPES = list(TOLERANCE)


def assert_equal_within_tolerance(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, fp32_atol: float):
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert out.shape == ref.shape
    assert not out.isnan().any(), "NaN in the output"
    if dtype == torch.float32:
        err = (out - ref).abs().max().item()
        assert err <= fp32_atol, f"max abs error {err:.3g} > {fp32_atol}"
    else:
        err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        assert err <= TOLERANCE[dtype], f"relative error {err:.3g} > {TOLERANCE[dtype]}"


# --- runners ------------------------------------------------------------------------------------


class GpuRunner:
    """The ops through fastddpm.ops with backend="cuda", on the current CUDA device."""

    device = "cuda"

    def group_norm_silu(self, x, weight, bias, num_groups, eps, silu, add):
        return ops.group_norm_silu(x, weight, bias, num_groups, eps, silu=silu, add=add, backend="cuda")

    def attention(self, q, k, v, scale):
        return ops.attention(q, k, v, scale, backend="cuda")

    def ddpm_step(self, x_t, eps, t, table, noise, seed, offset, clip_x0):
        return ops.ddpm_step(
            x_t, eps, t, table, noise=noise, seed=seed, offset=offset, clip_x0=clip_x0, backend="cuda"
        )


class EmulatedRunner:
    """The same C ABI compiled for the host emulator, on CPU tensors, through fastddpm.cuda's own
    marshalling (launch_*)."""

    device = "cpu"

    def __init__(self, lib):
        self.lib = lib

    def group_norm_silu(self, x, weight, bias, num_groups, eps, silu, add):
        return cuda.launch_group_norm_silu(self.lib, x, weight, bias, num_groups, eps, silu, add, None)

    def attention(self, q, k, v, scale):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return cuda.launch_attention(self.lib, q, k, v, scale, None)

    def ddpm_step(self, x_t, eps, t, table, noise, seed, offset, clip_x0):
        return cuda.launch_ddpm_step(
            self.lib, x_t, eps, t, table.coef, table.stochastic,
            noise=noise, seed=seed, offset=offset, clip_x0=clip_x0, stream=None,
        )  # fmt: skip


EMULATOR_SOURCES = [
    ROOT / "csrc" / f for f in ("library.cu", "group_norm_silu.cu", "attention.cu", "ddpm_step.cu")
]
EMULATOR_FLAGS = [
    "-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-ffp-contract=off",
    "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-parameter", "-DFASTDDPM_HOST_EMULATION",
]  # fmt: skip


def build_emulator() -> Path:
    """Compile csrc/*.cu against the emulator's headers with g++ (once per source version, cached
    under build/emulator); skips the calling test where no g++ exists."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no C++ compiler (g++) to build the host emulator of the CUDA kernels")
    headers = sorted((ROOT / "csrc").rglob("*.h")) + sorted((ROOT / "csrc").rglob("*.cuh"))
    digest = hashlib.sha256(" ".join(EMULATOR_FLAGS).encode())
    for path in EMULATOR_SOURCES + headers:
        digest.update(path.read_bytes())
    out_dir = ROOT / "build" / "emulator"
    library = out_dir / f"libfastddpm_emulated-{digest.hexdigest()[:16]}.so"
    if library.is_file():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "build_config.h").write_text(
        '#define FASTDDPM_VERSION "emulated"\n#define FASTDDPM_TARGETS "emulated"\n'
    )
    includes = [
        f"-I{d}"
        for d in (ROOT / "csrc/tools/emulator/include", ROOT / "csrc/include", ROOT / "csrc", out_dir)
    ]
    objects, jobs = [], []
    for source in EMULATOR_SOURCES:  # one g++ per source, in parallel
        obj = out_dir / f"{source.stem}-{os.getpid()}.o"
        objects.append(obj)
        cmd = [cxx, *EMULATOR_FLAGS, *includes, "-x", "c++", "-c", str(source), "-o", str(obj)]
        jobs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [job.communicate()[0] for job in jobs]
    if any(job.returncode for job in jobs):
        pytest.fail("the host emulator build failed:\n" + "\n".join(logs))
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run([cxx, "-shared", *map(str, objects), "-o", str(partial)], check=True)
    partial.rename(library)  # atomic: a concurrent test run sees the whole library or none
    for obj in objects:
        obj.unlink()
    return library


# --- group_norm_silu ---------------------------------------------------------------------------

GROUP_NORM_SHAPES = [  # (N, C, H, W), groups: the launch path each takes
    pytest.param((2, 64, 8, 8), 16, id="vec-fused"),  # 16-byte vectors (NCHW), one block per group
    pytest.param((2, 64, 4, 4), 8, id="cg8"),  # NHWC: 8 channels per group, 16-byte vectors
    pytest.param((2, 64, 4, 4), 16, id="cg4"),  # NHWC: 4 channels per group (CIFAR10's 128 / 32)
    pytest.param((1, 24, 5, 7), 4, id="odd"),  # 6 channels per group, 5x7: element-wise kernel
    pytest.param((3, 32, 3, 3), 8, id="3x3"),
    pytest.param((1, 5, 80, 80), 1, id="split3"),  # one group over 3 blocks, the last shorter
    pytest.param((1, 3, 97, 95), 1, id="split-odd"),  # split, element-wise
]
# channels_last tiles of whole groups (plan_group_norm_nhwc) at the U-Nets' channel counts, 32 groups
NHWC_GROUP_NORM_SHAPES = [
    pytest.param((1, 128, 8, 8), 32, id="c128"),  # 4 channels per group: tiles of 8 (fp32) or 16 groups
    pytest.param((2, 256, 4, 4), 32, id="c256"),
    pytest.param((1, 384, 4, 4), 32, id="c384"),  # 12 per group: 16-bit tiles of 8 groups (96 channels)
    pytest.param((1, 512, 4, 4), 32, id="c512"),
    pytest.param((1, 1024, 2, 2), 32, id="c1024"),  # the 256x256 models' widest level
    pytest.param((1, 128, 32, 32), 32, id="cifar-32x32"),  # tiles of 4 groups, split in 2 at batch 1
    pytest.param((1, 32, 48, 48), 8, id="split9"),  # 128-byte tiles split over 9 blocks of positions
    pytest.param((2, 36, 5, 5), 12, id="c36"),  # 3 per group: fp32 tiles of 4 groups; 16-bit: C % 8 != 0
    pytest.param((1, 6, 4, 4), 3, id="c6"),  # C % 4 != 0: no 16-byte layout, element-wise kernel
]
GPU_GROUP_NORM_SHAPES = [  # the DDPM networks' own sizes
    pytest.param((8, 128, 32, 32), 32, id="cifar-32x32"),
    pytest.param((64, 256, 16, 16), 32, id="cifar-16x16-b64"),
    pytest.param((1, 128, 256, 256), 32, id="lsun-256x256-b1"),  # few groups: split over blocks
    pytest.param((2, 512, 8, 8), 32, id="lsun-8x8"),
]


def check_group_norm_silu(
    run,
    shape,
    groups,
    dtype,
    channels_last,
    *,
    with_add=True,
    silu=True,
    misaligned=False,
    param_dtype=None,
    mean=1.0,
    std=2.0,
):
    """x ~ N(mean, std^2) in dtype and layout; weight, bias, add in param_dtype (default: dtype)."""
    g = torch.Generator().manual_seed(sum(shape) + groups)
    N, C = shape[:2]
    x = torch.randn(shape, generator=g) * std + mean
    w, b, add = torch.randn(C, generator=g), torch.randn(C, generator=g), torch.randn(N, C, generator=g)
    param_dtype = param_dtype or dtype
    w, b, add = w.to(param_dtype), b.to(param_dtype), add.to(param_dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xd = x.to(run.device, dtype).contiguous(memory_format=fmt)
    if misaligned:  # the same values one element into a buffer: no vector access is aligned
        buf = torch.empty(xd.numel() + 1, dtype=dtype, device=run.device)[1:]
        xd = buf.as_strided(xd.shape, xd.stride()).copy_(xd)
    out = run.group_norm_silu(
        xd, w.to(run.device), b.to(run.device), groups, 1e-6, silu, add.to(run.device) if with_add else None
    )
    ref = reference.group_norm_silu(
        xd.cpu().float(), w.float(), b.float(), groups, 1e-6, silu=silu, add=add.float() if with_add else None
    )
    assert out.dtype == dtype and out.device.type == torch.device(run.device).type
    assert out.is_contiguous(memory_format=fmt)
    assert_equal_within_tolerance(out, ref, dtype, 1e-4)


def check_group_norm_stable(run, split: bool):
    """Mean 1e3, std 0.1 in float32 (tests/test_reference_ops.py's case): within 1e-3 of the float64
    GroupNorm of the same input. split: one group of 16384 * 2 elements, over several blocks."""
    g = torch.Generator().manual_seed(2)
    shape, groups = ((1, 2, 128, 256), 1) if split else ((1, 32, 8, 8), 32)
    x = (1e3 + torch.randn(shape, generator=g) * 0.1).to(run.device)
    C = shape[1]
    ones, zeros = torch.ones(C, device=run.device), torch.zeros(C, device=run.device)
    out = run.group_norm_silu(x, ones, zeros, groups, 1e-6, False, None)
    truth = torch.nn.functional.group_norm(x.cpu().double(), groups, eps=1e-6)
    assert (out.cpu().double() - truth).abs().max().item() < 1e-3


# --- attention ---------------------------------------------------------------------------------

ATTENTION_SHAPES = [  # (B, heads, Lq, Lk, D)
    pytest.param((1, 1, 40, 70, 64), id="d64-masked"),  # Lq, Lk past the tiles' ends
    pytest.param((2, 3, 33, 33, 8), id="d8-heads"),  # diffusers' CIFAR10 heads of dim 8: the tile of 8
    pytest.param((1, 2, 21, 70, 16), id="d16"),
    pytest.param((1, 1, 19, 37, 12), id="d12"),  # tile 16; 16-bit rows of 24 bytes: element loads
    pytest.param((1, 2, 20, 37, 40), id="d40"),  # D not a multiple of 8: element loads
    pytest.param((1, 1, 17, 45, 136), id="d136"),  # D in (128, 256]: two warps share a row
    pytest.param((1, 1, 20, 40, 256), id="d256"),
    pytest.param((1, 1, 20, 40, 512), id="d512"),  # four warps share a row
    pytest.param((1, 1, 5, 9, 1), id="d1"),
]
GPU_ATTENTION_SHAPES = [  # the DDPM networks' attention at 16x16 (L = 256), and a longer one
    pytest.param((16, 1, 256, 256, 256), id="cifar-paper-b16"),
    pytest.param((4, 1, 256, 256, 512), id="lsun-b4"),
    pytest.param((16, 32, 256, 256, 8), id="cifar-diffusers-b16"),
    pytest.param((2, 4, 1024, 1024, 64), id="l1024"),
]
ATTENTION_LAYOUTS = ["contiguous", "unet", "padded-rows"]


def check_attention(run, shape, dtype, layout="contiguous", scale=None):
    """layout: "unet" = (N, heads, D, L) transposed to (N, heads, L, D) as the U-Net hands it over;
    "padded-rows" = rows of D inside rows of D + 8 (strided positions, contiguous D)."""
    B, H, Lq, Lk, D = shape
    g = torch.Generator().manual_seed(Lq * 1000 + Lk + D)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Lq, Lk, Lk))

    def place(t):
        t = t.to(run.device, dtype)
        if layout == "unet":
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        if layout == "padded-rows":
            wide = torch.zeros(*t.shape[:-1], D + 8, dtype=dtype, device=run.device)
            wide[..., :D] = t
            return wide[..., :D]
        return t

    qd, kd, vd = place(q), place(k), place(v)
    out = run.attention(qd, kd, vd, scale)
    ref = reference.attention(qd.cpu().float(), kd.cpu().float(), vd.cpu().float(), scale)
    assert out.dtype == dtype and out.shape == (B, H, Lq, D) and out.is_contiguous()
    assert_equal_within_tolerance(out, ref, dtype, 1e-4)


# --- ddpm_step ---------------------------------------------------------------------------------

STEP_SHAPES = [
    pytest.param((4, 3, 8, 8), id="vec"),  # contiguous: 16-byte vectors with 4-element Philox groups
    pytest.param((3, 3, 5, 7), id="odd"),  # element-wise kernel
]
GPU_STEP_SHAPES = [
    pytest.param((128, 3, 32, 32), id="cifar-b128"),
    pytest.param((4, 3, 256, 256), id="lsun-b4"),
]
NOISE_KINDS = ["float32", "same-dtype", "seed"]
T_KINDS = ["int", "0d", "per-sample"]


def step_table(device, kind="ddpm", variance="fixedlarge", eta=0.0) -> StepTable:
    return Schedule.from_name().respace(100).step_table(kind, variance, eta, device=device)


def step_index(t_kind: str, N: int, device):
    rows = [99, 1, 0, 50, 73, 2][:N]
    if t_kind == "int":
        return 50
    if t_kind == "0d":
        return torch.tensor(99, device=device)
    return torch.tensor(rows, device=device)


def check_ddpm_step(run, shape, dtype, channels_last, *, clip_x0=True, noise="float32", t_kind="per-sample",
                    table_kind="ddpm"):  # fmt: skip
    g = torch.Generator().manual_seed(7)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, eps = (
        torch.randn(shape, generator=g).to(run.device, dtype).contiguous(memory_format=fmt) for _ in range(2)
    )
    eps = eps * 0.5
    table = step_table(run.device, table_kind, eta=0.5 if table_kind == "ddim" else 0.0)
    t = step_index(t_kind, shape[0], run.device)
    z, seed = None, None
    if noise == "seed":
        seed = 2**64 - 3
    else:
        z = torch.randn(shape, generator=g).to(run.device, torch.float32 if noise == "float32" else dtype)
        z = z.contiguous(memory_format=fmt)
    out = run.ddpm_step(x, eps, t, table, z, seed, 12345, clip_x0)
    ref_table = step_table("cpu", table_kind, eta=0.5 if table_kind == "ddim" else 0.0)
    ref = reference.ddpm_step(
        x.cpu(), eps.cpu(), t.cpu() if isinstance(t, torch.Tensor) else t, ref_table,
        noise=None if z is None else z.cpu(), seed=seed, offset=12345, clip_x0=clip_x0,
    )  # fmt: skip
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    assert_equal_within_tolerance(out, ref, dtype, STEP_FP32_TOLERANCE)
    return out, ref


BAD_T_CASES = [  # (t, which samples are bad) for a device-side step index into a table of 100 rows
    pytest.param([5, 100], [False, True], id="past-end"),  # t = num_steps
    pytest.param([-1, 7], [True, False], id="negative"),
    pytest.param([2**40, -(2**40)], [True, True], id="far"),
    pytest.param(100, [True, True], id="0d-past-end"),  # a 0-d t applies to every sample
    pytest.param(-1, [True, True], id="0d-negative"),
    pytest.param([99, 0], [False, False], id="edges"),  # the table's first and last rows
]


def check_out_of_range_t(run, table: StepTable, t, bad, dtype, channels_last, noise):
    """A step index outside the table, held on the device: every element of its sample (of every
    sample, for a 0-d t) is NaN; the other samples are the reference's step. noise: "none" (the
    table must be noiseless), "tensor" or "seed"."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(3)
    x, eps, z = (
        torch.randn(2, 3, 4, 4, generator=g).to(run.device, dtype).contiguous(memory_format=fmt)
        for _ in range(3)
    )
    z, seed = (z, None) if noise == "tensor" else (None, 11 if noise == "seed" else None)
    t = torch.tensor(t, device=run.device)
    out = run.ddpm_step(x, eps, t, table, z, seed, 0, True).cpu()
    bad = torch.tensor(bad)
    assert out[bad].isnan().all(), f"a sample of t = {t.tolist()} is not all NaN"
    if not bad.all():  # the others: the reference's step, with the bad indices made valid
        t_ok = torch.where(bad, 0, t.cpu()) if t.dim() else t.cpu()
        cpu_table = StepTable(table.coef.cpu(), table.timesteps.cpu(), table.stochastic)
        ref = reference.ddpm_step(
            x.cpu(), eps.cpu(), t_ok, cpu_table, noise=None if z is None else z.cpu(), seed=seed, offset=0
        )
        assert_equal_within_tolerance(out[~bad], ref[~bad], dtype, STEP_FP32_TOLERANCE)


def noise_table(device) -> StepTable:
    """A one-row table whose step returns its noise: mean = 0 * x - 0 * eps, sigma = 1."""
    coef = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], device=device)
    return StepTable(coef=coef, timesteps=torch.zeros(1, dtype=torch.long, device=device), stochastic=True)


def check_in_kernel_noise(run, shape, seed, offset):
    """z through the kernel equals reference.philox_normal, is reproducible, and is N(0, 1)."""
    zeros = torch.zeros(shape, device=run.device)
    z = run.ddpm_step(zeros, zeros, 0, noise_table(run.device), None, seed, offset, False)
    again = run.ddpm_step(zeros, zeros, 0, noise_table(run.device), None, seed, offset, False)
    assert torch.equal(z, again), "same seed and offset, different noise"
    torch.testing.assert_close(z.cpu(), reference.philox_normal(seed, offset, shape), rtol=0, atol=2e-6)
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n) and abs(z.std().item() - 1) < 5 / math.sqrt(n)
    return z
