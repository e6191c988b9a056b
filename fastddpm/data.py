"""Training images: a folder of image files, an .npz of uint8 images, or scikit-learn's digits.

Every source comes out as uint8 (N, C, H, W); `to_model_range` maps it to [-1, 1].
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _digits_split(n: int, split: str) -> np.ndarray:
    """Boolean mask of a split: "train" (index not a multiple of 5), "heldout" (the rest), "all"."""
    index = np.arange(n)
    masks = {"train": index % 5 != 0, "heldout": index % 5 == 0, "all": index >= 0}
    if split not in masks:
        raise ValueError(f"unknown digits split {split!r}; choose train, heldout or all")
    return masks[split]


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the built-in digits need scikit-learn: pip install scikit-learn") from err
    return load_digits()


def digits(split: str = "train") -> np.ndarray:
    """scikit-learn's 1,797 8x8 digits as uint8 (N, 1, 8, 8), scaled from 0..16 to 0..255.

    split: "train" (1,437 images), "heldout" (360) or "all".
    """
    bunch = _load_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    return images[_digits_split(len(images), split)]


def digit_labels(split: str = "train") -> np.ndarray:
    """The class (0..9) of each image of `digits(split)`."""
    labels = _load_digits().target
    return labels[_digits_split(len(labels), split)]


def from_npz(path: str | os.PathLike) -> np.ndarray:
    """An .npz whose arr_0 is uint8 (N, H, W, C) (what fastddpm and FID tools write) -> (N, C, H, W)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such data file: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f:
                raise ValueError(f"{path} has no arr_0 array (keys: {list(f.keys())})")
            images = f["arr_0"]
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable .npz file ({_first_line(err)})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    if not len(images):
        raise ValueError(f"{path}: arr_0 holds no images")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def from_folder(path: str | os.PathLike, resolution: int, channels: int = 3) -> np.ndarray:
    """Every image file in a folder (recursively), center-cropped square and resized -> uint8 (N, C, H, W).
    ValueError naming the first file that is not a readable image."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    mode = {1: "L", 3: "RGB"}[channels]
    out = np.empty((len(files), channels, resolution, resolution), dtype=np.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as image:
                image = image.convert(mode)
                side = min(image.size)
                left, top = (image.width - side) // 2, (image.height - side) // 2
                image = image.crop((left, top, left + side, top + side))
                image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
                out[i] = np.asarray(image).reshape(resolution, resolution, channels).transpose(2, 0, 1)
        except (
            OSError,
            ValueError,
            Image.DecompressionBombError,
        ) as err:  # UnidentifiedImageError is an OSError
            raise ValueError(f"{file}: not a readable image ({_first_line(err)})") from None
    return out


def load(source: str, resolution: int, channels: int) -> np.ndarray:
    """ "digits", an .npz file, or a folder -> uint8 (N, channels, resolution, resolution), checked."""
    if source == "digits":
        images = digits("train")
    elif source.endswith(".npz"):
        images = from_npz(source)
    elif Path(source).is_dir():
        images = from_folder(source, resolution, channels)
    else:
        raise FileNotFoundError(f"no such data folder or .npz file: {source} (or use 'digits')")
    if images.shape[1:] != (channels, resolution, resolution):
        raise ValueError(
            f"data {source} has images of shape {images.shape[1:]}, but the model takes"
            f" {(channels, resolution, resolution)}"
        )
    return images


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 in 0..255 -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0
