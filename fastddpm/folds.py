"""Tensors the U-Net derives from its parameters for a forward, memoized while no gradient is taken.

The U-Net's forward folds work into fewer kernels with tensors computed from its weights: q, k and
v stacked for one GEMM, every ResnetBlock's time projection stacked for one, convolution biases
summed into the per-channel add of the next GroupNorm (fastddpm.unet.Act), the 3x3 kernel of an
Upsample turned into the 4x4 kernel of a transposed convolution. Each is computed by a function of
the parameters at a site of the forward: `fold(site, compute)`.

With gradients on (training), under torch.compile and while exporting, `compute()` runs at every
call, so autograd and tracing see the arithmetic. Otherwise (sampling: no_grad, inference_mode)
the first forward computes each site once and later forwards reuse it, until a parameter changes:
the memo is keyed by every parameter's address and version counter, so `load_state_dict`, an
optimizer or EMA step in place, `.to()` or `.half()` all start a fresh memo. A CUDA graph that
captured a forward reads the memo's tensors where they were at capture; its key
(fastddpm.sampler.TorchDenoiser.weights) holds the same versions, so a changed weight recaptures.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

Fold = Callable[[Hashable, Callable[[], torch.Tensor]], torch.Tensor]


def compute_now(site: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The fold that memoizes nothing: compute() at every call."""
    return compute()


def weights_version(module: torch.nn.Module) -> tuple:
    """Every parameter's address and version counter: what a memo of `module`'s folds depends on."""
    return tuple((p.data_ptr(), p._version) for p in module.parameters())


class FoldMemo:
    """One network's memo of folded tensors (see the module docstring)."""

    def __init__(self) -> None:
        self._memo: dict[Hashable, torch.Tensor] = {}
        self._version: tuple | None = None

    def for_forward(self, module: torch.nn.Module) -> Fold:
        """The fold one forward of `module` uses: memoizing, or compute_now where a gradient,
        torch.compile or an export must see the arithmetic."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return compute_now
        version = weights_version(module)
        if version != self._version:
            self._memo, self._version = {}, version
        memo = self._memo

        def fold(site: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
            value = memo.get(site)
            if value is None:
                value = memo[site] = compute()
            return value

        return fold

    def __len__(self) -> int:
        return len(self._memo)
