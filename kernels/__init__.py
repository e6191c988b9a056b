"""The "triton" backend of fastddpm.ops: Triton kernels of the fused ops (installed as fastddpm.kernels).

One file per op (`group_norm_silu.py`, `attention.py`, `ddpm_step.py`, `multistep_update.py`)
holds top to bottom its kernels, its launcher (`launch_<op>`, whose keyword arguments override the
launch heuristics, for tests), its custom op `torch.ops.fastddpm_triton.<op>` (fastddpm.custom_ops:
a fake, so `torch.compile(fullgraph=True)` of the U-Net keeps one graph, and a backward that
recomputes the reference under autograd, so training can run with the fused forward; none for
multistep_update, which writes its history in place) and the function `<op>` that fastddpm.ops
calls, `fastddpm.kernels.<op>.<op>`, with the reference's signature. fastddpm.ops checks its
inputs; it adds what only the kernels impose (a device Triton can run on), as ValueError.

The kernels run on CUDA devices, and on the CPU through Triton's interpreter when
TRITON_INTERPRET=1 is set before this module is imported (the test suite does this).
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401
except ImportError as err:  # the backend reports why; fastddpm itself still imports
    _IMPORT_ERROR: ImportError | None = err
else:
    _IMPORT_ERROR = None

__all__ = ["unavailable_reason"]


def unavailable_reason() -> str | None:
    """Why `fastddpm.ops` cannot use this backend; None when it can."""
    if _IMPORT_ERROR is not None:
        return f"triton is not installed ({_IMPORT_ERROR}); pip install triton"
    from ._common import INTERPRET

    if INTERPRET or torch.cuda.is_available():
        return None
    return (
        "no CUDA device is available, and Triton's interpreter is off (set TRITON_INTERPRET=1 before"
        " importing fastddpm to run the kernels on the CPU, slowly)"
    )


if _IMPORT_ERROR is None:
    from . import attention, ddpm_step, group_norm_silu, multistep_update  # noqa: F401  (one module per op)
