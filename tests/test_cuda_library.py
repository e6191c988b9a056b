"""The CUDA library (csrc/) on a machine without a GPU: it was built by `pip install -e .`
wherever nvcc exists, compiled cleanly for sm_80 and sm_90, loads with ctypes, exports
exactly its C ABI, and every entry point returns a status code and a message for bad
input without touching a device. Its Philox code runs on the host against the reference.

Running the kernels needs a GPU (tests/test_cuda_ops.py, and tests/ops with backend "cuda"), or
the host emulator (tests/ops and tests/test_cuda_emulator.py).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastddpm import cuda, ops, reference
from fastddpm.custom_ops import StepArgs

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
        x=FAKE, skip=None, add=None, weight=FAKE, bias=FAKE, y=FAKE, workspace=None, workspace_bytes=0,
        N=2, C1=64, C=64, H=8, W=8, G=32, add_stride_n=64, add_stride_c=1, eps=1e-6, silu=1,
        channels_last=0, dtype=0, add_dtype=0, param_dtype=0, stream=None,
    )  # fmt: skip
    args.update(changes)
    args["C1"] = changes.get("C1", args["C"])  # all channels in x unless a case says otherwise
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
        ({"add": FAKE, "add_stride_n": -64}, cuda.ERROR_INVALID_VALUE, "add_stride_n = -64 is negative"),
        ({"add": FAKE, "add_stride_c": -1}, cuda.ERROR_INVALID_VALUE, "add_stride_c = -1 is negative"),
        # skip: C1 of the C channels in x, the rest in skip
        ({"C1": 40}, cuda.ERROR_INVALID_VALUE, "skip is a null pointer but C1 = 40 < C = 64"),
        ({"C1": 0, "skip": FAKE}, cuda.ERROR_INVALID_VALUE, "C1 = 0 channels of x must be in (0, C = 64]"),
        ({"C1": 65}, cuda.ERROR_INVALID_VALUE, "C1 = 65 channels of x must be in (0, C = 64]"),
        ({"skip": FAKE}, cuda.ERROR_INVALID_VALUE, "skip is given but C1 = C = 64 leaves it no channels"),
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
    """(vectors per thread, mode) of a mangled group_norm_silu_nhwc_kernel<T, MODE, SKIP> name."""
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
    """Each kernel, with skip or without: a 16-byte load of x (or skip) per vector a thread holds
    (`items`, unrolled; the compiler may duplicate a loop, e.g. one copy with SiLU and one without,
    so at least that many);
    fused and apply: every global store (mnemonics starting with `stores`) is a 16-byte `store`
    of y; fused: no 8-byte `narrow_load`."""
    assert len(bodies) == 18, f"expected 3 dtypes x 3 modes x skip or not of {NHWC_KERNEL}: {sorted(bodies)}"
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


def multistep_update(lib, **changes) -> int:
    args = dict(
        x=FAKE, eps=FAKE, noise=None, history=FAKE, out=FAKE, weights=FAKE, dest=FAKE, num_steps=10,
        num_slots=2, i=None, i_host=9, noise_mode=cuda.NOISE_PHILOX, seed=2**64 - 1, offset=7,
        seed_device=None, offset_device=None, clip_x0=0, numel=6144, stream=None,
    )  # fmt: skip
    args.update(changes)
    return lib.fastddpm_multistep_update(*args.values())


@pytest.mark.parametrize(
    "changes, status, message",
    [
        ({"x": None}, cuda.ERROR_INVALID_VALUE, "x is a null pointer"),
        ({"eps": None}, cuda.ERROR_INVALID_VALUE, "eps is a null pointer"),
        ({"out": None}, cuda.ERROR_INVALID_VALUE, "out is a null pointer"),
        ({"weights": None}, cuda.ERROR_INVALID_VALUE, "weights is a null pointer"),
        ({"dest": None}, cuda.ERROR_INVALID_VALUE, "dest is a null pointer"),
        ({"history": None}, cuda.ERROR_INVALID_VALUE, "history is a null pointer"),
        ({"noise_mode": cuda.NOISE_TENSOR}, cuda.ERROR_INVALID_VALUE, "noise is a null pointer"),
        ({"noise_mode": 3}, cuda.ERROR_INVALID_VALUE, "noise_mode = 3 is not 0 (none), 1 (tensor) or 2"),
        ({"i_host": 10}, cuda.ERROR_INVALID_VALUE, "i_host = 10 is outside the solver table's 0..9"),
        ({"i_host": -1}, cuda.ERROR_INVALID_VALUE, "i_host = -1 is outside the solver table's 0..9"),
        ({"num_steps": 0}, cuda.ERROR_INVALID_VALUE, "num_steps = 0: the solver table is empty"),
        ({"num_slots": cuda.MAX_SLOTS + 1}, cuda.ERROR_NOT_SUPPORTED, "num_slots = 9 is not in 0..8"),
        ({"numel": -4}, cuda.ERROR_INVALID_VALUE, "numel = -4 is negative"),
        ({"numel": 2**62}, cuda.ERROR_INVALID_VALUE, "num_slots * numel overflows int64"),
    ],
)
def test_multistep_update_rejects_bad_input(lib, changes, status, message):
    assert multistep_update(lib, **changes) == status
    assert message in last_error(lib)


def test_empty_problems_launch_nothing(lib):
    """Zero elements: success without a CUDA call, so even null data pointers pass."""
    assert group_norm(lib, N=0, x=None, y=None) == cuda.SUCCESS
    assert group_norm(lib, N=0, C1=40, x=None, y=None) == cuda.SUCCESS, "an empty skip: a null pointer"
    assert attention(lib, B=0, q=None, o=None) == cuda.SUCCESS
    assert ddpm_step(lib, N=0, x=None, out=None) == cuda.SUCCESS
    assert multistep_update(lib, numel=0, x=None, out=None, history=None) == cuda.SUCCESS


def test_multistep_update_without_slots_takes_a_null_history(lib):
    """The arguments pass their checks; what follows is the launch (which needs a GPU here)."""
    status = multistep_update(lib, num_slots=0, history=None)
    assert status in (cuda.SUCCESS, cuda.ERROR_CUDA), last_error(lib)
    assert "null pointer" not in last_error(lib)


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
        y = torch.ops.fastddpm_cuda.group_norm_silu(x, w, w, 32, 1e-6, True, None, None)
        assert (
            y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
        )
        half = torch.empty(2, 32, 8, 8, device="cuda", dtype=torch.bfloat16).to(
            memory_format=torch.channels_last
        )  # x and skip of 32 channels each
        y = torch.ops.fastddpm_cuda.group_norm_silu(half, w, w, 32, 1e-6, True, None, half)
        assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
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
