"""First-use verification (fastddpm.verify) through fastddpm.ops' dispatch, on the CPU.

A deliberately wrong backend (the reference + 1), registered in ops' backend table, must be
caught on first use, warned about once and replaced by the reference; verdicts are cached per
machine in the user's cache directory, a damaged cache is rewritten, FASTDDPM_VERIFY=0 turns it
off, torch.compile(fullgraph=True) traces through it, and nothing is verified during a capture.
The test suite turns verification off (tests/conftest.py); these tests turn it on.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fastddpm import cases, ops, reference, verify

from .test_check import plus_one, register_backend

ROOT = Path(__file__).parent.parent


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """Verification on, a cache directory of the test's own, and a new process's state."""
    monkeypatch.setenv("FASTDDPM_VERIFY", "1")
    monkeypatch.setenv("FASTDDPM_CACHE_DIR", str(tmp_path / "cache"))
    new_process(monkeypatch)
    return tmp_path / "cache" / "verified.json"


def new_process(monkeypatch) -> None:
    """Forget this process's verdicts and its read of the cache file, as a new process would."""
    monkeypatch.setattr(verify, "_VERDICTS", {})
    monkeypatch.setattr(verify, "_CACHE", None)


def counting(op: str, calls: list, wrong: bool = False):
    """The reference's op (+ 1 if wrong), recording each call's input shape."""
    fn = plus_one(op) if wrong else getattr(reference, op)

    def run(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return fn(*args, **kwargs)

    return run


def norm_inputs(channels_last=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 4, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randn(16, generator=g), torch.randn(16, generator=g)


def norm(x, w, b, backend):
    return ops.group_norm_silu(x, w, b, 4, backend=backend)


def caught(fn):
    """fn()'s result and the VerificationWarnings it raised."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in seen if issubclass(w.category, verify.VerificationWarning)]


def test_a_wrong_backend_warns_once_and_the_reference_serves_that_class(cache, monkeypatch):
    calls = []
    register_backend(monkeypatch, "wrong", group_norm_silu=counting("group_norm_silu", calls, wrong=True))
    x, w, b = norm_inputs()
    out, warned = caught(lambda: norm(x, w, b, "wrong"))
    torch.testing.assert_close(out, reference.group_norm_silu(x, w, b, 4), rtol=0, atol=0)
    small = [
        cases.make_inputs(c, x.device)[0][0].shape for c in cases.small_cases("group_norm_silu", x.dtype)
    ]
    assert calls == small and (2, 64, 4, 4) in small  # the small cases only, not the call
    (warning,) = warned
    message = str(warning.message)
    assert "backend 'wrong' group_norm_silu on cpu" in message and "torch.float32, contiguous" in message
    assert "differs from the reference: max error 1 > tolerance 0.0001" in message
    assert "using the reference (backend 'torch')" in message and "FASTDDPM_VERIFY=0" in message
    out, warned = caught(lambda: norm(x, w, b, "wrong"))  # the same class: no check, no warning
    assert not warned and len(calls) == len(small)
    torch.testing.assert_close(out, reference.group_norm_silu(x, w, b, 4), rtol=0, atol=0)
    _, warned = caught(lambda: norm(*norm_inputs(channels_last=True), "wrong"))  # another class
    assert len(warned) == 1 and "channels_last" in str(warned[0].message) and len(calls) == 2 * len(small)
    entries = json.loads(cache.read_text())["verdicts"]
    assert len(entries) == 2 and not any(e["ok"] for e in entries.values())
    assert all(e["error"] == pytest.approx(1.0, abs=1e-6) for e in entries.values())


def test_a_right_backend_runs_verified_and_its_verdict_is_cached(cache, monkeypatch):
    calls = []
    register_backend(monkeypatch, "right", attention=counting("attention", calls))
    q = torch.randn(1, 2, 8, 24)
    out = ops.attention(q, q, q, backend="right")
    assert calls == [(1, 2, 32, 24), (1, 2, 8, 24)]  # the small case of the class (D = 24), the call
    (key,) = json.loads(cache.read_text())["verdicts"]
    assert key.endswith("| attention float32 D=24") and f"fastddpm {verify.__version__}" in key
    assert cases.device_name(torch.device("cpu")) in key
    torch.testing.assert_close(out, reference.attention(q, q, q), rtol=0, atol=0)

    new_process(monkeypatch)  # a cached machine: nothing is verified again
    monkeypatch.setattr(cases, "check_case", lambda *a: pytest.fail("verified again despite the cache"))
    ops.attention(q, q, q, backend="right")
    assert len(calls) == 3


def test_a_cached_mismatch_warns_in_each_new_process(cache, monkeypatch):
    register_backend(monkeypatch, "wrong", ddpm_step=plus_one("ddpm_step"))
    table = cases.cifar10_table(torch.device("cpu"))
    x = torch.randn(2, 3, 4, 4)

    def step():
        return ops.ddpm_step(x, x, 7, table, seed=1, backend="wrong")

    _, warned = caught(step)
    assert len(warned) == 1 and "verified on first use" in str(warned[0].message)
    new_process(monkeypatch)
    monkeypatch.setattr(cases, "check_case", lambda *a: pytest.fail("verified again despite the cache"))
    out, warned = caught(step)
    assert len(warned) == 1 and f"cached in {cache}" in str(warned[0].message)
    torch.testing.assert_close(out, reference.ddpm_step(x, x, 7, table, seed=1), rtol=0, atol=0)


@pytest.mark.parametrize(
    "damage",
    [
        b"\x00\xff{not json",
        b'{"format": 1, "verdicts": [1, 2]}',
        b'{"format": 1, "verdicts": {"k": 3}}',
        b"[]",
    ],
    ids=["bytes", "list", "entry", "array"],
)
def test_a_damaged_cache_is_ignored_and_rewritten(cache, monkeypatch, damage):
    register_backend(monkeypatch, "wrong", group_norm_silu=plus_one("group_norm_silu"))
    cache.parent.mkdir(parents=True)
    cache.write_bytes(damage)
    x, w, b = norm_inputs()
    out, warned = caught(lambda: norm(x, w, b, "wrong"))
    assert len(warned) == 1
    torch.testing.assert_close(out, reference.group_norm_silu(x, w, b, 4), rtol=0, atol=0)
    data = json.loads(cache.read_text())
    assert data["format"] == verify.FORMAT and [e["ok"] for e in data["verdicts"].values()] == [False]


def test_an_unwritable_cache_never_breaks_an_op(cache, monkeypatch):
    cache.parent.parent.joinpath("file").write_text("")
    monkeypatch.setenv("FASTDDPM_CACHE_DIR", str(cache.parent.parent / "file"))  # a file, not a folder
    register_backend(monkeypatch, "wrong", group_norm_silu=plus_one("group_norm_silu"))
    x, w, b = norm_inputs()
    out, warned = caught(lambda: norm(x, w, b, "wrong"))
    assert len(warned) == 1
    torch.testing.assert_close(out, reference.group_norm_silu(x, w, b, 4), rtol=0, atol=0)


def test_verify_0_runs_the_backend_unchecked(cache, monkeypatch):
    monkeypatch.setenv("FASTDDPM_VERIFY", "0")
    register_backend(monkeypatch, "wrong", group_norm_silu=plus_one("group_norm_silu"))
    x, w, b = norm_inputs()
    out, warned = caught(lambda: norm(x, w, b, "wrong"))
    assert not warned and not cache.exists()
    torch.testing.assert_close(out, reference.group_norm_silu(x, w, b, 4) + 1, rtol=0, atol=0)


def test_a_backend_that_refuses_the_class_refuses_the_call_itself(cache, monkeypatch):
    """A ValueError is the contract's refusal, not a wrong answer: no fallback, no verdict stored."""
    from .test_check import refuses

    register_backend(monkeypatch, "picky", group_norm_silu=refuses)
    x, w, b = norm_inputs()
    with pytest.raises(ValueError, match="this backend refuses every input"):
        caught(lambda: norm(x, w, b, "picky"))
    assert not cache.exists()
    meta = torch.empty(2, 16, 4, 4, device="meta")  # no kernel runs on meta: nothing to verify
    assert verify.trusted("group_norm_silu", "triton", meta.device, meta.dtype, "contiguous")


def test_the_reference_is_never_verified(cache):
    x, w, b = norm_inputs()
    norm(x, w, b, "torch")
    norm(x, w, b, "auto")  # the reference on the CPU
    assert not cache.exists() and not verify._VERDICTS


def test_nothing_is_verified_during_a_capture(cache, monkeypatch):
    """While the current stream captures a CUDA graph, `trusted` takes the process's verdict, else the
    cached one, else trusts the backend: it never runs a check (simulated: no GPU here)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(verify, "fingerprint", lambda device, backend: "a GPU")
    monkeypatch.setattr(cases, "check_case", lambda *a: pytest.fail("verified during a capture"))
    cuda = torch.device("cuda:0")
    assert verify.trusted("attention", "triton", cuda, torch.float32, "D=8")
    assert not verify._VERDICTS  # trusting is no verdict: the next call outside a capture checks
    verify._cached()["a GPU | attention float32 D=8"] = {"ok": False, "error": 1.0, "message": "m"}
    assert not verify.trusted("attention", "triton", cuda, torch.float32, "D=8")
    verify._VERDICTS[("attention", "triton", "cuda:0", "torch.float32", "D=16")] = False
    assert not verify.trusted("attention", "triton", cuda, torch.float32, "D=16")


def test_compile_fullgraph_traces_through_verification(cache, monkeypatch):
    """The verdict is made at trace time (assume_constant_result) and the reference compiled in."""
    register_backend(monkeypatch, "wrong", group_norm_silu=plus_one("group_norm_silu"))
    x, w, b = norm_inputs()
    torch._dynamo.reset()
    out, warned = caught(lambda: torch.compile(norm, fullgraph=True, backend="aot_eager")(x, w, b, "wrong"))
    assert len(warned) == 1
    torch.testing.assert_close(out, reference.group_norm_silu(x, w, b, 4), rtol=0, atol=0)
    torch._dynamo.reset()


def keeps_nothing(x, eps, history, i, table, **kwargs):
    """The reference's x_next with the history left as it was: wrong only in the slots."""
    return reference.multistep_update(x, eps, history.clone(), i, table, **kwargs)


def test_a_multistep_update_that_writes_wrong_slots_is_caught(cache, monkeypatch):
    """The op's result, as verification measures it, is x_next and the slots it writes: a backend
    right in x_next but not writing the history is caught, and the reference writes it instead."""
    register_backend(monkeypatch, "wrong", multistep_update=keeps_nothing)
    args, kwargs = cases.make_inputs(
        cases.small_cases("multistep_update", torch.float32)[0], torch.device("cpu")
    )
    x, eps, history, i, table = args
    mine, want = history.clone(), history.clone()
    out, warned = caught(lambda: ops.multistep_update(x, eps, mine, i, table, backend="wrong", **kwargs))
    (warning,) = warned
    assert "backend 'wrong' multistep_update on cpu" in str(warning.message)
    torch.testing.assert_close(
        out, reference.multistep_update(x, eps, want, i, table, **kwargs), rtol=0, atol=0
    )
    assert torch.equal(mine, want) and not torch.equal(mine, history)


def test_the_triton_multistep_update_passes_its_first_use_check(cache):
    pytest.importorskip("triton")
    args, kwargs = cases.make_inputs(
        cases.small_cases("multistep_update", torch.float32)[1], torch.device("cpu")
    )
    _, warned = caught(lambda: ops.multistep_update(*args, backend="triton", **kwargs))
    assert not warned
    assert verify._VERDICTS == {("multistep_update", "triton", "cpu", "torch.float32", "contiguous"): True}


def test_the_triton_kernels_pass_their_first_use_check(cache):
    """The real fused backend here (Triton's interpreter), through the tiny U-Net: every class it
    meets is verified, passes and is cached."""
    pytest.importorskip("triton")
    from .conftest import tiny_unet

    net = tiny_unet("triton")
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    with torch.no_grad():
        _, warned = caught(lambda: net(x, t))
    assert not warned
    assert set(verify._VERDICTS) == {
        ("group_norm_silu", "triton", "cpu", "torch.float32", "contiguous"),
        ("attention", "triton", "cpu", "torch.float32", "D=64"),
    }
    assert all(verify._VERDICTS.values())
    assert all(e["ok"] for e in json.loads(cache.read_text())["verdicts"].values())


# A process that asks for 15 input classes of a backend "right" (the reference's module under
# another name: verifying it is quick), then times a call on a class it has seen.
COST_SCRIPT = """
import time, torch
from fastddpm import backends, verify
backends.BACKEND_MODULES["right"] = "fastddpm.reference"
classes = [("group_norm_silu", "contiguous"), ("group_norm_silu", "channels_last"), ("attention", "D=64"),
           ("attention", "D=256"), ("ddpm_step", "contiguous")]
cpu, start = torch.device("cpu"), time.perf_counter()
ok = [verify.trusted(op, "right", cpu, dtype, layout) for op, layout in classes
      for dtype in (torch.float32, torch.float16, torch.bfloat16)]
first = time.perf_counter() - start
start = time.perf_counter()
for _ in range(1000):
    verify.trusted("attention", "right", cpu, torch.float32, "D=64")
print(all(ok), len(ok), first, (time.perf_counter() - start) / 1000, flush=True)
"""


def run_python(script: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_at_once_then_the_cost_on_a_cached_machine(cache):
    """Two processes verifying every class at once leave a whole cache file; a third, on the cached
    machine, spends under 100 ms on all 15 classes and under 20 us per later op call."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [run_python(COST_SCRIPT, env) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert out.split()[:2] == ["True", "15"], err
    entries = json.loads(cache.read_text())["verdicts"]
    assert all(e["ok"] for e in entries.values()) and len(entries) >= 1
    complete = run_python(COST_SCRIPT, env)  # fills in what the racing processes dropped
    complete.communicate(timeout=600)
    assert len(json.loads(cache.read_text())["verdicts"]) == 15
    cached = run_python(COST_SCRIPT, env)
    out, err = cached.communicate(timeout=600)
    ok, count, first, per_call = out.split()
    print(
        f"cached machine: {float(first) * 1e3:.1f} ms for 15 classes, {float(per_call) * 1e6:.2f} us a call"
    )
    assert ok == "True" and float(first) < 0.1 and float(per_call) < 20e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_capture_after_first_use_verification(cache):
    """On a GPU: the graph runner's warm-up steps verify every class (outside the capture), the
    capture then succeeds, and the replayed samples equal the eager ones."""
    import fastddpm

    from .conftest import tiny_unet

    unet = tiny_unet("auto").cuda()
    graphed = fastddpm.Sampler(unet, cuda_graph=True)
    x = graphed.sample(2, steps=4, seed=3, progress=False)
    assert graphed.graph_runner.captures == 1
    assert verify._VERDICTS and all(verify._VERDICTS.values())
    assert {key[0] for key in verify._VERDICTS} == {"group_norm_silu", "attention", "ddpm_step"}
    eager = fastddpm.Sampler(unet, cuda_graph=False).sample(2, steps=4, seed=3, progress=False)
    assert (x - eager).abs().max().item() <= 1e-5
