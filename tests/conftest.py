"""Shared fixtures: reference data, and real diffusers checkpoints written to disk."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

# Triton kernels run compiled where a CUDA device exists and through the interpreter elsewhere,
# unless TRITON_INTERPRET says otherwise; it must be set before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
# Kernel tests test the kernels: no first-use verification silently swapping in the reference.
os.environ.setdefault("FASTDDPM_VERIFY", "0")

# diffusers is part of ".[test]": where it is missing, the tests that need it fail, unless this
# variable is 1 (the GPU machine, which has no diffusers), where they skip with the reason.
WITHOUT_DIFFUSERS = "FASTDDPM_TESTS_WITHOUT_DIFFUSERS"

REFERENCE = Path(__file__).parent / "data" / "ddpm-cifar10-32"

# A small UNet2DModel of the DDPM family (same block types and settings as the CIFAR10 model).
TINY_DIFFUSERS_UNET = {
    "act_fn": "silu",
    "block_out_channels": [32, 64],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 8,
    "out_channels": 3,
    "sample_size": 16,
    "time_embedding_type": "positional",
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}


def pytest_report_header(config) -> list[str]:
    mode = "interpreted (CPU)" if os.environ["TRITON_INTERPRET"] == "1" else "compiled (CUDA)"
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    verify = os.environ["FASTDDPM_VERIFY"]
    return [f"fastddpm: Triton kernels {mode}; CUDA device: {cuda}; FASTDDPM_VERIFY={verify}"]


def require_diffusers():
    """diffusers, imported; where it is missing, ImportError, or a skip under WITHOUT_DIFFUSERS=1.
    At a test module's top level the skip skips the module."""
    try:
        import diffusers
    except ImportError as err:
        if os.environ.get(WITHOUT_DIFFUSERS) == "1":
            pytest.skip(f"diffusers is not installed ({WITHOUT_DIFFUSERS}=1)", allow_module_level=True)
        raise ImportError(
            f"the tests need diffusers (pip install -e '.[test]'); set {WITHOUT_DIFFUSERS}=1 to skip them"
        ) from err
    return diffusers


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for a process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_reaped(command: list[str], env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    """Run `command` (torchrun or a fastddpm command) to completion, then kill every process it
    started, however detached: torchrun starts its ranks in sessions of their own, so neither its
    process group nor its pipes reach a rank that outlives it. Processes are found by a marker in
    their environment (Linux /proc). Output goes through files, never pipes, so an orphan cannot
    block the read. Fails the test past `timeout_s`; returns stdout and stderr as text."""
    marker = f"FASTDDPM_REAP={os.getpid()}-{time.monotonic_ns()}"
    key, value = marker.split("=")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, env={**env, key: value})
        try:
            proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_marked(marker.encode())
            proc.wait()
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read())
    if timed_out:
        pytest.fail(f"{' '.join(command)} did not finish in {timeout_s} s; stderr: {result.stderr[-2000:]}")
    return result


def kill_marked(entry: bytes) -> None:
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if entry in environ.read_bytes().split(b"\0"):
                os.kill(int(environ.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def reference_json(name: str):
    return json.loads((REFERENCE / name).read_text())


def perturb_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Add 0.1 N(0, 1) to every norm weight and bias (initialised to 1 and 0), so that a test
    comparing two networks sees the norm parameters wired through; returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_unet(backend: str = "auto", seed: int = 0):
    """The tiny preset, random weights from `seed`, norms perturbed, in eval mode."""
    from fastddpm.unet import PRESETS, UNet

    torch.manual_seed(seed)
    return perturb_norms(UNet(PRESETS["tiny"], backend=backend).eval())


def write_diffusers_folder(folder: Path, unet_config: dict, scheduler_config: dict, seed: int = 0):
    """Build a diffusers UNet2DModel with random weights (norms perturbed too), save it with
    save_pretrained beside a DDPMScheduler config, and return the model."""
    diffusers = require_diffusers()

    torch.manual_seed(seed)
    model = perturb_norms(diffusers.UNet2DModel.from_config(unet_config).eval())
    model.save_pretrained(folder)
    diffusers.DDPMScheduler.from_config(scheduler_config).save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def cifar10_diffusers(tmp_path_factory):
    """(folder, diffusers model): google/ddpm-cifar10-32's exact configs, random weights."""
    folder = tmp_path_factory.mktemp("ddpm-cifar10-32")
    model = write_diffusers_folder(
        folder, reference_json("unet_config.json"), reference_json("scheduler_config.json")
    )
    return folder, model


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    """(folder, diffusers model): a tiny DDPM with T = 20 steps, for whole-pipeline runs."""
    folder = tmp_path_factory.mktemp("tiny-ddpm")
    scheduler = dict(reference_json("scheduler_config.json"), num_train_timesteps=20, beta_end=0.2)
    model = write_diffusers_folder(folder, TINY_DIFFUSERS_UNET, scheduler, seed=1)
    return folder, model
