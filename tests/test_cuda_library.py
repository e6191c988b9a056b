"""The CUDA library (csrc/) on a machine without a GPU: it was built by `pip install -e .`
wherever nvcc exists, compiled cleanly for sm_80 and sm_90, loads with ctypes, exports
exactly its C ABI, and every entry point returns a status code and a message for bad
input without touching a device. Its Philox code runs on the host against the reference.

Running the kernels needs a GPU: tests/test_cuda_ops.py.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastddpm import cuda, ops, reference
from fastddpm.custom_ops import StepArgs
from fastddpm.schedule import StepTable

from . import cuda_cases

ROOT = Path(__file__).parent.parent
BUILD_DIR = ROOT / "build" / "cuda"
FAKE = 0x1000  # a non-null device address: the checks under test fail before anything reads it


def nvcc_path() -> str | None:
    """Where setup.py looks for nvcc (PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin)."""
    candidates = [shutil.which("nvcc")]
    candidates += [
        os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ
    ]
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    loaded = cuda.load_library()
    if isinstance(loaded, str):
        if nvcc_path() is not None and os.environ.get("FASTDDPM_BUILD_CUDA") != "0":
            pytest.fail(
                f"nvcc is at {nvcc_path()}, so `pip install -e .` must have built the library: {loaded}"
            )
        pytest.skip(f"no nvcc here, so the package installed without the CUDA library: {loaded}")
    return loaded


def last_error(lib) -> str:
    return lib.fastddpm_last_error().decode()


def test_built_wherever_nvcc_exists(lib):
    assert cuda.library_path().is_file()
    assert lib.fastddpm_abi_version() == cuda.ABI_VERSION


def test_compiled_for_sm80_and_sm90_with_ptx(lib):
    targets = lib.fastddpm_build_targets().decode().split()
    assert {"sm_80", "sm_90"} <= set(targets), targets
    assert any(t.startswith("compute_") for t in targets), f"no PTX for newer GPUs in {targets}"
    info = lib.fastddpm_build_info().decode()
    assert info.startswith("fastddpm-cuda ") and "CUDA 1" in info and " ".join(targets) in info


def test_compile_had_no_warnings(lib):
    """setup.py keeps each object's nvcc/ptxas/gcc diagnostics in build/cuda/<object>.o.log."""
    logs = sorted(BUILD_DIR.glob("*.o.log"))
    if not logs:
        pytest.skip(f"no build logs in {BUILD_DIR} (the library was built elsewhere)")
    messages = {log.name: log.read_text() for log in logs if log.read_text().strip()}
    assert not messages, "the CUDA library compiled with diagnostics:\n" + "\n".join(
        f"--- {name}\n{text}" for name, text in messages.items()
    )


def ninja_binary() -> str | None:
    """The ninja setup.py builds with: the `ninja` package's, else PATH's."""
    try:
        import ninja

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        return shutil.which("ninja")


def ninja_log_header(ninja: str, folder: Path) -> str:
    """The first line of the .ninja_log this ninja writes (versions record command lines differently)."""
    (folder / "build.ninja").write_text("rule touch\n  command = touch $out\nbuild out: touch\n")
    subprocess.run([ninja, "-C", str(folder)], capture_output=True, check=True)
    return (folder / ".ninja_log").read_text().splitlines()[0]


def test_a_rebuild_happens_only_when_sources_change(lib, tmp_path):
    ninja = ninja_binary()
    if ninja is None or not (BUILD_DIR / ".ninja_log").is_file():
        pytest.skip("no ninja, or no build/cuda/.ninja_log (the library was built elsewhere)")
    built_with = (BUILD_DIR / ".ninja_log").read_text().splitlines()[0]
    if ninja_log_header(ninja, tmp_path) != built_with:
        pytest.skip(f"{ninja} is not the ninja version that built the library ({built_with})")
    dry_run = subprocess.run([ninja, "-C", str(BUILD_DIR), "-n"], capture_output=True, text=True)
    assert dry_run.returncode == 0, dry_run.stderr
    assert "no work to do" in dry_run.stdout, dry_run.stdout


def test_exports_exactly_the_c_abi(lib):
    for name in cuda.EXPORTED_SYMBOLS:
        assert hasattr(lib, name), name
    # the statically linked CUDA runtime stays private: it cannot clash with torch's
    for private in ("cudaMalloc", "cudaLaunchKernel", "_ZN8fastddpm3abi4failEiPKcz"):
        assert not hasattr(lib, private), private


