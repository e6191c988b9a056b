"""End-to-end DDPM sampling speed: fastddpm against diffusers' DDPMPipeline loop and torch.compile of it.

    pytest benchmarks/test_e2e.py --benchmark-only --benchmark-json=benchmarks/results/<date>-<gpu>-e2e.json
    python -m benchmarks.report benchmarks/results/<date>-<gpu>-e2e.json --out e2e.png

Models, with random weights (speed does not depend on them), T = 1000:
- cifar10: google/ddpm-cifar10-32's own config (tests/data/ddpm-cifar10-32) for both systems, so both run
  the 32-head attention diffusers runs for that checkpoint. GPU: batch 1, 16, 64, 256; CPU: batch 1, 8.
- lsun256: fastddpm.PRESETS["lsun256"] with the fixedsmall variance; diffusers builds the same network
  from `checkpoints.unet_config_to_diffusers`. GPU: batch 1 and 8.

A timed round is one whole reverse process of S steps (S = GPU_STEPS on a GPU, CPU_STEPS on the CPU)
from fresh x_T to x_0, ended by a CUDA synchronize on the GPU. One untimed round first compiles,
autotunes and captures. What a round runs, per system:
- "diffusers" (eager): DDPMPipeline's loop written out, with `scheduler.set_timesteps(S)`: x_T = randn in
  the network's dtype; for each t: eps = unet(x, t).sample; x = scheduler.step(eps, t, x,
  generator=g).prev_sample, with t the scheduler's CPU tensor as the pipeline passes it and g a generator
  on the sampling device. Precisions: fp32 (TF32 off), tf32 (TF32 matmuls and cuDNN convolutions;
  PyTorch's defaults sit between, TF32 in convolutions only), fp16 (weights and x in half, as
  DDPMPipeline runs a half-precision unet). fastddpm.precision.Precision.scope sets the TF32 flags,
  as it does for fastddpm.
- "diffusers+compile": the same loop with unet = torch.compile(unet, mode="max-autotune"), which
  replays CUDA graphs (cudagraph trees; torch.compiler.cudagraph_mark_step_begin() before each call);
  the network gets t as a CUDA tensor so no host input blocks the capture. fp32 and fp16.
- "fastddpm": one `Sampler.sample(B, steps=S, seed=0, batch_size=B, progress=False)` call: the Philox
  x_T, the respaced step table, S U-Net + ops.ddpm_step calls, with the CUDA-graph runner
  (`cuda_graph=True`) or without (`cuda_graph=False`), for each backend and precision. CPU rows: fp32,
  and the candidates for the fastest CPU configuration (CPU_OPTIONS: bf16, channels_last, and the
  network under `Sampler(compile=True)`, torch.compile fullgraph), torch backend.

Solver rows (DPM-Solver++ 2M, `solver` in extra_info): on the GPU cifar10 at batch 1 and 256, 20 steps
(SOLVER_GPU_STEPS), diffusers' loop over DPMSolverMultistepScheduler.from_config of the DDPMScheduler
(eager, fp32 / tf32 / fp16) against fastddpm's `sample(method="dpmpp-2m")` with the graph runner per
backend, fp32 and bf16; on the CPU both at CPU_STEPS, fp32.

extra_info: ms_per_step = round median / S; images_per_s = B / (1000 * step time), the rate of a
1000-step sample; plus system, model, device, batch, precision, backend, graph, channels_last, compile and
the torch / diffusers / fastddpm versions. Groups: "<model> <device type> batch <B>".
GPU rows are marked `gpu` and skip with the reason without a CUDA device; a backend that cannot run
skips with its reason, a configuration that refuses (ValueError) skips with its message, and so
does a graph row whose runner captured no graph in the warm-up (it fell back to eager): a row
labelled graph=on replays CUDA graphs. The torch.compile rows take minutes each to build:
`-k "not compile"` leaves them out.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch

import fastddpm
from fastddpm import ops
from fastddpm.cases import device_name
from fastddpm.checkpoints import (
    diffusion_config_from_diffusers,
    diffusion_config_to_diffusers,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from fastddpm.precision import Precision, cpu_capability

from .common import backend_or_skip

T = 1000  # images/s is the rate of a T-step sample
GPU_STEPS, GPU_ROUNDS = 50, 3  # a round already averages 50 steps; the GPU machine's time is scarce
CPU_STEPS, CPU_ROUNDS = 3, 3
CUDA = torch.cuda.is_available()

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
DIFFUSERS_PRECISIONS = ("fp32", "tf32", "fp16")
COMPILE_PRECISIONS = ("fp32", "fp16")
# (precision, channels_last, compile) of fastddpm's CPU rows: plain fp32, and the candidates for the
# fastest CPU configuration (bf16 runs on AMX / AVX-512 bf16 units; channels_last is oneDNN's native
# layout; compile: Sampler(compile=True), Inductor's CPU code for the network).
CPU_OPTIONS = (
    ("fp32", False, False),
    ("fp32", True, False),
    ("bf16", False, False),
    ("bf16", True, False),
    ("bf16", True, True),
)


@dataclass(frozen=True)
class Model:
    """One network and diffusion, as both systems build it from diffusers-format config dicts."""

    name: str
    unet_json: dict
    scheduler_json: dict

    @classmethod
    def from_folder(cls, name: str, folder: Path) -> Model:
        read = lambda f: json.loads((folder / f).read_text())  # noqa: E731
        return cls(name, read("unet_config.json"), read("scheduler_config.json"))

    @classmethod
    def from_config(cls, name: str, unet: fastddpm.UNetConfig, diffusion: fastddpm.DiffusionConfig) -> Model:
        return cls(name, unet_config_to_diffusers(unet), diffusion_config_to_diffusers(diffusion))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        size = self.unet_json["sample_size"]
        return self.unet_json.get("in_channels", 3), size, size

    def diffusers(self, device: torch.device, dtype: torch.dtype):
        """(UNet2DModel with random weights on `device` in `dtype`, DDPMScheduler); skips the row
        where diffusers is not installed (the GPU machine has none unless it travels as wheels)."""
        diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")

        torch.manual_seed(0)
        unet = diffusers.UNet2DModel.from_config(self.unet_json).to(device).eval()
        if dtype != torch.float32:  # (diffusers warns on any dtype cast)
            unet = unet.to(dtype)
        return unet, diffusers.DDPMScheduler.from_config(self.scheduler_json)

    def fastddpm(self, device: torch.device, backend: str, **options) -> fastddpm.Sampler:
        """A Sampler over a fastddpm U-Net with random weights on `device`; options go to Sampler."""
        torch.manual_seed(0)
        unet = fastddpm.UNet(unet_config_from_diffusers(self.unet_json), backend=backend).to(device).eval()
        return fastddpm.Sampler(unet, diffusion_config_from_diffusers(self.scheduler_json), **options)


MODELS = {
    "cifar10": Model.from_folder(
        "cifar10", Path(__file__).parent.parent / "tests" / "data" / "ddpm-cifar10-32"
    ),
    "lsun256": Model.from_config(
        "lsun256", fastddpm.PRESETS["lsun256"], fastddpm.DiffusionConfig(variance="fixedsmall")
    ),
}
GPU_CASES = [("cifar10", b) for b in (1, 16, 64, 256)] + [("lsun256", b) for b in (1, 8)]
CPU_CASES = [("cifar10", 1), ("cifar10", 8)]


def case_ids(cases: list[tuple[str, int]]) -> list[str]:
    return [f"{model}-b{batch}" for model, batch in cases]


def installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Case:
    """What a row runs on: the model, the device, the batch, S steps per round, timed rounds."""

    model: Model
    device: torch.device
    batch: int
    steps: int
    rounds: int


@pytest.fixture(autouse=True)
def release_gpu_memory():
    """Free each row's CUDA memory (its graphs' pools, the allocator's cache) before the next row."""
    yield
    if CUDA:
        gc.collect()
        torch.cuda.empty_cache()


