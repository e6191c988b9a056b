"""The "cuda" backend of fastddpm.ops: the CUDA C++ library built from csrc/.

setup.py compiles csrc/ into `fastddpm/_lib/libfastddpm_cuda.so` wherever nvcc exists. The
library is torch-free (its C ABI is csrc/include/fastddpm/fastddpm.h); this module loads it
with ctypes and registers each op as a PyTorch custom op (`torch.ops.fastddpm_cuda.*`) with
a fake implementation, so `torch.compile(fullgraph=True)` keeps one graph. Each op checks
device, dtype, layout and sizes here, raising ValueError, and then launches on the current
CUDA stream of its tensors' device, so a step can be captured in a CUDA graph. The ops are
differentiable: the backward recomputes the plain-PyTorch reference (fastddpm.reference)
under autograd, so training can use the fused forward.

FASTDDPM_CUDA_LIBRARY=/path/to/libfastddpm_cuda.so loads another build of the library.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from .custom_ops import ddpm_step_args, register, unpack_seed
from .reference import memory_format_of
from .schedule import StepTable

LIBRARY_PATH = Path(__file__).parent / "_lib" / "libfastddpm_cuda.so"

# The C ABI's constants (fastddpm.h).
SUCCESS, ERROR_INVALID_VALUE, ERROR_NOT_SUPPORTED, ERROR_CUDA = 0, 1, 2, 3
NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ABI_VERSION = 3
MAX_HEAD_DIM = 512  # attention
MAX_GROUP_CHANNELS = 2048  # group_norm_silu: channels per group
MAX_QUERY_POSITIONS = 65535 * 16  # attention: Lq

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
        [_ptr] * 6 + [ctypes.c_size_t] + [_i64] * 5 + [_f32] + [_int] * 5 + [_ptr],
    ),
    "fastddpm_group_norm_silu_plan": (_int, [_i64] * 5 + [_int] * 2 + [ctypes.POINTER(_i64)] * 4),
    "fastddpm_attention": (_int, [_ptr] * 4 + [_i64] * 5 + [ctypes.POINTER(_i64)] * 3 + [_f32, _int, _ptr]),
    "fastddpm_attention_plan": (_int, [_i64, _int] + [ctypes.POINTER(_i64)] * 3),
    "fastddpm_ddpm_step": (
        _int,
        [_ptr] * 5
        + [_i64, _ptr, _i64, _i64, _int, _int, _u64, _u64, _ptr, _ptr, _int]
        + [_i64] * 4
        + [_int, _int, _ptr],
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


def _library() -> ctypes.CDLL:
    lib = load_library()
    if isinstance(lib, str):
        raise RuntimeError(lib)
    return lib


def _check_status(lib: ctypes.CDLL, status: int, op: str) -> None:
    if status == SUCCESS:
        return
    message = f"cuda {op}: {lib.fastddpm_last_error().decode()}"
    raise (ValueError if status in (ERROR_INVALID_VALUE, ERROR_NOT_SUPPORTED) else RuntimeError)(message)


def _check_cuda(op: str, **tensors: torch.Tensor | None) -> None:
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


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# --- group_norm_silu ---------------------------------------------------------------------------


def _check_group_norm_silu(x: torch.Tensor, weight, bias, num_groups: int, add) -> None:
    _check_cuda("group_norm_silu", x=x, weight=weight, bias=bias, add=add)
    N, C, H, W = x.shape
    if C // num_groups > MAX_GROUP_CHANNELS:
        raise ValueError(
            f"the cuda group_norm_silu takes at most {MAX_GROUP_CHANNELS} channels per group;"
            f" got {C // num_groups} ({C} channels in {num_groups} groups)"
        )
    group_size = C // num_groups * H * W
    if group_size >= 2**31:
        raise ValueError(
            f"the cuda group_norm_silu takes groups of fewer than 2^31 elements; got {group_size}"
        )


def launch_group_norm_silu(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    silu: bool,
    add: torch.Tensor | None,
    stream: int | None,
) -> torch.Tensor:
    """Marshal the tensors for fastddpm_group_norm_silu and launch it on `stream` (a cudaStream_t)."""
    fmt = memory_format_of(x)
    if weight.dtype != bias.dtype:  # one parameter dtype; float32 holds either exactly
        weight, bias = weight.float(), bias.float()
    weight, bias = weight.contiguous(), bias.contiguous()
    add = None if add is None else add.contiguous()
    y = torch.empty_like(x, memory_format=fmt)
    N, C, H, W = x.shape
    size = ctypes.c_size_t(0)
    status = lib.fastddpm_group_norm_silu_workspace_size(N, C, H, W, num_groups, ctypes.byref(size))
    _check_status(lib, status, "group_norm_silu")
    workspace = torch.empty(size.value, dtype=torch.uint8, device=x.device) if size.value else None
    status = lib.fastddpm_group_norm_silu(
        _ptr(x),
        _ptr(add),
        _ptr(weight),
        _ptr(bias),
        _ptr(y),
        _ptr(workspace),
        size.value,
        N,
        C,
        H,
        W,
        num_groups,
        eps,
        int(silu),
        int(fmt == torch.channels_last),
        DTYPE_CODES[x.dtype],
        DTYPE_CODES[add.dtype] if add is not None else 0,
        DTYPE_CODES[weight.dtype],
        stream,
    )
    _check_status(lib, status, "group_norm_silu")
    return y


def group_norm_silu_plan(
    lib: ctypes.CDLL,
    shape: tuple[int, int, int, int],
    num_groups: int,
    channels_last: bool,
    dtype: torch.dtype,
) -> dict[str, int]:
    """What fastddpm_group_norm_silu launches for x of `shape` (N, C, H, W), 16-byte aligned:
    groups_per_block, blocks, threads (per block) and vector_bytes (of each access to x and y)."""
    values = [_i64() for _ in range(4)]
    status = lib.fastddpm_group_norm_silu_plan(
        *shape, num_groups, int(channels_last), DTYPE_CODES[dtype], *(ctypes.byref(v) for v in values)
    )
    _check_status(lib, status, "group_norm_silu_plan")
    names = ("groups_per_block", "blocks", "threads", "vector_bytes")
    return dict(zip(names, (v.value for v in values), strict=True))


def _group_norm_silu_forward(x, weight, bias, num_groups, eps, silu, add):
    with torch.cuda.device(x.device):
        return launch_group_norm_silu(
            _library(), x, weight, bias, num_groups, eps, silu, add, _stream(x.device)
        )


# --- attention ---------------------------------------------------------------------------------


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    _check_cuda("attention", q=q, k=k, v=v)
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the cuda attention takes head dims up to {MAX_HEAD_DIM}; got D = {q.shape[-1]}")
    if q.shape[2] > MAX_QUERY_POSITIONS:
        raise ValueError(
            f"the cuda attention takes up to {MAX_QUERY_POSITIONS} query positions; got {q.shape[2]}"
        )


def _row_major_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows of D contiguous elements; other strides are free."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def launch_attention(
    lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, stream: int | None
) -> torch.Tensor:
    """Marshal the tensors for fastddpm_attention and launch it on `stream` (a cudaStream_t)."""
    q, k, v = _row_major_last(q), _row_major_last(k), _row_major_last(v)
    B, heads, Lq, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)

    def strides(t: torch.Tensor):
        return (_i64 * 3)(*t.stride()[:3])

    status = lib.fastddpm_attention(
        _ptr(q),
        _ptr(k),
        _ptr(v),
        _ptr(out),
        B,
        heads,
        Lq,
        k.shape[2],
        D,
        strides(q),
        strides(k),
        strides(v),
        scale,
        DTYPE_CODES[q.dtype],
        stream,
    )
    _check_status(lib, status, "attention")
    return out


def attention_plan(lib: ctypes.CDLL, D: int, dtype: torch.dtype) -> dict[str, int]:
    """What fastddpm_attention launches for head dim D in dtype: head_dim_tile (the padded head dim
    the kernel computes with), rows_per_block and threads (per block)."""
    values = [_i64() for _ in range(3)]
    status = lib.fastddpm_attention_plan(D, DTYPE_CODES[dtype], *(ctypes.byref(v) for v in values))
    _check_status(lib, status, "attention_plan")
    return dict(zip(("head_dim_tile", "rows_per_block", "threads"), (v.value for v in values), strict=True))


def _attention_forward(q, k, v, scale):
    with torch.cuda.device(q.device):
        return launch_attention(_library(), q, k, v, scale, _stream(q.device))


# --- ddpm_step ---------------------------------------------------------------------------------


def _check_ddpm_step(
    x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None, table: StepTable
) -> None:
    _check_cuda("ddpm_step", x_t=x_t, eps=eps, noise=noise)
    if table.coef.dtype != torch.float32 or table.coef.dim() != 2 or table.coef.shape[1] != 7:
        raise ValueError(
            f"the step table must be (S, 7) float32, got {tuple(table.coef.shape)} {table.coef.dtype}"
        )


def launch_ddpm_step(
    lib: ctypes.CDLL,
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
    stream: int | None,
) -> torch.Tensor:
    """Marshal the tensors for fastddpm_ddpm_step and launch it on `stream` (a cudaStream_t).
    seed_tensor, offset_tensor: 0-d int64 tensors on x_t's device that the kernel reads instead of
    the seed words (custom_ops.ddpm_step_args)."""
    fmt = memory_format_of(x_t)  # x_t, eps, noise and the output share one layout
    x_t, eps = x_t.contiguous(memory_format=fmt), eps.contiguous(memory_format=fmt)
    noise = None if noise is None else noise.contiguous(memory_format=fmt)
    coef = coef.contiguous()
    if t_tensor is not None:
        t_tensor = t_tensor.to(device=x_t.device, dtype=torch.int64).reshape(-1)
    seed, offset = unpack_seed(seed_words)  # the host words; a device tensor's are 0
    mode = NOISE_NONE if not stochastic else NOISE_TENSOR if noise is not None else NOISE_PHILOX
    out = torch.empty_like(x_t, memory_format=fmt)
    N, C, H, W = x_t.shape
    status = lib.fastddpm_ddpm_step(
        _ptr(x_t),
        _ptr(eps),
        _ptr(noise),
        _ptr(out),
        _ptr(coef),
        coef.shape[0],
        _ptr(t_tensor),
        0 if t_tensor is None else t_tensor.numel(),
        t_int,
        mode,
        DTYPE_CODES[noise.dtype] if noise is not None else 0,
        seed or 0,
        offset,
        _ptr(seed_tensor),
        _ptr(offset_tensor),
        int(clip_x0),
        N,
        C,
        H,
        W,
        int(fmt == torch.channels_last),
        DTYPE_CODES[x_t.dtype],
        stream,
    )
    _check_status(lib, status, "ddpm_step")
    return out


def _ddpm_step_forward(
    x_t, eps, t_tensor, t_int, coef, stochastic, noise, seed_words, clip_x0, seed_tensor, offset_tensor
):
    with torch.cuda.device(x_t.device):
        return launch_ddpm_step(
            _library(),
            x_t,
            eps,
            t_tensor,
            t_int,
            coef,
            stochastic,
            noise,
            seed_words,
            clip_x0,
            seed_tensor,
            offset_tensor,
            _stream(x_t.device),
        )


register("fastddpm_cuda", _group_norm_silu_forward, _attention_forward, _ddpm_step_forward)


# --- the backend's ops (signatures of fastddpm.reference; inputs already checked by fastddpm.ops) ---


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float = 1e-6,
    *,
    silu: bool = True,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = SiLU(GroupNorm(x + add[:, :, None, None])): csrc/include/fastddpm/group_norm_silu.cuh."""
    _check_group_norm_silu(x, weight, bias, num_groups, add)
    return torch.ops.fastddpm_cuda.group_norm_silu(x, weight, bias, num_groups, float(eps), silu, add)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v: csrc/include/fastddpm/attention.cuh."""
    _check_attention(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.fastddpm_cuda.attention(q, k, v, scale)


def ddpm_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int | torch.Tensor,
    table: StepTable,
    *,
    noise: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    clip_x0: bool = True,
) -> torch.Tensor:
    """One reverse step at step index t: csrc/include/fastddpm/ddpm_step.cuh."""
    _check_ddpm_step(x_t, eps, noise, table)
    return torch.ops.fastddpm_cuda.ddpm_step(
        *ddpm_step_args(x_t, eps, t, table, noise, seed, offset, clip_x0)
    )


def philox_normal_host(seed: int, offset: int, n: int) -> torch.Tensor:
    """The in-kernel noise of (seed, offset) for logical elements 0..n-1, computed on the CPU by
    the library's own Philox code (no GPU needed): float32 (n,)."""
    lib = _library()
    out = torch.empty(n, dtype=torch.float32)
    status = lib.fastddpm_philox_normal_host(
        seed, offset, n, ctypes.cast(out.data_ptr(), ctypes.POINTER(_f32))
    )
    _check_status(lib, status, "philox_normal_host")
    return out