def test_status_names_and_last_error(lib):
    names = [lib.fastddpm_status_name(s).decode() for s in range(5)]
    assert names == [
        "FASTDDPM_SUCCESS",
        "FASTDDPM_ERROR_INVALID_VALUE",
        "FASTDDPM_ERROR_NOT_SUPPORTED",
        "FASTDDPM_ERROR_CUDA",
        "FASTDDPM_ERROR_INTERNAL",
    ]
    assert lib.fastddpm_status_name(99) == b"unknown status"
    out = (ctypes.c_float * 1)()
    assert lib.fastddpm_philox_normal_host(0, 0, -1, out) == cuda.ERROR_INVALID_VALUE
    assert last_error(lib) == "n = -1 is negative"
    assert lib.fastddpm_philox_normal_host(0, 0, 1, out) == cuda.SUCCESS
    assert last_error(lib) == "", "a successful call clears the last error"


# --- every op's error paths: null pointers, bad sizes, unsupported dtypes -------------------------


def group_norm(lib, **changes) -> int:
    args = dict(
        x=FAKE, add=None, weight=FAKE, bias=FAKE, y=FAKE, workspace=None, workspace_bytes=0,
        N=2, C=64, H=8, W=8, G=32, eps=1e-6, silu=1, channels_last=0, dtype=0, add_dtype=0, param_dtype=0,
        stream=None,
    )  # fmt: skip
    args.update(changes)
    return lib.fastddpm_group_norm_silu(*args.values())


@pytest.mark.parametrize(
    "changes, status, message",
    [
        ({"x": None}, cuda.ERROR_INVALID_VALUE, "x is a null pointer"),
        ({"weight": None}, cuda.ERROR_INVALID_VALUE, "weight is a null pointer"),
        ({"bias": None}, cuda.ERROR_INVALID_VALUE, "bias is a null pointer"),
        ({"y": None}, cuda.ERROR_INVALID_VALUE, "y is a null pointer"),
        ({"N": -1}, cuda.ERROR_INVALID_VALUE, "N = -1 is negative"),
        ({"G": 0}, cuda.ERROR_INVALID_VALUE, "num_groups = 0 must be positive and divide C = 64"),
        ({"G": 24}, cuda.ERROR_INVALID_VALUE, "num_groups = 24 must be positive and divide C = 64"),
        (
            {"C": 4096, "G": 1},
            cuda.ERROR_NOT_SUPPORTED,
            "4096 channels per group; the kernel takes at most 2048",
        ),
        ({"dtype": 3}, cuda.ERROR_NOT_SUPPORTED, "dtype = 3 is not a supported dtype"),
        ({"param_dtype": -1}, cuda.ERROR_NOT_SUPPORTED, "param_dtype = -1 is not a supported dtype"),
        ({"add": FAKE, "add_dtype": 9}, cuda.ERROR_NOT_SUPPORTED, "add_dtype = 9 is not a supported dtype"),
        # one sample of a 256x256 LSUN activation splits its groups over blocks: a workspace is due
        ({"N": 1, "C": 128, "H": 256, "W": 256}, cuda.ERROR_INVALID_VALUE, "need a workspace of"),
    ],
)
def test_group_norm_silu_rejects_bad_input(lib, changes, status, message):
    assert group_norm(lib, **changes) == status
    assert message in last_error(lib)


def test_group_norm_silu_workspace_size(lib):
    size = ctypes.c_size_t(1)
    assert lib.fastddpm_group_norm_silu_workspace_size(64, 128, 32, 32, 32, ctypes.byref(size)) == 0
    assert size.value == 0, "CIFAR10 at batch 64: no group split over blocks, no workspace"
    assert lib.fastddpm_group_norm_silu_workspace_size(1, 128, 256, 256, 32, ctypes.byref(size)) == 0
    assert size.value > 0 and size.value % 8 == 0
    assert lib.fastddpm_group_norm_silu_workspace_size(1, 128, 256, 256, 32, None) == cuda.ERROR_INVALID_VALUE
    assert "bytes is a null pointer" in last_error(lib)


# --- the compiled sm_90 code: the channels_last GroupNorm moves 16 bytes per access ------------