def time_rounds(
    benchmark, case: Case, run: Callable[[], None], *, warmed: Callable[[], None] | None = None, **info
) -> None:
    """Warm up with one call of `run` (one S-step reverse process, synchronized), time `case.rounds`
    more, and record per-step time, images/s, the case and the row's description (`info`) in
    extra_info. A warm-up that raises ValueError skips the row with its message; `warmed()` runs
    after the warm-up (it may skip the row)."""
    try:
        run()  # compiles, autotunes, captures; and lets a configuration refuse
    except ValueError as err:
        pytest.skip(f"refused: {str(err).splitlines()[0][:200]}")
    if warmed is not None:
        warmed()
    benchmark.group = f"{case.model.name} {case.device.type} batch {case.batch}"
    benchmark.pedantic(run, rounds=case.rounds, iterations=1, warmup_rounds=0)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    step = benchmark.stats.stats.median / case.steps
    benchmark.extra_info.update(
        info,
        model=case.model.name,
        device_type=case.device.type,
        device=device_name(case.device),
        **(cpu_capability() if case.device.type == "cpu" else {}),  # AVX2 / AVX512, bf16 units
        batch=case.batch,
        steps_per_round=case.steps,
        ms_per_step=step * 1e3,
        images_per_s=case.batch / (T * step),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        diffusers=installed_version("diffusers"),
        fastddpm=fastddpm.__version__,
    )


