"""What the kernel backends ("triton", "cuda") share to make an op a torch.library custom op.

`define` registers one op: its forward, a fake (shape-only) implementation so
torch.compile(fullgraph=True) traces through it, and a backward that recomputes the op's reference
math (fastddpm.reference) under autograd, so training can run with the fused forward. Each backend
file calls it right under its launcher.

`StepArgs` is ddpm_step's argument list in the types a custom op takes: a step index, seed or offset
is either a device tensor or a host int, and a custom op's ints are int64 while seeds span
[0, 2**64). `MultistepArgs` is multistep_update's, the same way; that op writes its history slots
in place, so it is defined with mutates_args=("history",) and has no backward (torch.library
differentiates no mutating op; a solver step samples, it is never trained through).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import reference
from .reference import memory_format_of
from .schedule import StepTable
from .solver_table import SolverTable

_MASK32 = 0xFFFFFFFF


def define(
    qualname: str,
    forward: Callable[..., torch.Tensor],
    *,
    fake: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor] | None,
    mutates_args: tuple[str, ...] = (),
) -> torch.library.CustomOpDef:
    """The custom op `qualname` ("namespace::name") running `forward`.

    The op's parameters are forward's annotated parameters (torch.library infers the schema from
    them) or, where forward takes one NamedTuple, that tuple's annotated fields: the op is then
    called with the tuple unpacked, `torch.ops.namespace.name(*args)`, and forward gets it whole.
    `fake` (an empty output of the right shape, dtype and memory format) and `reference` take what
    forward takes. The backward calls reference on the saved inputs by name (so a reference function
    whose parameters have the op's names serves as is) and differentiates it. An op that writes
    into some of its tensor parameters names them in `mutates_args`; it gets no backward
    (torch.library has none for a mutating op), and `reference` is None.
    """
    if (reference is None) != bool(mutates_args):
        raise ValueError(f"{qualname}: a reference (for the backward) exactly when nothing is mutated")
    fields = _fields_of(forward)
    forward, fake = (_on_fields(fields, fn) if fields else fn for fn in (forward, fake))
    names = list(inspect.signature(forward).parameters)
    op = torch.library.custom_op(qualname, forward, mutates_args=mutates_args)
    op.register_fake(fake)
    if reference is None:
        return op
    reference = _on_fields(fields, reference) if fields else reference

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(v if isinstance(v, torch.Tensor) else None for v in inputs))
        ctx.values = [None if isinstance(v, torch.Tensor) else v for v in inputs]

    def backward(ctx, grad):
        inputs = [v if t is None else t for t, v in zip(ctx.saved_tensors, ctx.values, strict=True)]
        return _reference_grads(
            lambda *args: reference(**dict(zip(names, args, strict=True))), inputs, ctx.needs_input_grad, grad
        )

    op.register_autograd(backward, setup_context=setup_context)
    return op


def _fields_of(forward: Callable) -> type[tuple] | None:
    """The NamedTuple type of forward's one parameter, or None where forward takes the op's arguments."""
    parameters = list(inspect.signature(forward).parameters)
    if len(parameters) != 1:
        return None
    hint = typing.get_type_hints(forward).get(parameters[0])
    return hint if isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields") else None


def _on_fields(fields: type[tuple], fn: Callable[[tuple], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """fn as a function of the NamedTuple's fields, annotated as they are (so a schema can be inferred)."""

    def pack(*args, **kwargs) -> torch.Tensor:
        return fn(fields(*args, **kwargs))

    hints = typing.get_type_hints(fields)
    pack.__signature__ = inspect.Signature(
        [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[name])
            for name in fields._fields
        ],
        return_annotation=torch.Tensor,
    )
    return pack


def _reference_grads(fn: Callable, inputs: list, needs: tuple[bool, ...], grad: torch.Tensor) -> tuple:
    """Gradients of fn(*inputs) against `grad` for the tensor inputs that need one; None for the rest."""
    with torch.enable_grad():
        leaves = [
            v.detach().requires_grad_(need) if isinstance(v, torch.Tensor) else v
            for v, need in zip(inputs, needs, strict=True)
        ]
        wanted = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
        if not wanted:
            return tuple(None for _ in inputs)
        got = iter(torch.autograd.grad(fn(*leaves), wanted, grad))
    return tuple(
        next(got) if isinstance(leaf, torch.Tensor) and leaf.requires_grad else None for leaf in leaves
    )