def disassembler() -> list[str] | None:
    """A SASS dump command: cuobjdump beside nvcc or on PATH, else the one bundled with Triton."""
    found = [os.path.join(os.path.dirname(nvcc_path() or ""), "cuobjdump"), shutil.which("cuobjdump")]
    try:
        from triton.backends.nvidia import __file__ as triton_nvidia

        found.append(os.path.join(os.path.dirname(triton_nvidia), "bin", "cuobjdump"))
    except ImportError:
        pass
    tool = next((t for t in found if t and os.access(t, os.X_OK)), None)
    return None if tool is None else [tool, "-sass"]


def kernel_bodies(listing: str, start: str, name: str) -> dict[str, str]:
    """The text of each function whose header line contains `start` and whose name contains
    `name`, by mangled name."""
    bodies, current = {}, None
    for line in listing.splitlines():
        if start in line:
            current = next((w.strip("(") for w in line.split() if name in w), None)
            if current is not None:
                bodies[current] = ""
        elif current is not None:
            bodies[current] += line + "\n"
    return bodies


NHWC_KERNEL = "group_norm_silu_nhwc_kernel"
ITEMS = {"If": 8, "I6__half": 4, "I13__nv_bfloat16": 4}  # 16-byte vectors per thread (32 elements)


def nhwc_kernel_items(name: str) -> tuple[int, int]:
    """(vectors per thread, mode) of a mangled group_norm_silu_nhwc_kernel<T, MODE> name."""
    args = name.split(NHWC_KERNEL)[1]
    items = next(n for prefix, n in ITEMS.items() if args.startswith(prefix + "Li"))
    return items, int(args.split("Li")[1][0])


@pytest.fixture(scope="module")
def group_norm_sm90(tmp_path_factory) -> Path:
    nvcc = nvcc_path()
    if nvcc is None:
        pytest.skip("no nvcc to compile csrc/group_norm_silu.cu for sm_90")
    out = tmp_path_factory.mktemp("sm90")
    flags = ["-std=c++17", "-O3", "-arch=sm_90", f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc'}"]
    for kind in ("-ptx", "-cubin"):
        target = out / f"group_norm_silu.{kind[1:]}"
        subprocess.run(
            [nvcc, *flags, kind, str(ROOT / "csrc/group_norm_silu.cu"), "-o", str(target)], check=True
        )
    return out


def check_nhwc_accesses(bodies: dict[str, str], load: str, stores: str, store: str, narrow_load: str) -> None:
    """Each kernel: a 16-byte load of x per vector a thread holds (`items`, unrolled; the compiler
    may duplicate a loop, e.g. one copy with SiLU and one without, so at least that many);
    fused and apply: every global store (mnemonics starting with `stores`) is a 16-byte `store`
    of y; fused: no 8-byte `narrow_load`."""
    assert len(bodies) == 9, f"expected 3 dtypes x 3 modes of {NHWC_KERNEL}: {sorted(bodies)}"
    for name, body in bodies.items():
        items, mode = nhwc_kernel_items(name)
        assert body.count(load) >= items, f"{name}: {body.count(load)} 16-byte loads of x, want {items}"
        if mode != 1:  # fused and apply write y; the statistics kernel writes (mean, M2) pairs
            found = [w for w in body.split() if w.startswith(stores)]
            assert all(w.startswith(store) for w in found), f"{name}: stores {set(found)}"
            assert len(found) >= items, f"{name}: {len(found)} stores of y, want {items}"
        if mode == 0:  # nothing else in the fused kernel is 8 bytes wide: x never moves in halves
            assert narrow_load not in body, f"{name} loads 8 bytes at a time"


def test_nhwc_group_norm_loads_and_stores_16_bytes_in_sm90_ptx(group_norm_sm90):
    ptx = (group_norm_sm90 / "group_norm_silu.ptx").read_text()
    bodies = kernel_bodies(ptx, ".entry", NHWC_KERNEL)
    bodies = {name: body.replace("ld.global.nc.v4", "ld.global.v4") for name, body in bodies.items()}
    check_nhwc_accesses(bodies, "ld.global.v4.", "st.global", "st.global.v4.", "ld.global.v2.")


def test_nhwc_group_norm_loads_and_stores_16_bytes_in_sm90_sass(group_norm_sm90):
    tool = disassembler()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton) to read the SASS; the PTX test still runs")
    sass = subprocess.run(
        [*tool, str(group_norm_sm90 / "group_norm_silu.cubin")], capture_output=True, text=True, check=True
    ).stdout
    bodies = kernel_bodies(sass, "Function :", NHWC_KERNEL)
    bodies = {name: body.replace("LDG.E.128.CONSTANT", "LDG.E.128") for name, body in bodies.items()}
    check_nhwc_accesses(bodies, "LDG.E.128 ", "STG", "STG.E.128", "LDG.E.64 ")


