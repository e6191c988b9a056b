"""The Triton kernels compile for real GPUs (sm_80, sm_90), with the launch configurations the
launchers pick at DDPM's production shapes, on a machine without a GPU.

The interpreter (which the other tests use) runs kernels as numpy and never meets the compiler,
so a kernel can pass there and still fail to compile. Here each launcher runs on meta tensors
with its kernels replaced by recorders; every distinct launch is then compiled ahead of time by
`triton.compile` for the NVIDIA targets (Triton -> PTX -> cubin with the bundled ptxas), with
the argument types and specializations a real launch would get. This runs in a subprocess
without TRITON_INTERPRET, since the interpreter replaces kernels at definition time.

`python -m tests.test_triton_gpu_compile` prints each launch's shared memory, registers and spills.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).parent.parent
TARGETS = ((90, "sm_90"), (80, "sm_80"))  # the GPU machine's H100, and the oldest CI builds for


def _cases(full: bool):
    """(name, thunk) per launch; each thunk calls a launcher on meta tensors. The default set takes
    every constexpr branch of every kernel; `full` adds the rest of DDPM's production shapes."""
    import torch
    from fastddpm.kernels.attention import attention
    from fastddpm.kernels.ddpm_step import FLAT, ddpm_step
    from fastddpm.kernels.group_norm_silu import group_norm_silu

    from fastddpm.schedule import Schedule

    meta = torch.device("meta")
    tables = {
        "ddpm": Schedule.from_name().step_table(device=meta),
        "ddim": Schedule.from_name().respace("ddim50").step_table("ddim", device=meta),
    }
    cases = []

    def norm(shape, dtype, channels_last=False, add=True, silu=True):
        def run():
            x = torch.empty(shape, device=meta, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            w = torch.empty(shape[1], device=meta, dtype=dtype)
            a = torch.empty(shape[:2], device=meta, dtype=dtype) if add else None
            group_norm_silu(x, w, w, 32, 1e-6, silu=silu, add=a)

        cases.append(
            (f"group_norm_silu {tuple(shape)} {dtype} cl={channels_last} add={add} silu={silu}", run)
        )

    def attn(shape, dtype, heads_last=False):
        def run():
            q = torch.empty(shape, device=meta, dtype=dtype)
            if heads_last:  # the U-Net's (N, heads, L, D) view of a conv output: L is contiguous
                q = q.transpose(-1, -2).contiguous().transpose(-1, -2)
            attention(q, q, q)

        cases.append((f"attention {tuple(shape)} {dtype} heads_last={heads_last}", run))

    def step(shape, dtype, t=500, noise="seed", channels_last=False, clip=True, layout=None, table="ddpm"):
        def run():
            x = torch.empty(shape, device=meta, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            kw = {"seed": 2**40 + 3, "offset": 7} if noise == "seed" else {"noise": torch.empty_like(x)}
            if noise == "device-seed":  # seed and offset read from int64 device scalars (graph replay)
                scalar = torch.empty((), device=meta, dtype=torch.long)
                kw = {"seed": scalar, "offset": scalar.clone()}
            tt = t if isinstance(t, int) else torch.zeros(t, device=meta, dtype=torch.long)
            ddpm_step(x, x, tt, tables[table], clip_x0=clip, layout=layout, **kw)

        cases.append((f"ddpm_step {tuple(shape)} {dtype} t={t} {noise} cl={channels_last} {table}", run))

    def noise():
        step_module = sys.modules["fastddpm.kernels.ddpm_step"]
        out = torch.empty(8, 3, 32, 32, device=meta)
        step_module._philox_normal_kernel[(24,)](out, out.numel(), 2**63 + 5, 1, 0, BLOCK=1024)

    norm((1, 128, 32, 32), torch.float32)  # CIFAR10: one tile per group
    norm((2, 64, 16, 16), torch.bfloat16, channels_last=True, add=False, silu=False)
    norm((8, 128, 256, 256), torch.float16, silu=False)  # 256x256 model, batch 8: looping programs
    norm((1, 256, 64, 64), torch.bfloat16, channels_last=True)  # batch 1: split statistics + apply
    attn((1, 1, 256, 256), torch.bfloat16, heads_last=True)  # CIFAR10 batch 1: keys split, combined
    attn((8, 1, 256, 512), torch.float16)  # LSUN / CelebA-HQ: q k^T in chunks of D
    attn((64, 1, 256, 256), torch.float32)  # 3xTF32, no split
    step((256, 3, 32, 32), torch.float32)
    step((1, 3, 32, 32), torch.float32, t=(1,), noise="tensor")
    step((8, 3, 256, 256), torch.bfloat16, t=(8,), channels_last=True, clip=False)
    step((2, 3, 5, 5), torch.float16, layout=FLAT, table="ddim")
    step((16, 3, 32, 32), torch.float32, t=(), noise="device-seed")  # the graph runner's step
    cases.append(("philox_normal", noise))
    if full:
        for dtype in (torch.float32, torch.bfloat16):
            norm((256, 128, 32, 32), dtype, channels_last=True)
            norm((1, 384, 32, 32), dtype, add=False)  # the largest one-tile group (12 x 1024)
            norm((1, 128, 256, 256), dtype)
            norm((8, 128, 256, 256), dtype, silu=False)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            attn((1, 1, 256, 256), dtype, heads_last=True)
            attn((64, 1, 256, 256), dtype)
            attn((1, 1, 256, 512), dtype)
            attn((8, 1, 256, 512), dtype, heads_last=True)
        attn((16, 32, 256, 8), torch.float32)  # diffusers' 32 heads of dimension 8
        attn((16, 32, 256, 8), torch.bfloat16)
        step((8, 3, 256, 256), torch.float32, t=(8,), clip=False)
        step((8, 3, 256, 256), torch.bfloat16, channels_last=True)
    return cases


class _Recorder:
    """Stands in for a JITFunction: kernel[grid](*args, **kwargs) records the launch."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def _signature(fn, args, kwargs):
    """The signature, constexprs and options of a launch, specialized the way triton.jit does
    (ints equal to 1 become constexprs unless the parameter is in do_not_specialize)."""
    import torch
    from triton.backends.compiler import BaseBackend

    from triton._C.libtriton import native_specialize_impl  # isort: skip

    names = fn.arg_names
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(names, args, strict=False)) | kwargs
    signature, constexprs = {}, {}
    for param, name in zip(fn.params, names, strict=True):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = (
                "*"
                + {
                    torch.float32: "fp32",
                    torch.float16: "fp16",
                    torch.bfloat16: "bf16",
                    torch.int64: "i64",
                    torch.int32: "i32",
                }[value.dtype]
            )
        else:
            kind = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize, True)[0]
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = value
    return signature, constexprs, options


def compile_all(targets=TARGETS, full=False, verbose=False) -> list[dict]:
    """Compile every distinct launch of `_cases(full)`; one result dict per launch and target."""
    import fastddpm.kernels  # noqa: F401  (registers the submodules)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    modules = [sys.modules[f"fastddpm.kernels.{m}"] for m in ("group_norm_silu", "attention", "ddpm_step")]
    launches: list = []
    for module in modules:
        for name in dir(module):
            if isinstance(getattr(module, name), triton.runtime.JITFunction) and name.endswith("_kernel"):
                setattr(module, name, _Recorder(getattr(module, name), launches))
    results, seen = [], set()
    for case, run in _cases(full):
        del launches[:]
        run()
        for fn, args, kwargs in launches:
            signature, constexprs, options = _signature(fn, args, dict(kwargs))
            key = (fn.__name__, tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))
            if key in seen:
                continue
            seen.add(key)
            for capability, arch in targets:
                result = {"case": case, "kernel": fn.__name__, "arch": arch, **constexprs, **options}
                try:
                    compiled = triton.compile(
                        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                        target=GPUTarget("cuda", capability, 32),
                        options=options,
                    )
                except Exception as err:  # reported, and failed, by the test
                    result["error"] = f"{type(err).__name__}: {err}"[:2000]
                else:
                    result["shared"] = compiled.metadata.shared
                    if verbose:
                        result.update(_ptxas_usage(compiled.asm["ptx"], arch))
                results.append(result)
    return results


def _ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers and spill bytes, from the bundled ptxas -v."""
    import re
    import tempfile

    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        arch = arch + "a" if arch == "sm_90" else arch
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {
        "regs": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill.group(1)) if spill else None,
    }


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every constexpr branch of every kernel compiles for the GPU machine's H100 (sm_90)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "tests.test_triton_gpu_compile", "--ci"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(out.stdout.splitlines()[-1])
    failed = [r for r in results if "error" in r]
    assert not failed, json.dumps(failed, indent=1)[:6000]
    kernels = {r["kernel"] for r in results}
    assert kernels == {
        "_gn_fused_kernel",
        "_gn_stats_kernel",
        "_gn_apply_kernel",
        "_attn_fwd_kernel",
        "_attn_combine_kernel",
        "_ddpm_step_kernel",
        "_philox_normal_kernel",
    }
    for r in results:  # an H100 block has 227 KiB of shared memory
        assert r["shared"] <= 227 * 1024, r


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    if "--ci" in sys.argv:
        print(json.dumps(compile_all(targets=TARGETS[:1])))
    else:  # every production shape, sm_90 and sm_80, with registers and spills
        for r in compile_all(full=True, verbose=True):
            print(json.dumps(r), flush=True)
