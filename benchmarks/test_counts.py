"""Kernels launched, bytes moved and FLOPs per U-Net forward and per sampling step (benchmarks.counts).

    pytest benchmarks/test_counts.py --benchmark-only --benchmark-json=benchmarks/results/<date>-counts.json

The counts are exact and hardware-independent (shape-only, on meta tensors), so these rows run on
any machine; the timed figure is only how long counting took. extra_info holds the row: system,
model, batch, backend, channels_last, what ("forward" or "step"), launches, memory_bound_bytes
(every op outside convolutions and GEMMs), bytes, flops and the per-category split.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest

from fastddpm import ops

from . import counts

CONFIGS = [(model, batch) for model in counts.MODELS for batch in counts.BATCHES]


def _record(benchmark, rows: list[counts.Row], count) -> None:
    benchmark.pedantic(count, rounds=1, iterations=1)
    for row in rows:
        benchmark.extra_info[row.what] = asdict(row)


@pytest.mark.parametrize(("model", "batch"), CONFIGS)
def test_diffusers_counts(benchmark, model, batch):
    pytest.importorskip("diffusers", reason="diffusers is not installed")
    rows = counts.count_diffusers(model, batch)
    _record(benchmark, rows, lambda: counts.count_diffusers(model, batch))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", counts.COUNTED_BACKENDS)
@pytest.mark.parametrize(("model", "batch"), CONFIGS)
def test_fastddpm_counts(benchmark, model, batch, backend, channels_last):
    if not counts.available((backend,)):
        pytest.skip(f"backend {backend!r}: {ops.backend_status()[backend]}")
    rows = counts.count_fastddpm(model, batch, backend, channels_last)
    _record(benchmark, rows, lambda: counts.count_fastddpm(model, batch, backend, channels_last))