def attention(lib, **changes) -> int:
    strides = (ctypes.c_int64 * 3)(64 * 256, 64 * 256, 64)
    args = dict(
        q=FAKE, k=FAKE, v=FAKE, o=FAKE, B=2, heads=1, Lq=256, Lk=256, D=64,
        q_strides=strides, k_strides=strides, v_strides=strides, scale=0.125, dtype=1, stream=None,
    )  # fmt: skip
    args.update(changes)
    return lib.fastddpm_attention(*args.values())


@pytest.mark.parametrize(
    "changes, status, message",
    [
        ({"q": None}, cuda.ERROR_INVALID_VALUE, "q is a null pointer"),
        ({"k": None}, cuda.ERROR_INVALID_VALUE, "k is a null pointer"),
        ({"v": None}, cuda.ERROR_INVALID_VALUE, "v is a null pointer"),
        ({"o": None}, cuda.ERROR_INVALID_VALUE, "o is a null pointer"),
        ({"q_strides": None}, cuda.ERROR_INVALID_VALUE, "q_strides is a null pointer"),
        ({"Lk": -5}, cuda.ERROR_INVALID_VALUE, "Lk = -5 is negative"),
        ({"D": 513}, cuda.ERROR_NOT_SUPPORTED, "head dim D = 513; the kernels take D <= 512"),
        ({"Lq": 65535 * 16 + 1}, cuda.ERROR_NOT_SUPPORTED, "exceeds the kernels' 1048560 query positions"),
        ({"dtype": 5}, cuda.ERROR_NOT_SUPPORTED, "dtype = 5 is not a supported dtype"),
    ],
)
def test_attention_rejects_bad_input(lib, changes, status, message):
    assert attention(lib, **changes) == status
    assert message in last_error(lib)


def ddpm_step(lib, **changes) -> int:
    args = dict(
        x=FAKE, eps=FAKE, noise=None, out=FAKE, coef=FAKE, num_steps=1000, t=None, t_numel=0, t_host=999,
        noise_mode=cuda.NOISE_PHILOX, noise_dtype=0, seed=2**64 - 1, offset=7, seed_device=None,
        offset_device=None, clip_x0=1,
        N=2, C=3, H=32, W=32, channels_last=0, dtype=0, stream=None,
    )  # fmt: skip
    args.update(changes)
    return lib.fastddpm_ddpm_step(*args.values())


@pytest.mark.parametrize(
    "changes, status, message",
    [
        ({"x": None}, cuda.ERROR_INVALID_VALUE, "x is a null pointer"),
        ({"eps": None}, cuda.ERROR_INVALID_VALUE, "eps is a null pointer"),
        ({"out": None}, cuda.ERROR_INVALID_VALUE, "out is a null pointer"),
        ({"coef": None}, cuda.ERROR_INVALID_VALUE, "coef is a null pointer"),
        ({"noise_mode": cuda.NOISE_TENSOR}, cuda.ERROR_INVALID_VALUE, "noise is a null pointer"),
        (
            {"noise_mode": 3},
            cuda.ERROR_INVALID_VALUE,
            "noise_mode = 3 is not 0 (none), 1 (tensor) or 2 (philox)",
        ),
        ({"t_host": 1000}, cuda.ERROR_INVALID_VALUE, "t_host = 1000 is outside the step table's 0..999"),
        ({"t": FAKE, "t_numel": 3}, cuda.ERROR_INVALID_VALUE, "t_numel = 3 must be 1 or N = 2"),
        ({"num_steps": 0}, cuda.ERROR_INVALID_VALUE, "num_steps = 0: the step table is empty"),
        ({"W": -32}, cuda.ERROR_INVALID_VALUE, "W = -32 is negative"),
        ({"dtype": 4}, cuda.ERROR_NOT_SUPPORTED, "dtype = 4 is not a supported dtype"),
        (
            {"noise_mode": cuda.NOISE_TENSOR, "noise": FAKE, "noise_dtype": 8},
            cuda.ERROR_NOT_SUPPORTED,
            "noise_dtype",
        ),
    ],
)
def test_ddpm_step_rejects_bad_input(lib, changes, status, message):
    assert ddpm_step(lib, **changes) == status
    assert message in last_error(lib)


