"""`fastddpm check`: every available backend's ops against the reference, then their speed.

    fastddpm check [--device cuda] [--quick] [--json F]

1. Correctness: each backend that can run on the device ("torch" always; "triton" on CUDA, or on
   the CPU through Triton's interpreter; "cuda" where the library is built and a GPU is visible)
   runs the three ops at the DDPM shape classes, each compared with `fastddpm.reference` run in
   float32 on the same (rounded) inputs:
   - group_norm_silu: NCHW and channels_last, the ResBlock's form (+ add, SiLU) and the plain
     GroupNorm in front of attention;
   - attention in both forms the CIFAR10 models run: one head of D = 256 (the paper's network;
     D = 512 for the 256x256 models) and 32 heads of D = 8 (google/ddpm-cifar10-32 as diffusers
     reads its config), in the (B, L, heads, D) storage the U-Net's projections produce;
   - ddpm_step with the noise passed in and drawn in-kernel from a Philox seed, in float32 (the
     sampler keeps x_t in float32);
   each in float32, float16 and bfloat16 (the step: float32). `max_error` is DESIGN.md's measure
   ("Equal means"): float32 max absolute error (tolerance 1e-4, 1e-5 for ddpm_step), float16 and
   bfloat16 max absolute error over the output's scale max|ref| (2e-3 and 2e-2). A NaN, a wrong
   shape, dtype or memory format, or an exception fails the case with its message.
2. Speed (skipped with --quick): each passing case timed on its backend (CUDA events on a GPU,
   perf_counter on the CPU; the median of a few repetitions) with the bytes it must move and,
   for attention, its FLOPs; then one U-Net reverse step (network + ddpm_step) per backend: the
   CIFAR10 network at batch 1 and 256 on a GPU, the tiny preset at batch 1 on the CPU.

Shapes are the production ones on a GPU and small ones on the CPU (the interpreter runs Triton
programs one at a time). `fastddpm.verify` runs the same comparison on first use of a backend, and
benchmarks/gpu_quick.py times with the same code.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import ops
from ._version import __version__
from .backends import backend_op
from .cases import (
    DTYPES,
    MULTISTEP_STEP,
    MULTISTEP_VARIANTS,
    NORM_VARIANTS,
    SOLVER_DEST,
    STEP_VARIANTS,
    Case,
    cifar10_table,
    compare,
    device_name,
    error_line,
    make_inputs,
    plain,
    reference_output,
)
from .io import atomic_write

# (N, C, H, W) and groups of group_norm_silu; (B, heads, L, D) of attention; (N, C, H, W) of the step.
GPU_SHAPES = {
    "group_norm_silu": [((256, 128, 32, 32), 32)],  # CIFAR10's first level at batch 256
    "attention": [(256, 1, 256, 256), (8, 1, 256, 512), (256, 32, 256, 8)],
    "ddpm_step": [(256, 3, 32, 32)],
    "multistep_update": [(256, 3, 32, 32)],
}
CPU_SHAPES = {
    "group_norm_silu": [((1, 32, 8, 8), 8)],
    "attention": [(1, 1, 16, 256), (1, 1, 16, 512), (1, 4, 16, 8)],  # heads: 4 stand for 32 here
    "ddpm_step": [(2, 3, 8, 8)],
    "multistep_update": [(2, 3, 8, 8)],
}
UNET_RUNS = {"cuda": ("cifar10", (1, 256)), "cpu": ("tiny", (1,))}  # preset, batch sizes
GPU_REPS, CPU_REPS = 10, 3
GPU_REP_SECONDS = 2e-3  # a timed repetition on a GPU repeats a short op to about this long


# --- cases and their inputs ---------------------------------------------------------------------


def cases(device: torch.device) -> list[Case]:
    """The shape classes, production sizes on a GPU and small ones on the CPU, in every dtype."""
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    out = []
    for dtype in DTYPES:
        for shape, groups in shapes["group_norm_silu"]:
            for channels_last in (False, True):
                out += [
                    Case("group_norm_silu", shape, dtype, channels_last, variant, groups)
                    for variant in NORM_VARIANTS
                ]
        out += [Case("attention", shape, dtype) for shape in shapes["attention"]]
    for shape in shapes["ddpm_step"]:
        out += [Case("ddpm_step", shape, torch.float32, variant=v) for v in STEP_VARIANTS]
    for shape in shapes["multistep_update"]:  # float32 only
        out += [Case("multistep_update", shape, torch.float32, variant=v) for v in MULTISTEP_VARIANTS]
    return out


# --- timing -------------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int | None = None) -> float:
    """Median seconds of one fn() call after one warm-up call: CUDA events around each repetition
    on a GPU (a repetition repeats a short fn to about GPU_REP_SECONDS), perf_counter on the CPU."""
    fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps or CPU_REPS):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    inner = max(1, min(1000, round(GPU_REP_SECONDS / max(time.perf_counter() - start, 1e-6))))
    events = []
    for _ in range(reps or GPU_REPS):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(inner):
            fn()
        end.record()
        events.append((begin, end))
    torch.cuda.synchronize(device)
    return statistics.median(b.elapsed_time(e) for b, e in events) / 1e3 / inner


def traffic(case: Case) -> tuple[float, float | None]:
    """(bytes the op must move: each input read once, the output written once; FLOPs of attention's
    two matrix products, else None)."""
    numel, size = math.prod(case.shape), torch.tensor([], dtype=case.dtype).element_size()
    if case.op == "group_norm_silu":
        N, C = case.shape[:2]
        extra = 2 * C + {"add+silu": N * C, "skip": C}.get(case.variant, 0)  # skip's add: one row
        return float((2 * numel + extra) * size), None
    if case.op == "attention":
        B, H, L, D = case.shape
        return float(4 * numel * size), 4.0 * B * H * L * L * D
    if case.op == "multistep_update":  # x, eps, (noise), the 3 slots read, x_next, the slots written
        written = sum(slot >= 0 for slot in SOLVER_DEST[MULTISTEP_STEP[case.variant]])
        tensors = (4 if case.variant == "noise" else 3) + 3 + written
        return float(tensors * numel * size), None
    tensors = 4 if case.variant == "noise" else 3  # x_t, eps, (noise), x_{t-1}
    return float(tensors * numel * size), None


def time_case(
    case: Case,
    name: str,
    inputs: tuple[tuple, dict],
    fn: Callable | None = None,
    reps: int | None = None,
) -> dict:
    """A timing row of `case` on backend `name` (or of `fn`, an alternative taking the op's
    arguments, under that name): ms per call, GB/s and (attention) TFLOP/s."""
    args, kwargs = inputs
    fn = fn or backend_op(name, case.op)
    with plain(args[0].device):
        seconds = median_seconds(lambda: fn(*args, **kwargs), args[0].device, reps)
    nbytes, flops = traffic(case)
    return {
        **describe(case, name),
        "ms": seconds * 1e3,
        "GBps": nbytes / seconds / 1e9,
        "TFLOPs": None if flops is None else flops / seconds / 1e12,
    }


def unet_step_seconds(
    preset_name: str,
    backend: str,
    device: torch.device,
    batch: int,
    precision: str = "fp32",
    channels_last: bool = False,
    reps: int | None = None,
) -> float:
    """Median seconds of one eager reverse step: the network's eps at batch `batch` (random weights,
    in `precision`), then ops.ddpm_step with Philox noise, as the sampler runs it."""
    from .sampler import Sampler
    from .unet import UNet, preset

    config = preset(preset_name)
    unet = UNet(config, backend=backend).to(device).eval()
    sampler = Sampler(unet, precision=precision, channels_last=channels_last, cuda_graph=False)
    table = cifar10_table(device)
    i = len(table) // 2
    res = config.resolution
    x = torch.randn(batch, config.in_channels, res, res, device=device)
    t = torch.full((batch,), int(table.timesteps[i]), device=device)

    def step() -> torch.Tensor:
        eps = sampler.predict_eps(x, t)
        return ops.ddpm_step(x, eps, i, table, seed=0, offset=i, backend=backend)

    with torch.no_grad(), sampler.precision.scope(device):
        return median_seconds(step, device, reps)


# --- the whole check ----------------------------------------------------------------------------


def describe(case: Case, backend: str) -> dict:
    """The JSON fields naming a case on a backend."""
    return {
        "backend": backend,
        "op": case.op,
        "case": case.label,
        "shape": list(case.shape),
        "groups": case.groups if case.op == "group_norm_silu" else None,
        "dtype": str(case.dtype).removeprefix("torch."),
    }


def backends_for(device: torch.device) -> dict[str, str | None]:
    """Each backend of fastddpm.ops -> None where it runs on `device`, else why it is skipped."""
    out = {}
    for name, status in ops.backend_status().items():
        if status != "available":
            out[name] = status
        elif device.type == "cpu" and name == "cuda":
            out[name] = "the CUDA library runs on CUDA devices"
        elif device.type == "cpu" and name == "triton" and not _interpreted():
            out[name] = "Triton runs on the CPU only in its interpreter (TRITON_INTERPRET=1 before import)"
        else:
            out[name] = None
    return out


def _interpreted() -> bool:
    from fastddpm.kernels._common import INTERPRET

    return INTERPRET


@dataclass
class Report:
    """What `fastddpm check` found: the machine, each backend's status, every case on every backend
    that runs here, and (unless quick) timings and U-Net step times."""

    machine: dict
    backends: dict[str, str | None]
    checks: list[dict] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)
    unet: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[dict]:
        return [row for row in self.checks if not row["passed"]]

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": not self.failures}

    def write_json(self, path: str | Path) -> None:
        """Write the report to `path` atomically (a reader sees the old file or the whole new one)."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False, default=str)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))

    def table(self) -> str:
        m = self.machine
        lines = [f"fastddpm check {m['fastddpm']}: {m['device']} ({m['device_name']}), torch {m['torch']}"]
        for name, why in self.backends.items():
            lines.append(f"backend {name}: {'checked' if why is None else 'skipped: ' + why}")
        lines += ["", "against fastddpm.reference (float32: max abs error; float16, bfloat16: over max|ref|)"]
        lines.append(_columns(CHECK_COLUMNS, [_check_cells(r) for r in self.checks]))
        if self.timings:
            lines += ["", f"timings (median; {m['timer']})"]
            lines.append(_columns(TIMING_COLUMNS, [_timing_cells(r) for r in self.timings]))
        if self.unet:
            lines += ["", "U-Net reverse step (network + ddpm_step, eager, random weights)"]
            cells = [
                [r["backend"], r["preset"], str(r["batch"]), r["precision"], _num(r["ms"])] for r in self.unet
            ]
            lines.append(_columns(("backend", "preset", "batch", "precision", "ms/step"), cells))
        lines += [f"note: {note}" for note in self.notes]
        failed = len(self.failures)
        lines += ["", f"{len(self.checks) - failed} of {len(self.checks)} checks pass, {failed} fail"]
        return "\n".join(lines)


