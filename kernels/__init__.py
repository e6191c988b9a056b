"""The "triton" backend of fastddpm.ops: Triton kernels of the fused ops (installed as fastddpm.kernels).

One file per op holds its kernels and launcher: `group_norm_silu.py`, `attention.py`,
`ddpm_step.py`. This module registers each launcher as a PyTorch custom op
(`torch.ops.fastddpm_triton.*`, with a fake implementation), so `torch.compile(fullgraph=True)`
of the U-Net keeps one graph, and makes it differentiable: the backward recomputes the plain
PyTorch reference (`fastddpm.reference`) under autograd, so training can run with the fused
forward. The functions below have the reference's signatures; `fastddpm.ops` checks their
inputs, and they add what only the kernels impose (a device Triton can run on), as ValueError.

The kernels run on CUDA devices, and on the CPU through Triton's interpreter when
TRITON_INTERPRET=1 is set before this module is imported (the test suite does this).

Mind the names: after import, `fastddpm.kernels.group_norm_silu` (and `attention`, `ddpm_step`)
is the op function, which shadows the submodule of the same name. Reach a submodule with
`from fastddpm.kernels.group_norm_silu import plan` or importlib, not `import ... as`.
"""

from __future__ import annotations

import torch

from fastddpm.custom_ops import coef_table, ddpm_step_args, register, unpack_seed
from fastddpm.schedule import StepTable

try:
    import triton  # noqa: F401
except ImportError as err:  # the backend reports why; fastddpm itself still imports
    _IMPORT_ERROR: ImportError | None = err
else:
    _IMPORT_ERROR = None

__all__ = ["attention", "ddpm_step", "group_norm_silu", "unavailable_reason"]


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
    from . import attention as _attention_kernels
    from . import ddpm_step as _step_kernels
    from . import group_norm_silu as _norm_kernels

    def _group_norm_silu_forward(x, weight, bias, num_groups, eps, silu, add):
        return _norm_kernels.group_norm_silu(x, weight, bias, num_groups, eps, silu=silu, add=add)

    def _ddpm_step_forward(
        x_t, eps, t_tensor, t_int, coef, stochastic, noise, seed_words, clip_x0, seed_tensor, offset_tensor
    ):
        seed, offset = unpack_seed(seed_words, seed_tensor, offset_tensor)
        t = t_int if t_tensor is None else t_tensor
        table = coef_table(coef, stochastic)
        return _step_kernels.ddpm_step(
            x_t, eps, t, table, noise=noise, seed=seed, offset=offset, clip_x0=clip_x0
        )

    register("fastddpm_triton", _group_norm_silu_forward, _attention_kernels.attention, _ddpm_step_forward)


# --- the backend's ops (signatures of fastddpm.reference; inputs already checked by fastddpm.ops) ---


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float = 1e-6,
    *,
    silu: bool = True,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = SiLU(GroupNorm(x + add[:, :, None, None])): see kernels/group_norm_silu.py."""
    _norm_kernels.check_group_norm_silu(x, weight, bias, add)
    return torch.ops.fastddpm_triton.group_norm_silu(x, weight, bias, num_groups, float(eps), silu, add)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v: see kernels/attention.py."""
    _attention_kernels.check_attention(q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.fastddpm_triton.attention(q, k, v, scale)


def ddpm_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int | torch.Tensor,
    table: StepTable,
    *,
    noise: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    clip_x0: bool = True,
) -> torch.Tensor:
    """One reverse step at step index t: see kernels/ddpm_step.py."""
    _step_kernels.check_ddpm_step(x_t, eps, noise, table)
    return torch.ops.fastddpm_triton.ddpm_step(
        *ddpm_step_args(x_t, eps, t, table, noise, seed, offset, clip_x0)
    )
