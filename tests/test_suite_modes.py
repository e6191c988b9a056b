"""The test suite itself on the machines it runs on: the GPU machine has no diffusers, CI has no GPU.

Each test runs pytest in a subprocess, with diffusers hidden (a package of that name whose import
raises ModuleNotFoundError, first on PYTHONPATH) or a CUDA device faked (a plugin loaded before conftest).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import WITHOUT_DIFFUSERS as WITHOUT

ROOT = Path(__file__).parent.parent

FAKE_GPU = """
import torch
torch.cuda.is_available = lambda: True
torch.cuda.get_device_name = lambda *a: "Fake GPU"
"""


def pytest_run(tmp_path: Path, *args: str, hide_diffusers=False, fake_gpu=False, **env) -> str:
    """Run pytest on `args` from the repository root; returns its output, failing on a timeout."""
    paths = [*env.pop("PYTHONPATH", "").split(os.pathsep), str(ROOT)]
    if hide_diffusers:
        package = tmp_path / "hidden" / "diffusers"
        package.mkdir(parents=True, exist_ok=True)
        hide = 'raise ModuleNotFoundError("diffusers hidden by the test", name="diffusers")\n'
        (package / "__init__.py").write_text(hide)
        paths.insert(0, str(package.parent))
    plugin = []
    if fake_gpu:
        (tmp_path / "fake_gpu.py").write_text(FAKE_GPU)
        paths.insert(0, str(tmp_path))
        plugin = ["-p", "fake_gpu"]
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDDPM_VERIFY")}
    base.pop(WITHOUT, None)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *plugin, *args],
        cwd=ROOT,
        env={**base, **env, "PYTHONPATH": os.pathsep.join(paths)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return f"rc={out.returncode}\n{out.stdout}{out.stderr}"


def collected(output: str) -> set[str]:
    """The node ids that `pytest --collect-only -q` printed."""
    return {line for line in output.splitlines() if line.startswith("tests/") and "::" in line}


def test_gpu_tests_collect_without_diffusers_on_request(tmp_path):
    """With FASTDDPM_TESTS_WITHOUT_DIFFUSERS=1 and no diffusers, pytest collects every GPU test it
    collects with diffusers, and none of them needs a diffusers fixture."""
    fixtures = tmp_path / "print_fixtures.py"
    fixtures.write_text(
        "def pytest_collection_finish(session):\n"
        "    for item in session.items:\n"
        "        print('FIXTURES', item.nodeid, *sorted(getattr(item, 'fixturenames', ())))\n"
    )
    args = ("--collect-only", "-q", "-m", "gpu", "-p", "print_fixtures", "tests")
    env = {"PYTHONPATH": str(tmp_path)}
    with_diffusers = pytest_run(tmp_path, *args, **env)
    without = pytest_run(tmp_path, *args, hide_diffusers=True, **{WITHOUT: "1"}, **env)
    assert with_diffusers.startswith("rc=0"), with_diffusers[-3000:]
    assert without.startswith("rc=0"), without[-3000:]
    gpu_tests = collected(with_diffusers)
    assert len(gpu_tests) > 50
    assert collected(without) == gpu_tests
    for line in without.splitlines():
        if line.startswith("FIXTURES"):
            _, nodeid, *names = line.split()
            assert not [n for n in names if "diffusers" in n], line


def test_a_missing_diffusers_fails_the_run(tmp_path):
    """Without the variable, a missing diffusers is an error, never a skip (CI must not pass so)."""
    out = pytest_run(tmp_path, "-q", "tests/test_scheduler_step.py", hide_diffusers=True)
    assert not out.startswith("rc=0"), out[-3000:]
    assert "the tests need diffusers" in out
    skipped = pytest_run(
        tmp_path,
        "-q",
        "-rs",
        "tests/test_scheduler_step.py",
        "tests/test_schedule.py",
        hide_diffusers=True,
        **{WITHOUT: "1"},
    )
    assert skipped.startswith("rc=0") and "diffusers is not installed" in skipped, skipped[-3000:]


@pytest.mark.parametrize(
    ("fake_gpu", "env", "mode"),
    [
        (False, {}, "interpreted (CPU)"),
        (True, {}, "compiled (CUDA)"),
        (True, {"TRITON_INTERPRET": "1"}, "interpreted (CPU)"),  # asked for
    ],
    ids=["cpu", "gpu", "gpu-asked-to-interpret"],
)
def test_triton_interprets_only_without_a_gpu(tmp_path, fake_gpu, env, mode):
    """conftest interprets Triton only where no CUDA device exists, or when asked; the header says so."""
    out = pytest_run(tmp_path, "--collect-only", "tests/test_schedule.py", fake_gpu=fake_gpu, **env)
    assert out.startswith("rc=0"), out[-3000:]
    assert f"fastddpm: Triton kernels {mode}" in out


def test_fastddpm_benchmark_rows_run_without_diffusers(tmp_path):
    """fastddpm's own end-to-end rows need no diffusers; diffusers' rows skip, saying why."""
    out = pytest_run(
        tmp_path,
        "-q",
        "-rs",
        "--benchmark-disable",
        "benchmarks/test_e2e.py",
        "-k",
        "cpu and cifar10-b1 and (diffusers or fp32-cl0 or fastddpm_solver)",
        hide_diffusers=True,
    )
    assert out.startswith("rc=0"), out[-3000:]
    # fastddpm's DDPM and solver rows run; diffusers' DDPMPipeline and DPMSolver rows skip
    assert "2 passed, 2 skipped" in out and "diffusers is not installed" in out, out[-3000:]
