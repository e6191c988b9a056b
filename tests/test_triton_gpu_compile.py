"""The Triton kernels compile for the GPU machine's H100 (sm_90) as their launches compile them,
without spills and within its shared memory, on a machine without a GPU.

The interpreter (which the other tests use) runs kernels as numpy and never meets the compiler,
so a kernel can pass there and still fail to compile, or compile to something slow. Here each
launcher runs on meta tensors with its kernels replaced by recorders; every recorded launch is
then compiled by the kernel's own `JITFunction.run(..., warmup=True)` with Triton's driver
replaced by a stand-in that reports an sm_90 device: the same binder, specialization
(`tt.divisibility` 16 on 16-B aligned pointers and on ints divisible by 16, constexpr ints equal
to 1) and options as `kernel[grid](...)` on an H100. Meta tensors carry their views' offsets in
`data_ptr()` (element offset x element size, from a 0 base), and the CUDA caching allocator
aligns every allocation to 512 B, so a view's alignment is modelled as on the GPU. ptxas's own
report of each compile (TRITON_DUMP_PTXAS_LOG) gives registers, spills and stack frame.

This runs in a subprocess without TRITON_INTERPRET, since the interpreter replaces kernels at
definition time; the triton there is the first on PYTHONPATH (CI's pinned 3.7.1, and triton 3.6,
the GPU machine's, pip-installed into build/triton-3.6.0). The tests compile the `full` case set
(every production configuration) under both: about 35 s and 45 s on two cores.

    python -m tests.test_triton_gpu_compile [--full] [--capability 80] [--json FILE]

prints one JSON result per distinct launch (--json FILE writes them with their PTX);
`python -m benchmarks.resources` tabulates them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SM90_SHARED_PER_BLOCK = 227 * 1024
KERNELS = {
    "_gn_fused_kernel",
    "_gn_stats_kernel",
    "_gn_apply_kernel",
    "_gn_nhwc_fused_kernel",
    "_gn_nhwc_stats_kernel",
    "_gn_nhwc_apply_kernel",
    "_attn_fwd_kernel",
    "_attn_combine_kernel",
    "_ddpm_step_kernel",
    "_philox_normal_kernel",
    "_multistep_update_kernel",
}


def _cases(full: bool):
    """(name, thunk) per launch; each thunk calls a launcher on meta tensors. The default set takes
    every constexpr branch of every kernel; `full` adds the rest of DDPM's production shapes."""
    import torch
    from fastddpm.kernels.attention import launch_attention
    from fastddpm.kernels.ddpm_step import FLAT, launch_ddpm_step
    from fastddpm.kernels.group_norm_silu import launch_group_norm_silu
    from fastddpm.kernels.multistep_update import launch_multistep_update

    from fastddpm.schedule import Schedule

    meta = torch.device("meta")
    tables = {
        "ddpm": Schedule.from_name().step_table(device=meta),
        "ddim": Schedule.from_name().respace("ddim50").step_table("ddim", device=meta),
    }
    cases = []

    def norm(shape, dtype, channels_last=False, add=True, silu=True, skip=0):
        """x of `shape`; with skip=C2 the up path's norm of x and a (N, C2, H, W) skip in place."""

        def run():
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x = torch.empty(shape, device=meta, dtype=dtype).contiguous(memory_format=fmt)
            s = torch.empty(shape[0], skip, *shape[2:], device=meta, dtype=dtype).contiguous(
                memory_format=fmt
            )
            C = shape[1] + skip
            w = torch.empty(C, device=meta, dtype=dtype)
            # add: the time projection (N, C), or with a skip the pending bias, a broadcast row
            a = torch.empty(shape[0], C, device=meta, dtype=dtype) if add else None
            a = a[:1].expand(shape[0], C) if add and skip else a
            launch_group_norm_silu(x, w, w, 32, 1e-6, silu=silu, add=a, skip=s if skip else None)

        what = f"cl={channels_last} add={add} silu={silu}" + (f" skip={skip}" if skip else "")
        cases.append((f"group_norm_silu {tuple(shape)} {dtype} {what}", run))

    def attn(shape, dtype, unet=True):
        def run():
            B, H, L, D = shape
            if unet:  # the U-Net's q, k, v: (N, L, C) matmul outputs viewed (N, heads, L, D)
                q, k, v = (torch.empty(B, L, H * D, device=meta, dtype=dtype) for _ in range(3))
                q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in (q, k, v))
            else:  # (N, heads, L, D) views of a conv output, L contiguous: another caller's layout
                q = torch.empty(B, H, D, L, device=meta, dtype=dtype).transpose(-1, -2)
                k = v = q
            launch_attention(q, k, v)

        cases.append((f"attention {tuple(shape)} {dtype}" + ("" if unet else " L-contiguous"), run))

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
            launch_ddpm_step(
                x, x, tt, tables[table].coef, tables[table].stochastic, clip_x0=clip, layout=layout, **kw
            )

        cases.append((f"ddpm_step {tuple(shape)} {dtype} t={t} {noise} cl={channels_last} {table}", run))

    def solver_step(shape, num_slots, i=3, noise="seed", clip=False):
        def run():
            x = torch.empty(shape, device=meta)
            history = torch.empty(num_slots, *shape, device=meta)
            weights = torch.empty(4, 4, 4 + num_slots, device=meta)
            dest = torch.empty(4, 2, device=meta, dtype=torch.long)
            kw = {"seed": 2**40 + 3, "offset": 7} if noise == "seed" else {"noise": torch.empty_like(x)}
            if noise == "device-seed":
                scalar = torch.empty((), device=meta, dtype=torch.long)
                kw = {"seed": scalar, "offset": scalar.clone()}
            step = i if isinstance(i, int) else torch.zeros(i, device=meta, dtype=torch.long)
            launch_multistep_update(x, x, history, step, weights, dest, noise != "none", clip_x0=clip, **kw)

        cases.append((f"multistep_update {tuple(shape)} M={num_slots} i={i} {noise} clip={clip}", run))

    def noise():
        step_module = sys.modules["fastddpm.kernels.ddpm_step"]
        out = torch.empty(8, 3, 32, 32, device=meta)
        step_module._philox_normal_kernel[(24,)](out, out.numel(), 2**63 + 5, 1, 0, BLOCK=1024)

    norm((1, 128, 32, 32), torch.float32)  # CIFAR10: one tile per group
    norm((2, 64, 16, 16), torch.bfloat16, channels_last=True, add=False, silu=False)
    norm((8, 128, 256, 256), torch.float16, silu=False)  # 256x256 model, batch 8: looping programs
    norm((1, 256, 64, 64), torch.bfloat16, channels_last=True)  # batch 1: split statistics + apply
    norm((64, 128, 128, 128), torch.bfloat16, channels_last=True)  # channels_last looping programs
    # The up path's norm of h and a skip read in place, in each kernel:
    norm((1, 256, 16, 16), torch.float32, skip=128)  # CIFAR10's 384 channels at 16x16: one tile
    norm((1, 256, 64, 64), torch.float32, skip=256)  # NCHW split statistics + apply
    norm((8, 128, 256, 256), torch.float16, skip=128)  # NCHW looping programs
    norm((1, 256, 64, 64), torch.bfloat16, channels_last=True, skip=256)  # NHWC split
    norm((64, 128, 128, 128), torch.bfloat16, channels_last=True, skip=128)  # NHWC looping
    attn((1, 1, 256, 256), torch.bfloat16)  # CIFAR10 batch 1: keys split, combined
    attn((1, 1, 256, 256), torch.float16, unet=False)
    attn((8, 1, 256, 512), torch.float16)  # LSUN / CelebA-HQ: q k^T in chunks of D
    attn((64, 1, 256, 256), torch.float32)  # 3xTF32, no split
    step((256, 3, 32, 32), torch.float32)
    step((1, 3, 32, 32), torch.float32, t=(1,), noise="tensor")
    step((8, 3, 256, 256), torch.bfloat16, t=(8,), channels_last=True, clip=False)
    step((2, 3, 5, 5), torch.float16, layout=FLAT, table="ddim")
    step((16, 3, 32, 32), torch.float32, t=(), noise="device-seed")  # the graph runner's step
    cases.append(("philox_normal", noise))
    solver_step((256, 3, 32, 32), 2)  # DPM-Solver++ 2M at CIFAR10's batch 256
    solver_step((8, 3, 256, 256), 3, i=(), noise="device-seed", clip=True)  # a captured step, 3 slots
    solver_step((16, 3, 32, 32), 0, noise="tensor")
    solver_step((2, 3, 5, 5), 1, noise="none")
    if full:
        for dtype in (torch.float32, torch.bfloat16):
            norm((256, 128, 32, 32), dtype, channels_last=True)
            norm((1, 384, 32, 32), dtype, add=False)  # the largest one-tile group (12 x 1024)
            norm((1, 128, 256, 256), dtype)
            norm((8, 128, 256, 256), dtype, silu=False)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            attn((1, 1, 256, 256), dtype)
            attn((64, 1, 256, 256), dtype)
            attn((1, 1, 256, 512), dtype)
            attn((8, 1, 256, 512), dtype)
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
        return lambda *args, **kwargs: self.launches.append((self.fn, grid, args, kwargs))


