"""First-use verification of the fused backends: no silent wrong answer on unseen hardware.

The first time a fused backend ("triton", "cuda"; never the reference "torch") runs an op on a
class of inputs in a process, `fastddpm.ops` asks `trusted()`, which runs that backend's op once
on small inputs of the class and compares it with fastddpm.reference by fastddpm.cases' measure
and tolerances (`cases.small_cases`, `cases.check_case`). A class is (op, backend, device, dtype,
layout); the layout is the memory format for group_norm_silu and ddpm_step, the head dimension D
for attention (it picks the kernels' plan).

The verdict is cached in `verified.json` under $FASTDDPM_CACHE_DIR, else $XDG_CACHE_HOME/fastddpm,
else ~/.cache/fastddpm, keyed by the machine (the GPU's model and the driver, or the CPU's model),
torch's and fastddpm's versions and the backend's own (triton's version; the CUDA library's C ABI
and build line): on a machine seen before, verification reads that file once per process and runs
nothing. The file is replaced atomically (fastddpm.io): two processes writing at once can drop one
another's newest verdict, which is then verified again; a damaged file is ignored and rewritten.

On a mismatch: one VerificationWarning naming the op, the backend, the device and the error, and
the reference serves that class from then on (in this process, and through the cache in later ones).

FASTDDPM_VERIFY=0 turns verification off. torch.compile: `trusted` is an assume_constant_result
function, run at trace time, its verdict baked into the graph. CUDA graphs: nothing is verified
while the current stream captures (the comparison reads results on the host); a capture takes the
verdict this process has, else the cached one, else trusts the backend (the graph runner's warm-up
steps, before its capture, are where the verdict is made).
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from pathlib import Path

import torch

from . import cases
from ._version import __version__
from .backends import get_backend
from .cases import device_name
from .io import atomic_write
from .reference import memory_format_of

ENV = "FASTDDPM_VERIFY"
CACHE_FILE = "verified.json"
FORMAT = 1

_VERDICTS: dict[tuple, bool] = {}  # this process's verdicts: (op, backend, device, dtype, layout) -> ok
_CACHE: dict[str, dict] | None = None  # the cache file's entries, read once per process


class VerificationWarning(RuntimeWarning):
    """A fused backend differs from the reference on this machine; the reference replaces it."""


def layout(op: str, x: torch.Tensor) -> str:
    """The layout part of an input class: "D=<head dim>" for attention, else x's memory format."""
    if op == "attention":
        return f"D={x.shape[-1]}"
    return "channels_last" if memory_format_of(x) == torch.channels_last else "contiguous"


@torch.compiler.assume_constant_result
def trusted(op: str, backend: str, device: torch.device, dtype: torch.dtype, layout: str) -> bool:
    """Whether fastddpm.ops may run `backend`'s `op` on this input class (see the module docstring)."""
    if os.environ.get(ENV, "1") == "0":
        return True
    key = (op, backend, str(device), str(dtype), layout)
    verdict = _VERDICTS.get(key)
    if verdict is None:
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            return True  # no kernel runs there: the backend's own ValueError says so
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            entry = _cached().get(_entry_key(key, device))
            return True if entry is None else entry["ok"]
        verdict = _VERDICTS[key] = _verdict(key, device, dtype)
    return verdict


def _verdict(key: tuple, device: torch.device, dtype: torch.dtype) -> bool:
    """The class's verdict from the cache file, else verified now and stored; warns on a mismatch.
    A backend that refuses the class (ValueError) is left to refuse the call itself."""
    op, backend, _, _, layout = key
    entry_key = _entry_key(key, device)
    entry = _cached().get(entry_key)
    source = f"cached in {cache_path()}"
    if entry is None:
        entry = _verify(op, backend, device, dtype, layout)
        if entry is None:
            return True
        _store(entry_key, entry)
        source = "verified on first use"
    if not entry["ok"]:
        warnings.warn(
            f"fastddpm: backend {backend!r} {op} on {device} ({device_name(device)}; {dtype}, {layout})"
            f" differs from the reference: {entry['message']} ({source}); using the reference"
            f" (backend 'torch') for it from now on. {ENV}=0 turns this check off",
            VerificationWarning,
            stacklevel=2,
        )
    return entry["ok"]


