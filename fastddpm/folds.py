"""Tensors the U-Net derives from its parameters for a forward, and where they are kept.

The U-Net's forward folds work into fewer kernels with tensors computed from its weights: q, k and
v stacked for one GEMM, every ResnetBlock's time projection stacked for one, convolution biases
summed into the per-channel add of the next GroupNorm (fastddpm.unet.Act), an Upsample's 3x3
kernel turned into a transposed convolution's 4x4 one. Each is computed by a function of the
parameters at a site of the forward: `fold(site, compute)`.

By default `compute()` runs at every forward, so gradients, torch.compile, an export and any
change of the weights see the arithmetic. Inside `FoldMemo.frozen()` (Sampler.sample enters it for
its whole run) a forward without gradients keeps each site's tensor after computing it once, and
later forwards reuse it: the weights are taken as constant there. Entering recomputes every kept
tensor in place from the weights as they are then, so weights changed between two runs, by any
means (an optimizer or EMA step, `load_state_dict`, writes through `.data`, which no version
counter sees), are always seen; within a run, a parameter whose version counter moved (an
in-place write other than through `.data`) recomputes them too. In place means at the same
address: a CUDA graph captured in an earlier run replays the refreshed values. When a parameter
itself moved (a new address, dtype or shape: `.to()`, `.half()`, `p.data = ...`) the kept tensors
are dropped and computed afresh, and `generation` counts up, which a graph's cache key holds
(fastddpm.sampler.TorchDenoiser.weights).

A site's compute may read parameters (through their modules, at call time) and other sites'
tensors, never an activation: a kept closure would hold it alive.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch

Fold = Callable[[Hashable, Callable[[], torch.Tensor]], torch.Tensor]


def compute_now(site: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The fold that keeps nothing: compute() at every call."""
    return compute()


def weights_state(module: torch.nn.Module) -> tuple[tuple, tuple]:
    """(layout, versions) in one pass over the parameters: each one's address, dtype and shape
    (what the kept tensors' own layout follows), and each one's version counter."""
    params = list(module.parameters())
    return tuple((p.data_ptr(), p.dtype, p.shape) for p in params), tuple(p._version for p in params)


class FoldMemo:
    """One network's kept folded tensors (see the module docstring)."""

    def __init__(self) -> None:
        self._kept: dict[Hashable, tuple[Callable[[], torch.Tensor], torch.Tensor]] = {}
        self._layout: tuple | None = None
        self._version: tuple | None = None
        self._frozen = 0  # depth of frozen() scopes
        self.generation = 0  # counts replacements of kept tensors (new addresses)

    @contextmanager
    def frozen(self, module: torch.nn.Module) -> Iterator[None]:
        """Within: forwards of `module` without gradients keep and reuse their folded tensors; on
        entry the kept ones are recomputed from the weights as they are now."""
        if self._frozen == 0:
            self._refresh(module)
        self._frozen += 1
        try:
            yield
        finally:
            self._frozen -= 1

    def for_forward(self, module: torch.nn.Module) -> Fold:
        """The fold one forward of `module` uses: keeping inside frozen() without gradients, torch
        .compile or an export; compute_now elsewhere."""
        if (
            not self._frozen
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()
        ):
            return compute_now
        state = weights_state(module)
        if state != (self._layout, self._version):
            self._refresh(module, state)
        kept = self._kept

        def fold(site: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
            if site in kept:
                return kept[site][1]
            value = compute()
            if value is not None:  # a site with nothing to fold (no pending bias) keeps nothing
                kept[site] = (compute, value)
            return value

        return fold

    def _refresh(self, module: torch.nn.Module, state: tuple[tuple, tuple] | None = None) -> None:
        """Recompute every kept tensor in place, in the order they were first computed (a site's
        compute reads earlier sites' tensors); drop them all where a parameter moved, or where
        one cannot be written in place (an inference tensor outside inference mode). state:
        weights_state(module), where the caller has it."""
        layout, _ = state or weights_state(module)
        stuck = any(
            old.is_inference() and not torch.is_inference_mode_enabled() for _, old in self._kept.values()
        )
        if layout != self._layout or stuck:
            if self._kept:
                self._kept, self.generation = {}, self.generation + 1
        else:
            with torch.no_grad():
                for compute, old in self._kept.values():
                    new = compute()
                    if new.data_ptr() != old.data_ptr():  # a site whose tensor is a parameter is live
                        old.copy_(new)
        self._layout, self._version = layout, weights_state(module)[1]  # after any in-place write

    def __len__(self) -> int:
        return len(self._kept)
