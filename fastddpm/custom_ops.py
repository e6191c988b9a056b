"""What the kernel backends ("triton", "cuda") share: the three fused ops as torch.library custom
ops, each with a fake (shape-only) implementation so torch.compile(fullgraph=True) traces
through it, and a backward that recomputes the reference math (fastddpm.reference) under
autograd. A backend supplies only the forward launches.

The step op takes t as a tensor or an int (t_tensor, t_int), the table's coefficients, and the
seed and offset as four 32-bit words (custom-op ints are int64; seeds span [0, 2**64)), or, each
of them, as a 0-d int64 device tensor (seed_tensor, offset_tensor; its word pair is then 0) read
by the kernel, so a CUDA-graph-captured step can replay with new values.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch

from . import reference
from .reference import memory_format_of
from .schedule import StepTable

_MASK32 = 0xFFFFFFFF


def ddpm_step_args(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int | torch.Tensor,
    table: StepTable,
    noise: torch.Tensor | None,
    seed: int | torch.Tensor | None,
    offset: int | torch.Tensor,
    clip_x0: bool,
) -> tuple:
    """The step op's arguments: t split into a tensor or an int, the noise source settled (none
    for a table without noise; a given noise tensor wins over a seed), and the seed and offset as
    32-bit words ([] without a seed) and, where they are device tensors, those tensors."""
    if not table.stochastic:
        noise, seed = None, None
    elif noise is not None:
        seed = None
    t_tensor, t_int = (t, 0) if isinstance(t, torch.Tensor) else (None, int(t))
    words, seed_tensor, offset_tensor = [], None, None
    if seed is not None:
        seed_tensor, seed = (seed, 0) if isinstance(seed, torch.Tensor) else (None, seed)
        offset_tensor, offset = (offset, 0) if isinstance(offset, torch.Tensor) else (None, offset)
        words = [seed & _MASK32, seed >> 32, offset & _MASK32, offset >> 32]
    coef, stochastic = table.coef, table.stochastic
    return x_t, eps, t_tensor, t_int, coef, stochastic, noise, words, clip_x0, seed_tensor, offset_tensor


def unpack_seed(
    words: list[int], seed_tensor: torch.Tensor | None = None, offset_tensor: torch.Tensor | None = None
) -> tuple[int | torch.Tensor | None, int | torch.Tensor]:
    """The inverse of ddpm_step_args' packing: (seed or None, offset), a device tensor where given."""
    if not words:
        return None, 0
    seed = words[0] | (words[1] << 32) if seed_tensor is None else seed_tensor
    offset = words[2] | (words[3] << 32) if offset_tensor is None else offset_tensor
    return seed, offset


def coef_table(coef: torch.Tensor, stochastic: bool) -> StepTable:
    """A StepTable carrying only what the step reads (the timesteps are the network's business)."""
    return StepTable(coef=coef, timesteps=coef.new_empty(0, dtype=torch.long), stochastic=stochastic)


def reference_grads(fn: Callable, inputs: tuple, needs: tuple, grad: torch.Tensor) -> tuple:
    """Gradients of fn(*inputs) (a reference op) against `grad`, for the inputs that need one."""
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


