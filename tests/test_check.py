"""`fastddpm check`: every backend's ops against the reference, the table, the JSON and the command.

On the CPU it runs the torch backend and the Triton kernels through the interpreter
(tests/conftest.py) on small shapes; a deliberately wrong backend, registered in fastddpm.ops'
backend table, must be reported failing with its error.
"""

import json
import math
from types import ModuleType

import pytest
import torch

from fastddpm import backends, cases, check, cli, reference


def register_backend(monkeypatch, name: str, **op_functions) -> ModuleType:
    """Register a backend module `name` in fastddpm.ops whose ops are the given functions (the
    reference's for the others), for this test only."""
    module = ModuleType(f"fastddpm_test_backend_{name}")
    for op in cases.OPS:
        setattr(module, op, op_functions.get(op, getattr(reference, op)))
    monkeypatch.setitem(backends.BACKEND_MODULES, name, module.__name__)
    monkeypatch.setitem(backends._LOADED, name, module)
    return module


def plus_one(op: str):
    """The reference's op, off by one everywhere."""
    return lambda *args, **kwargs: getattr(reference, op)(*args, **kwargs) + 1


def refuses(*args, **kwargs):
    raise ValueError("this backend refuses every input")


def contiguous_output(*args, **kwargs):
    """The right numbers in the wrong memory format (NCHW for a channels_last input)."""
    return reference.ddpm_step(*args, **kwargs).contiguous()


def test_tolerances_are_designs():
    """DESIGN.md, "Equal means": fp32 1e-4 (1e-5 for ddpm_step); fp16 2e-3; bf16 2e-2."""
    assert cases.tolerance("attention", torch.float32) == 1e-4
    assert cases.tolerance("group_norm_silu", torch.float32) == 1e-4
    assert cases.tolerance("ddpm_step", torch.float32) == 1e-5
    for op in cases.OPS:
        assert cases.tolerance(op, torch.float16) == 2e-3
        assert cases.tolerance(op, torch.bfloat16) == 2e-2


def test_max_error_is_absolute_in_fp32_and_relative_to_the_output_scale_below():
    ref = torch.tensor([4.0, -8.0, 1.0])
    out = ref + torch.tensor([0.0, 0.5, -0.25])
    assert cases.max_error(out, ref, torch.float32) == 0.5
    assert cases.max_error(out.bfloat16(), ref, torch.bfloat16) == 0.5 / 8
    assert cases.max_error(torch.tensor([4.0, math.nan, 1.0]), ref, torch.float32) == math.inf


def test_every_backend_passes_every_case_on_the_cpu():
    report = check.run("cpu", quick=True)
    assert report.backends["torch"] is None and report.backends["triton"] is None  # the interpreter
    assert "cuda" in report.backends["cuda"].lower()  # skipped, saying why
    cases = {(r["op"], r["case"], r["dtype"]) for r in report.checks if r["backend"] == "triton"}
    assert (
        len(cases) == len(check.cases(torch.device("cpu"))) == 3 * (2 * 3 + 3) + 2 + 2
    )  # dtypes x (norm: 2 layouts x 3 variants + attention) + step + solver step
    for label in ("NCHW, add+silu", "channels_last, plain", "1 head, D=256", "1 head, D=512", "4 heads, D=8"):
        assert any(case == label for _, case, _ in cases), label
    assert {dtype for _, _, dtype in cases} == {"float32", "float16", "bfloat16"}
    assert {("ddpm_step", "NCHW, noise", "float32"), ("ddpm_step", "NCHW, seed", "float32")} <= cases
    assert {
        ("multistep_update", "NCHW, noise", "float32"),
        ("multistep_update", "NCHW, seed+clip", "float32"),
    } <= cases
    assert not report.failures, report.table()
    assert all(0 <= r["error"] <= r["tolerance"] for r in report.checks)
    assert not report.timings and not report.unet  # quick


def test_a_wrong_backend_is_reported_failing_with_its_error(monkeypatch):
    register_backend(
        monkeypatch,
        "wrong",
        group_norm_silu=plus_one("group_norm_silu"),
        attention=refuses,
        ddpm_step=plus_one("ddpm_step"),
        multistep_update=plus_one("multistep_update"),
    )
    report = check.run("cpu", quick=True, backends=["torch", "wrong"])
    by_backend = {name: [r for r in report.checks if r["backend"] == name] for name in ("torch", "wrong")}
    assert all(r["passed"] for r in by_backend["torch"])
    wrong = by_backend["wrong"]
    assert wrong and not any(r["passed"] for r in wrong)
    for r in wrong:
        if r["op"] == "attention":
            assert r["error"] is None and r["message"] == "ValueError: this backend refuses every input"
            assert r["refused"]
        elif r["dtype"] == "float32":
            assert r["error"] == pytest.approx(1.0, abs=1e-5)
            assert r["message"] == f"max error {r['error']:.3g} > tolerance {r['tolerance']:g}"
        else:
            assert r["error"] > r["tolerance"] and r["message"].startswith("max error")
    table = report.table()
    assert "FAIL: ValueError: this backend refuses every input" in table
    assert (
        f"{len(report.checks) - len(wrong)} of {len(report.checks)} checks pass, {len(wrong)} fail" in table
    )