class _DriverFor:
    """Triton's active driver, as far as JITFunction.run(warmup=True) asks it: the current device
    is a GPU of compute capability `capability` (its index is the capability, so each target
    gets its own binder and kernel cache)."""

    def __init__(self, capability: int):
        self.capability = capability

    def get_current_device(self) -> int:
        return self.capability

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.capability, 32)


def compile_all(full: bool = False, capability: int = 90) -> list[dict]:
    """Compile every distinct launch of `_cases(full)` for `capability`; one dict per launch:
    case, kernel, triton version, config (the launch's non-tensor keyword arguments), num_warps,
    shared (bytes), regs, spill_stores, spill_loads, stack (bytes), pointers (the tensor arguments),
    divisible (the arguments specialized as divisible by 16), ptx; or case, kernel and error."""
    import fastddpm.kernels  # noqa: F401  (registers the submodules)
    import torch
    import triton
    from triton import knobs
    from triton.runtime.driver import driver

    from benchmarks.resources import parse_ptxas

    ops = ("group_norm_silu", "attention", "ddpm_step", "multistep_update")
    modules = [sys.modules[f"fastddpm.kernels.{m}"] for m in ops]
    launches: list = []
    for module in modules:
        for name in dir(module):
            if isinstance(getattr(module, name), triton.runtime.JITFunction) and name.endswith("_kernel"):
                setattr(module, name, _Recorder(getattr(module, name), launches))
    driver.set_active(_DriverFor(capability))
    knobs.nvidia.dump_ptxas_log = True  # ptxas's report, printed by each compile
    knobs.compilation.always_compile = True  # every first launch compiles (and reports), cache or not
    results, seen = [], set()
    for case, run in _cases(full):
        del launches[:]
        run()
        for fn, grid, args, kwargs in launches:
            log = io.StringIO()
            result = {"case": case, "kernel": fn.__name__, "triton": triton.__version__}
            try:
                with contextlib.redirect_stdout(log):
                    compiled = fn.run(*args, grid=grid, warmup=True, **kwargs)
            except Exception as err:  # reported, and failed, by the tests
                results.append(result | {"error": f"{type(err).__name__}: {err}"[:2000]})
                continue
            if compiled.hash in seen:  # the JIT's cache had it: the same launch as an earlier case
                continue
            seen.add(compiled.hash)
            (usage,) = parse_ptxas(log.getvalue())
            names = [p.name for p in fn.params]
            result["config"] = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
            result["num_warps"] = compiled.metadata.num_warps
            result["shared"] = compiled.metadata.shared
            result |= {k: usage[k] for k in ("regs", "spill_stores", "spill_loads", "stack")}
            result["divisible"] = [
                names[p[0]] for p, a in compiled.src.attrs.items() if ["tt.divisibility", 16] in a
            ]
            bound = dict(zip(names, args, strict=False)) | kwargs
            result["pointers"] = [n for n in names if isinstance(bound.get(n), torch.Tensor)]
            result["ptx"] = compiled.asm["ptx"]
            results.append(result)
    return results


