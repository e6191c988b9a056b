"""Sample tensors in [-1, 1] -> uint8 images, PNG grids, and the .npz that FID tools read."""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image

from .io import atomic_write

# The largest grid or strip written, in pixels (400 MB as RGB): a bigger one is refused before work.
MAX_PNG_PIXELS = 2**27


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounded as diffusers' pipelines round."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got {_describe(x)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"expected float images in [-1, 1], got dtype {x.dtype}")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        kind = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        bad = int((~finite).flatten(1).any(1).sum())
        raise ValueError(
            f"{bad} of {x.shape[0]} images hold non-finite values ({kind}): refusing to write them"
        )
    x = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if hasattr(x, "shape") else type(x).__name__


def to_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 1 or 3) uint8 -> (N, H, W, 3): grey images repeated over three channels."""
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[-1]}")
    return images


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, 3) image, row-major."""
    n, h, w, c = images.shape
    height, width = grid_size(n, h, w, nrow, pad)
    nrow = nrow or math.ceil(math.sqrt(n))
    out = np.zeros((height, width, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y : y + h, x : x + w] = image
    return out


def grid_size(
    n: int, h: int, w: int, nrow: int | None = None, pad: int = 2, scale: int = 1
) -> tuple[int, int]:
    """(height, width) in pixels of the grid of n (h, w) images `grid` makes, times `scale`;
    a ValueError for no images, bad nrow/pad/scale, or more than MAX_PNG_PIXELS pixels."""
    if n < 1:
        raise ValueError("a grid needs at least one image, got 0")
    for name, value, low in (("nrow", nrow, 1), ("pad", pad, 0), ("scale", scale, 1)):
        if value is None and name == "nrow":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    height, width = (rows * (h + pad) + pad) * scale, (nrow * (w + pad) + pad) * scale
    if height * width > MAX_PNG_PIXELS:
        raise ValueError(
            f"the PNG would be {width}x{height} pixels ({n} images, scale {scale}), more than the"
            f" {MAX_PNG_PIXELS:,} allowed: lower the scale or the number of images, or write an .npz"
        )
    return height, width


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write one (H, W, 3) uint8 image as PNG, atomically."""
    atomic_write(path, lambda p: Image.fromarray(image).save(p, format="PNG"))


def save_grid(
    path: str | os.PathLike, x: torch.Tensor, nrow: int | None = None, scale: int = 1, pad: int = 2
) -> None:
    """Samples (N, C, H, W) in [-1, 1] -> a PNG grid (`pad` pixels between and around the
    images), each pixel enlarged to scale x scale."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"expected samples (N, C, H, W), got {_describe(x)}")
    grid_size(x.shape[0], x.shape[2], x.shape[3], nrow, pad, scale)
    image = grid(to_rgb(to_uint8(x)), nrow, pad)
    save_png(path, image.repeat(scale, axis=0).repeat(scale, axis=1))


def save_npz(path: str | os.PathLike, images: np.ndarray) -> None:
    """(N, H, W, 3) uint8 -> .npz with key arr_0, the layout FID tools read; atomic."""
    save_npz_chunks(path, images.shape, [images])


def save_npz_chunks(path: str | os.PathLike, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> None:
    """Write an .npz whose arr_0 is the concatenation of `chunks`, streamed, atomically.

    shape: (N, H, W, 3) of the whole array; chunks: uint8 (k_i, H, W, 3) with sum k_i = N,
    each read once, so N may exceed memory (50,000 256x256 images are 9.8 GB).
    """
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 images, got shape {tuple(shape)}")

    def write(p: str) -> None:
        written = 0
        with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as f:
                header = {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)}
                np.lib.format.write_array_header_1_0(f, header)
                for chunk in chunks:
                    if chunk.dtype != np.uint8 or chunk.ndim != 4 or chunk.shape[1:] != tuple(shape[1:]):
                        raise ValueError(
                            f"expected (k, {', '.join(map(str, shape[1:]))}) uint8 images,"
                            f" got {chunk.dtype} {chunk.shape}"
                        )
                    f.write(np.ascontiguousarray(chunk).tobytes())
                    written += len(chunk)
        if written != shape[0]:
            raise ValueError(f"the chunks hold {written} images, but the .npz was declared with {shape[0]}")

    atomic_write(path, write)