def test_empty_problems_launch_nothing(lib):
    """Zero elements: success without a CUDA call, so even null data pointers pass."""
    assert group_norm(lib, N=0, x=None, y=None) == cuda.SUCCESS
    assert attention(lib, B=0, q=None, o=None) == cuda.SUCCESS
    assert ddpm_step(lib, N=0, x=None, out=None) == cuda.SUCCESS


def test_check_device_reports_the_missing_gpu(lib):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: tests/test_cuda_ops.py checks the device")
    assert lib.fastddpm_check_device() == cuda.ERROR_CUDA
    assert last_error(lib).startswith("no usable CUDA device: ")


# --- the host copy of the in-kernel noise ------------------------------------------------------


@pytest.mark.parametrize(
    "seed, offset, n", [(0, 0, 10), (123, 5, 1001), (2**64 - 1, 2**63 + 5, 7), (7, 2**32, 4)]
)
def test_philox_noise_equals_the_reference(lib, seed, offset, n):
    """csrc/include/fastddpm/philox.cuh, run on the CPU: the counter layout and rounds the
    kernels use give reference.philox_normal's noise."""
    host = cuda.philox_normal_host(seed, offset, n)
    torch.testing.assert_close(host, reference.philox_normal(seed, offset, (n,)), rtol=0, atol=1e-6)


# --- the Python side on a CPU-only machine -----------------------------------------------------


def test_backend_says_why_it_cannot_run(lib):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    reason = cuda.unavailable_reason()
    assert reason.startswith(f"the CUDA library is built for {lib.fastddpm_build_targets().decode()} but")
    assert "no CUDA device is visible" in reason
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' is not available.*no CUDA device"):
        ops.group_norm_silu(x, torch.ones(8), torch.zeros(8), 4, backend="cuda")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_an_unbuilt_library_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDDPM_CUDA_LIBRARY", str(tmp_path / "libfastddpm_cuda.so"))
    cuda.load_library.cache_clear()
    try:
        assert cuda.unavailable_reason().startswith("the CUDA library (csrc/) is not built")
        assert cuda.library_info()["error"] == cuda.unavailable_reason()
    finally:
        monkeypatch.undo()
        cuda.load_library.cache_clear()


def test_cpu_tensors_are_refused_with_a_reason():
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(
        ValueError, match="the cuda backend's group_norm_silu runs on CUDA tensors; x is on cpu"
    ):
        cuda.group_norm_silu.group_norm_silu(x, torch.ones(8), torch.zeros(8), 4)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="attention runs on CUDA tensors; q is on cpu"):
        cuda.attention.attention(q, q, q)


