"""multistep_update on every backend equals the reference within the contract's tolerance, in x_next
and in the history slots it writes: random SolverTables with M = 0, 1 and 3 slots, destinations
including -1 (not kept), a slot read and written in one step and both rows into one slot, D
clipped or not, passed-in noise and in-kernel Philox noise at (seed, offset) (seed and offset as
ints or device tensors), the step index as an int or a 0-d tensor; fused backends skip the slots
and z a step does not weigh, and a device step index outside the table gives NaN, writing nothing;
a CUDA graph replays the step with a new index; fastddpm.ops refuses bad inputs with one-line errors."""

import numpy as np
import pytest
import torch

from fastddpm import ops, reference
from fastddpm.cases import tolerance
from fastddpm.solver_table import (
    COL_D,
    COL_Z,
    NUM_INPUTS,
    NUM_ROWS,
    ROW_D,
    ROW_KEEP_A,
    ROW_X,
    SolverTable,
)

from .backends import needs_gpu
from .tolerance import assert_within_tolerance

FUSED = ["triton", "cuda"]
NOISE_BOUND = tolerance("ddpm_step", torch.float32)  # in-kernel z against reference.philox_normal
SHAPE = (2, 3, 5, 7)  # 210 elements: the last Philox group of the flat tensor is partial
SHAPES = [SHAPE, (2, 3, 4, 4)]  # CUDA: one element per thread; 16-byte vectors
SHAPE_IDS = ["elementwise", "vectors"]
DESTS = {  # M: dest (S, 2) of a 4-step table
    0: [[-1, -1]] * 4,
    1: [[0, -1], [-1, 0], [-1, -1], [0, -1]],
    3: [[1, 0], [2, -1], [-1, 2], [0, 1]],  # swaps (each slot read and written), -1 each side
}


def random_table(num_slots: int, device, *, seed: int = 0, stochastic: bool = True, dest=None) -> SolverTable:
    """A 4-step table, weights uniform in [-1, 1] (row D over x and eps only, as the reference reads
    it; no z weights unless stochastic), destinations DESTS[num_slots] unless given."""
    dest = np.array(DESTS[num_slots] if dest is None else dest)
    weights = np.random.default_rng(seed).uniform(-1.0, 1.0, (len(dest), NUM_ROWS, NUM_INPUTS + num_slots))
    weights[:, ROW_D, COL_D:] = 0.0
    if not stochastic:
        weights[:, :, COL_Z] = 0.0
    S = len(dest)
    return SolverTable.from_float64("random", weights, dest, np.arange(S), np.ones(S), 1.0, False, device)


def table_from(weights: np.ndarray, dest, device) -> SolverTable:
    S = len(dest)
    return SolverTable.from_float64(
        "given", weights, np.array(dest), np.arange(S), np.ones(S), 1.0, False, device
    )


def tensors(b, num_slots: int, shape=SHAPE, *, seed: int = 0):
    """x (std 1.5), eps, history (num_slots, *shape) and noise on b's device, float32."""
    g = torch.Generator().manual_seed(seed)
    x, eps, noise = (torch.randn(shape, generator=g) * s for s in (1.5, 1.0, 1.0))
    history = torch.randn((num_slots, *shape), generator=g)
    return [t.to(b.device) for t in (x, eps, history, noise)]


def noise_kwargs(kind: str, noise: torch.Tensor) -> dict:
    return {"tensor": {"noise": noise}, "seed": {"seed": 1234, "offset": 5}, "none": {}}[kind]


def reference_step(x, eps, history, i, tab, **kwargs):
    """(x_next, history after the step) of the reference, on the CPU, history copied."""
    history = history.cpu().clone()
    i = i.cpu() if isinstance(i, torch.Tensor) else i
    noise = kwargs.get("noise")
    kwargs = kwargs | ({"noise": noise.cpu()} if noise is not None else {})
    out = reference.multistep_update(x.cpu(), eps.cpu(), history, i, tab.to("cpu"), **kwargs)
    return out, history


def check(b, x, eps, history, i, tab, **kwargs):
    """The backend's step on a copy of history equals the reference's in x_next and every slot."""
    mine = history.clone()
    out = b.multistep_update(x, eps, mine, i, tab, **kwargs)
    assert (out.dtype, out.device, out.shape) == (x.dtype, x.device, x.shape)
    ref_out, ref_history = reference_step(x, eps, history, i, tab, **kwargs)
    assert_within_tolerance(out, ref_out, "multistep_update", torch.float32)
    if history.shape[0]:
        assert_within_tolerance(mine, ref_history, "multistep_update", torch.float32)
    return out, mine


