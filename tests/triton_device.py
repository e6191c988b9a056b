"""Where the Triton tests run: through Triton's interpreter on the CPU (tests/conftest.py sets
TRITON_INTERPRET=1 where no CUDA device exists), or compiled on a GPU when TRITON_INTERPRET=0.
A test module imports this after `pytest.importorskip("triton")`, and sets `pytestmark = RUNNABLE`."""

import pytest
import torch
from fastddpm.kernels._common import INTERPRET

DEVICE = "cpu" if INTERPRET else "cuda"
RUNNABLE = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(), reason="needs a CUDA device or TRITON_INTERPRET=1"
)
