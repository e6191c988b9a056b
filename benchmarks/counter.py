"""Count what a GPU must do for a piece of PyTorch code: kernels launched, bytes moved, FLOPs.

    with Counter() as c:
        y = model(x)
    c.total("launches"), c.by_category()

Counts are exact on any machine and independent of the hardware, so they are the project's speed
figures where no GPU is lent. Run the code on meta tensors (shape-only: nothing is computed, so a
batch-256 forward of a 256x256 U-Net counts in seconds) or on real CPU tensors.

What a record is: every ATen op that reaches the dispatcher, one record per call, counted as a GPU
eager run would execute it:
- launches: 0 for views and allocations (the outputs alias an input or are uninitialized: view,
  transpose, expand, empty, ...), else 1. A cuDNN convolution or cuBLAS GEMM counts as 1 kernel
  (libraries may add a small one); a fused op of fastddpm (a custom op of a `fastddpm_*`
  namespace) counts as the kernels its launch plan runs (`fused_launches`; 1 by default).
- what an op runs on CUDA besides its own kernel, as PyTorch's CUDA code does it, each its own
  record: a convolution with a bias adds it in a second kernel (`output.add_(bias)`: cuDNN does
  not take the bias; category "elementwise"), and copies an input that is not dense in the memory
  format cuDNN runs (channels_last if the input or the weight is, "copy"); an out-of-place
  `baddbmm` first copies its broadcast input into the output ("copy"), which the GEMM then reads
  (beta = 1). `addmm` with a 1-D bias is one kernel (cuBLASLt's bias epilogue).
- bytes: the minimum traffic, each distinct input tensor read once and each output written once,
  at the unique elements a tensor addresses (an expanded dimension, stride 0, is read once).
- flops: PyTorch's own formulas (torch.utils.flop_counter) where it has one, else 0.

`F.scaled_dot_product_attention` is one record (category "attention"), as the flash / efficient
kernel a GPU runs; on meta or CPU tensors PyTorch decomposes it into the math path, whose ops are
not counted separately.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

CATEGORIES = (
    "convolution",
    "gemm",
    "attention",
    "fused",
    "norm",
    "copy",
    "elementwise",
    "reduction",
    "other",
)
COMPUTE_BOUND = ("convolution", "gemm")  # the rest is memory-bound work

_CONVOLUTION = {"convolution", "cudnn_convolution", "_convolution", "conv2d"}
_GEMM = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_mm"}
_NORM = {
    "native_group_norm",
    "native_layer_norm",
    "native_batch_norm",
    "_native_batch_norm_legit_no_training",
}
_COPY = {
    "clone", "copy_", "_to_copy", "cat", "constant_pad_nd", "upsample_nearest2d", "index_select", "index",
    "gather", "repeat", "stack", "contiguous", "_unsafe_index", "fill_", "zeros", "ones", "full", "zero_",
    "arange", "scalar_tensor", "lift_fresh_copy",
}  # fmt: skip
_REDUCTION = {"mean", "sum", "amax", "amin", "any", "all", "var_mean", "var", "std", "max", "min", "prod"}
_OVERWRITE = {"copy_", "fill_", "zero_"}  # in-place ops that never read their destination
# Allocations and metadata ops: no kernel runs.
_NO_LAUNCH = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
    "_unsafe_view", "_reshape_alias", "lift_fresh",
}  # fmt: skip


@dataclass(frozen=True)
class Record:
    """One op call: its ATen name, category, kernel launches, minimum bytes and FLOPs."""

    op: str
    category: str
    launches: int
    bytes: int
    flops: int


def _pass(what: str, kind: str, moved: int) -> Record:
    """A memory-bound kernel that an op runs on CUDA besides its own (see the module docstring)."""
    return Record(what, kind, 1, moved, 0)


def _cudnn_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout cuDNN convolves in: channels_last if the input's or the weight's strides are NHWC
    (and not also NCHW), as PyTorch's cudnn_conv_suggest_memory_format decides."""
    nhwc = any(
        t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
        for t in (x, weight)
    )
    return torch.channels_last if nhwc else torch.contiguous_format


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes `t` addresses once: its unique elements (a stride-0 dimension counts once)."""
    elements = math.prod(size for size, stride in zip(t.shape, t.stride(), strict=True) if stride != 0)
    return elements * t.element_size() if t.numel() else 0


def _tensors(tree: object) -> list[torch.Tensor]:
    """The distinct tensors in a nest of args (a tensor passed twice is read once)."""
    seen: dict[int, torch.Tensor] = {}
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor):
            seen.setdefault(id(leaf), leaf)
    return list(seen.values())


def _is_view(func: torch._ops.OpOverload) -> bool:
    """Every output of `func` aliases an input without writing it (a view: no kernel)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def category(func: torch._ops.OpOverload) -> str:
    """The category of an ATen op (or of a fastddpm custom op: "fused")."""
    namespace, name = func.namespace, func._schema.name.split("::")[-1]
    if namespace.startswith("fastddpm"):
        return "fused"
    if name in _CONVOLUTION:
        return "convolution"
    if name.rstrip("_") in _GEMM:  # in place too (baddbmm_)
        return "gemm"
    if name in _NORM:
        return "norm"
    if name in _REDUCTION:
        return "reduction"
    if name in _COPY:
        return "copy"
    if torch.Tag.pointwise in func.tags or name.rstrip("_") in {"silu", "masked_fill", "where"}:
        return "elementwise"
    return "other"