# --- the contract -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_slots", [0, 1, 3])
@pytest.mark.parametrize("clip_x0", [False, True], ids=["direct", "clip"])
@pytest.mark.parametrize("noise_from", ["tensor", "seed"])
@pytest.mark.parametrize("index", ["int", "tensor"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_equals_reference(backend, num_slots, clip_x0, noise_from, index, shape):
    tab = random_table(num_slots, backend.device)
    x, eps, history, noise = tensors(backend, num_slots, shape)
    for i in range(len(tab)):
        step = torch.tensor(i, device=backend.device) if index == "tensor" else i
        check(backend, x, eps, history, step, tab, clip_x0=clip_x0, **noise_kwargs(noise_from, noise))


def test_slots_not_written_keep_their_values(backend):
    """Only the slots dest[i] change; a step of dest (-1, -1) changes none."""
    tab = random_table(3, backend.device)
    x, eps, history, noise = tensors(backend, 3, seed=1)
    _, after = check(backend, x, eps, history, 1, tab, noise=noise)  # dest (2, -1)
    assert torch.equal(after[:2], history[:2]) and not torch.equal(after[2], history[2])
    tab = random_table(3, backend.device, dest=[[-1, -1]])
    _, after = check(backend, x, eps, history, 0, tab, noise=noise)
    assert torch.equal(after, history)


def test_a_table_without_noise_needs_neither_noise_nor_seed(backend):
    tab = random_table(1, backend.device, stochastic=False)
    assert not tab.stochastic
    x, eps, history, _ = tensors(backend, 1, seed=2)
    check(backend, x, eps, history, 0, tab)


def test_step_index_tensor_equals_int_bit_for_bit(backend):
    tab = random_table(3, backend.device)
    x, eps, history, noise = tensors(backend, 3, seed=3)
    for i in range(len(tab)):
        by_int, by_tensor = history.clone(), history.clone()
        out_int = backend.multistep_update(x, eps, by_int, i, tab, seed=7, offset=2)
        for dtype in (torch.int64, torch.int32):
            step = torch.tensor(i, dtype=dtype, device=backend.device)
            by_tensor = history.clone()
            assert torch.equal(
                backend.multistep_update(x, eps, by_tensor, step, tab, seed=7, offset=2), out_int
            )
            assert torch.equal(by_tensor, by_int)


@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
@pytest.mark.parametrize("num_slots", [0, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cuda_equals_the_reference_bit_for_bit_with_z_given(backend, num_slots, shape):
    """The CUDA kernel sums each row column by column without fused multiply-adds, as the
    reference does: with z passed in, x_next and the slots are the reference's exactly."""
    tab = random_table(num_slots, backend.device)
    x, eps, history, noise = tensors(backend, num_slots, shape, seed=9)
    for i in range(len(tab)):
        for clip_x0 in (False, True):
            mine = history.clone()
            out = backend.multistep_update(x, eps, mine, i, tab, noise=noise, clip_x0=clip_x0)
            ref_out, ref_history = reference_step(x, eps, history, i, tab, noise=noise, clip_x0=clip_x0)
            assert torch.equal(out.cpu(), ref_out) and torch.equal(mine.cpu(), ref_history)


@pytest.mark.parametrize("backend", FUSED, indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_unweighted_slots_and_noise_are_not_read(backend, shape):
    """A slot no row weighs, and z where no row weighs it, are never loaded: NaN there leaves the
    step finite (the reference's 0 * NaN would not be), equal to the step with those inputs 0."""
    weights = np.random.default_rng(4).uniform(-1.0, 1.0, (2, NUM_ROWS, NUM_INPUTS + 3))
    weights[:, ROW_D, COL_D:] = 0.0
    weights[:, :, NUM_INPUTS + 1] = 0.0  # slot 1: never weighed
    weights[1, :, COL_Z] = 0.0  # step 1 adds no noise
    tab = table_from(weights, [[0, 2], [2, 1]], backend.device)
    x, eps, history, noise = tensors(backend, 3, shape, seed=5)
    poisoned = history.clone()
    poisoned[1] = float("nan")
    zeroed = history.clone()
    zeroed[1] = 0.0
    nan_noise = torch.full_like(noise, float("nan"))
    for i, kw in ((0, {"noise": noise}), (0, {"seed": 3}), (1, {"noise": nan_noise}), (1, {"seed": 3})):
        mine = poisoned.clone()
        out = backend.multistep_update(x, eps, mine, i, tab, **kw)
        assert not out.isnan().any()
        ref_kw = {"noise": torch.zeros_like(noise)} if i == 1 and "noise" in kw else kw
        ref_out, ref_history = reference_step(x, eps, zeroed, i, tab, **ref_kw)
        assert_within_tolerance(out, ref_out, "multistep_update", torch.float32)
        written = [s for s in tab.dest[i].tolist() if s >= 0]
        assert_within_tolerance(mine[written], ref_history[written], "multistep_update", torch.float32)


@pytest.mark.parametrize("backend", FUSED, indirect=True)
@pytest.mark.parametrize("i", [4, -1, 2**40], ids=["past-end", "negative", "far"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_step_index_outside_the_table_gives_nan_and_writes_nothing(backend, i, shape):
    """A device step index cannot be range-checked without a host sync (fastddpm.ops checks a CPU
    one, so this calls the backend's op itself): x_next is all NaN and no slot is written."""
    tab = random_table(3, backend.device)
    x, eps, history, noise = tensors(backend, 3, shape, seed=6)
    for kw in ({"noise": noise}, {"seed": 1}):
        mine = history.clone()
        out = backend.unchecked("multistep_update")(
            x, eps, mine, torch.tensor(i, device=backend.device), tab, **kw
        )
        assert out.isnan().all()
        assert torch.equal(mine, history)


# --- in-kernel noise ------------------------------------------------------------------------------


def noise_table(device) -> SolverTable:
    """One step with x_next = z and keep_a = z into slot 0: the step of any input returns z."""
    weights = np.zeros((1, NUM_ROWS, NUM_INPUTS + 1))
    weights[0, ROW_X, COL_Z] = weights[0, ROW_KEEP_A, COL_Z] = 1.0
    return table_from(weights, [[0, -1]], device)


@pytest.mark.parametrize(
    "shape", [(3, 4, 6, 5), (3, 5, 3, 3), (1, 1, 1, 3)], ids=["groups", "ragged", "tiny"]
)
@pytest.mark.parametrize("seed, offset", [(0, 0), (2**64 - 1, 2**32 + 9), (12345, 2**63)])
def test_in_kernel_noise_is_philox(backend, shape, seed, offset):
    """z equals reference.philox_normal element for element (as ddpm_step's does), and is the same
    for the same (seed, offset); seed and offset as 0-d int64 device tensors give it bit for bit."""
    tab = noise_table(backend.device)
    x = torch.zeros(shape, device=backend.device)
    history = torch.zeros((1, *shape), device=backend.device)
    z = backend.multistep_update(x, x, history, 0, tab, seed=seed, offset=offset)
    assert (z.cpu() - reference.philox_normal(seed, offset, shape)).abs().max().item() <= NOISE_BOUND
    assert torch.equal(history[0], z)
    as_tensors = {
        k: torch.tensor(ops.uint64_as_int64(v), device=backend.device)
        for k, v in (("seed", seed), ("offset", offset))
    }
    assert torch.equal(backend.multistep_update(x, x, history, 0, tab, **as_tensors), z)
    other = backend.multistep_update(x, x, history, 0, tab, seed=seed, offset=(offset + 1) % 2**64)
    assert (other != z).float().mean().item() > 0.9


# --- the input checks of fastddpm.ops -------------------------------------------------------------


_X = torch.randn(SHAPE)
_META = torch.device("meta")
BAD_INPUTS = {  # name: (what replaces the good arguments, the error it must raise)
    "x dtype": ({"x": _X.half()}, "x has dtype torch.float16; multistep_update takes float32"),
    "eps layout": ({"eps": _X.contiguous(memory_format=torch.channels_last)}, "eps must be contiguous"),
    "x 3-D": ({"x": _X[0], "eps": _X[0]}, r"x and eps must be 4-D of one shape"),
    "eps shape": ({"eps": _X[:1]}, r"x and eps must be 4-D of one shape"),
    "history slots": ({"history": torch.zeros(2, *SHAPE)}, r"history must have shape \(3, 2, 3, 5, 7\)"),
    "history dtype": ({"history": torch.zeros(3, *SHAPE).double()}, "history has dtype torch.float64"),
    "history device": ({"history": torch.zeros(3, *SHAPE, device=_META)}, "history is on device meta but x"),
    "table device": ({"table": random_table(3, _META)}, "the solver table is on meta but x is on cpu"),
    "i range": ({"i": 4}, r"the step index i=4 is out of range: the table has steps 0..3"),
    "i tensor range": ({"i": torch.tensor(-1)}, "the step index i is out of range"),
    "i shape": ({"i": torch.tensor([1])}, r"i must be an int or a tensor of shape \(\), got shape \(1,\)"),
    "i float": ({"i": torch.tensor(1.0)}, "the step index i must be an integer tensor"),
    "noise and seed": ({"seed": 3}, "pass exactly one of noise= or seed="),
    "neither": ({"noise": None}, "pass exactly one of noise= or seed="),
    "noise shape": ({"noise": _X[:1]}, r"noise must have shape \(2, 3, 5, 7\)"),
    "noise dtype": ({"noise": _X.double()}, "noise has dtype torch.float64"),
    "seed range": ({"noise": None, "seed": 2**64}, r"seed must be in \[0, 2\*\*64\)"),
    "offset dtype": ({"noise": None, "seed": 1, "offset": torch.tensor(1).int()}, "offset must be an int64"),
    "seed device": ({"noise": None, "seed": torch.tensor(1, device=_META)}, "seed is on device meta but x"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_raise_one_line_value_errors(name):
    changes, message = BAD_INPUTS[name]
    x, eps, noise = (torch.randn(SHAPE) for _ in range(3))
    good = {"history": torch.zeros(3, *SHAPE), "i": 1, "table": random_table(3, "cpu"), "noise": noise}
    args = {"x": x, "eps": eps} | good | changes
    positional = [args.pop(k) for k in ("x", "eps", "history", "i", "table")]
    with pytest.raises(ValueError, match=message) as caught:
        ops.multistep_update(*positional, backend="torch", **args)
    assert "\n" not in str(caught.value)


def test_the_triton_kernel_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from fastddpm.kernels import _common

    step = ops.backend_op("triton", "multistep_update")
    monkeypatch.setattr(_common, "INTERPRET", False)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"multistep_update \(backend 'triton'\): x is on cpu; .*CUDA"):
        step(x, x, torch.zeros(3, *SHAPE), 0, random_table(3, "cpu"), noise=x)


# --- CUDA graphs, on a GPU ------------------------------------------------------------------------


@pytest.mark.gpu
def test_step_in_a_cuda_graph_replays_with_a_new_index(backend):
    """Captured once with i a device tensor, replayed for each step: each replay equals the eager
    step bit for bit (x_next and the history it writes) and the reference."""
    needs_gpu(backend)
    tab = random_table(3, backend.device)
    x, eps, history, _ = tensors(backend, 3, (16, 3, 32, 32), seed=8)
    i = torch.zeros((), dtype=torch.long, device=backend.device)
    live = history.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        backend.multistep_update(x, eps, live, i, tab, seed=11, offset=4)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = backend.multistep_update(x, eps, live, i, tab, seed=11, offset=4)
    for step in (3, 2, 1, 0):
        before = live.clone()
        i.fill_(step)
        graph.replay()
        eager = before.clone()
        assert torch.equal(captured, backend.multistep_update(x, eps, eager, step, tab, seed=11, offset=4))
        assert torch.equal(live, eager)
        ref_out, ref_history = reference_step(x, eps, before, step, tab, seed=11, offset=4)
        assert_within_tolerance(captured, ref_out, "multistep_update", torch.float32)
        assert_within_tolerance(live, ref_history, "multistep_update", torch.float32)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_compile_fullgraph_traces_the_step_and_keeps_its_writes(backend):
    """torch.compile(fullgraph=True) keeps the Triton step in one graph (its custom op declares that
    it writes history), and the compiled step writes the slots as the eager one does."""
    tab = random_table(3, backend.device)
    x, eps, history, noise = tensors(backend, 3, seed=10)

    def step(x, eps, history):
        return backend.multistep_update(x, eps, history, 0, tab, noise=noise) * 2.0

    torch._dynamo.reset()
    eager, compiled = history.clone(), history.clone()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, eps, compiled)
    torch._dynamo.reset()
    assert torch.equal(out, step(x, eps, eager)) and torch.equal(compiled, eager)
    assert not torch.equal(compiled, history)
