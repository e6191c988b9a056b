"""The CUDA library's kernels on the CPU: csrc/*.cu compiled by g++ against the host emulator's
headers (csrc/tools/emulator), which run each CUDA thread as a fiber. `EmulatedOps` runs them on
CPU tensors through the cuda backend's own marshalling, with fastddpm.ops' signatures."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastddpm import cuda
from fastddpm.schedule import StepTable
from fastddpm.solver_table import SolverTable

ROOT = Path(__file__).parent.parent.parent


EMULATOR_SOURCES = [
    ROOT / "csrc" / f
    for f in ("library.cu", "group_norm_silu.cu", "attention.cu", "ddpm_step.cu", "multistep_update.cu")
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


class EmulatedOps:
    """The cuda backend's ops on CPU tensors, launched in the emulated library `lib`; the
    inputs are taken as fastddpm.ops would pass them (its checks are not repeated here)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def group_norm_silu(
        self, x, weight, bias, num_groups, eps=1e-6, *, silu=True, add=None, skip=None
    ) -> torch.Tensor:
        return cuda.launch_group_norm_silu(self.lib, x, weight, bias, num_groups, eps, silu, add, None, skip)

    def attention(self, q, k, v, scale=None) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return cuda.launch_attention(self.lib, q, k, v, scale, None)

    def ddpm_step(
        self, x_t, eps, i, table: StepTable, *, noise=None, seed=None, offset=0, clip_x0=True
    ) -> torch.Tensor:
        return cuda.launch_ddpm_step(
            self.lib, x_t, eps, i, table.coef, table.stochastic, noise=noise, seed=seed, offset=offset,
            clip_x0=clip_x0, stream=None,
        )  # fmt: skip

    def multistep_update(
        self, x, eps, history, i, table: SolverTable, *, noise=None, seed=None, offset=0, clip_x0=False
    ) -> torch.Tensor:
        return cuda.launch_multistep_update(
            self.lib, x, eps, history, i, table.weights, table.dest, table.stochastic, noise=noise,
            seed=seed, offset=offset, clip_x0=clip_x0, stream=None,
        )  # fmt: skip


@functools.cache
def emulated_ops() -> EmulatedOps:
    """The emulated library, built on first use (skips the calling test where no g++ exists)."""
    return EmulatedOps(cuda.open_library(build_emulator()))