def register(
    namespace: str,
    group_norm_silu: Callable[..., torch.Tensor],
    attention: Callable[..., torch.Tensor],
    ddpm_step: Callable[..., torch.Tensor],
) -> SimpleNamespace:
    """Define `namespace::group_norm_silu`, `::attention` and `::ddpm_step` over the given forwards:

    group_norm_silu(x, weight, bias, num_groups, eps, silu, add)
    attention(q, k, v, scale)
    ddpm_step(x_t, eps, t_tensor, t_int, coef, stochastic, noise, seed_words, clip_x0, seed_tensor,
              offset_tensor)
    """

    # --- group_norm_silu --------------------------------------------------------------------------

    @torch.library.custom_op(f"{namespace}::group_norm_silu", mutates_args=())
    def group_norm_silu_op(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        num_groups: int,
        eps: float,
        silu: bool,
        add: torch.Tensor | None,
    ) -> torch.Tensor:
        return group_norm_silu(x, weight, bias, num_groups, eps, silu, add)

    @group_norm_silu_op.register_fake
    def _(x, weight, bias, num_groups, eps, silu, add):
        return torch.empty_like(x, memory_format=memory_format_of(x))

    def group_norm_silu_setup(ctx, inputs, output):
        x, weight, bias, num_groups, eps, silu, add = inputs
        ctx.save_for_backward(x, weight, bias, add)
        ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu

    def group_norm_silu_backward(ctx, grad):
        x, weight, bias, add = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gx, gw, gb, gadd = reference_grads(
            lambda x, w, b, a: reference.group_norm_silu(
                x, w, b, ctx.num_groups, ctx.eps, silu=ctx.silu, add=a
            ),
            (x, weight, bias, add),
            (needs[0], needs[1], needs[2], needs[6]),
            grad,
        )
        return gx, gw, gb, None, None, None, gadd

    group_norm_silu_op.register_autograd(group_norm_silu_backward, setup_context=group_norm_silu_setup)

    # --- attention --------------------------------------------------------------------------------

    @torch.library.custom_op(f"{namespace}::attention", mutates_args=())
    def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return attention(q, k, v, scale)

    @attention_op.register_fake
    def _(q, k, v, scale):
        return q.new_empty(q.shape)

    def attention_setup(ctx, inputs, output):
        q, k, v, scale = inputs
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale

    def attention_backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        grads = reference_grads(
            lambda q, k, v: reference.attention(q, k, v, ctx.scale), (q, k, v), ctx.needs_input_grad[:3], grad
        )
        return (*grads, None)

    attention_op.register_autograd(attention_backward, setup_context=attention_setup)

    # --- ddpm_step --------------------------------------------------------------------------------

    @torch.library.custom_op(f"{namespace}::ddpm_step", mutates_args=())
    def ddpm_step_op(
        x_t: torch.Tensor,
        eps: torch.Tensor,
        t_tensor: torch.Tensor | None,
        t_int: int,
        coef: torch.Tensor,
        stochastic: bool,
        noise: torch.Tensor | None,
        seed_words: list[int],
        clip_x0: bool,
        seed_tensor: torch.Tensor | None,
        offset_tensor: torch.Tensor | None,
    ) -> torch.Tensor:
        args = (x_t, eps, t_tensor, t_int, coef, stochastic, noise, seed_words, clip_x0)
        return ddpm_step(*args, seed_tensor, offset_tensor)

    @ddpm_step_op.register_fake
    def _(x_t, eps, t_tensor, t_int, coef, stochastic, noise, seed_words, clip_x0, seed_t, offset_t):
        return torch.empty_like(x_t, memory_format=memory_format_of(x_t))

    def ddpm_step_setup(ctx, inputs, output):
        x_t, eps, t_tensor, t_int, coef, stochastic, noise, seed_words, clip_x0, seed_t, offset_t = inputs
        ctx.save_for_backward(x_t, eps, t_tensor, coef, noise, seed_t, offset_t)
        ctx.t_int, ctx.stochastic, ctx.seed_words, ctx.clip_x0 = t_int, stochastic, seed_words, clip_x0

    def ddpm_step_backward(ctx, grad):
        x_t, eps, t_tensor, coef, noise, seed_tensor, offset_tensor = ctx.saved_tensors
        seed, offset = unpack_seed(ctx.seed_words, seed_tensor, offset_tensor)
        t = ctx.t_int if t_tensor is None else t_tensor
        table = coef_table(coef, ctx.stochastic)
        needs = ctx.needs_input_grad
        gx, geps, gnoise = reference_grads(
            lambda x, e, z: reference.ddpm_step(
                x, e, t, table, noise=z, seed=seed, offset=offset, clip_x0=ctx.clip_x0
            ),
            (x_t, eps, noise),
            (needs[0], needs[1], needs[6]),
            grad,
        )
        return gx, geps, None, None, None, None, gnoise, None, None, None, None

    ddpm_step_op.register_autograd(ddpm_step_backward, setup_context=ddpm_step_setup)

    return SimpleNamespace(group_norm_silu=group_norm_silu_op, attention=attention_op, ddpm_step=ddpm_step_op)
