"""Large sampling runs that lose nothing: n images in shards, written atomically, resumable.

A run directory holds

    run.json                 the run's settings (RunSpec) and the model's identity; written once
    shards/shard-000042.npz  images [42 * shard_size, 43 * shard_size) as arr_0 (k, H, W, 3) uint8
    samples.npz              all n images in order, arr_0 (n, H, W, 3) uint8, written last

Shard k is sampled with the Philox seed `shard_seed(seed, k)` (Sampler.sample(seed=...)), so
its images depend only on the run's settings and k: not on which process, device, or attempt
made them. Every file is written atomically, so a run killed at any point keeps its finished
shards; run again with the same settings, it samples only the missing shards and ends with the
same n images as an uninterrupted run. Under torchrun the missing shards are dealt round-robin
to the ranks; each rank writes its own shards and rank 0 assembles samples.npz.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import images
from .distributed import World
from .io import atomic_write
from .sampler import METHODS, Sampler, placement

MANIFEST = "run.json"
SHARDS = "shards"
SAMPLES = "samples.npz"
FORMAT = "fastddpm-run/1"


@dataclass(frozen=True)
class RunSpec:
    """What a run samples. Images depend on every field, so a resumed run must repeat them all.

    n: images in all; shard_size: images per shard file; batch_size: images per network call
    (Philox offsets are per batch, so it changes the images); seed: the run seed; steps, method,
    eta: as in Sampler.sample.
    """

    n: int
    shard_size: int
    batch_size: int
    seed: int = 0
    steps: int | str | None = None
    method: str = "ddpm"
    eta: float = 0.0

    def __post_init__(self) -> None:
        for name in ("n", "shard_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown sampling method {self.method!r}; choose one of {', '.join(METHODS)}")

    @property
    def num_shards(self) -> int:
        return math.ceil(self.n / self.shard_size)

    def shard_range(self, k: int) -> range:
        """The indices of the images in shard k."""
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.n))


def shard_seed(seed: int, k: int) -> int:
    """Shard k's Philox seed: 64 bits of SHA-256 over (run seed, k), so neighbouring seeds and
    shards give unrelated streams."""
    digest = hashlib.sha256(f"fastddpm-shard:{seed}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def model_fingerprint(sampler: Sampler) -> str:
    """SHA-256 over the network's config, the diffusion's, and every parameter's bytes."""
    h = hashlib.sha256()
    h.update(json.dumps([sampler.unet.config.to_dict(), sampler.diffusion.to_dict()]).encode())
    for name, tensor in sampler.unet.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def shard_path(out_dir: Path, k: int) -> Path:
    return out_dir / SHARDS / f"shard-{k:06d}.npz"


def manifest(spec: RunSpec, sampler: Sampler) -> dict:
    """run.json's content: the spec, the image shape, the model's identity and its precision
    mode (fp32 and tf32 share weights but not numerics on a GPU). Not the backend: backends agree
    within the op contract, so a run may resume on other hardware."""
    cfg = sampler.unet.config
    return {
        "format": FORMAT,
        "spec": asdict(spec),
        "image_shape": [cfg.resolution, cfg.resolution, 3],
        "model": model_fingerprint(sampler),
        "precision": sampler.precision.mode or str(placement(sampler.unet)[1]).removeprefix("torch."),
    }


def check_manifest(out_dir: Path, expected: dict) -> None:
    """Raise if out_dir's run.json differs from `expected`, naming what differs."""
    path = out_dir / MANIFEST
    try:
        found = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a fastddpm run manifest: {err}") from None
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastddpm run manifest (format {FORMAT!r})")
    if found == expected:
        return
    spec, spec0 = found.get("spec", {}), expected["spec"]
    diffs = [f"{key}={spec.get(key)!r} (now {spec0[key]!r})" for key in spec0 if spec.get(key) != spec0[key]]
    if found.get("model") != expected["model"]:
        diffs.append("a different model (weights or configs)")
    if found.get("precision") != expected["precision"]:
        diffs.append(f"precision {found.get('precision')!r} (now {expected['precision']!r})")
    if found.get("image_shape") != expected["image_shape"]:
        diffs.append(f"image shape {found.get('image_shape')} (now {expected['image_shape']})")
    raise ValueError(
        f"{out_dir} holds a run with other settings: {'; '.join(diffs)}."
        " Resume it with the same arguments, or choose another --out"
    )


def read_shard(out_dir: Path, spec: RunSpec, k: int, image_shape: tuple[int, ...]) -> np.ndarray:
    """Shard k's images (k_images, H, W, 3) uint8, checked against the spec."""
    path = shard_path(out_dir, k)
    expected = (len(spec.shard_range(k)), *image_shape)
    try:
        with np.load(path) as f:
            shard = f["arr_0"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path} is not a readable shard ({err}): delete it to sample it again") from None
    if shard.dtype != np.uint8 or shard.shape != expected:
        raise ValueError(
            f"{path} holds {shard.dtype} {shard.shape}, expected uint8 {expected}:"
            " delete it to sample it again"
        )
    return shard


def run(
    sampler: Sampler,
    out_dir: str | os.PathLike,
    spec: RunSpec,
    world: World | None = None,
    progress: bool = True,
) -> Path:
    """Sample `spec` into out_dir (see the module docstring), resuming what is there.

    world: this process's rank and the number of ranks (fastddpm.distributed.init); every rank
    calls run() with the same arguments. Returns the path of samples.npz.
    """
    world = world or World()
    out_dir = Path(out_dir)
    expected = manifest(spec, sampler)
    if world.is_main:
        if (out_dir / MANIFEST).exists():
            check_manifest(out_dir, expected)
        else:
            atomic_write(out_dir / MANIFEST, lambda p: Path(p).write_text(json.dumps(expected, indent=2)))
        for stale in (out_dir / SHARDS).glob(".shard-*.tmp"):  # left by a killed writer
            stale.unlink()
    world.barrier()
    if not world.is_main:
        check_manifest(out_dir, expected)
    final = out_dir / SAMPLES
    if final.exists():
        return final

    missing = [k for k in range(spec.num_shards) if not shard_path(out_dir, k).exists()]
    mine = missing[world.rank :: world.size]
    total = sum(len(spec.shard_range(k)) for k in mine)
    desc = f"rank {world.rank}/{world.size}" if world.size > 1 else "sampling"
    with tqdm(total=total, unit="img", desc=desc, disable=not (progress and world.is_main)) as bar:
        for k in mine:
            x = sampler.sample(
                len(spec.shard_range(k)),
                steps=spec.steps,
                method=spec.method,
                eta=spec.eta,
                batch_size=spec.batch_size,
                seed=shard_seed(spec.seed, k),
                progress=False,
            )
            images.save_npz(shard_path(out_dir, k), images.to_rgb(images.to_uint8(x)))
            bar.update(x.shape[0])
    world.barrier()
    if world.is_main:
        shape = (spec.n, *expected["image_shape"])
        images.save_npz_chunks(final, shape, _shards(out_dir, spec, tuple(shape[1:])))
    world.barrier()
    return final


def _shards(out_dir: Path, spec: RunSpec, image_shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    for k in range(spec.num_shards):
        if not shard_path(out_dir, k).exists():
            raise ValueError(f"{shard_path(out_dir, k)} is missing: run again to sample it")
        yield read_shard(out_dir, spec, k, image_shape)
