"""The measurements of the one-call GPU evidence run (benchmarks/gpu_check.sh runs this).

    python3 -m benchmarks.gpu_quick --out $OUT/bench.json --budget-s 170   # on the GPU machine
    python3 -m benchmarks.gpu_quick --dry [--out F]                        # on a CPU: CI's dry run

Sections, each guarded (an error is recorded and the rest runs) and clamped to the budget:

1. ceilings: a device-to-device copy (bytes read + written) and an 8192^3 bf16 matrix product,
   measured here, beside the figures the fractions use (4.3 TB/s and 790 TFLOP/s, KINDS.md's H200).
2. check: `fastddpm.check` at the production shapes: every backend's ops against the reference,
   then timed (each row with its GB/s or TFLOP/s and fraction of the ceilings), and the U-Net step
   (network + ddpm_step, eager) per backend and precision at batch 1 and 256.
3. alternatives: what a user would run instead, at the same shapes and with the same timer:
   F.group_norm + F.silu, and F.scaled_dot_product_attention.
4. graphs: the graph runner's ms per step (Sampler(cuda_graph=True) with seed=), batch 1 and 256.
5. solvers: a 20-step DPM-Solver++ 2M sample's ms per step, batch 1 and 256: fastddpm with the
   graph runner (the fused multistep_update captured with the network), against diffusers'
   DPMSolverMultistepScheduler loop on its UNet2DModel of the same config (where diffusers is
   installed on the GPU machine).
6. split: torch.profiler of one batch-256 forward: kernel time in convolutions, GEMMs (and SDPA),
   fastddpm's fused ops and other work, and the launch gaps (device idle between its kernels).

--dry runs every section's code on the CPU: fastddpm.check's small shapes, the tiny preset, two
sampling steps (the graph runner falls back to eager there, and says so), the profiler on CPU
operators; what needs a GPU (ceilings, launch gaps) is skipped and listed under "skipped". The JSON
is rewritten after each section, so a run cut short keeps what it measured; the table printed last
is what the device tool's reply shows.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastddpm import Sampler, UNet, cases, check, preset
from fastddpm.io import atomic_write
from fastddpm.precision import MODES, Precision

COPY_GBPS, BF16_TFLOPS = 4300.0, 790.0  # the lent H200's measured ceilings (.library/device/KINDS.md)
GRAPH_RUNS = [
    ("fp32", "triton"),
    ("bf16", "triton"),
    ("bf16", "cuda"),
    ("bf16", "torch"),
]  # precision, backend
SPLIT_RUNS = [("fp32", "triton"), ("tf32", "triton"), ("bf16", "triton"), ("bf16", "cuda"), ("bf16", "torch")]
GRAPH_STEPS = 20
SECTIONS = ("ceilings", "check", "alternatives", "graphs", "solvers", "split")
SOLVER = "dpmpp-2m"
SOLVER_RUNS = [("fp32", "triton"), ("bf16", "triton"), ("bf16", "cuda"), ("bf16", "torch")]  # as GRAPH_RUNS
SOLVER_STEPS = 20
LATER_SECTIONS_S = 60  # on a GPU, check's timings stop this long before the deadline, for what follows
FUSED_NAMES = ("fastddpm", "_gn_", "_attn_", "_ddpm_step", "_philox")  # custom ops, CUDA namespace, Triton
CONV_NAMES = ("conv", "fprop", "dgrad", "wgrad", "winograd", "nchwtonhwc", "nhwctonchw", "cudnn")
GEMM_NAMES = ("gemm", "cublas", "cutlass", "xmma", "fmha", "flash", "attention", "aten::mm", "aten::addmm",
              "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")  # fmt: skip


def group_norm_silu_eager(x, weight, bias, num_groups, eps, *, silu, add, skip=None):
    """The eager modules' (concatenation)(+add) GroupNorm(+SiLU), three to five kernels."""
    h = x if skip is None else torch.cat([x, skip], dim=1)
    h = h if add is None else h + add[:, :, None, None]
    h = F.group_norm(h, num_groups, weight, bias, eps)
    return F.silu(h) if silu else h


def sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


ALTERNATIVES = {
    "group_norm_silu": ("F.group_norm+F.silu", group_norm_silu_eager),
    "attention": ("sdpa", sdpa),
}


def with_fractions(row: dict) -> dict:
    """A timing row (fastddpm.check.time_case) with its fractions of the ceilings."""
    row["frac_copy"] = row["GBps"] / COPY_GBPS
    row["frac_bf16"] = None if row["TFLOPs"] is None else row["TFLOPs"] / BF16_TFLOPS
    return row


