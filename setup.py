"""Build and install fastddpm.

`kernels/` (the Triton kernels) is installed as `fastddpm.kernels`; the CUDA
library under `csrc/` is built here by a later change.
"""

import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "fastddpm" / "__init__.py").read_text()).group(1)

setup(
    name="fastddpm",
    version=VERSION,
    description="Fast, faithful DDPM sampling: fused kernels for the paper's U-Net",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastddpm", "fastddpm.kernels"],
    package_dir={"fastddpm": "fastddpm", "fastddpm.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "pillow"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "diffusers>=0.30", "ruff"],
    },
    entry_points={"console_scripts": ["fastddpm=fastddpm.cli:main"]},
)
