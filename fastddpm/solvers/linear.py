"""Build a SolverTable by running a solver's step arithmetic on symbols, in float64.

A solver is written as diffusers writes its scheduler's `step`, but over `Lin` values: linear
combinations of the current step's inputs (x, eps, D, z) and of values kept from earlier steps.
`build` runs it once over all steps, then gives each kept value a history slot for as long as a
later step reads it, and writes every step's combinations as the weights of fastddpm.solver_table.
The step's arithmetic is thereby exact float64, whatever order diffusers' float32 code takes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..solver_table import (
    COL_D,
    COL_EPS,
    COL_X,
    COL_Z,
    NUM_INPUTS,
    NUM_ROWS,
    ROW_D,
    ROW_KEEP_A,
    ROW_KEEP_B,
    ROW_X,
    SolverTable,
)

_INPUT_COLUMNS = {"x": COL_X, "eps": COL_EPS, "d": COL_D, "z": COL_Z}


class Lin:
    """A linear combination {symbol: float64 weight}: "x", "eps", "d", "z" of the current step, or
    an int, the id of a value kept from an earlier step."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict[str | int, float] | None = None) -> None:
        self.terms = {k: float(v) for k, v in (terms or {}).items() if v != 0}

    def __add__(self, other: Lin | int) -> Lin:
        if isinstance(other, int) and other == 0:  # sum() starts at 0
            return self
        terms = dict(self.terms)
        for k, v in other.terms.items():
            terms[k] = terms.get(k, 0.0) + v
        return Lin(terms)

    __radd__ = __add__

    def __neg__(self) -> Lin:
        return Lin({k: -v for k, v in self.terms.items()})

    def __sub__(self, other: Lin) -> Lin:
        return self + (-other)

    def __mul__(self, c: float) -> Lin:
        return Lin({k: v * float(c) for k, v in self.terms.items()})

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> Lin:
        return self * (1.0 / float(c))


X, EPS, D, Z = Lin({"x": 1.0}), Lin({"eps": 1.0}), Lin({"d": 1.0}), Lin({"z": 1.0})


@dataclass
class Step:
    """What one step of a solver computes: its x0 prediction `d` (a Lin of x and eps), at most two
    values to keep (`keep`), and x_next; the network's timestep t and input scale."""

    t: float
    d: Lin
    x_next: Lin
    input_scale: float = 1.0
    kept: list[tuple[int, Lin]] = field(default_factory=list)


class Steps:
    """The steps a solver program records, in its own order (diffusers' step_index 0, 1, ...)."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self._ids = itertools.count()
        self._pending: list[tuple[int, Lin]] = []

    def keep(self, value: Lin) -> Lin:
        """`value` (of this step's inputs) as a symbol later steps can read; at most two a step."""
        if len(self._pending) == 2:
            raise AssertionError("a solver step keeps at most two values")
        k = next(self._ids)
        self._pending.append((k, value))
        return Lin({k: 1.0})

    def add(self, t: float, d: Lin, x_next: Lin, input_scale: float = 1.0) -> None:
        """Record the step, with the values kept since the last one."""
        if set(d.terms) - {"x", "eps"}:
            raise AssertionError("D is a combination of x and eps only")
        self.steps.append(Step(t, d, x_next, input_scale, self._pending))
        self._pending = []


def _read_symbols(step: Step) -> set[int]:
    return {k for lin in (step.x_next, *(v for _, v in step.kept)) for k in lin.terms if isinstance(k, int)}


def _allocate(steps: list[Step]) -> tuple[dict[tuple[int, int], int], int]:
    """Each kept value's slot, per step written: {(step, id): slot}, and the number of slots. A
    value no later step reads gets none; a slot is free again at the last step that reads its
    value (the step reads before it writes)."""
    last_read: dict[int, int] = {}
    for k, step in enumerate(steps):
        for symbol in _read_symbols(step):
            last_read[symbol] = k
    holder: list[int | None] = []  # slot -> the id it holds
    where: dict[int, int] = {}
    slots = {}
    for k, step in enumerate(steps):
        for symbol, _ in step.kept:
            if symbol not in last_read:
                continue  # no later step reads it: it is not written
            free = [s for s, held in enumerate(holder) if held is None or last_read[held] <= k]
            taken = {where[sym] for sym, _ in step.kept if sym in where}
            free = [s for s in free if s not in taken]
            slot = free[0] if free else len(holder)
            if slot == len(holder):
                holder.append(None)
            holder[slot], where[symbol] = symbol, slot
            slots[(k, symbol)] = slot
    return slots, len(holder)


def _row(lin: Lin, where: dict[int, int], width: int) -> np.ndarray:
    """`lin` as a weights row, its kept values at their slots in `where` (those of earlier steps:
    a step reads its own inputs, not what it keeps)."""
    row = np.zeros(width, dtype=np.float64)
    for key, weight in lin.terms.items():
        if not isinstance(key, str) and key not in where:
            raise AssertionError(f"a step reads value {key}, which no earlier step kept")
        row[_INPUT_COLUMNS[key] if isinstance(key, str) else NUM_INPUTS + where[key]] += weight
    return row


def build(
    name: str,
    program: Callable[[Steps], None],
    *,
    init_scale: float = 1.0,
    final_draw: bool = False,
    device: torch.device | str = "cpu",
) -> SolverTable:
    """The SolverTable of the steps `program` records, in the loop's step-index order (row i is the
    program's step S-1-i)."""
    recorder = Steps()
    program(recorder)
    steps = recorder.steps
    slots, M = _allocate(steps)
    S, width = len(steps), NUM_INPUTS + M
    weights = np.zeros((S, NUM_ROWS, width), dtype=np.float64)
    dest = np.full((S, 2), -1, dtype=np.int64)
    where: dict[int, int] = {}  # id -> its slot, as of the step being written
    for k, step in enumerate(steps):
        i = S - 1 - k
        weights[i, ROW_D] = _row(step.d, where, width)
        weights[i, ROW_X] = _row(step.x_next, where, width)
        kept = [(symbol, value) for symbol, value in step.kept if (k, symbol) in slots]
        for j, (symbol, value) in enumerate(kept):
            weights[i, (ROW_KEEP_A, ROW_KEEP_B)[j]] = _row(value, where, width)
            dest[i, j] = slots[(k, symbol)]
        for symbol, _ in kept:  # visible from the next step on
            where[symbol] = slots[(k, symbol)]
    timesteps = np.array([s.t for s in steps][::-1], dtype=np.float64)
    scales = np.array([s.input_scale for s in steps][::-1], dtype=np.float64)
    return SolverTable.from_float64(name, weights, dest, timesteps, scales, init_scale, final_draw, device)