def test_a_nan_fails_and_the_report_stays_json(tmp_path):
    case = cases.Case("attention", (1, 1, 4, 8), torch.float32)
    device = torch.device("cpu")
    inputs = cases.make_inputs(case, device)
    ref = cases.reference_output(case, inputs, device)
    with pytest.MonkeyPatch.context() as mp:
        register_backend(mp, "nan", attention=lambda *args: torch.full_like(args[0], math.nan))
        outcome = cases.compare(case, "nan", inputs, ref)
    assert not outcome.passed and outcome.error is None and outcome.message.startswith("NaN or inf")
    report = check.Report({}, {"nan": None}, [{**check.describe(case, "nan"), **vars(outcome)}])
    report.write_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


def test_a_wrong_memory_format_fails():
    case = cases.Case("ddpm_step", (2, 3, 4, 4), torch.float32, channels_last=True, variant="noise")
    device = torch.device("cpu")
    inputs = cases.make_inputs(case, device)
    ref = cases.reference_output(case, inputs, device)
    assert cases.compare(case, "torch", inputs, ref).passed
    with pytest.MonkeyPatch.context() as mp:
        register_backend(mp, "nchw", ddpm_step=contiguous_output)
        outcome = cases.compare(case, "nchw", inputs, ref)
    assert not outcome.passed and "torch.contiguous_format" in outcome.message


def test_timings_unet_and_json(tmp_path):
    report = check.run("cpu", backends=["torch"])
    path = tmp_path / "out" / "check.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    assert data["passed"] is True
    assert data["machine"]["device"] == "cpu" and data["machine"]["timer"] == "perf_counter"
    assert data["backends"] == {"torch": None}
    assert len(data["checks"]) == len(check.cases(torch.device("cpu")))
    row = data["checks"][0]
    fields = "backend op case shape groups dtype error tolerance passed message refused"
    assert set(row) == set(fields.split())
    assert len(data["timings"]) == len(data["checks"])
    for t in data["timings"]:
        assert t["ms"] > 0 and t["GBps"] > 0
        assert (t["TFLOPs"] is not None) == (t["op"] == "attention")
    attention = next(t for t in data["timings"] if t["op"] == "attention" and t["shape"] == [1, 1, 16, 256])
    assert attention["TFLOPs"] == pytest.approx(4 * 16 * 16 * 256 / (attention["ms"] * 1e-3) / 1e12)
    assert data["unet"] == [
        {"backend": "torch", "preset": "tiny", "batch": 1, "precision": "fp32", "ms": data["unet"][0]["ms"]}
    ]
    assert data["unet"][0]["ms"] > 0
    assert "U-Net reverse step" in report.table() and "timings (median; perf_counter)" in report.table()


def test_cli_check_writes_the_table_and_json(tmp_path, capsys):
    path = tmp_path / "check.json"
    assert cli.main(["check", "--device", "cpu", "--quick", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "backend triton: checked" in out and f"wrote {path}" in out
    data = json.loads(path.read_text())
    assert data["passed"] and {r["backend"] for r in data["checks"]} == {"torch", "triton"}
    assert f"{len(data['checks'])} of {len(data['checks'])} checks pass, 0 fail" in out


def test_cli_check_exits_1_naming_the_first_failure(monkeypatch, tmp_path, capsys):
    register_backend(monkeypatch, "wrong", group_norm_silu=plus_one("group_norm_silu"))
    path = tmp_path / "check.json"
    assert cli.main(["check", "--quick", "--json", str(path)]) == 1
    captured = capsys.readouterr()
    assert "FAIL: max error 1 > tolerance 0.0001" in captured.out
    failed = sum(case.op == "group_norm_silu" for case in check.cases(torch.device("cpu")))
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"fastddpm: error: {failed} of ") and "backend wrong group_norm_silu" in line
    assert json.loads(path.read_text())["passed"] is False  # written before the exit


@pytest.mark.parametrize(
    "device, message",
    [
        ("mps", "fastddpm check runs on cpu or cuda, not mps"),
        ("banana", "unknown device 'banana'; use cpu or cuda"),
    ],
)
def test_cli_check_refuses_a_device_it_cannot_check(device, message, capsys):
    assert cli.main(["check", "--device", device, "--quick"]) == 1
    assert capsys.readouterr().err.strip() == f"fastddpm: error: {message}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_check_cuda_without_a_gpu_says_so(capsys):
    assert cli.main(["check", "--device", "cuda", "--quick"]) == 1
    assert "no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_backend_passes_at_the_production_shapes_on_a_gpu():
    report = check.run("cuda", quick=True)
    assert not report.failures, report.table()
    assert {r["backend"] for r in report.checks} >= {"torch", "triton"}
