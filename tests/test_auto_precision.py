"""Precision "auto": what it chooses from the CPU's units and the probe, and the warning for slow modes."""

import logging
import math

import pytest
import torch

from fastddpm import precision
from fastddpm.precision import Precision

CPU = torch.device("cpu")


@pytest.fixture
def cpu(monkeypatch):
    """Set the CPU's flags and the probe's answer; the probe raises unless a factor is given."""

    def configure(flags, slowdown=None):
        monkeypatch.setattr(precision, "cpu_flags", lambda: None if flags is None else frozenset(flags))

        def probe(dtype, channels_last=False):
            if slowdown is None:
                raise AssertionError("the probe ran where the CPU's flags decide")
            return slowdown

        monkeypatch.setattr(precision, "cpu_slowdown", probe)
        precision.warn_slow_cpu_mode.cache_clear()

    yield configure
    precision.warn_slow_cpu_mode.cache_clear()


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\nbugs\t\t: none\n")
    assert precision.cpu_flags(info) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"}
    assert precision.cpu_flags(tmp_path / "missing") is None


def test_the_best_unit_is_named():
    assert precision.cpu_units(torch.bfloat16, frozenset({"avx512_bf16", "amx_bf16"})) == "AMX"
    assert precision.cpu_units(torch.bfloat16, frozenset({"avx512_bf16"})) == "AVX512-BF16"
    assert precision.cpu_units(torch.bfloat16, frozenset({"avx2"})) is None
    assert precision.cpu_units(torch.float16, None) is None


def test_auto_takes_bf16_on_amx_and_fp32_without_units_without_probing(cpu):
    cpu({"avx2", "amx_bf16", "avx512_bf16"})
    assert precision.auto_mode(CPU) == "bf16"
    cpu({"avx2", "fma"})
    assert precision.auto_mode(CPU) == "fp32"


@pytest.mark.parametrize(("flags", "slowdown", "mode"), [
    ({"avx512_bf16"}, 0.6, "bf16"),
    ({"avx512_bf16"}, 1.4, "fp32"),
    (None, 0.5, "bf16"),  # no readable flags: the probe decides
    (None, 40.0, "fp32"),
])  # fmt: skip
def test_auto_probes_where_the_flags_do_not_decide(cpu, flags, slowdown, mode):
    cpu(flags, slowdown)
    assert precision.auto_mode(CPU) == mode
    assert Precision("auto", channels_last=True).resolved(CPU) == Precision(mode, channels_last=True)


def test_auto_on_other_devices_is_fp32():
    assert precision.auto_mode(torch.device("meta")) == "fp32"


def test_an_explicit_bf16_on_a_cpu_without_units_warns_once_with_the_factor(cpu, caplog):
    cpu({"avx2"}, slowdown=60.0)
    with caplog.at_level(logging.WARNING, logger="fastddpm.precision"):
        assert Precision("bf16").resolved(CPU) == Precision("bf16")
        Precision("bf16").resolved(CPU)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "no bf16 units" in warnings[0] and "60x slower" in warnings[0]


def test_no_warning_where_the_cpu_has_the_units(cpu, caplog):
    cpu({"amx_bf16"})
    with caplog.at_level(logging.WARNING, logger="fastddpm.precision"):
        Precision("bf16").resolved(CPU)
        Precision("fp32").resolved(CPU)
    assert not caplog.records


def test_auto_must_be_resolved_before_it_converts_a_network():
    with pytest.raises(ValueError, match="must be resolved"):
        Precision("auto").apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="choose one of fp32, tf32, fp16, bf16, auto"):
        Precision("fast")


def test_the_probe_measures_a_finite_positive_factor():
    factor = precision.cpu_slowdown.__wrapped__(torch.float32)
    assert math.isfinite(factor) and factor > 0
