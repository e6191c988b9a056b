"""The constants Python shares with the CUDA library equal those of its C header, fastddpm.h, read
from the header's text (no library needed): the step table's columns and their count
(fastddpm.schedule, and the Triton step kernel's copies), the solver table's columns and rows
(fastddpm.solver_table, and the Triton multistep kernel's copies), the noise modes (the Triton step kernel's
and fastddpm.cuda's), and fastddpm.cuda's dtype codes, status codes and ABI version. A change on
either side alone fails here."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from fastddpm import schedule, solver_table
from fastddpm.cuda import _library as cuda

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "fastddpm" / "fastddpm.h"

# fastddpm.schedule's names of the step table's columns.
STEP_COLUMNS = (
    "SQRT_RECIP_ABAR",
    "SQRT_RECIPM1_ABAR",
    "COEF_X0",
    "COEF_XT",
    "DIRECT_XT",
    "DIRECT_EPS",
    "SIGMA",
)


def header_defines(prefix: str) -> dict[str, int]:
    """{NAME: value} of each `#define FASTDDPM_<prefix>NAME <integer>` in fastddpm.h."""
    pattern = rf"^#define FASTDDPM_{prefix}(\w+) (\d+)\b"
    return {m[1]: int(m[2]) for m in re.finditer(pattern, HEADER.read_text(), re.MULTILINE)}


def module_constants(module, prefix: str) -> dict[str, int]:
    """{NAME: value} of each constant `<prefix>NAME` of `module` (tl.constexpr values as ints)."""
    return {name.removeprefix(prefix): int(v) for name, v in vars(module).items() if name.startswith(prefix)}


def test_the_header_defines_what_is_compared():
    """The patterns below find the header's constants (an empty match would compare nothing)."""
    assert header_defines("STEP_") and header_defines("NOISE_") and header_defines("ERROR_")
    assert header_defines("MULTISTEP_")
    assert set(header_defines("")) >= {"ABI_VERSION", "SUCCESS", "FLOAT32", "FLOAT16", "BFLOAT16"}


def test_step_table_columns_match_the_header():
    """fastddpm.schedule's columns and NUM_COEFS are the header's FASTDDPM_STEP_*, the columns
    number 0..NUM_COEFS-1, and the table the step kernels read has NUM_COEFS columns."""
    python = {name: getattr(schedule, name) for name in STEP_COLUMNS} | {"NUM_COEFS": schedule.NUM_COEFS}
    assert header_defines("STEP_") == python
    assert sorted(python[name] for name in STEP_COLUMNS) == list(range(schedule.NUM_COEFS))
    table = schedule.Schedule.from_name().respace("ddim10").step_table("ddim")
    assert table.coef.shape == (10, schedule.NUM_COEFS)


def test_solver_table_columns_and_rows_match_the_header():
    """fastddpm.solver_table's columns, rows and their counts are the header's FASTDDPM_MULTISTEP_*
    (and the Triton multistep kernel's copies), numbered 0..count-1; the CUDA backend's slot limit
    is the header's."""
    names = ("COL_X", "COL_EPS", "COL_D", "COL_Z", "NUM_INPUTS", "ROW_D", "ROW_KEEP_A", "ROW_KEEP_B")
    names += ("ROW_X", "NUM_ROWS")
    header = header_defines("MULTISTEP_")
    assert {name: getattr(solver_table, name) for name in names} == {name: header[name] for name in names}
    columns = sorted(header[n] for n in names if n.startswith("COL_"))
    rows = sorted(header[n] for n in names if n.startswith("ROW_"))
    assert columns == list(range(header["NUM_INPUTS"])) and rows == list(range(header["NUM_ROWS"]))
    assert cuda.MAX_SLOTS == header["MAX_SLOTS"]
    pytest.importorskip("triton")
    kernel = importlib.import_module("fastddpm.kernels.multistep_update")
    assert {name: int(getattr(kernel, name)) for name in names} == {name: header[name] for name in names}


def test_triton_step_kernel_constants_match_the_header():
    """The Triton step kernel's noise modes are the header's FASTDDPM_NOISE_*, and its copies of
    the step table's columns are the header's FASTDDPM_STEP_*."""
    pytest.importorskip("triton")
    kernel = importlib.import_module("fastddpm.kernels.ddpm_step")
    assert module_constants(kernel, "NOISE_") == header_defines("NOISE_")
    columns = header_defines("STEP_")
    assert {name: int(getattr(kernel, name)) for name in columns} == columns


def test_cuda_backend_constants_match_the_header():
    """fastddpm.cuda._library's noise modes, dtype codes, status codes and ABI version are the header's."""
    assert module_constants(cuda, "NOISE_") == header_defines("NOISE_")
    dtypes = {"FLOAT32": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}
    assert {name: cuda.DTYPE_CODES[dtype] for name, dtype in dtypes.items()} == {
        name: header_defines("")[name] for name in dtypes
    }
    assert set(cuda.DTYPE_CODES) == set(dtypes.values())
    errors = module_constants(cuda, "ERROR_")
    assert errors and errors.items() <= header_defines("ERROR_").items()
    assert cuda.SUCCESS == header_defines("")["SUCCESS"]
    assert cuda.ABI_VERSION == header_defines("")["ABI_VERSION"]