def test_fake_implementations_trace_without_a_gpu(lib):
    """The custom ops' fake kernels give torch.compile the output's shape, dtype and layout."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 64, 8, 8, device="cuda", dtype=torch.bfloat16).to(
            memory_format=torch.channels_last
        )
        w = torch.empty(64, device="cuda")
        y = torch.ops.fastddpm_cuda.group_norm_silu(x, w, w, 32, 1e-6, True, None)
        assert (
            y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
        )
        q = torch.empty(2, 4, 256, 8, device="cuda", dtype=torch.float16)
        o = torch.ops.fastddpm_cuda.attention(q, q, q, 0.25)
        assert o.shape == q.shape and o.dtype == q.dtype
        coef = torch.empty(1000, 7, device="cuda")
        xt = torch.empty(2, 3, 32, 32, device="cuda")
        offset = torch.empty((), dtype=torch.int64, device="cuda")
        args = StepArgs(
            x_t=xt, eps=xt, i_tensor=None, i_int=5, coefficients=coef, stochastic=True, noise=None,
            seed_words=[1, 0, 0, 0], seed_tensor=None, offset_tensor=offset, clip_x0=True,
        )  # fmt: skip
        out = torch.ops.fastddpm_cuda.ddpm_step(*args)
        assert out.shape == xt.shape and out.device.type == "cuda"


# --- the kernels themselves, on the host emulator (csrc/tools/emulator) --------------------------
# The same csrc/*.cu, compiled by g++ against headers that run each CUDA thread as a fiber, with
# warp collectives, ldmatrix and mma.sync per the PTX ISA's fragment layouts, and cp.async
# landing only at wait_group (or at issue). This checks the kernels' indexing, tiling, masking,
# reductions and synchronization on every machine; speed and the hardware itself need a GPU
# (tests/test_cuda_ops.py runs these cases there).


@pytest.fixture(scope="module")
def emulated() -> cuda_cases.EmulatedRunner:
    return cuda_cases.EmulatedRunner(cuda.open_library(cuda_cases.build_emulator()))


# How the emulator interleaves warps: in lockstep, or one warp running ahead of the others (or
# behind them) between barriers, which turns a missing __syncthreads into a wrong result.
SCHEDULES = ["lockstep", "forward", "reverse"]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", cuda_cases.DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape, groups", cuda_cases.GROUP_NORM_SHAPES)
def test_emulated_group_norm_silu(emulated, shape, groups, dtype, channels_last, schedule, monkeypatch):
    monkeypatch.setenv("FASTDDPM_EMU_SCHEDULE", schedule)
    cuda_cases.check_group_norm_silu(emulated, shape, groups, dtype, channels_last)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", cuda_cases.DTYPES, ids=str)
@pytest.mark.parametrize("shape, groups", cuda_cases.NHWC_GROUP_NORM_SHAPES)
def test_emulated_group_norm_silu_nhwc_tiles(emulated, shape, groups, dtype, schedule, monkeypatch):
    monkeypatch.setenv("FASTDDPM_EMU_SCHEDULE", schedule)
    cuda_cases.check_group_norm_silu(emulated, shape, groups, dtype, True)


@pytest.mark.parametrize("dtype", cuda_cases.DTYPES, ids=str)
@pytest.mark.parametrize(
    "variant",
    [{"silu": False, "with_add": False}, {"misaligned": True}, {"param_dtype": torch.float32}],
    ids=["nosilu-noadd", "misaligned", "fp32-params"],
)
@pytest.mark.parametrize("shape, groups", [((1, 128, 8, 8), 32), ((1, 384, 4, 4), 32), ((1, 32, 48, 48), 8)])
def test_emulated_group_norm_silu_nhwc_tile_variants(emulated, shape, groups, variant, dtype):
    cuda_cases.check_group_norm_silu(emulated, shape, groups, dtype, True, **variant)


@pytest.mark.parametrize("dtype", cuda_cases.DTYPES, ids=str)
def test_group_norm_nhwc_blocks_take_many_groups_in_16_byte_vectors(emulated, dtype):
    """channels_last: a block normalizes several whole groups, loading 16 bytes along C (it took
    one group of 4 channels, 8-byte loads at a stride of C in 16-bit, before); NCHW keeps one group
    per block; where no 16-byte layout exists the element-wise kernel runs."""
    plan = functools.partial(cuda.group_norm_silu_plan, emulated.lib, dtype=dtype)
    elem = dtype.itemsize
    cifar = plan((256, 128, 32, 32), 32, True)
    assert cifar["vector_bytes"] == 16 and cifar["groups_per_block"] >= 4, cifar
    assert cifar["groups_per_block"] * 4 * elem >= 32, "each tile row is at least a 32-byte sector"
    assert cifar["blocks"] == 256 * 32 // cifar["groups_per_block"], "CIFAR10 at batch 256: no split"
    for shape, groups in [((64, 256, 16, 16), 32), ((8, 512, 8, 8), 32), ((2, 1024, 16, 16), 32)]:
        p, group_bytes = plan(shape, groups, True), shape[1] // groups * elem
        assert p["vector_bytes"] == 16 and p["groups_per_block"] * group_bytes >= 32, (shape, p)
        assert p["groups_per_block"] > 1 or group_bytes >= 128, (
            "a group narrower than a line shares its block"
        )
    nchw = plan((256, 128, 32, 32), 32, False)
    assert nchw["groups_per_block"] == 1 and nchw["vector_bytes"] == 16
    assert plan((2, 36, 5, 5), 12, True)["vector_bytes"] == (16 if elem == 4 else elem)
    assert plan((1, 6, 4, 4), 3, True)["vector_bytes"] == elem
    with pytest.raises(ValueError, match="num_groups = 5 must be positive and divide C = 64"):
        plan((1, 64, 4, 4), 5, True)


@pytest.mark.parametrize("dtype", cuda_cases.DTYPES, ids=str)
@pytest.mark.parametrize(
    "variant",
    [
        {"silu": False, "with_add": False},
        {"silu": False, "with_add": True},
        {"misaligned": True},
        {"param_dtype": torch.float32},  # low-precision activations, float32 parameters
    ],
    ids=["nosilu-noadd", "nosilu-add", "misaligned", "fp32-params"],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_emulated_group_norm_silu_variants(emulated, variant, dtype, channels_last):
    cuda_cases.check_group_norm_silu(emulated, (2, 64, 4, 4), 16, dtype, channels_last, **variant)


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_emulated_group_norm_statistics_are_stable_for_a_large_mean(emulated, split):
    cuda_cases.check_group_norm_stable(emulated, split)


@pytest.mark.parametrize(
    "cp_async, schedule",
    [("lazy", "lockstep"), ("eager", "forward"), ("eager", "reverse"), ("lazy", "reverse")],
)
@pytest.mark.parametrize("dtype", cuda_cases.DTYPES, ids=str)
@pytest.mark.parametrize("shape", cuda_cases.ATTENTION_SHAPES)
def test_emulated_attention(emulated, shape, dtype, cp_async, schedule, monkeypatch):
    """cp.async copies land as late (at wait_group) or as early (at issue) as the hardware may
    let them, and warps run in lockstep or skewed: a missing wait or barrier shows up as stale
    or overwritten tiles."""
    monkeypatch.setenv("FASTDDPM_EMU_CP_ASYNC", cp_async)
    monkeypatch.setenv("FASTDDPM_EMU_SCHEDULE", schedule)
    cuda_cases.check_attention(emulated, shape, dtype)


@pytest.mark.parametrize("D", [8, 16, 64])
@pytest.mark.parametrize("dtype", cuda_cases.DTYPES, ids=str)
@pytest.mark.parametrize("layout", cuda_cases.ATTENTION_LAYOUTS)
def test_emulated_attention_layouts_and_scale(emulated, layout, dtype, D):
    cuda_cases.check_attention(emulated, (2, 2, 24, 30, D), dtype, layout, scale=0.3)


@pytest.mark.parametrize("dtype", cuda_cases.DTYPES, ids=str)
def test_attention_head_dim_tile_follows_the_head_dim(emulated, dtype):
    """The kernel's work scales with its head-dim tile: the smallest power of two >= max(D, 8).
    diffusers' CIFAR10 heads (D = 8) ran fp32 at a tile of 32 and fp16/bf16 at 16 before."""
    heads = (1, 8, 9, 12, 16, 17, 40, 64, 136, 256, 257, 512)
    tiles = [cuda.attention_plan(emulated.lib, D, dtype)["head_dim_tile"] for D in heads]
    assert tiles == [8, 8, 16, 16, 16, 32, 64, 64, 256, 256, 512, 512]
    plan = cuda.attention_plan(emulated.lib, 8, dtype)
    assert plan["rows_per_block"] >= 16 and plan["threads"] % 32 == 0
    for bad in (0, 513):
        with pytest.raises(ValueError, match=f"head dim D = {bad}; the kernels take 1 <= D <= 512"):
            cuda.attention_plan(emulated.lib, bad, dtype)


