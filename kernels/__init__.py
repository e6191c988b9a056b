"""Triton kernels of the fused ops, one file per op (installed as `fastddpm.kernels`).

Each kernel implements an op of the contract in `fastddpm.ops`; the plain-PyTorch
ground truth it must equal is `fastddpm.reference`. No kernel has landed yet.
"""


def unavailable_reason() -> str | None:
    """Why `fastddpm.ops` cannot use this backend (None once it can)."""
    return "the Triton kernels (fastddpm.kernels) are not built in this version of fastddpm"
