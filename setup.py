"""Build and install fastddpm.

`kernels/` (the Triton kernels) is installed as `fastddpm.kernels`. The CUDA library
under `csrc/` is compiled by nvcc through ninja into `fastddpm/_lib/libfastddpm_cuda.so`
wherever nvcc is found (see `build_cuda_library`); without nvcc the package installs
without it and `fastddpm info` says so.
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "fastddpm" / "_version.py").read_text()).group(1)

# --- the CUDA library (csrc/) -------------------------------------------------------------
# Environment: FASTDDPM_BUILD_CUDA=0 skips the library, =1 makes a missing nvcc an error;
# FASTDDPM_CUDA_ARCH_LIST (default below) picks the GPUs; FASTDDPM_NVCC names the compiler;
# FASTDDPM_BUILD_JOBS caps ninja's parallel jobs.

CSRC = ROOT / "csrc"
CUDA_SOURCES = ("library.cu", "group_norm_silu.cu", "attention.cu", "ddpm_step.cu", "multistep_update.cu")
CUDA_LIBRARY = ROOT / "fastddpm" / "_lib" / "libfastddpm_cuda.so"
CUDA_BUILD_DIR = ROOT / "build" / "cuda"  # kept between builds: ninja recompiles what changed
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def find_nvcc() -> str | None:
    """FASTDDPM_NVCC, nvcc on PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, then /usr/local/cuda/bin."""
    candidates = [os.environ.get("FASTDDPM_NVCC"), shutil.which("nvcc")]
    candidates += [
        os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ
    ]
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def find_ninja() -> str | None:
    """The `ninja` package's binary (the build requirement), else ninja on PATH. One ninja keeps
    builds incremental: ninja versions differ in how they record command lines."""
    try:
        import ninja

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        return shutil.which("ninja")


def parse_cuda_arch_list(text: str) -> tuple[list[int], bool]:
    """'8.0;8.6;9.0+PTX' -> ([80, 86, 90], True); also takes '80 90', 'sm_80,sm_90' and a lone 'PTX'."""
    archs, ptx = [], False
    for token in re.split(r"[;,\s]+", text.strip()):
        if token.upper().endswith("PTX"):
            ptx, token = True, token[: -len("PTX")].rstrip("+")
        if not token:
            continue
        digits = token.removeprefix("sm_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}", digits):
            raise ValueError(f"FASTDDPM_CUDA_ARCH_LIST: cannot read {token!r} (write e.g. '8.0;9.0+PTX')")
        if int(digits) < 80:
            raise ValueError(
                f"FASTDDPM_CUDA_ARCH_LIST: {token} is older than sm_80; the kernels need cp.async and"
                " bf16 tensor cores (Ampere or newer)"
            )
        archs.append(int(digits))
    if not archs:
        raise ValueError(f"FASTDDPM_CUDA_ARCH_LIST={text!r} names no architecture")
    return sorted(set(archs)), ptx


def cuda_targets(archs: list[int], ptx: bool) -> tuple[str, list[str]]:
    """nvcc's -gencode flag and the target names. All SASS comes from the PTX of the oldest
    architecture (one front-end pass instead of one per architecture: the kernels use nothing
    newer than sm_80), and "+PTX" embeds that PTX, which any newer GPU can compile."""
    virtual = f"compute_{archs[0]}"
    codes = [f"sm_{a}" for a in archs] + ([virtual] if ptx else [])
    return f"-gencode=arch={virtual},code=[{','.join(codes)}]", codes


def write_if_changed(path: Path, text: str) -> None:
    """Leaves an unchanged file alone, so ninja sees nothing to rebuild."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def write_ninja_file(
    nvcc: str,
    gencode: str,
    targets: list[str],
    build: Path = CUDA_BUILD_DIR,
    library: Path = CUDA_LIBRARY,
    extra_cflags: str = "",
) -> None:
    """build.ninja (and the headers it needs) for the library in `build`; `extra_cflags` are added
    to nvcc's (benchmarks/resources.py builds with "-Xptxas -v" to read each kernel's resources)."""
    build.mkdir(parents=True, exist_ok=True)
    write_if_changed(
        build / "build_config.h",
        f'#define FASTDDPM_VERSION "{VERSION}"\n#define FASTDDPM_TARGETS "{" ".join(targets)}"\n',
    )
    write_if_changed(build / "exports.map", "{\n  global: fastddpm_*;\n  local: *;\n};\n")
    objects = [build / (Path(src).stem + ".o") for src in CUDA_SOURCES]
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        "cflags = -std=c++17 -O3 -Xcompiler=-fPIC,-fvisibility=hidden,-Wall,-Wextra"
        f" -I{CSRC / 'include'} -I{CSRC} -I{build} {gencode} {extra_cflags}".rstrip(),
        f"ldflags = -shared -cudart=static -Xlinker=--version-script={build / 'exports.map'}",
        "",
        "# Each compile also leaves its diagnostics in $out.log (empty when clean).",
        "rule cu",
        "  command = $nvcc $cflags -MD -MF $out.d -c $in -o $out 2> $out.log;"
        " status=$$?; cat $out.log >&2; exit $$status",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule link",
        "  command = $nvcc $ldflags $in -o $out",
        "  description = link $out",
        "",
    ]
    lines += [f"build {obj}: cu {CSRC / src}" for src, obj in zip(CUDA_SOURCES, objects, strict=True)]
    lines += [f"build {library}: link {' '.join(map(str, objects))}", f"default {library}", ""]
    write_if_changed(build / "build.ninja", "\n".join(lines))