def _verify(op: str, backend: str, device: torch.device, dtype: torch.dtype, layout: str) -> dict | None:
    """Run the class's small cases on the backend against the reference: {ok, error, message}, or
    None where the backend refuses them."""
    if op == "attention":
        small = cases.small_cases(op, dtype, head_dim=int(layout.removeprefix("D=")))
    else:
        small = cases.small_cases(op, dtype, channels_last=layout == "channels_last")
    outcomes = [cases.check_case(case, backend, device) for case in small]
    if any(o.refused for o in outcomes):
        return None
    failed = [o for o in outcomes if not o.passed]
    errors = [o.error for o in outcomes if o.error is not None]
    return {
        "ok": not failed,
        "error": max(errors, default=None),
        "message": failed[0].message if failed else "",
    }


# --- the cache file ------------------------------------------------------------------------------


def cache_path() -> Path:
    """$FASTDDPM_CACHE_DIR/verified.json, else $XDG_CACHE_HOME (default ~/.cache)/fastddpm/verified.json."""
    if os.environ.get("FASTDDPM_CACHE_DIR"):
        return Path(os.environ["FASTDDPM_CACHE_DIR"]) / CACHE_FILE
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastddpm" / CACHE_FILE


def _read() -> dict[str, dict]:
    """The cache file's well-formed entries; none from a missing, unreadable or damaged file."""
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return {}
    entries = data.get("verdicts") if isinstance(data, dict) and data.get("format") == FORMAT else None
    if not isinstance(entries, dict):
        return {}
    return {
        key: entry
        for key, entry in entries.items()
        if isinstance(entry, dict)
        and isinstance(entry.get("ok"), bool)
        and isinstance(entry.get("message"), str)
    }


def _cached() -> dict[str, dict]:
    global _CACHE
    if _CACHE is None:
        _CACHE = _read()
    return _CACHE


def _store(entry_key: str, entry: dict) -> None:
    """Add a verdict to the file, merged with what other processes wrote since it was read."""
    _cached()[entry_key] = entry
    text = json.dumps({"format": FORMAT, "verdicts": _read() | {entry_key: entry}}, indent=1)
    try:
        atomic_write(cache_path(), lambda tmp: Path(tmp).write_text(text + "\n"))
    except OSError:
        pass  # an unwritable cache costs a verification per process, never a wrong answer


def _entry_key(key: tuple, device: torch.device) -> str:
    op, backend, _, dtype, layout = key
    return f"{fingerprint(device, backend)} | {op} {dtype.removeprefix('torch.')} {layout}"


@functools.cache
def fingerprint(device: torch.device, backend: str) -> str:
    """What a verdict holds for: the device's model (and the driver), the versions of torch, of
    fastddpm and of the backend."""
    parts = [device_name(device)]
    if device.type == "cuda":
        parts.append(_driver())
    if backend == "triton":
        import triton

        parts.append(f"triton {triton.__version__}")
    elif backend == "cuda":
        from .cuda import ABI_VERSION, library_info

        parts.append(f"C ABI {ABI_VERSION}, {library_info()['info']}")
    else:
        parts.append(f"{backend} {getattr(get_backend(backend), '__version__', 'unversioned')}")
    return " | ".join([*parts, f"torch {torch.__version__}", f"fastddpm {__version__}"])


def _driver() -> str:
    """The NVIDIA driver's version (Linux: /proc/driver/nvidia/version), else the CUDA driver API's."""
    try:
        found = re.search(r"Kernel Module\s+(\S+)", Path("/proc/driver/nvidia/version").read_text())
    except OSError:
        found = None
    if found:
        return f"driver {found.group(1)}"
    version = getattr(torch._C, "_cuda_getDriverVersion", lambda: "unknown")()
    return f"CUDA driver API {version}"