def category(name: str) -> str:
    """conv, gemm, fused (fastddpm's ops) or other, for a CUDA kernel's or a CPU operator's name."""
    n = name.lower()
    for label, keys in (("fused", FUSED_NAMES), ("conv", CONV_NAMES), ("gemm", GEMM_NAMES)):
        if any(key in n for key in keys):
            return label
    return "other"


class Run:
    """The run's state: device, deadline, results (the JSON), and a guard per section."""

    def __init__(self, dry: bool, budget_s: float, out: str | None) -> None:
        self.dry, self.out = dry, out
        self.device = torch.device("cpu" if dry else "cuda")
        self.deadline = time.monotonic() + budget_s
        self.preset, self.batches = check.UNET_RUNS[self.device.type]
        self.unavailable = check.backends_for(self.device)  # backend -> why it cannot run here, or None
        self.results: dict = {
            "machine": check.machine(self.device),
            "dry": dry,
            "sections": {},
            "skipped": [],
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def skip(self, what: str) -> None:
        self.results["skipped"].append(what)
        print(f"skipped: {what}", flush=True)

    def section(self, name: str, fn) -> None:
        """Run one section: its seconds (or its error) go under "sections"; the JSON is rewritten."""
        if self.left() <= 0:
            self.skip(f"{name} (past the deadline)")
            return
        start = time.perf_counter()
        try:
            fn()
            status = "ok"
        except Exception as err:  # an evidence run records the error and goes on
            status = f"error: {cases.error_line(err)}"
        self.results["sections"][name] = {"status": status, "seconds": round(time.perf_counter() - start, 2)}
        print(f"== {name}: {status} ({time.perf_counter() - start:.1f} s)", flush=True)
        self.write()

    def row(self, section: str, **row) -> None:
        self.results.setdefault(section, []).append(row)

    def guarded(self, section: str, what: str, fn, backend: str | None = None) -> None:
        """One row of a section: skipped past the deadline or where `backend` cannot run, its error
        recorded instead of raised."""
        if self.left() <= 0:
            self.skip(f"{section}: {what} (past the deadline)")
            return
        why = None if backend is None else self.unavailable[backend]
        if why is not None:
            self.skip(f"{section}: {what} (backend {backend}: {why})")
            return
        try:
            fn()
        except Exception as err:
            self.row(section, what=what, error=cases.error_line(err))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # after an out-of-memory error, the next row starts clean

    def write(self) -> None:
        if self.out:
            text = json.dumps(self.results, indent=1, default=str)
            atomic_write(self.out, lambda tmp: Path(tmp).write_text(text + "\n"))

    # --- sections ----------------------------------------------------------------------------

    def ceilings(self) -> None:
        if self.dry:
            self.skip("ceilings: the copy and matrix-product ceilings are measured on a GPU only")
            return
        dev = self.device
        src = torch.randn(2**28, device=dev)  # 1 GiB, many times the L2
        dst = torch.empty_like(src)
        copy_s = check.median_seconds(lambda: dst.copy_(src), dev)
        a, b = (torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) for _ in range(2))
        mm_s = check.median_seconds(lambda: a @ b, dev)
        self.results["ceilings"] = {
            "copy_GBps_measured": 2 * src.numel() * 4 / copy_s / 1e9,
            "bf16_TFLOPs_measured": 2 * 8192**3 / mm_s / 1e12,
            "copy_GBps_used": COPY_GBPS,
            "bf16_TFLOPs_used": BF16_TFLOPS,
        }

    def check(self) -> None:
        precisions = ("fp32", "bf16") if self.dry else MODES
        reserve = 0 if self.dry else LATER_SECTIONS_S
        report = check.run(self.device, precisions=precisions, deadline=self.deadline - reserve)
        result = report.to_dict()
        result["timings"] = [with_fractions(row) for row in result["timings"]]
        self.results["check"] = result
        self.results["skipped"] += [f"check: {note}" for note in report.notes]

    def alternatives(self) -> None:
        for case in check.cases(self.device):
            if case.op not in ALTERNATIVES:
                continue
            name, _ = ALTERNATIVES[case.op]
            self.guarded(
                "alternatives",
                f"{name} {case.label} {case.dtype}",
                functools.partial(self._alternative, case),
            )

    def _alternative(self, case: cases.Case) -> None:
        name, fn = ALTERNATIVES[case.op]
        inputs = cases.make_inputs(case, self.device)
        self.row("alternatives", **with_fractions(check.time_case(case, name, inputs, fn=fn)))

    def graphs(self) -> None:
        batches = (1,) if self.dry else (1, 256)
        steps = 2 if self.dry else GRAPH_STEPS
        for batch in batches:
            for precision, backend in GRAPH_RUNS:
                what = f"{precision} {backend} batch {batch}"
                run = functools.partial(self._graph, precision, backend, batch, steps)
                self.guarded("graphs", what, run, backend)
        if self.dry:
            self.skip("graphs: CUDA graphs are captured on a GPU only (the CPU rows sampled eagerly)")

    def _graph(self, precision: str, backend: str, batch: int, steps: int) -> None:
        unet = UNet(preset(self.preset), backend=backend).to(self.device).eval()
        sampler = Sampler(unet, precision=precision, cuda_graph=True)
        seconds = check.median_seconds(
            lambda: sampler.sample(batch, steps=steps, seed=0, progress=False), self.device, reps=3
        )  # the warm-up call captures
        self.row(
            "graphs", precision=precision, backend=backend, batch=batch, steps=steps,
            graph=sampler.graph_runner.captures > 0, ms_per_step=seconds / steps * 1e3,
        )  # fmt: skip

    def solvers(self) -> None:
        batches = (1,) if self.dry else (1, 256)
        steps = 2 if self.dry else SOLVER_STEPS
        for batch in batches:
            for precision, backend in SOLVER_RUNS:
                what = f"fastddpm {SOLVER} {precision} {backend} batch {batch}"
                run = functools.partial(self._solver, precision, backend, batch, steps)
                self.guarded("solvers", what, run, backend)
            what = f"diffusers DPMSolverMultistepScheduler fp32 batch {batch}"
            self.guarded("solvers", what, functools.partial(self._diffusers_solver, batch, steps))

    def _solver(self, precision: str, backend: str, batch: int, steps: int) -> None:
        unet = UNet(preset(self.preset), backend=backend).to(self.device).eval()
        sampler = Sampler(unet, precision=precision, cuda_graph=True)
        sample = functools.partial(sampler.sample, batch, steps=steps, method=SOLVER, seed=0, progress=False)
        seconds = check.median_seconds(sample, self.device, reps=3)  # the warm-up call captures
        self.row(
            "solvers", system="fastddpm", precision=precision, backend=backend, batch=batch, steps=steps,
            graph=sampler.graph_runner.captures > 0, ms_per_step=seconds / steps * 1e3,
        )  # fmt: skip

    def _diffusers_solver(self, batch: int, steps: int) -> None:
        import diffusers  # the GPU machine has it only where it travels as wheels: an error row then

        from fastddpm import DiffusionConfig
        from fastddpm.checkpoints import diffusion_config_to_diffusers, unet_config_to_diffusers

        cfg = preset(self.preset)
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel.from_config(unet_config_to_diffusers(cfg)).to(self.device).eval()
        scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            diffusion_config_to_diffusers(DiffusionConfig())
        )
        shape = (batch, cfg.in_channels, cfg.resolution, cfg.resolution)

        @torch.no_grad()
        def run() -> None:
            scheduler.set_timesteps(steps)  # it keeps its history: a fresh run each time
            x = torch.randn(shape, device=self.device)
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample

        seconds = check.median_seconds(run, self.device, reps=3)
        self.row(
            "solvers", system="diffusers", precision="fp32", backend="eager", batch=batch, steps=steps,
            graph=False, ms_per_step=seconds / steps * 1e3,
        )  # fmt: skip

    def split(self) -> None:
        runs = SPLIT_RUNS[-1:] if self.dry else SPLIT_RUNS
        batch = self.batches[-1]
        for precision, backend in runs:
            run = functools.partial(self._split, precision, backend, batch)
            self.guarded("split", f"{precision} {backend}", run, backend)
        if self.dry:
            self.skip(
                "split: launch gaps are read from the GPU's timeline only (the CPU row splits operators)"
            )

    def _split(self, precision: str, backend: str, batch: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        dev = self.device
        mode = Precision(precision)
        net = mode.apply(UNet(preset(self.preset), backend=backend).to(dev).eval())
        x = torch.randn(batch, 3, net.config.resolution, net.config.resolution, device=dev)
        x = x.to(next(net.parameters()).dtype)
        t = torch.full((batch,), 500, device=dev)
        activity = ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU
        with torch.no_grad(), mode.scope(dev):
            net(x, t)  # warm-up: JIT, cuDNN plans
            sync(dev)
            with profile(activities=[activity]) as prof:
                net(x, t)
                sync(dev)
        kind = torch.autograd.DeviceType.CUDA if dev.type == "cuda" else torch.autograd.DeviceType.CPU
        events = [e for e in prof.events() if e.device_type == kind]
        ms: dict[str, float] = {}
        for e in events:
            # a kernel's own span on the device's timeline; a CPU operator's time less its children's
            self_us = e.time_range.end - e.time_range.start if dev.type == "cuda" else e.self_cpu_time_total
            ms[category(e.name)] = ms.get(category(e.name), 0.0) + self_us / 1e3
        self.row(
            "split", precision=precision, backend=backend, batch=batch, kernels=len(events),
            ms=ms, busy_ms=sum(ms.values()), gaps_ms=launch_gaps_ms(events) if dev.type == "cuda" else None,
        )  # fmt: skip

    def table(self, ops: bool = True) -> str:
        """The table printed last; without `ops`, the summary without a row per op."""
        lines = [
            f"gpu_quick on {self.results['machine']['device_name']}" + (" (dry run)" if self.dry else "")
        ]
        for name, s in self.results["sections"].items():
            lines.append(f"  {name}: {s['status']} ({s['seconds']} s)")
        c = self.results.get("check")
        if c:
            failed = [r for r in c["checks"] if not r["passed"]]
            lines.append(f"checks: {len(c['checks']) - len(failed)} of {len(c['checks'])} pass")
            lines += [
                f"  FAIL {r['backend']} {r['op']} {r['case']} {r['dtype']}: {r['message']}" for r in failed
            ]
            if ops:
                lines.append("ops (ms, GB/s, copy fraction, TFLOP/s, bf16 fraction):")
                rows = c["timings"] + [r for r in self.results.get("alternatives", []) if "ms" in r]
                lines += [f"  {timing_line(r)}" for r in rows]
            lines.append("U-Net step (ms):")
            lines += [f"  {r['backend']} {r['precision']} b{r['batch']}: {fmt(r['ms'])}" for r in c["unet"]]
        for r in self.results.get("graphs", []):
            if "error" in r:
                lines.append(f"graph {r['what']}: {r['error']}")
            else:
                name = f"{r['backend']} {r['precision']} b{r['batch']}"
                lines.append(f"graph {name}: {r['ms_per_step']:.3g} ms/step (captured: {r['graph']})")
        for r in self.results.get("solvers", []):
            if "error" in r:
                lines.append(f"solver {r['what']}: {r['error']}")
            else:
                name = f"{r['system']} {SOLVER} {r['backend']} {r['precision']} b{r['batch']}"
                lines.append(f"solver {name}: {r['ms_per_step']:.3g} ms/step (graph: {r['graph']})")
        for r in self.results.get("split", []):
            if "error" in r:
                lines.append(f"split {r['what']}: {r['error']}")
            else:
                parts = ", ".join(f"{k} {v:.3g}" for k, v in sorted(r["ms"].items()))
                name = f"{r['backend']} {r['precision']} b{r['batch']}"
                lines.append(f"split {name} (ms): {parts}, launch gaps {fmt(r['gaps_ms'])}")
        lines += [f"skipped: {s}" for s in self.results["skipped"]]
        return "\n".join(lines)


def timing_line(r: dict) -> str:
    shape = "x".join(map(str, r["shape"]))
    return (
        f"{r['backend']:<19} {r['op']:<15} {r['case']:<23} {shape:<14} {r['dtype']:<8} {r['ms']:9.4g}"
        f" {r['GBps']:8.4g} {r['frac_copy']:6.1%} {fmt(r['TFLOPs']):>6} {fmt_pct(r['frac_bf16']):>6}"
    )


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def launch_gaps_ms(events) -> float:
    """Device time between the first kernel's start and the last one's end with no kernel running."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    if not spans:
        return 0.0
    idle, end = 0.0, spans[0][1]
    for start, stop in spans[1:]:
        idle += max(0.0, start - end)
        end = max(end, stop)
    return idle / 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="the JSON file to write (rewritten after each section)")
    p.add_argument("--dry", action="store_true", help="on the CPU: tiny shapes, the GPU-only parts skipped")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting rows after this (170; dry 60)")
    p.add_argument("--only", default=",".join(SECTIONS), help="sections to run")
    p.add_argument("--summary", help="append the table without its per-op rows to this file")
    args = p.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        p.error("no CUDA device is visible: run with --dry on a CPU")
    run = Run(args.dry, args.budget_s or (60 if args.dry else 170), args.out)
    for name in args.only.split(","):
        if name not in SECTIONS:
            p.error(f"unknown section {name!r}")
        run.section(name, getattr(run, name))
    print(run.table(), flush=True)
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(run.table(ops=False) + "\n")


if __name__ == "__main__":
    main()