@pytest.fixture(scope="module", params=["pinned", "gpu-machine"])
def compiled(request) -> list[dict]:
    """Every launch of the full case set compiled for sm_90: by the installed triton ("pinned": CI
    pins 3.7.1), and by triton 3.6, the GPU machine's (pip-installed into build/triton-3.6.0)."""
    from benchmarks.resources import GPU_MACHINE_TRITON, install_triton, triton_kernel_resources

    if request.param == "pinned":
        return triton_kernel_resources()
    results = triton_kernel_resources(install_triton())
    assert {r["triton"] for r in results} == {GPU_MACHINE_TRITON}
    return results


def _summary(results: list[dict]) -> str:
    keys = ("case", "kernel", "triton", "num_warps", "regs", "spill_stores", "spill_loads", "stack", "shared")
    return json.dumps([{k: r[k] for k in keys} for r in results], indent=1)


def test_every_launch_compiles_within_sm90_shared_memory(compiled):
    """Every kernel is launched by the case set, every launch compiles, and none needs more shared
    memory than an sm_90 block may have (227 KiB)."""
    failed = [r for r in compiled if "error" in r]
    assert not failed, json.dumps(failed, indent=1)[:6000]
    assert {r["kernel"] for r in compiled} == KERNELS
    assert not (over := [r for r in compiled if r["shared"] > SM90_SHARED_PER_BLOCK]), _summary(over)


