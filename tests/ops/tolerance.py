"""The one measure of "equal" for the op tests: fastddpm.check's tolerance and max_error (DESIGN.md,
"Equal means"), against fastddpm.reference run in float32 on the CPU on the same rounded inputs."""

from __future__ import annotations

import torch

from fastddpm import reference
from fastddpm.cases import DTYPES, TOLERANCE, max_error, tolerance
from fastddpm.reference import memory_format_of
from fastddpm.schedule import StepTable
from fastddpm.solver_table import SolverTable

__all__ = ["DTYPES", "assert_equals_reference", "assert_within_tolerance", "reference_output"]


def _fp32_cpu(value):
    """A tensor on the CPU (floating ones in float32, keeping their memory format), a table on the CPU."""
    if isinstance(value, (StepTable, SolverTable)):
        return value.to("cpu")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.float() if value.is_floating_point() else value
    return value


def reference_output(op: str, *args, **kwargs) -> torch.Tensor:
    """fastddpm.reference's `op` in float32 on the CPU, on float32 copies of the inputs."""
    return getattr(reference, op)(*map(_fp32_cpu, args), **{k: _fp32_cpu(v) for k, v in kwargs.items()})


def assert_within_tolerance(
    out: torch.Tensor, ref: torch.Tensor, op: str | None, dtype: torch.dtype
) -> float:
    """max_error(out, ref) within tolerance(op, dtype) (op None: a network's output, held to the
    ops' tolerance in dtype); a NaN in out fails. Returns the error."""
    out, ref = out.detach().cpu(), ref.detach().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert not out.isnan().any(), "NaN in the output"
    err, tol = max_error(out, ref, dtype), TOLERANCE[dtype] if op is None else tolerance(op, dtype)
    assert err <= tol, f"{op or 'output'} in {dtype}: max error {err:.3g} > tolerance {tol:g}"
    return err


def assert_equals_reference(op: str, out: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """out, the op's result on (args, kwargs), has the first input's dtype, device and memory format
    and equals the reference within the contract's tolerance. Returns the reference output."""
    ref = reference_output(op, *args, **kwargs)
    first = args[0]
    assert (out.dtype, out.device) == (first.dtype, first.device)
    assert memory_format_of(out) == memory_format_of(first), "the output lost the input's memory format"
    assert_within_tolerance(out, ref, op, first.dtype)
    return ref
