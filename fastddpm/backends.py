"""The backend registry: which concrete backends exist, loading each once, and finding its ops.

Each concrete backend is a module: the reference's holds the three ops as functions (same
signatures, inputs already checked by fastddpm.ops); a kernel backend is a package with one module
per op, `<package>.<op>`, holding the function `<op>` (see backend_op), and `unavailable_reason()
-> str | None`: None when it can run, else why not. fastddpm.ops dispatches through this module, and
fastddpm.verify and fastddpm.check find a backend's own op here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

CONCRETE_BACKENDS = ("torch", "triton", "cuda")  # the reference, the Triton kernels, the CUDA library
BACKENDS = ("auto", *CONCRETE_BACKENDS)


class BackendUnavailableError(RuntimeError):
    """A known backend that is not built or cannot run here."""


BACKEND_MODULES = {"torch": "fastddpm.reference", "triton": "fastddpm.kernels", "cuda": "fastddpm.cuda"}


_LOADED: dict[str, ModuleType | str] = {}  # backend name -> its module, or why it cannot be used


@torch.compiler.assume_constant_result
def _load_backend(name: str) -> bool:
    """Import backend `name` once into _LOADED. torch.compile runs this at trace time instead of
    tracing the import, so `torch.compile(fullgraph=True)` of a model that calls ops keeps one graph."""
    if name not in _LOADED:
        try:
            module = importlib.import_module(BACKEND_MODULES[name])
        except ImportError as err:
            _LOADED[name] = f"cannot import {BACKEND_MODULES[name]}: {err}"
        else:
            reason = getattr(module, "unavailable_reason", lambda: None)()
            _LOADED[name] = module if reason is None else reason
    return True


def _backend_module(name: str) -> ModuleType | str:
    """The backend's module, or the reason it cannot be used."""
    _load_backend(name)
    return _LOADED[name]


def get_backend(name: str) -> ModuleType:
    """The module implementing concrete backend `name`; raises if unknown or unavailable."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module = _backend_module(name)
    if isinstance(module, str):
        raise BackendUnavailableError(f"backend {name!r} is not available: {module}; use backend='torch'")
    return module


def backend_op(name: str, op: str) -> Callable:
    """Concrete backend `name`'s function `op`. The reference's module holds the functions; a kernel
    backend holds one module per op, `<package>.<op>`, and the function `<op>` is in it."""
    found = getattr(get_backend(name), op)
    return getattr(found, op) if isinstance(found, ModuleType) else found


def backend_status() -> dict[str, str]:
    """Each concrete backend -> "available" or why it is not."""
    status = {}
    for name in BACKEND_MODULES:
        module = _backend_module(name)
        status[name] = module if isinstance(module, str) else "available"
    return status


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend that `name` means for tensors on `device`."""
    if name != "auto":
        get_backend(name)
        return name
    if device.type == "cuda":
        for candidate in ("cuda", "triton"):
            if not isinstance(_backend_module(candidate), str):
                return candidate
    return "torch"
