"""Registers, spills, shared memory and theoretical H100 occupancy of every kernel on sm_90.

    python -m benchmarks.resources

prints a Markdown table (the one in benchmarks/README.md, "Kernel resources on sm_90") without a
GPU: each Triton launch of the production configurations (tests/test_triton_gpu_compile.py's
`full` case set) compiled exactly as its launch compiles it, under the triton installed here and
under triton 3.6 (the GPU machine's; pip-installed into build/triton-3.6 on first use), and
every kernel of the CUDA library (csrc/) built for sm_90 with setup.py's flags plus -Xptxas -v.
Figures are ptxas's own report; the output is deterministic.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parent.parent
GPU_MACHINE_TRITON = "3.6.0"

# H100 (sm_90) per-SM limits, as CUDA's occupancy calculator (cuda_occupancy.h) states them.
REGS_PER_SM = 65536
SUB_PARTITIONS = 4  # registers are allocated per sub-partition: 16384 each
REG_GRANULARITY = 256  # registers per warp are allocated in units of 256
MAX_WARPS_PER_SM = 64  # 2048 threads
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_GRANULARITY = 128
SMEM_PER_BLOCK = 227 * 1024  # the most one block may use (opt-in)


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def warps_by_registers(regs: int) -> int:
    """Warps per SM that `regs` registers per thread leave room for:
    4 * floor(16384 / ceil(32 * regs / 256) * 256), at most 64."""
    per_warp = _round_up(max(regs, 1) * 32, REG_GRANULARITY)
    return min(MAX_WARPS_PER_SM, SUB_PARTITIONS * (REGS_PER_SM // SUB_PARTITIONS // per_warp))


def occupancy(regs: int, threads: int, shared: int) -> float:
    """Theoretical occupancy on an H100: resident warps / 64, for a block of `threads` threads that
    uses `regs` registers per thread and `shared` bytes of shared memory (static + dynamic).

    blocks/SM = min(32,
                    floor(2048 / threads),
                    floor(warps_by_registers(regs) / warps),          warps = ceil(threads / 32)
                    floor(228 KiB / round_up(shared + 1 KiB, 128)))
    occupancy = blocks/SM * warps / 64

    where warps_by_registers(regs) = 4 * floor(16384 / round_up(32 * regs, 256)) (each of the 4
    sub-partitions holds 16384 of the SM's 65536 registers, allocated per warp in units of 256).
    This is cudaOccupancyMaxActiveBlocksPerMultiprocessor's arithmetic with the largest
    shared-memory carve-out; 0 when one block does not fit (shared > 227 KiB).
    """
    warps = -(-threads // 32)
    if shared > SMEM_PER_BLOCK or warps == 0:
        return 0.0
    by_smem = SMEM_PER_SM // _round_up(shared + SMEM_RESERVED_PER_BLOCK, SMEM_GRANULARITY)
    blocks = min(MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // warps, warps_by_registers(regs) // warps, by_smem)
    return blocks * warps / MAX_WARPS_PER_SM


# --- ptxas -v ---------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> list[dict]:
    """ptxas -v's report -> one dict per entry function: name, arch, regs, stack, spill_stores,
    spill_loads, smem (static shared bytes). Frames of non-entry functions are left out."""
    kernels, current, properties_of = [], None, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {
                "name": m.group(1),
                "arch": m.group(2),
                "stack": 0,
                "spill_stores": 0,
                "spill_loads": 0,
            }
            kernels.append(current)
        elif m := _PROPERTIES.search(line):
            properties_of = m.group(1)
        elif (m := _FRAME.search(line)) and current is not None and properties_of == current["name"]:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif (m := _USED.search(line)) and current is not None:
            current["regs"] = int(m.group(1))
            current["smem"] = int(s.group(1)) if (s := _SMEM.search(line)) else 0
    missing = [k["name"] for k in kernels if "regs" not in k]
    if missing:
        raise ValueError(f"ptxas report without a register count for {missing}")
    return kernels


# --- the CUDA library ---------------------------------------------------------------------------


def _setup():
    sys.path.insert(0, str(ROOT))
    try:
        import setup
    finally:
        sys.path.remove(str(ROOT))
    return setup


def _demangle(names: list[str], nvcc: str) -> list[str]:
    tool = shutil.which("cu++filt", path=str(Path(nvcc).parent)) or shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def cuda_kernel_resources(build_dir: Path) -> list[dict]:
    """Build the library's objects for sm_90 into `build_dir` (one nvcc job; setup.py's sources
    and flags, plus -Xptxas -v) and return ptxas's figures per kernel, with its demangled name."""
    setup = _setup()
    nvcc, ninja = setup.find_nvcc(), setup.find_ninja()
    if nvcc is None or ninja is None:
        raise FileNotFoundError("the CUDA resources need nvcc and ninja (as setup.py finds them)")
    gencode, targets = setup.cuda_targets(*setup.parse_cuda_arch_list("9.0"))
    library = build_dir / "libfastddpm_cuda.so"
    setup.write_ninja_file(
        nvcc, gencode, targets, build=build_dir, library=library, extra_cflags="-Xptxas -v"
    )
    objects = [build_dir / (Path(src).stem + ".o") for src in setup.CUDA_SOURCES]
    run = subprocess.run(
        [ninja, "-C", str(build_dir), "-j", "1", *map(str, objects)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if run.returncode != 0:
        raise RuntimeError(f"the -Xptxas -v build failed:\n{run.stdout[-4000:]}{run.stderr[-4000:]}")
    kernels = []
    for obj in objects:
        for kernel in parse_ptxas(obj.with_suffix(".o.log").read_text()):
            kernels.append({"source": obj.stem + ".cu", **kernel})
    for kernel, readable in zip(kernels, _demangle([k["name"] for k in kernels], nvcc), strict=True):
        kernel["kernel"] = readable.removeprefix("void ").removeprefix("fastddpm::")
    return kernels


# DDPM's attention head dims: 32 heads of 8 (diffusers' configs), one head of 256 (CIFAR10) or
# 512 (the 256x256 models).
PRODUCTION_HEAD_DIMS = (8, 256, 512)


def _template(kernel: str) -> tuple[str, list[str]]:
    """'attention_tc_kernel<__half, 256>(fastddpm::AttentionParams)'
    -> ('attention_tc_kernel', ['__half', '256'])."""
    name, _, rest = kernel.partition("<")
    return name.split("(")[0], [a.strip() for a in rest.rpartition(">")[0].split(",")] if rest else []


def hot_kernels(kernels: list[str]) -> set[str]:
    """The kernels the U-Net's launches run, by the demangled names ptxas reports: all but the
    scalar fallbacks (`*_scalar_kernel`: misaligned or odd-sized inputs only), the device probe,
    and attention instantiations for head-dim bounds no DDPM head dim picks (a launch takes the
    smallest bound >= D, the last template argument, among its dtype's instantiations)."""
    hot, bounds = set(), {}
    for kernel in kernels:
        name, args = _template(kernel)
        if name.endswith("_scalar_kernel") or not name.endswith("_kernel") or "probe" in name:
            continue
        if name.startswith("attention") and args and args[-1].isdigit():
            bounds.setdefault((name, tuple(args[:-1])), {})[int(args[-1])] = kernel
        else:
            hot.add(kernel)
    for by_bound in bounds.values():
        for d in PRODUCTION_HEAD_DIMS:
            if fits := [b for b in by_bound if b >= d]:
                hot.add(by_bound[min(fits)])
    return hot


# --- the Triton kernels -----------------------------------------------------------------------


def install_triton(version: str = GPU_MACHINE_TRITON) -> Path:
    """build/triton-<version>: that triton alone (pip --no-deps --target), installed once."""
    target = ROOT / "build" / f"triton-{version}"
    if not (target / "triton" / "__init__.py").is_file():
        partial = target.with_name(target.name + f".{os.getpid()}.tmp")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(partial)]
        run = subprocess.run([*cmd, f"triton=={version}"], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"pip could not install triton=={version}: {run.stderr.strip()[-2000:]}")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


def triton_kernel_resources(triton_path: Path | None = None, full: bool = True) -> list[dict]:
    """Compile every Triton launch of the case set for sm_90 in a subprocess (no interpreter),
    with `triton_path` (a pip --target folder) ahead of the installed triton; one dict per
    distinct launch (tests/test_triton_gpu_compile.py's `compile_all`)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(p) for p in (triton_path, ROOT) if p is not None] + [env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        cmd = [sys.executable, "-m", "tests.test_triton_gpu_compile", "--json", str(out)]
        run = subprocess.run(
            cmd + (["--full"] if full else []), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
        if run.returncode != 0:
            raise RuntimeError(f"the Triton compile failed:\n{run.stderr[-6000:]}")
        return json.loads(out.read_text())


# --- the tables ---------------------------------------------------------------------------------


def _bytes(n: int) -> str:
    return f"{n / 1024:g} KiB" if n >= 1024 else f"{n} B"


def triton_table(runs: dict[str, list[dict]]) -> str:
    """Markdown, one row per Triton launch; registers, spills, stack frame and occupancy per triton
    version ("3.7.1 / 3.6.0"), shared memory of the first version."""
    found = [{(r["case"], r["kernel"]): r for r in results} for results in runs.values()]
    keys = list(dict.fromkeys(key for by_key in found for key in by_key))

    def per_version(key: tuple, show) -> str:
        return " / ".join(show(by_key[key]) if key in by_key else "-" for by_key in found)

    def spills(r: dict) -> str:
        return f"{r['spill_stores']}/{r['spill_loads']}"

    def occupancy_of(r: dict) -> str:
        return f"{occupancy(r['regs'], r['num_warps'] * 32, r['shared']):.0%}"

    lines = [
        "| kernel | launch | configuration | warps | regs | spills st/ld B | stack B | shared | occupancy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        r = next(by_key[key] for by_key in found if key in by_key)
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k != "num_warps")
        cells = [f"`{r['kernel']}`", r["case"], config, str(r["num_warps"])]
        cells += [per_version(key, lambda x: str(x["regs"])), per_version(key, spills)]
        cells += [
            per_version(key, lambda x: str(x["stack"])),
            _bytes(r["shared"]),
            per_version(key, occupancy_of),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cuda_table(kernels: list[dict]) -> str:
    """Markdown, one row per CUDA kernel. The launchers pick block sizes and dynamic shared memory
    at run time (csrc/*.cu) and the library does not expose them, so shared memory is ptxas's
    static figure and occupancy the bound registers alone set (warps_by_registers / 64)."""
    hot = hot_kernels([k["kernel"] for k in kernels])
    lines = [
        "| kernel | source | hot | regs | spills st/ld B | stack B | static shared | occupancy (registers) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in kernels:
        lines.append(
            f"| `{k['kernel']}` | {k['source']} | {'yes' if k['kernel'] in hot else ''} | {k['regs']} |"
            f" {k['spill_stores']}/{k['spill_loads']} | {k['stack']} | {_bytes(k['smem'])} |"
            f" {warps_by_registers(k['regs']) / MAX_WARPS_PER_SM:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    import triton

    runs = {triton.__version__: triton_kernel_resources()}
    if triton.__version__ != GPU_MACHINE_TRITON:
        runs[GPU_MACHINE_TRITON] = triton_kernel_resources(install_triton())
    print(f"Triton launches of the production configurations, sm_90 (triton {' / '.join(runs)}):\n")
    print(triton_table(runs))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            kernels = cuda_kernel_resources(Path(tmp))
        except FileNotFoundError as err:
            print(f"\nCUDA library: not built here ({err})")
            return
    print("\nCUDA library kernels, sm_90 (setup.py's flags, FASTDDPM_CUDA_ARCH_LIST=9.0):\n")
    print(cuda_table(kernels))


if __name__ == "__main__":
    main()