def diffusers_row(benchmark, case: Case, precision: str, *, compiled: bool, solver: str = "ddpm") -> None:
    """Time DDPMPipeline's loop of S steps (eager, or the network under max-autotune torch.compile);
    with `solver` "dpmpp-2m", the same loop over DPMSolverMultistepScheduler.from_config of the
    DDPMScheduler (its set_timesteps in each round: it keeps history)."""
    device, dtype = case.device, torch.float16 if precision == "fp16" else torch.float32
    unet, scheduler = case.model.diffusers(device, dtype)
    if solver != "ddpm":
        scheduler = SOLVER_SCHEDULERS[solver](scheduler)
    scheduler.set_timesteps(case.steps)
    if compiled:
        torch._dynamo.reset()  # a fresh cache: the recompile limit would otherwise leave later rows eager
        unet = torch.compile(unet, mode="max-autotune", dynamic=False)
    # (t for the scheduler, t for the network): the pipeline passes the CPU tensor to both
    timesteps = [(t, t.to(device) if compiled else t) for t in scheduler.timesteps]
    generator = torch.Generator(device).manual_seed(0)

    @torch.no_grad()
    def run() -> None:
        if solver != "ddpm":
            scheduler.set_timesteps(case.steps)  # a multistep scheduler starts its history afresh
        x = torch.randn((case.batch, *case.model.shape), generator=generator, device=device, dtype=dtype)
        for t, t_unet in timesteps:
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            eps = unet(x, t_unet).sample
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        synchronize(device)

    with Precision(precision if precision != "fp16" else None).scope(device):
        time_rounds(
            benchmark,
            case,
            run,
            system="diffusers+compile" if compiled else "diffusers",
            solver=solver,
            precision=precision,
            backend="inductor" if compiled else "eager",
            graph=compiled and device.type == "cuda",  # Inductor's CUDA graphs
            channels_last=False,
            compile=compiled,
        )


def fastddpm_row(
    benchmark,
    case: Case,
    *,
    backend: str,
    precision: str,
    channels_last: bool,
    graph: bool,
    compile: bool = False,
    solver: str = "ddpm",
) -> None:
    """Time one `Sampler.sample` call of S steps (`solver`: its method), on CUDA with (graph) or
    without (cuda_graph=False) the CUDA-graph runner; on the CPU with the Sampler's default, eager
    there. A graph row whose runner captured nothing in the warm-up (it fell back to eager) skips."""
    backend_or_skip(backend)
    if compile:
        torch._dynamo.reset()  # as for diffusers: no earlier row's compiled code or shape history
    options = {"precision": precision, "channels_last": channels_last, "compile": compile}
    if case.device.type == "cuda":
        options["cuda_graph"] = graph
    sampler = case.model.fastddpm(case.device, backend, **options)

    def run() -> None:
        sampler.sample(
            case.batch, steps=case.steps, method=solver, seed=0, batch_size=case.batch, progress=False
        )
        synchronize(case.device)

    def captured() -> None:
        if graph and not sampler.graph_runner.captures:
            pytest.skip("the graph runner fell back to eager (its notice on stderr says why)")

    time_rounds(
        benchmark,
        case,
        run,
        warmed=captured,
        system="fastddpm",
        solver=solver,
        precision=precision,
        backend=backend,
        graph=graph,
        channels_last=channels_last,
        compile=compile,
    )


def _dpmsolver(scheduler):
    import diffusers

    return diffusers.DPMSolverMultistepScheduler.from_config(scheduler.config)


# The few-step solvers timed against diffusers' scheduler of the same name (the others' steps cost
# the same: one network call and one fused update each).
SOLVER_SCHEDULERS = {"dpmpp-2m": _dpmsolver}
SOLVER_GPU_STEPS = 20  # the step count users run DPM-Solver++ at


# --- GPU rows ---------------------------------------------------------------------------------------