def test_emulated_attention_without_keys_is_zero(emulated):
    q = torch.randn(1, 2, 5, 16, dtype=torch.float16)
    k = torch.randn(1, 2, 0, 16, dtype=torch.float16)
    torch.testing.assert_close(emulated.attention(q, k, k, None), reference.attention(q, k, k))


@pytest.mark.parametrize("noise", cuda_cases.NOISE_KINDS)
@pytest.mark.parametrize("dtype", cuda_cases.DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", cuda_cases.STEP_SHAPES)
def test_emulated_ddpm_step(emulated, shape, channels_last, dtype, noise):
    cuda_cases.check_ddpm_step(emulated, shape, dtype, channels_last, noise=noise)


@pytest.mark.parametrize("t_kind", cuda_cases.T_KINDS)
@pytest.mark.parametrize("clip_x0", [True, False], ids=["clip", "direct"])
@pytest.mark.parametrize("table_kind", ["ddpm", "ddim"])
def test_emulated_ddpm_step_forms(emulated, t_kind, clip_x0, table_kind):
    cuda_cases.check_ddpm_step(
        emulated, (4, 3, 8, 8), torch.float32, False, clip_x0=clip_x0, t_kind=t_kind, table_kind=table_kind
    )


def test_emulated_ddpm_step_float32_equals_the_reference_bit_for_bit(emulated):
    """With z given, the kernel does the reference's float32 operations in the same order."""
    out, ref = cuda_cases.check_ddpm_step(emulated, (4, 3, 8, 8), torch.float32, False)
    assert torch.equal(out, ref)


def test_emulated_ddpm_step_without_noise(emulated):
    """DDIM with eta = 0 adds no noise: neither a noise tensor nor a seed is read."""
    table = cuda_cases.step_table("cpu", "ddim", eta=0.0)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = emulated.ddpm_step(x, eps, 40, table, None, None, 0, True)
    torch.testing.assert_close(out, reference.ddpm_step(x, eps, 40, table), rtol=0, atol=0)


def guarded_copy(coef: torch.Tensor, at_end: bool) -> tuple[torch.Tensor, mmap.mmap]:
    """coef's values in memory between two inaccessible pages, starting right after the first
    (at_end=False) or ending right before the second: a read past either end of the table
    faults. Returns the tensor and the mapping that holds it."""
    page, nbytes = mmap.PAGESIZE, coef.numel() * coef.element_size()
    data_pages = -(-nbytes // page)
    region = mmap.mmap(-1, (data_pages + 2) * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for guard in (base, base + (data_pages + 1) * page):
        assert libc.mprotect(guard, page, 0) == 0  # PROT_NONE, os.strerror(ctypes.get_errno())
    start = base + (data_pages + 1) * page - nbytes if at_end else base + page
    view = torch.frombuffer((ctypes.c_float * coef.numel()).from_address(start), dtype=torch.float32)
    return view.view(coef.shape).copy_(coef), region


@pytest.mark.parametrize("noise", ["none", "tensor", "seed"])
@pytest.mark.parametrize("dtype", cuda_cases.DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("t, bad", cuda_cases.BAD_T_CASES)
def test_emulated_ddpm_step_out_of_range_t_gives_nan(emulated, t, bad, channels_last, dtype, noise):
    """A device-side t outside [0, num_steps) cannot raise: its samples are all NaN, the others
    are the reference's, and nothing outside the table is read: the table sits against
    inaccessible pages on either side, so a read past its start or end faults."""
    table = cuda_cases.step_table("cpu", "ddim" if noise == "none" else "ddpm")
    for at_end in (False, True):
        coef, region = guarded_copy(table.coef, at_end)
        guarded = StepTable(coef=coef, timesteps=table.timesteps, stochastic=table.stochastic)
        cuda_cases.check_out_of_range_t(emulated, guarded, t, bad, dtype, channels_last, noise)
        del coef, guarded  # the mapping outlives every view of it
        region.close()


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 3, 5, 7)], ids=["vec", "odd"])
def test_emulated_in_kernel_noise(emulated, shape):
    cuda_cases.check_in_kernel_noise(emulated, shape, seed=2024, offset=3)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 3, 5, 7)], ids=["vec", "odd"])