def test_no_launch_spills_registers(compiled):
    assert not (spilled := [r for r in compiled if r["spill_stores"] or r["spill_loads"]]), _summary(spilled)


# Kernels whose Box-Muller transform calls libdevice's sin and cos: their slow argument-reduction
# path (for |x| far beyond 2 pi, never reached for angles in (0, 2 pi]) keeps a 28-byte array in
# local memory, so ptxas reports a 32-byte frame with no spills. Known, and allowed exactly that.
LIBDEVICE_SINCOS_FRAME = {
    "_ddpm_step_kernel": 32,
    "_philox_normal_kernel": 32,
    "_multistep_update_kernel": 32,
}


def test_no_launch_has_a_local_memory_stack_frame(compiled):
    """No local memory: besides spills, a stack frame holds locally indexed arrays, which live in
    (cached) device memory. The one allowance: libdevice sin/cos's frame in the noise kernels."""
    framed = [r for r in compiled if r["stack"] > LIBDEVICE_SINCOS_FRAME.get(r["kernel"], 0)]
    assert not framed, _summary(framed)


def test_launches_are_specialized_on_alignment_as_on_a_gpu(compiled):
    """Every tensor argument of the production launches is 16-B aligned (a fresh allocation or
    a view at an aligned offset) and compiles with tt.divisibility 16, which vectorized loads and
    cp.async pipelining need; ints get it from their real values: the head stride 8 of 32 heads
    of D = 8 does not, their row stride 256 does."""
    for r in compiled:
        assert set(r["pointers"]) <= set(r["divisible"]), (r["case"], r["kernel"], r["divisible"])
    heads8 = [r for r in compiled if r["kernel"] == "_attn_fwd_kernel" and "(16, 32, 256, 8)" in r["case"]]
    assert heads8 and all("sqh" not in r["divisible"] and "sql" in r["divisible"] for r in heads8)


_GLOBAL_LOAD = re.compile(r"\bld\.global[\w.:]*?(?:\.v(\d))?\.[bfsu](8|16|32|64)\b")


def global_loads(ptx: str) -> dict[int, int]:
    """Bytes per thread of each global load instruction in `ptx` -> how many there are."""
    widths: dict[int, int] = {}
    for vec, bits in _GLOBAL_LOAD.findall(ptx):
        width = int(vec or 1) * int(bits) // 8
        widths[width] = widths.get(width, 0) + 1
    return widths


def test_global_loads_reads_vector_widths():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.L1::evict_last.v2.b64 { %rd5, %rd6 }, [ %rd2 + 0 ];
    @%p2 ld.global.b16 { %rs1 }, [ %rd3 + 0 ];
    ld.global.nc.f32 %f1, [%rd4];
    st.global.v4.b32 [ %rd7 + 0 ], { %r1, %r2, %r3, %r4 };
    """
    assert global_loads(ptx) == {16: 2, 2: 1, 4: 1}


def test_channels_last_group_norm_loads_16_bytes_along_c(compiled):
    """channels_last x is (N, H, W, C) in memory: contiguous only along C. Each channels_last
    GroupNorm kernel must move most of its loaded bytes in 16-B vector loads (ld.global.v4.b32,
    .v2.b64, ...) of C-contiguous elements, counted over its PTX's load instructions: 2- or 4-B
    scalar loads at a stride of C use a fraction of each 32-B sector."""
    rows = [r for r in compiled if r["kernel"].startswith("_gn_") and "cl=True" in r["case"]]
    assert rows
    narrow = []
    for r in rows:
        loads = global_loads(r["ptx"])
        wide = sum(w * n for w, n in loads.items() if w >= 16)
        if wide < sum(w * n for w, n in loads.items() if w < 16):
            narrow.append(f"{r['triton']} {r['kernel']} {r['case']}: load bytes x count {loads}")
    assert not narrow, "\n".join(narrow)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    capability = int(sys.argv[sys.argv.index("--capability") + 1]) if "--capability" in sys.argv else 90
    found = compile_all(full="--full" in sys.argv, capability=capability)
    if "--json" in sys.argv:
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(found))
    else:
        for r in found:
            print(json.dumps({k: v for k, v in r.items() if k != "ptx"}), flush=True)
