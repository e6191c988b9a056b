"""The graph runner (fastddpm/graphs.py): eager fallback with a one-line notice, the captured
step's work equal to the eager loop, and, on a GPU, graph-replayed runs equal to eager ones.

Without a GPU the capture itself cannot run. What can: the fallback (CPU), and the step body the
graph records (`GraphedStep` before `capture()` runs that body eagerly, on the same static
buffers, the step index and the offsets read from device scalars), which must give the eager
loop's images bit for bit. The tests marked `gpu` capture and replay for real.
"""

from __future__ import annotations

import logging

import pytest
import torch

import fastddpm
from fastddpm import loop, ops
from fastddpm.graphs import GraphedStep

from .conftest import tiny_unet

T = 30
# (steps, method, eta): ancestral over all T, respaced ancestral, DDIM without and with noise
CONFIGS = {
    "ddpm": {},
    "respaced": {"steps": 7},
    "ddim": {"steps": 6, "method": "ddim", "use_clipped_model_output": True},  # the fused form
    "ddim-eta": {"steps": 6, "method": "ddim", "eta": 0.7, "use_clipped_model_output": True},
    "one-step": {"steps": 1},  # the warm-up must not step past i = 0
    # Solver tables: history slots, a stochastic one, a scaled network input, DDIM's default form.
    "dpmpp-2m": {"steps": 6, "method": "dpmpp-2m", "clip_x0": False},
    "unipc": {"steps": 6, "method": "unipc", "clip_x0": False},
    "dpmpp-2m-sde": {"steps": 5, "method": "dpmpp-2m-sde", "clip_x0": False},
    "euler-a": {"steps": 5, "method": "euler-a", "clip_x0": False},
    "ddim-model-eps": {"steps": 6, "method": "ddim"},
}


def make_sampler(cuda_graph, backend="torch", device="cpu"):
    unet = tiny_unet(backend).to(device)
    return fastddpm.Sampler(unet, fastddpm.DiffusionConfig(num_timesteps=T), cuda_graph=cuda_graph)


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fastddpm.graphs"]


# --- CPU: fallback ---------------------------------------------------------------------------------


def test_requested_on_the_cpu_is_one_notice_and_the_eager_images(caplog):
    eager = make_sampler(False)
    graph = make_sampler(True)
    with caplog.at_level(logging.WARNING, logger="fastddpm.graphs"):
        for kw in CONFIGS.values():
            got = graph.sample(2, seed=11, progress=False, **kw)
            assert torch.equal(got, eager.sample(2, seed=11, progress=False, **kw))
    assert notices(caplog) == [
        "fastddpm: no CUDA graph: the sampler runs on cpu; CUDA graphs need a CUDA device; sampling eagerly"
    ]


def test_default_is_silent_on_the_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="fastddpm.graphs"):
        make_sampler(None).sample(2, seed=1, steps=3, progress=False)
    assert notices(caplog) == []


def test_cuda_graph_setting():
    sampler = make_sampler(None)
    assert sampler.cuda_graph is None and sampler.graph_runner is not None
    sampler.cuda_graph = False
    assert sampler.graph_runner is None
    with pytest.raises(ValueError, match="cuda_graph must be None .*, True or False, got 'yes'"):
        sampler.cuda_graph = "yes"
    with pytest.raises(ValueError, match="cuda_graph must be None .*, True or False, got 1"):
        make_sampler(1)


# --- CPU: the work the graph holds, run eagerly on its static buffers ---------------------------------


class Body:
    """A step strategy that runs GraphedStep's body (uncaptured) for each batch."""

    def __init__(self, sampler):
        self.sampler, self.steps = sampler, []

    def start(self, x_T, table, clip_x0, noise):
        step = GraphedStep(self.sampler.predict_eps, "torch", table, x_T, clip_x0)
        self.steps.append(step)
        return step.start(x_T, noise.seed, noise.offset(0))


def run_body(sampler, n, kw, *, seed, batch_size=None, callback=None, every=1):
    """Sample with GraphedStep's body through the reverse loop, x_T drawn as Sampler.sample draws it."""
    method = kw.get("method", "ddpm")
    model_eps = method == "ddim" and not kw.get("use_clipped_model_output", False)
    table = sampler.step_table(kw.get("steps"), method, kw.get("eta", 0.0), model_eps=model_eps)
    body = Body(sampler)
    clip_x0 = kw.get("clip_x0", True)
    out = loop.sample(
        body, table, n, (3, 16, 16), torch.device("cpu"), clip_x0=clip_x0, batch_size=batch_size, seed=seed,
        progress=False, callback=callback, callback_every=every,
    )  # fmt: skip
    return out, body.steps[-1]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_captured_body_equals_the_eager_loop(config):
    """Device-side t (gathered from the table at the device step index), offsets base + i from
    device scalars, i decremented on the device: the eager loop's images bit for bit."""
    sampler = make_sampler(False)
    kw = CONFIGS[config]
    out, step = run_body(sampler, 3, kw, seed=2**64 - 9)
    assert torch.equal(out, sampler.sample(3, seed=2**64 - 9, progress=False, **kw))
    assert int(step.i) == -1, "one decrement per step"


def test_the_body_draws_each_batch_at_its_offsets():
    """Batch b of a run: the static base offset is b * (S + 1) + 1, as the eager loop's."""
    sampler = make_sampler(False)
    kw = CONFIGS["respaced"]
    whole = sampler.sample(4, seed=5, batch_size=2, progress=False, **kw)
    both, _ = run_body(sampler, 4, kw, seed=5, batch_size=2)
    assert torch.equal(both, whole)


