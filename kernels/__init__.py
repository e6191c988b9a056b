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

from fastddpm import reference
from fastddpm.reference import memory_format_of
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

    # --- group_norm_silu ----------------------------------------------------------------------

    @torch.library.custom_op("fastddpm_triton::group_norm_silu", mutates_args=())
    def _group_norm_silu_op(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        num_groups: int,
        eps: float,
        silu: bool,
        add: torch.Tensor | None,
    ) -> torch.Tensor:
        return _norm_kernels.group_norm_silu(x, weight, bias, num_groups, eps, silu=silu, add=add)

    @_group_norm_silu_op.register_fake
    def _(x, weight, bias, num_groups, eps, silu, add):
        return torch.empty_like(x, memory_format=memory_format_of(x))

    def _group_norm_silu_setup(ctx, inputs, output):
        x, weight, bias, num_groups, eps, silu, add = inputs
        ctx.save_for_backward(x, weight, bias, add)
        ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu

    def _group_norm_silu_backward(ctx, grad):
        x, weight, bias, add = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gx, gw, gb, gadd = _reference_grads(
            lambda x, w, b, a: reference.group_norm_silu(
                x, w, b, ctx.num_groups, ctx.eps, silu=ctx.silu, add=a
            ),
            (x, weight, bias, add),
            (needs[0], needs[1], needs[2], needs[6]),
            grad,
        )
        return gx, gw, gb, None, None, None, gadd

    _group_norm_silu_op.register_autograd(_group_norm_silu_backward, setup_context=_group_norm_silu_setup)

    # --- attention ----------------------------------------------------------------------------

    @torch.library.custom_op("fastddpm_triton::attention", mutates_args=())
    def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return _attention_kernels.attention(q, k, v, scale)

    @_attention_op.register_fake
    def _(q, k, v, scale):
        return q.new_empty(q.shape)

    def _attention_setup(ctx, inputs, output):
        q, k, v, scale = inputs
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale

    def _attention_backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        grads = _reference_grads(
            lambda q, k, v: reference.attention(q, k, v, ctx.scale), (q, k, v), ctx.needs_input_grad[:3], grad
        )
        return (*grads, None)

    _attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)

    # --- ddpm_step ----------------------------------------------------------------------------

    @torch.library.custom_op("fastddpm_triton::ddpm_step", mutates_args=())
    def _ddpm_step_op(
        x_t: torch.Tensor,
        eps: torch.Tensor,
        t_tensor: torch.Tensor | None,
        t_int: int,
        coef: torch.Tensor,
        stochastic: bool,
        noise: torch.Tensor | None,
        seed_words: list[int],
        clip_x0: bool,
    ) -> torch.Tensor:
        seed, offset = _unpack_seed(seed_words)
        return _step_kernels.ddpm_step(
            x_t,
            eps,
            t_int if t_tensor is None else t_tensor,
            _coef_table(coef, stochastic),
            noise=noise,
            seed=seed,
            offset=offset,
            clip_x0=clip_x0,
        )

    @_ddpm_step_op.register_fake
    def _(x_t, eps, t_tensor, t_int, coef, stochastic, noise, seed_words, clip_x0):
        return torch.empty_like(x_t, memory_format=memory_format_of(x_t))

    def _ddpm_step_setup(ctx, inputs, output):
        x_t, eps, t_tensor, t_int, coef, stochastic, noise, seed_words, clip_x0 = inputs
        ctx.save_for_backward(x_t, eps, t_tensor, coef, noise)
        ctx.t_int, ctx.stochastic, ctx.seed_words, ctx.clip_x0 = t_int, stochastic, seed_words, clip_x0

    def _ddpm_step_backward(ctx, grad):
        x_t, eps, t_tensor, coef, noise = ctx.saved_tensors
        seed, offset = _unpack_seed(ctx.seed_words)
        t = ctx.t_int if t_tensor is None else t_tensor
        table = _coef_table(coef, ctx.stochastic)
        needs = ctx.needs_input_grad
        gx, geps, gnoise = _reference_grads(
            lambda x, e, z: reference.ddpm_step(
                x, e, t, table, noise=z, seed=seed, offset=offset, clip_x0=ctx.clip_x0
            ),
            (x_t, eps, noise),
            (needs[0], needs[1], needs[6]),
            grad,
        )
        return gx, geps, None, None, None, None, gnoise, None, None

    _ddpm_step_op.register_autograd(_ddpm_step_backward, setup_context=_ddpm_step_setup)


def _reference_grads(fn, inputs, needs, grad):
    """Gradients of fn(*inputs) (the reference op) against `grad`, for the inputs that need one."""
    with torch.enable_grad():
        leaves = [
            None if t is None else t.detach().requires_grad_(bool(need))
            for t, need in zip(inputs, needs, strict=True)
        ]
        wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
        if not wanted:
            return tuple(None for _ in inputs)
        got = iter(torch.autograd.grad(fn(*leaves), wanted, grad))
    return tuple(next(got) if leaf is not None and leaf.requires_grad else None for leaf in leaves)


def _coef_table(coef: torch.Tensor, stochastic: bool) -> StepTable:
    """A StepTable carrying only what the step reads (the timesteps are the network's business)."""
    return StepTable(coef=coef, timesteps=coef.new_empty(0, dtype=torch.long), stochastic=stochastic)


_MASK32 = 0xFFFFFFFF


def _pack_seed(seed: int | None, offset: int) -> list[int]:
    """[] without a seed, else the 32-bit words (seed lo, seed hi, offset lo, offset hi): custom-op
    ints are int64, and seeds and offsets span [0, 2**64)."""
    if seed is None:
        return []
    return [seed & _MASK32, seed >> 32, offset & _MASK32, offset >> 32]


def _unpack_seed(words: list[int]) -> tuple[int | None, int]:
    if not words:
        return None, 0
    return words[0] | (words[1] << 32), words[2] | (words[3] << 32)


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
    seed: int | None = None,
    offset: int = 0,
    clip_x0: bool = True,
) -> torch.Tensor:
    """One reverse step at step index t: see kernels/ddpm_step.py."""
    _step_kernels.check_ddpm_step(x_t, eps, noise, table)
    if not table.stochastic:
        noise, seed = None, None
    elif noise is not None:
        seed = None
    t_tensor, t_int = (t, 0) if isinstance(t, torch.Tensor) else (None, int(t))
    return torch.ops.fastddpm_triton.ddpm_step(
        x_t, eps, t_tensor, t_int, table.coef, table.stochastic, noise, _pack_seed(seed, offset), clip_x0
    )