GPU = torch.device("cuda")
gpu_only = pytest.mark.skipif(not CUDA, reason="GPU row: no CUDA device on this machine")


DIFFUSERS_GPU = [("eager", p) for p in DIFFUSERS_PRECISIONS] + [("compile", p) for p in COMPILE_PRECISIONS]


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize(("mode", "precision"), DIFFUSERS_GPU, ids=[f"{m}-{p}" for m, p in DIFFUSERS_GPU])
@pytest.mark.parametrize(("model", "batch"), GPU_CASES, ids=case_ids(GPU_CASES))
def test_diffusers_gpu(benchmark, model, batch, mode, precision):
    case = Case(MODELS[model], GPU, batch, GPU_STEPS, GPU_ROUNDS)
    diffusers_row(benchmark, case, precision, compiled=mode == "compile")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", ops.CONCRETE_BACKENDS)
@pytest.mark.parametrize(("model", "batch"), GPU_CASES, ids=case_ids(GPU_CASES))
def test_fastddpm_gpu(benchmark, model, batch, backend, precision, graph):
    case = Case(MODELS[model], GPU, batch, GPU_STEPS, GPU_ROUNDS)
    fastddpm_row(benchmark, case, backend=backend, precision=precision, channels_last=False, graph=graph)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("precision", DIFFUSERS_PRECISIONS)
@pytest.mark.parametrize("batch", [1, 256])
def test_diffusers_solver_gpu(benchmark, batch, precision):
    case = Case(MODELS["cifar10"], GPU, batch, SOLVER_GPU_STEPS, GPU_ROUNDS)
    diffusers_row(benchmark, case, precision, compiled=False, solver="dpmpp-2m")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("precision", ("fp32", "bf16"))
@pytest.mark.parametrize("backend", ops.CONCRETE_BACKENDS)
@pytest.mark.parametrize("batch", [1, 256])
def test_fastddpm_solver_gpu(benchmark, batch, backend, precision):
    case = Case(MODELS["cifar10"], GPU, batch, SOLVER_GPU_STEPS, GPU_ROUNDS)
    fastddpm_row(
        benchmark,
        case,
        backend=backend,
        precision=precision,
        channels_last=False,
        graph=True,
        solver="dpmpp-2m",
    )


# --- CPU rows ---------------------------------------------------------------------------------------

CPU = torch.device("cpu")


@pytest.mark.parametrize(("model", "batch"), CPU_CASES, ids=case_ids(CPU_CASES))
def test_diffusers_cpu(benchmark, model, batch):
    diffusers_row(benchmark, Case(MODELS[model], CPU, batch, CPU_STEPS, CPU_ROUNDS), "fp32", compiled=False)


@pytest.mark.parametrize(
    ("precision", "channels_last", "compile"),
    CPU_OPTIONS,
    ids=[f"{p}-cl{int(c)}" + ("-compile" if k else "") for p, c, k in CPU_OPTIONS],
)
@pytest.mark.parametrize(("model", "batch"), CPU_CASES, ids=case_ids(CPU_CASES))
def test_fastddpm_cpu(benchmark, model, batch, precision, channels_last, compile):
    case = Case(MODELS[model], CPU, batch, CPU_STEPS, CPU_ROUNDS)
    fastddpm_row(
        benchmark,
        case,
        backend="torch",
        precision=precision,
        channels_last=channels_last,
        graph=False,
        compile=compile,
    )


@pytest.mark.parametrize(("model", "batch"), CPU_CASES, ids=case_ids(CPU_CASES))
def test_diffusers_solver_cpu(benchmark, model, batch):
    """DPM-Solver++ 2M: diffusers' DPMSolverMultistepScheduler loop, fp32 (fastddpm's: below)."""
    case = Case(MODELS[model], CPU, batch, CPU_STEPS, CPU_ROUNDS)
    diffusers_row(benchmark, case, "fp32", compiled=False, solver="dpmpp-2m")


@pytest.mark.parametrize(("model", "batch"), CPU_CASES, ids=case_ids(CPU_CASES))
def test_fastddpm_solver_cpu(benchmark, model, batch):
    case = Case(MODELS[model], CPU, batch, CPU_STEPS, CPU_ROUNDS)
    fastddpm_row(
        benchmark,
        case,
        backend="torch",
        precision="fp32",
        channels_last=False,
        graph=False,
        solver="dpmpp-2m",
    )