def test_the_body_calls_back_with_the_eager_arguments():
    """The callback runs outside the graph from the static buffers: x_t copied before the step,
    eps from the step's output; its arguments equal those the eager loop passes."""
    sampler = make_sampler(False)
    kw = CONFIGS["ddim-eta"]
    eager, body = [], []

    def record(into):
        return lambda i, t, x, x0: into.append((i, t, x.clone(), x0.clone()))

    sampler.sample(2, seed=4, progress=False, callback=record(eager), callback_every=2, **kw)
    run_body(sampler, 2, kw, seed=4, callback=record(body), every=2)
    assert [(i, t) for i, t, _, _ in body] == [(i, t) for i, t, _, _ in eager]
    assert [i for i, _, _, _ in body] == [4, 2, 0]  # every second of the 6 steps, and the last
    for (_, _, x, x0), (_, _, x_e, x0_e) in zip(body, eager, strict=True):
        assert torch.equal(x, x_e) and torch.equal(x0, x0_e)


def test_cli_flags(tmp_path):
    """fastddpm sample --cuda-graph on the CPU: one notice line, the --no-cuda-graph images."""
    from .test_cli import run

    common = ("sample", "-n", "2", "--steps", "3", "--no-progress")
    out = run(*common, "--cuda-graph", "--out", str(tmp_path / "a.png"))
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stderr.splitlines() if "CUDA graph" in line] == [
        "fastddpm: no CUDA graph: the sampler runs on cpu; CUDA graphs need a CUDA device; sampling eagerly"
    ]
    out = run(*common, "--no-cuda-graph", "--out", str(tmp_path / "b.png"))
    assert out.returncode == 0 and "CUDA graph" not in out.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


# --- GPU: capture and replay ---------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def gpu_backends() -> list[str]:
    """torch, and each kernel backend that runs compiled here (triton not in its interpreter)."""
    from fastddpm.kernels._common import INTERPRET

    status = ops.backend_status()
    return ["torch"] + [
        b for b in ("triton", "cuda") if status[b] == "available" and not (b == "triton" and INTERPRET)
    ]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("config", list(CONFIGS))
def test_replayed_runs_equal_eager_runs(config, caplog):
    kw = CONFIGS[config]
    for backend in gpu_backends():
        eager = make_sampler(False, backend, "cuda").sample(5, seed=3, batch_size=2, progress=False, **kw)
        graph = make_sampler(True, backend, "cuda")
        with caplog.at_level(logging.WARNING, logger="fastddpm.graphs"):
            replayed = graph.sample(5, seed=3, batch_size=2, progress=False, **kw)
        assert notices(caplog) == [], f"{backend}: fell back"
        assert graph.graph_runner.captures == 2, "batches of 2 and of 1"
        assert torch.equal(replayed, eager), f"{backend}: max diff {(replayed - eager).abs().max().item()}"


@pytest.mark.gpu
@needs_cuda
def test_the_cache_reuses_graphs_and_memory():
    """Another seed, the same table: no capture, no new memory. Per step: no allocation beyond
    the callback's own (the same at every step)."""
    sampler = make_sampler(True, "torch", "cuda")
    kw = CONFIGS["respaced"]
    first = sampler.sample(2, seed=1, progress=False, **kw)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    second = sampler.sample(2, seed=2, progress=False, **kw)
    assert sampler.graph_runner.captures == 1 and sampler.graph_runner.cached == 1
    assert not torch.equal(first, second)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated + second.numel() * 4  # only the returned images
    per_step = []
    sampler.sample(
        2,
        seed=3,
        progress=False,
        callback_every=1,
        callback=lambda *a: per_step.append(torch.cuda.memory_allocated()),
        **kw,
    )
    assert sampler.graph_runner.captures == 1 and len(set(per_step)) == 1, per_step
    sampler.sample(3, seed=3, progress=False, **kw)  # another batch shape: a second graph
    assert sampler.graph_runner.captures == 2 and sampler.graph_runner.cached == 2


@pytest.mark.gpu
@needs_cuda
def test_generator_noise_falls_back_with_one_notice(caplog):
    sampler = make_sampler(None, "torch", "cuda")
    with caplog.at_level(logging.WARNING, logger="fastddpm.graphs"):
        for _ in range(2):
            sampler.sample(1, steps=3, generator=torch.Generator().manual_seed(0), progress=False)
    assert len(notices(caplog)) == 1 and "torch.Generator" in notices(caplog)[0]
    assert sampler.graph_runner.captures == 0
    x_T = torch.randn(1, 3, 16, 16, device="cuda")  # DDIM eta = 0 draws nothing: captured anyway
    sampler.sample(1, x_T=x_T, **CONFIGS["ddim"], progress=False)
    assert sampler.graph_runner.captures == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_sampler_on_the_second_gpu_captures_and_replays_there():
    """With cuda:0 current, a sampler on cuda:1 captures and replays on cuda:1: its images equal
    that device's eager images, for every backend."""
    for backend in gpu_backends():
        torch.cuda.set_device(0)
        graph = make_sampler(True, backend, "cuda:1")
        eager = make_sampler(False, backend, "cuda:1")
        for kw in (CONFIGS["respaced"], CONFIGS["ddim"]):
            got = graph.sample(2, seed=5, progress=False, **kw)
            assert got.device == torch.device("cuda:1")
            torch.testing.assert_close(got, eager.sample(2, seed=5, progress=False, **kw), atol=1e-5, rtol=0)
        assert graph.graph_runner.captures == 2, backend