@pytest.mark.parametrize("on_device", ["offset", "seed", "both"])
@pytest.mark.parametrize("seed, offset", [(7, 3), (2**64 - 1, 2**63 + 2**32 + 9)])
def test_emulated_seed_and_offset_tensors_equal_ints_bit_for_bit(emulated, shape, on_device, seed, offset):
    """Seed and offset read by the kernel from int64 device scalars (as a replayed CUDA graph
    reads them) give exactly the step of the same values passed as launch arguments; values
    >= 2**63 are held as their int64 bits."""
    table = cuda_cases.step_table("cpu")
    g = torch.Generator().manual_seed(8)
    x, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    as_tensor = {"seed": seed, "offset": offset}
    for name in ("seed", "offset") if on_device == "both" else (on_device,):
        as_tensor[name] = torch.tensor(ops.uint64_as_int64(as_tensor[name]))
    ints = emulated.ddpm_step(x, eps, 60, table, None, seed, offset, True)
    tensors = emulated.ddpm_step(x, eps, 60, table, None, as_tensor["seed"], as_tensor["offset"], True)
    assert torch.equal(tensors, ints)
    assert not torch.equal(ints, emulated.ddpm_step(x, eps, 60, table, None, seed, offset + 1, True))


def test_emulated_in_kernel_noise_ignores_the_memory_layout(emulated):
    table = cuda_cases.noise_table("cpu")
    zeros = torch.zeros(2, 5, 3, 4)
    z = emulated.ddpm_step(zeros, zeros, 0, table, None, 9, 1, False)
    zeros_cl = zeros.contiguous(memory_format=torch.channels_last)
    z_cl = emulated.ddpm_step(zeros_cl, zeros_cl, 0, table, None, 9, 1, False)
    assert z_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(z_cl, z, rtol=0, atol=0)
