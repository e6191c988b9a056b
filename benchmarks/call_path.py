"""The calls a reader follows from `fastddpm sample` down to a kernel launch.

`python -m benchmarks.call_path` runs `fastddpm sample -n 1 --steps 2 --backend triton` on the
bundled model, on the CPU through Triton's interpreter, and records the call stack at the first
launch of each Triton kernel (the `run` of its JITFunction, or of its InterpretedFunction under
TRITON_INTERPRET=1). Where a CUDA device and the built library exist, it does the same for
`--backend cuda --device cuda` at the first call of each CUDA library function of an op. Each
chain keeps the frames in fastddpm/ and kernels/, from `cli.main` to the launch, and is printed
with its number of calls and of distinct files; the frames of other packages between two of them
(torch's custom-op dispatch, say) are named but not counted. First-use verification is off
(FASTDDPM_VERIFY=0), so each first launch is the network's or the sampler's own.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
PROJECT_DIRS = (ROOT / "fastddpm", ROOT / "kernels")
SAMPLE = ["sample", "-n", "1", "--steps", "2", "--no-progress"]
LIBRARY_OPS = ("group_norm_silu", "attention", "ddpm_step")  # C ABI functions fastddpm_<op>


@dataclass(frozen=True)
class Call:
    """One frame of a chain: `function` in `file` (relative to the repository), and the frames of
    other packages (`via`, e.g. "torch") that called it from the frame before."""

    file: str
    function: str
    via: tuple[str, ...] = ()


def _project_file(filename: str) -> str | None:
    path = Path(filename).resolve()
    if any(path.is_relative_to(d) for d in PROJECT_DIRS):
        return str(path.relative_to(ROOT))
    return None


def _package(filename: str) -> str:
    """The top-level package of a frame outside the project ("torch", "triton", ...)."""
    parts = Path(filename).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    return Path(filename).stem


def chain(frame: FrameType | None) -> list[Call]:
    """The project's frames on the stack below `frame` (inclusive), outermost first."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    calls: list[Call] = []
    via: list[str] = []
    for f in reversed(frames):
        file = _project_file(f.f_code.co_filename)
        if file is None:
            if calls and _package(f.f_code.co_filename) not in via:
                via.append(_package(f.f_code.co_filename))
            continue
        calls.append(Call(file, f.f_code.co_qualname, tuple(via)))
        via = []
    return calls


def _sample(argv: list[str]) -> None:
    from fastddpm import cli

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        status = cli.main([*SAMPLE, *argv, "--out", os.path.join(tmp, "grid.png")])
    if status != 0:
        raise SystemExit(f"fastddpm sample {' '.join(argv)} failed with status {status}")


def triton_chains() -> dict[str, list[Call]]:
    """Kernel name -> the chain at its first launch, for a `--backend triton` CPU run."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    chains: dict[str, list[Call]] = {}

    def hook(frame: FrameType, event: str, arg: object) -> None:
        if event != "call" or frame.f_code.co_name != "run":
            return
        launcher = frame.f_locals.get("self")
        if isinstance(launcher, (JITFunction, InterpretedFunction)):
            fn = launcher.fn
            kernel = f"{_project_file(fn.__code__.co_filename)}::{fn.__name__}"
            chains.setdefault(kernel, chain(frame.f_back))

    sys.setprofile(hook)
    try:
        _sample(["--backend", "triton"])
    finally:
        sys.setprofile(None)
    return chains


class _Recorded:
    """A CUDA library function that records the chain of its first call into `chains`."""

    def __init__(self, fn: ctypes._CFuncPtr, name: str, chains: dict[str, list[Call]]) -> None:
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_chains", chains)

    def __getattr__(self, attr: str) -> object:
        return getattr(self._fn, attr)

    def __setattr__(self, attr: str, value: object) -> None:  # restype, argtypes
        setattr(self._fn, attr, value)

    def __call__(self, *args: object) -> object:
        self._chains.setdefault(self._name, chain(sys._getframe(1)))
        return self._fn(*args)


def cuda_chains() -> dict[str, list[Call]] | str:
    """Library function -> the chain at its first call, for a `--backend cuda` run on CUDA; or why
    there is none."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    chains: dict[str, list[Call]] = {}
    names = {f"fastddpm_{op}" for op in LIBRARY_OPS}

    class RecordingCDLL(ctypes.CDLL):
        def __getattr__(self, name: str) -> object:
            fn = super().__getattr__(name)
            if name in names:
                fn = _Recorded(fn, name, chains)
                setattr(self, name, fn)
            return fn

    plain, ctypes.CDLL = ctypes.CDLL, RecordingCDLL
    try:
        from fastddpm import ops

        if ops.backend_status()["cuda"] != "available":
            return f"the cuda backend is not available: {ops.backend_status()['cuda']}"
        _sample(["--backend", "cuda", "--device", "cuda"])
    finally:
        ctypes.CDLL = plain
    return chains


def report(title: str, calls: list[Call]) -> str:
    lines = [f"{title}: {len(calls)} calls in {len({c.file for c in calls})} files"]
    for n, call in enumerate(calls, 1):
        via = f"  (through {', '.join(call.via)})" if call.via else ""
        lines.append(f"  {n:2d}. {call.function}  [{call.file}]{via}")
    return "\n".join(lines)


def main() -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on the CPU
    os.environ["FASTDDPM_VERIFY"] = "0"
    sections = [report(f"triton {kernel}", calls) for kernel, calls in triton_chains().items()]
    cuda = cuda_chains()
    if isinstance(cuda, str):
        sections.append(f"cuda: not traced ({cuda})")
    else:
        sections += [report(f"cuda {name}", calls) for name, calls in cuda.items()]
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