def attention_flops(q: torch.Tensor, k: torch.Tensor) -> int:
    """softmax(q k^T) v's matmul FLOPs: q (..., Lq, D), k (..., Lk, D)."""
    return 4 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1]  # q k^T and p v


def _flops(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: object) -> int:
    name = func._schema.name.split("::")[-1]
    formula = flop_registry.get(func._overloadpacket)
    if formula is None and name.endswith("_"):  # in place (baddbmm_): the out-of-place op's formula
        formula = flop_registry.get(getattr(torch.ops.aten, name[:-1], None))
    return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten.convolution.default and out.is_meta:
            # Meta's convolution writes NCHW whatever its operands; cuDNN's output has the layout
            # it convolves in (and so does the CPU's).
            out = out.contiguous(memory_format=_cudnn_memory_format(args[0], args[1]))
        if not self.counter._inside:
            self.counter._record_op(func, args, kwargs, out)
        return out


class _Functions(TorchFunctionMode):
    """Counts F.scaled_dot_product_attention as one kernel; its decomposition goes uncounted."""

    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.counter._inside:
            return func(*args, **kwargs)
        self.counter._inside += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.counter._inside -= 1
        flops = attention_flops(args[0], args[1])
        moved = sum(tensor_bytes(t) for t in _tensors((args, kwargs))) + tensor_bytes(out)
        self.counter.records.append(Record("scaled_dot_product_attention", "attention", 1, moved, flops))
        return out


class Counter:
    """A context manager that records every op run inside it (see the module docstring).

    device: count only ops that touch a tensor on this device type ("meta", "cuda"): ops on CPU
    tensors are then host work (a scheduler's scalar arithmetic), not kernels. None counts all.
    fused_launches(op_name, args) -> int: the kernels a fused op's call launches (its plan may
    split one op over two kernels); default 1."""

    def __init__(self, device: str | None = None, fused_launches: Callable[[str, tuple], int] | None = None):
        self.device = device
        self.fused_launches = fused_launches
        self.records: list[Record] = []
        self._inside = 0  # > 0 while a counted composite (SDPA) runs its decomposition
        self._modes = (_Functions(self), _Dispatch(self))

    def __enter__(self) -> Counter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def _record_op(self, func, args: tuple, kwargs: dict, out: object) -> None:
        name = func._schema.name.split("::")[-1]
        outputs = _tensors(out)
        inputs = _tensors((args, kwargs))
        if self.device is not None and all(t.device.type != self.device for t in (*inputs, *outputs)):
            return
        if _is_view(func) or name in _NO_LAUNCH:
            self.records.append(Record(str(func), "view", 0, 0, 0))
            return
        if name in _OVERWRITE:  # the destination is written, not read
            inputs = [t for t in inputs if all(t is not o for o in outputs)]
        # An in-place op (x.add_(y)) reads its destination and writes it: both count.
        moved = sum(tensor_bytes(t) for t in inputs) + sum(tensor_bytes(t) for t in outputs)
        kind = category(func)
        launches, flops = 1, _flops(func, args, kwargs, out)
        before, after = [], []  # the kernels PyTorch's CUDA code runs around this one
        if name == "convolution":
            x, weight, bias = args[0], args[1], args[2]
            if not x.is_contiguous(memory_format=_cudnn_memory_format(x, weight)):
                before.append(_pass("convolution input copy", "copy", 2 * tensor_bytes(x)))
            if bias is not None:
                after.append(
                    _pass("convolution bias add", "elementwise", 2 * tensor_bytes(out) + tensor_bytes(bias))
                )
            moved = tensor_bytes(x) + tensor_bytes(weight) + tensor_bytes(out)
        elif name == "baddbmm" and kwargs.get("beta", 1) != 0:
            before.append(
                _pass("baddbmm input copy", "copy", tensor_bytes(args[0]) + tensor_bytes(out))
            )  # out = self
            moved = tensor_bytes(args[1]) + tensor_bytes(args[2]) + 2 * tensor_bytes(out)  # out += b1 @ b2
        if kind == "fused":
            launches = self.fused_launches(name, args) if self.fused_launches else 1
            flops = attention_flops(args[0], args[1]) if name == "attention" else 0
        self.records += [*before, Record(str(func), kind, launches, moved, flops), *after]

    def total(self, field: str, categories: tuple[str, ...] | None = None) -> int:
        """The sum of `field` ("launches", "bytes", "flops") over records of `categories` (all if None)."""
        return sum(getattr(r, field) for r in self.records if categories is None or r.category in categories)

    def memory_bound_bytes(self) -> int:
        """Bytes of every op outside convolutions and GEMMs."""
        return sum(r.bytes for r in self.records if r.category not in COMPUTE_BOUND)

    def by_category(self) -> dict[str, dict[str, int]]:
        """category -> {"launches", "bytes", "flops", "calls"} (views left out)."""
        table: dict[str, dict[str, int]] = defaultdict(
            lambda: dict.fromkeys(("calls", "launches", "bytes", "flops"), 0)
        )
        for r in self.records:
            if r.category == "view":
                continue
            row = table[r.category]
            row["calls"] += 1
            row["launches"] += r.launches
            row["bytes"] += r.bytes
            row["flops"] += r.flops
        return {c: table[c] for c in CATEGORIES if c in table}
