"""The CUDA library built from csrc/, loaded with ctypes: its C ABI (csrc/include/fastddpm/fastddpm.h),
whether it can run here, and what every op's launcher needs (status checks, pointers, streams).

FASTDDPM_CUDA_LIBRARY=/path/to/libfastddpm_cuda.so loads another build of the library.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

LIBRARY_PATH = Path(__file__).parent.parent / "_lib" / "libfastddpm_cuda.so"

# The C ABI's constants (fastddpm.h).
SUCCESS, ERROR_INVALID_VALUE, ERROR_NOT_SUPPORTED, ERROR_CUDA = 0, 1, 2, 3
NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ABI_VERSION = 5
MAX_HEAD_DIM = 512  # attention
MAX_GROUP_CHANNELS = 2048  # group_norm_silu: channels per group
MAX_QUERY_POSITIONS = 65535 * 16  # attention: Lq
MAX_SLOTS = 8  # multistep_update: history slots (FASTDDPM_MULTISTEP_MAX_SLOTS)

_i64, _u64, _int, _ptr, _f32 = ctypes.c_int64, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {  # name: (restype, argtypes)
    "fastddpm_abi_version": (_int, []),
    "fastddpm_build_info": (ctypes.c_char_p, []),
    "fastddpm_build_targets": (ctypes.c_char_p, []),
    "fastddpm_status_name": (ctypes.c_char_p, [_int]),
    "fastddpm_last_error": (ctypes.c_char_p, []),
    "fastddpm_check_device": (_int, []),
    "fastddpm_group_norm_silu_workspace_size": (_int, [_i64] * 5 + [ctypes.POINTER(ctypes.c_size_t)]),
    "fastddpm_group_norm_silu": (
        _int,
        [_ptr] * 7 + [ctypes.c_size_t] + [_i64] * 8 + [_f32] + [_int] * 5 + [_ptr],
    ),
    "fastddpm_group_norm_silu_plan": (_int, [_i64] * 6 + [_int] * 2 + [ctypes.POINTER(_i64)] * 4),
    "fastddpm_attention": (_int, [_ptr] * 4 + [_i64] * 5 + [ctypes.POINTER(_i64)] * 3 + [_f32, _int, _ptr]),
    "fastddpm_attention_plan": (_int, [_i64, _int] + [ctypes.POINTER(_i64)] * 3),
    "fastddpm_ddpm_step": (
        _int,
        [_ptr] * 5
        + [_i64, _ptr, _i64, _i64, _int, _int, _u64, _u64, _ptr, _ptr, _int]
        + [_i64] * 4
        + [_int, _int, _ptr],
    ),
    "fastddpm_multistep_update": (
        _int,
        [_ptr] * 7 + [_i64, _i64, _ptr, _i64, _int, _u64, _u64, _ptr, _ptr, _int, _i64, _ptr],
    ),
    "fastddpm_philox_normal_host": (_int, [_u64, _u64, _i64, ctypes.POINTER(_f32)]),
}
EXPORTED_SYMBOLS = tuple(_SIGNATURES)


def library_path() -> Path:
    """Where the library is looked for: $FASTDDPM_CUDA_LIBRARY, else fastddpm/_lib/."""
    return Path(os.environ.get("FASTDDPM_CUDA_LIBRARY", LIBRARY_PATH))


def open_library(path: Path | str) -> ctypes.CDLL:
    """Load a build of the C ABI (csrc/include/fastddpm/fastddpm.h) and declare its signatures."""
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


@functools.cache
def load_library() -> ctypes.CDLL | str:
    """The loaded library, or why it cannot be loaded."""
    path = library_path()
    if not path.is_file():
        return (
            f"the CUDA library (csrc/) is not built: no {path}; reinstall fastddpm (pip install -e .)"
            " where nvcc is on PATH or under $CUDA_HOME"
        )
    try:
        lib = open_library(path)
    except (OSError, AttributeError) as err:
        return f"cannot load the CUDA library {path}: {err}"
    if lib.fastddpm_abi_version() != ABI_VERSION:
        return f"{path} has C ABI {lib.fastddpm_abi_version()}, this fastddpm needs {ABI_VERSION}: rebuild it"
    return lib


def library_info() -> dict:
    """What `fastddpm info` reports: path, built, targets (e.g. ["sm_80", ..., "compute_80"]),
    info (the library's build line) and error (why it did not load, else None)."""
    lib = load_library()
    info = {"path": str(library_path()), "built": library_path().is_file(), "targets": [], "info": None}
    if isinstance(lib, str):
        return info | {"error": lib}
    return info | {
        "targets": lib.fastddpm_build_targets().decode().split(),
        "info": lib.fastddpm_build_info().decode(),
        "error": None,
    }


def _runs_on(targets: list[str], capability: tuple[int, int]) -> bool:
    """SASS sm_XY runs on X.Y and later minors of major X; PTX compute_XY on anything >= X.Y."""
    major, minor = capability
    for target in targets:
        kind, _, digits = target.partition("_")
        t_major, t_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and t_major == major and t_minor <= minor:
            return True
        if kind == "compute" and (t_major, t_minor) <= (major, minor):
            return True
    return False


def unavailable_reason() -> str | None:
    """Why `fastddpm.ops` cannot use this backend; None when it can."""
    lib = load_library()
    if isinstance(lib, str):
        return lib
    targets = lib.fastddpm_build_targets().decode()
    if not torch.cuda.is_available():
        why = (
            "this torch is a CPU build"
            if torch.version.cuda is None
            else "torch.cuda.is_available() is False"
        )
        return f"the CUDA library is built for {targets} but no CUDA device is visible ({why})"
    capability = torch.cuda.get_device_capability()
    if not _runs_on(targets.split(), capability):
        major, minor = capability
        return (
            f"the CUDA library is built for {targets}, which cannot run on {torch.cuda.get_device_name()}"
            f" (sm_{major}{minor}); rebuild it with FASTDDPM_CUDA_ARCH_LIST={major}.{minor}"
        )
    return None


def library() -> ctypes.CDLL:
    """The loaded library; raises RuntimeError with the reason where it cannot be loaded."""
    lib = load_library()
    if isinstance(lib, str):
        raise RuntimeError(lib)
    return lib


def check_status(lib: ctypes.CDLL, status: int, op: str) -> None:
    if status == SUCCESS:
        return
    message = f"cuda {op}: {lib.fastddpm_last_error().decode()}"
    raise (ValueError if status in (ERROR_INVALID_VALUE, ERROR_NOT_SUPPORTED) else RuntimeError)(message)


def check_cuda(op: str, **tensors: torch.Tensor | None) -> None:
    """The library's kernels take CUDA tensors of the three float dtypes."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"the cuda backend's {op} runs on CUDA tensors; {name} is on {t.device}")
        if t.dtype not in DTYPE_CODES:
            raise ValueError(
                f"the cuda backend's {op} takes float32, float16 or bfloat16; {name} is {t.dtype}"
            )


def stream_of(device: torch.device) -> int:
    """The current CUDA stream of `device`, as a cudaStream_t."""
    return torch.cuda.current_stream(device).cuda_stream


def data_ptr(t: torch.Tensor | None) -> int | None:
    """t's address, or NULL for None."""
    return None if t is None else t.data_ptr()


def philox_normal_host(seed: int, offset: int, n: int) -> torch.Tensor:
    """The in-kernel noise of (seed, offset) for logical elements 0..n-1, computed on the CPU by
    the library's own Philox code (no GPU needed): float32 (n,)."""
    lib = library()
    out = torch.empty(n, dtype=torch.float32)
    status = lib.fastddpm_philox_normal_host(
        seed, offset, n, ctypes.cast(out.data_ptr(), ctypes.POINTER(_f32))
    )
    check_status(lib, status, "philox_normal_host")
    return out
