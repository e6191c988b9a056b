"""Helpers shared by the benchmark suites."""

from __future__ import annotations

import os

import pytest

from fastddpm import ops


def backend_or_skip(name: str) -> None:
    """Skip the row when fastddpm's backend cannot run here, saying why."""
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the Triton kernels would run in the interpreter, not on the GPU")
    try:
        ops.get_backend(name)
    except ops.BackendUnavailableError as err:
        pytest.skip(str(err))