CHECK_COLUMNS = ("backend", "op", "case", "shape", "dtype", "error", "tolerance", "result")
TIMING_COLUMNS = ("backend", "op", "case", "shape", "dtype", "ms", "GB/s", "TFLOP/s")


def _check_cells(r: dict) -> list[str]:
    result = "pass" if r["passed"] else f"FAIL: {r['message']}"
    return [*_name_cells(r), _num(r["error"]), f"{r['tolerance']:g}", result]


def _timing_cells(r: dict) -> list[str]:
    return [*_name_cells(r), f"{r['ms']:.4g}", f"{r['GBps']:.4g}", _num(r["TFLOPs"])]


def _name_cells(r: dict) -> list[str]:
    shape = "x".join(map(str, r["shape"]))
    if r["groups"]:
        shape += f" /{r['groups']}"
    return [r["backend"], r["op"], r["case"], shape, r["dtype"]]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _columns(headers: tuple[str, ...], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(c) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]
    ]
    return "\n".join(lines)


def machine(device: torch.device) -> dict:
    info = {
        "fastddpm": __version__,
        "torch": torch.__version__,
        "device": str(device),
        "device_name": device_name(device),
        "timer": "CUDA events" if device.type == "cuda" else "perf_counter",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def run(
    device: str | torch.device,
    quick: bool = False,
    backends: list[str] | None = None,
    precisions: tuple[str, ...] = ("fp32",),
    deadline: float | None = None,
) -> Report:
    """Check (and unless `quick`, time) every backend that runs on `device`, or those named; the
    U-Net step in each of `precisions`. Past `deadline` (a time.monotonic() value) the remaining
    timings are skipped, with a note; every check still runs."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"fastddpm check runs on cpu or cuda, not {device}")
    status = backends_for(device)
    if backends is not None:
        unknown = [name for name in backends if name not in status]
        if unknown:
            raise ValueError(f"unknown backend {unknown[0]!r}; choose from {', '.join(status)}")
        status = {name: status[name] for name in backends}
    report = Report(machine(device), status)
    names = [name for name, why in status.items() if why is None]
    passed = {name: True for name in names}

    def in_time(what: str) -> bool:
        if deadline is None or time.monotonic() < deadline:
            return True
        report.notes.append(f"not timed (past the deadline): {what}")
        return False

    for case in cases(device):
        inputs = make_inputs(case, device)
        ref = reference_output(case, inputs, device)
        for name in names:
            outcome = compare(case, name, inputs, ref)
            report.checks.append({**describe(case, name), **asdict(outcome)})
            passed[name] &= outcome.passed
            if outcome.passed and not quick and in_time(f"{name} {case.op} {case.label} {case.dtype}"):
                report.timings.append(time_case(case, name, inputs))
    if quick:
        return report
    preset_name, batches = UNET_RUNS[device.type]
    for precision in precisions:  # every backend side by side before the next setting
        for batch in batches:
            for name in names:
                row = {
                    "backend": name,
                    "preset": preset_name,
                    "batch": batch,
                    "precision": precision,
                    "ms": None,
                }
                report.unet.append(row)
                what = f"U-Net step {name} {precision} batch {batch}"
                if not passed[name]:
                    report.notes.append(f"not timed (its checks failed): {what}")
                elif in_time(what):
                    try:
                        row["ms"] = unet_step_seconds(preset_name, name, device, batch, precision) * 1e3
                    except Exception as err:  # e.g. out of memory: the rest still runs
                        report.notes.append(f"{what} failed: {error_line(err)}")
    return report