def build_cuda_library() -> None:
    """Compile csrc/ into fastddpm/_lib/libfastddpm_cuda.so where nvcc exists; else say why not."""
    setting = os.environ.get("FASTDDPM_BUILD_CUDA", "")
    if setting == "0":
        print("fastddpm: skipping the CUDA library: FASTDDPM_BUILD_CUDA=0")
        return
    nvcc = find_nvcc()
    if nvcc is None:
        message = (
            "fastddpm: skipping the CUDA library: nvcc not found (PATH, $CUDA_HOME/bin, $CUDA_PATH/bin,"
            " /usr/local/cuda/bin); the 'cuda' backend will be unavailable"
        )
        if setting == "1":
            raise RuntimeError(message + ", and FASTDDPM_BUILD_CUDA=1 requires it")
        print(message)
        return
    if not CSRC.is_dir():
        print(f"fastddpm: skipping the CUDA library: no sources at {CSRC}")
        return
    ninja = find_ninja()
    if ninja is None:
        raise RuntimeError("fastddpm: building the CUDA library needs ninja (pip install ninja)")
    archs, ptx = parse_cuda_arch_list(os.environ.get("FASTDDPM_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST))
    gencode, targets = cuda_targets(archs, ptx)
    CUDA_LIBRARY.parent.mkdir(parents=True, exist_ok=True)
    write_ninja_file(nvcc, gencode, targets)
    jobs = os.environ.get("FASTDDPM_BUILD_JOBS", str(os.cpu_count() or 1))
    print(
        f"fastddpm: building {CUDA_LIBRARY.relative_to(ROOT)} for {' '.join(targets)} with {nvcc}", flush=True
    )
    start = time.perf_counter()
    result = subprocess.run([ninja, "-C", str(CUDA_BUILD_DIR), "-j", jobs])
    if result.returncode != 0:
        raise RuntimeError(
            "fastddpm: the CUDA library failed to build (nvcc's messages are above; run pip with -v to see"
            " them); set FASTDDPM_BUILD_CUDA=0 to install without it"
        )
    print(f"fastddpm: CUDA library ready in {time.perf_counter() - start:.1f} s", flush=True)


class BuildPyWithCuda(build_py):
    """build_py that first builds the CUDA library in place (editable installs use it there;
    wheels pick it up as package data)."""

    def run(self) -> None:
        build_cuda_library()
        super().run()


# Importable (benchmarks/resources.py reuses the build functions); pip and `python setup.py` run it as
# __main__.
if __name__ == "__main__":
    setup(
        name="fastddpm",
        version=VERSION,
        description="Fast, faithful DDPM sampling: fused kernels for the paper's U-Net",
        long_description=(ROOT / "README.md").read_text(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=["fastddpm", "fastddpm.cuda", "fastddpm.kernels"],
        package_dir={"fastddpm": "fastddpm", "fastddpm.kernels": "kernels"},
        package_data={"fastddpm": ["_lib/*.so", "models/digits/*"]},
        install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "pillow"],
        extras_require={
            "test": [
                "pytest",
                "pytest-benchmark",
                "matplotlib",  # benchmarks/report.py's plot
                "diffusers>=0.30",
                "ruff",
                "ninja",
                "scikit-learn",
                "onnx>=1.17",
                "onnxscript>=0.5",  # torch.onnx.export's (dynamo) exporter
                "onnxruntime>=1.20",
                # torch==2.13.0's own pin (its CUDA wheels require it); CI runs the kernels in its interpreter
                'triton==3.7.1; platform_system == "Linux"',
            ],
            "train": ["scikit-learn"],  # the built-in digits data
            # export, and sampling on onnxruntime
            "onnx": ["onnx>=1.17", "onnxscript>=0.5", "onnxruntime>=1.20"],
        },
        entry_points={"console_scripts": ["fastddpm=fastddpm.cli:main"]},
        cmdclass={"build_py": BuildPyWithCuda},
    )
