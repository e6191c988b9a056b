"""benchmarks/gpu_check.sh, the one-call GPU evidence run, cannot rot: CI runs its CPU dry mode,
which runs every stage's logic (the tests collected, benchmarks/gpu_quick.py on small shapes)
and skips what needs a GPU, saying so."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import gpu_quick

ROOT = Path(__file__).parent.parent
FILES = {
    "summary.txt",
    "machine.txt",
    "tests.log",
    "bench.json",
    "bench.log",
}  # + build, sanitize logs on a GPU


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "OUT": str(out), "BUDGET_S": "150", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out, result


def test_the_dry_run_passes_every_stage_and_skips_the_gpu_ones(dry_run):
    out, result = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for line in (
        "build: skipped (dry: nvcc for sm_90 is a GPU machine's job)",
        "tests (op files): ok",
        "tests (-m gpu): ok",
        "tests: dry: collected only, not run",
        "bench: ok",
        "sanitize: skipped (dry: compute-sanitizer needs a GPU)",
        "0 stage(s) failed",
    ):
        assert line in summary, summary
    assert "machine: no GPU" in summary or "machine: NVIDIA" in summary
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary comes last
    assert "commit: " in (out / "machine.txt").read_text()
    assert "tests collected" in (out / "tests.log").read_text()


def test_the_dry_run_leaves_at_most_8_files(dry_run):
    out, _ = dry_run
    names = {p.name for p in out.iterdir()}
    assert names == FILES and len(names) <= 8
    assert all(p.is_file() for p in out.iterdir())


def test_the_dry_bench_runs_every_section(dry_run):
    out, _ = dry_run
    bench = json.loads((out / "bench.json").read_text())
    assert bench["dry"] is True
    assert {name: s["status"] for name, s in bench["sections"].items()} == dict.fromkeys(
        ("ceilings", "check", "alternatives", "graphs", "solvers", "split"), "ok"
    )
    check = bench["check"]
    assert check["passed"] and check["checks"] and all(r["backend"] == "torch" for r in check["checks"])
    assert len(check["timings"]) == len(check["checks"])
    for row in check["timings"] + bench["alternatives"]:
        assert row["frac_copy"] == pytest.approx(row["GBps"] / gpu_quick.COPY_GBPS)
        assert (row["frac_bf16"] is None) == (row["TFLOPs"] is None)
    assert {r["backend"] for r in bench["alternatives"]} == {"F.group_norm+F.silu", "sdpa"}
    assert {(r["precision"], r["batch"]) for r in check["unet"]} == {("fp32", 1), ("bf16", 1)}
    assert all(r["ms"] > 0 for r in check["unet"])
    (graph,) = bench["graphs"]
    assert graph["backend"] == "torch" and graph["graph"] is False and graph["ms_per_step"] > 0
    ours, theirs = bench["solvers"]  # the dry run: batch 1, the torch backend and diffusers
    assert (ours["system"], ours["backend"], ours["graph"]) == ("fastddpm", "torch", False)
    assert theirs["system"] == "diffusers" and ours["ms_per_step"] > 0 and theirs["ms_per_step"] > 0
    (split,) = bench["split"]
    assert split["ms"]["conv"] > 0 and split["gaps_ms"] is None
    skipped = "\n".join(bench["skipped"])
    for what in ("ceilings: ", "graphs: CUDA graphs are captured on a GPU only", "split: launch gaps"):
        assert what in skipped


@pytest.mark.parametrize(
    "name, kind",
    [
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "conv"),
        ("void cudnn::engines_precompiled::nchwToNhwcKernel<float>(...)", "conv"),
        ("aten::mkldnn_convolution", "conv"),
        ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", "gemm"),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<256, 64, 32, 4>>", "gemm"),
        ("aten::addmm", "gemm"),
        ("_gn_fused_kernel", "fused"),
        ("_attn_fwd_kernel", "fused"),
        ("void fastddpm::attention_kernel<__nv_bfloat16, 256>(fastddpm::AttentionParams)", "fused"),
        ("fastddpm_triton::group_norm_silu", "fused"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other"),
    ],
)
def test_profiler_categories(name, kind):
    assert gpu_quick.category(name) == kind


def test_launch_gaps_count_device_idle_time_between_kernels():
    def kernel(start, end):
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end))

    # busy 0-10, 5-12 (overlapping), idle 12-20, busy 20-30, idle 30-31, busy 31-40: 9 us idle
    events = [kernel(20, 30), kernel(0, 10), kernel(5, 12), kernel(31, 40)]
    assert gpu_quick.launch_gaps_ms(events) == pytest.approx(9e-3)
    assert gpu_quick.launch_gaps_ms([]) == 0.0