def output_like(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A fake output of x's shape and dtype, in x's memory format (ddpm_step's)."""
    return torch.empty_like(x, memory_format=memory_format_of(x))


def norm_output(x: torch.Tensor, weight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """group_norm_silu's fake output: x's N, H, W and dtype, weight's channels (x's and a skip's),
    x's memory format."""
    N, _, H, W = x.shape
    shape = (N, weight.shape[0], H, W)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


# --- ddpm_step ------------------------------------------------------------------------------------


class StepArgs(NamedTuple):
    """ddpm_step's arguments as its custom op takes them; `step_args` builds them, the properties
    read the step index, seed and offset back as the launchers take them."""

    x_t: torch.Tensor
    eps: torch.Tensor
    i_tensor: torch.Tensor | None  # the step index on the device, or None: i_int
    i_int: int
    coefficients: torch.Tensor  # the StepTable's coef, (S, NUM_COEFS)
    stochastic: bool
    noise: torch.Tensor | None  # z; None without noise or with a seed
    seed_words: list[
        int
    ]  # seed and offset as 32-bit words, low first: [s_lo, s_hi, o_lo, o_hi]; [] without a seed
    seed_tensor: torch.Tensor | None  # a 0-d int64 device tensor read instead of the seed (its words are 0)
    offset_tensor: torch.Tensor | None  # the same, for the offset
    clip_x0: bool

    @property
    def i(self) -> int | torch.Tensor:
        return self.i_int if self.i_tensor is None else self.i_tensor

    @property
    def seed(self) -> int | torch.Tensor | None:
        return _seed_of(self.seed_words, self.seed_tensor)

    @property
    def offset(self) -> int | torch.Tensor:
        return _offset_of(self.seed_words, self.offset_tensor)

    def fake(self) -> torch.Tensor:
        return output_like(self.x_t)

    def reference(self) -> torch.Tensor:
        """fastddpm.reference's step on these arguments."""
        table = StepTable(
            self.coefficients, self.coefficients.new_empty(0, dtype=torch.long), self.stochastic
        )
        return reference.ddpm_step(
            self.x_t,
            self.eps,
            self.i,
            table,
            noise=self.noise,
            seed=self.seed,
            offset=self.offset,
            clip_x0=self.clip_x0,
        )


def step_args(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    i: int | torch.Tensor,
    table: StepTable,
    *,
    noise: torch.Tensor | None,
    seed: int | torch.Tensor | None,
    offset: int | torch.Tensor,
    clip_x0: bool,
) -> StepArgs:
    """fastddpm.ops.ddpm_step's arguments as StepArgs, the noise source settled: none for a table
    without noise, and a given noise tensor wins over a seed."""
    if not table.stochastic:
        noise, seed = None, None
    elif noise is not None:
        seed = None
    i_tensor, i_int = (i, 0) if isinstance(i, torch.Tensor) else (None, int(i))
    words, seed_tensor, offset_tensor = _counter_args(seed, offset)
    return StepArgs(
        x_t,
        eps,
        i_tensor,
        i_int,
        table.coef,
        table.stochastic,
        noise,
        words,
        seed_tensor,
        offset_tensor,
        clip_x0,
    )


# --- the Philox seed and offset as a custom op takes them -----------------------------------------


def _counter_args(
    seed: int | torch.Tensor | None, offset: int | torch.Tensor
) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    """(seed_words, seed_tensor, offset_tensor): a host seed and offset as 32-bit words, low first,
    [s_lo, s_hi, o_lo, o_hi] (a device tensor's words are 0); [] and None without a seed."""
    if seed is None:
        return [], None, None
    seed_tensor, seed = (seed, 0) if isinstance(seed, torch.Tensor) else (None, seed)
    offset_tensor, offset = (offset, 0) if isinstance(offset, torch.Tensor) else (None, offset)
    return [seed & _MASK32, seed >> 32, offset & _MASK32, offset >> 32], seed_tensor, offset_tensor


def _seed_of(words: list[int], tensor: torch.Tensor | None) -> int | torch.Tensor | None:
    if not words:
        return None
    return words[0] | words[1] << 32 if tensor is None else tensor


def _offset_of(words: list[int], tensor: torch.Tensor | None) -> int | torch.Tensor:
    if not words:
        return 0
    return words[2] | words[3] << 32 if tensor is None else tensor


# --- multistep_update -------------------------------------------------------------------------------


class MultistepArgs(NamedTuple):
    """multistep_update's arguments as its custom op takes them (history written in place);
    `multistep_args` builds them, the properties read the step index, seed and offset back."""

    x: torch.Tensor
    eps: torch.Tensor
    history: torch.Tensor  # (M, N, C, H, W), the op's one mutated argument
    i_tensor: torch.Tensor | None  # the step index on the device, shape (), or None: i_int
    i_int: int
    weights: torch.Tensor  # the SolverTable's (S, NUM_ROWS, NUM_INPUTS + M) float32
    dest: torch.Tensor  # its (S, 2) int64
    stochastic: bool
    noise: torch.Tensor | None  # z; None without noise or with a seed
    seed_words: list[int]  # as StepArgs'
    seed_tensor: torch.Tensor | None
    offset_tensor: torch.Tensor | None
    clip_x0: bool

    @property
    def i(self) -> int | torch.Tensor:
        return self.i_int if self.i_tensor is None else self.i_tensor

    @property
    def seed(self) -> int | torch.Tensor | None:
        return _seed_of(self.seed_words, self.seed_tensor)

    @property
    def offset(self) -> int | torch.Tensor:
        return _offset_of(self.seed_words, self.offset_tensor)

    def fake(self) -> torch.Tensor:
        return torch.empty_like(self.x)


def multistep_args(
    x: torch.Tensor,
    eps: torch.Tensor,
    history: torch.Tensor,
    i: int | torch.Tensor,
    table: SolverTable,
    *,
    noise: torch.Tensor | None,
    seed: int | torch.Tensor | None,
    offset: int | torch.Tensor,
    clip_x0: bool,
) -> MultistepArgs:
    """fastddpm.ops.multistep_update's arguments as MultistepArgs, the noise source settled as
    step_args settles it."""
    if not table.stochastic:
        noise, seed = None, None
    elif noise is not None:
        seed = None
    i_tensor, i_int = (i, 0) if isinstance(i, torch.Tensor) else (None, int(i))
    words, seed_tensor, offset_tensor = _counter_args(seed, offset)
    return MultistepArgs(
        x,
        eps,
        history,
        i_tensor,
        i_int,
        table.weights,
        table.dest,
        table.stochastic,
        noise,
        words,
        seed_tensor,
        offset_tensor,
        clip_x0,
    )
