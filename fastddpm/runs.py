"""Large sampling runs that lose nothing: n images in shards, written atomically, resumable.

A run directory holds

    .lock                     flock'ed by the one process that runs it (the kernel frees it at death)
    run.json                  the run's settings (RunSpec) and the model's identity; once samples.npz is
                              written, also its images' SHA-256 (`samples_sha256`)
    shards/shard-000042.json  shard 42's identity: the run's fingerprint, its index, Philox seed, count
                              and shape, and the SHA-256 of its images; written before its .npz
    shards/shard-000042.npz   images [42 * shard_size, 43 * shard_size) as arr_0 (k, H, W, 3) uint8
    samples.npz               all n images in order, arr_0 (n, H, W, 3) uint8, written last

Shard k is sampled with the Philox seed `shard_seed(seed, k)` (Sampler.sample(seed=...)), so
its images depend only on the run's settings and k: not on which process, device, or attempt
made them. Every file is written atomically, so a run killed at any point keeps its finished
shards; run again with the same settings, it samples only the missing shards and ends with the
same n images as an uninterrupted run. Under torchrun the missing shards are dealt round-robin
to the ranks; each rank writes its own shards and rank 0 assembles samples.npz.

Nothing found in the directory is trusted: a second process on it is refused ("DIR is in use by
another fastddpm process (pid N)"), so two never mix or redo each other's shards; a shard is
adopted only if its identity names this run and shard and its images hash to the recorded
SHA-256, else (another run's, swapped, rewritten, truncated, a symlink, a FIFO) it is sampled
again with a one-line notice; samples.npz is kept only if its images hash to the recorded value.
Temporary files of killed writers are removed on start, under the lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import stat
import sys
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import images
from .distributed import World
from .io import atomic_write
from .loop import NonFiniteSamplesError
from .precision import DTYPES
from .sampler import SAMPLERS, Sampler, check_clipped_model_output
from .schedule import check_eta, check_steps
from .solvers import SOLVERS, check_solver_steps

MANIFEST = "run.json"
SHARDS = "shards"
SAMPLES = "samples.npz"
LOCK = ".lock"
FORMAT = "fastddpm-run/2"  # /1 had no shard identities
SAMPLES_HASH = "samples_sha256"  # run.json's key for samples.npz's images, added when it is written
MAX_JSON_BYTES = 1 << 20  # run.json and shard identities are small; a larger file is not one
# Temporary files that atomic_write leaves when its process is killed (fastddpm.io).
STALE = {".": (".run.json.*.tmp", ".samples.npz.*.tmp", ".fastddpm-probe.*.tmp"), SHARDS: (".shard-*.tmp",)}
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)  # what a damaged file raises


class Rejected(Exception):
    """A file in the run directory that is not what the run expects; the message says why."""


def notice(message: str) -> None:
    """One line on stderr: what the run found and did about it."""
    print(f"fastddpm: {message}", file=sys.stderr)


@dataclass(frozen=True)
class RunSpec:
    """What a run samples. Images depend on every field, so a resumed run must repeat them all.

    n: images in all; shard_size: images per shard file; batch_size: images per network call
    (Philox offsets are per batch, so it changes the images); seed: the run seed; steps, method,
    eta, use_clipped_model_output: as in Sampler.sample.
    """

    n: int
    shard_size: int
    batch_size: int
    seed: int = 0
    steps: int | str | None = None
    method: str = "ddpm"
    eta: float = 0.0
    use_clipped_model_output: bool = False

    def __post_init__(self) -> None:
        for name in ("n", "shard_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.method not in SAMPLERS:
            raise ValueError(f"unknown sampling method {self.method!r}; choose one of {', '.join(SAMPLERS)}")
        object.__setattr__(self, "steps", check_steps(self.steps))
        if self.method in SOLVERS:
            check_solver_steps(self.method, self.steps)
        object.__setattr__(self, "eta", check_eta(self.eta, self.method))
        check_clipped_model_output(self.use_clipped_model_output, self.method)

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


def identity_path(out_dir: Path, k: int) -> Path:
    return out_dir / SHARDS / f"shard-{k:06d}.json"


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
        "precision": precision_name(sampler),
    }


def precision_name(sampler: Sampler) -> str:
    """The sampler's precision mode; for the default (the network's own dtype) the mode of that
    dtype's name, so that a default float32 run resumes under --precision fp32 (the same numbers
    on the CPU; on a GPU fp32 turns TF32 off where PyTorch's default keeps it in convolutions)."""
    if sampler.precision.mode is not None:
        return sampler.precision.mode
    dtype = sampler.denoiser.dtype
    return next((mode for mode, d in DTYPES.items() if d == dtype and mode != "tf32"), str(dtype))


def run_fingerprint(expected: dict) -> str:
    """SHA-256 of a run's manifest: what every one of its shards records, so that no shard of
    another run (another seed, model, or any setting) is ever adopted."""
    return hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()


def shard_identity(spec: RunSpec, fingerprint: str, image_shape: tuple[int, ...], k: int) -> dict:
    """What shard k of this run must record beside its images' SHA-256."""
    count = len(spec.shard_range(k))
    return {
        "run": fingerprint,
        "shard": k,
        "seed": shard_seed(spec.seed, k),
        "count": count,
        "shape": [count, *image_shape],
    }


def _open_regular(path: Path):
    """`path` opened for binary reading if it is a regular file (not a symlink, FIFO, directory:
    opened without following links and without blocking, then checked), else Rejected."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as err:
        if os.path.islink(path):
            raise Rejected("is a symbolic link, not a file of this run") from None
        raise Rejected(f"cannot be read ({err.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise Rejected("is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _read_json(path: Path) -> object:
    with _open_regular(path) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise Rejected(f"is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(data)
    except ValueError as err:
        raise Rejected(f"is not JSON ({err})") from None


def check_manifest(out_dir: Path, expected: dict) -> dict:
    """out_dir's run.json if it describes the run `expected` describes; else a ValueError naming
    what differs."""
    path = out_dir / MANIFEST
    try:
        found = _read_json(path)
    except Rejected as err:
        raise ValueError(f"{path} {err}: it is not a fastddpm run manifest") from None
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        what = found.get("format") if isinstance(found, dict) else None
        older = f" (it is {what!r}, from an older fastddpm)" if isinstance(what, str) else ""
        raise ValueError(
            f"{path} is not a fastddpm run manifest of format {FORMAT!r}{older}; choose another --out"
        )
    if {key: value for key, value in found.items() if key != SAMPLES_HASH} == expected:
        return found
    spec = found.get("spec") if isinstance(found.get("spec"), dict) else {}
    spec0 = expected["spec"]
    diffs = [f"{key}={spec.get(key)!r} (now {spec0[key]!r})" for key in spec0 if spec.get(key) != spec0[key]]
    if found.get("model") != expected["model"]:
        diffs.append("a different model (weights or configs)")
    if found.get("precision") != expected["precision"]:
        diffs.append(f"precision {found.get('precision')!r} (now {expected['precision']!r})")
    if found.get("image_shape") != expected["image_shape"]:
        diffs.append(f"image shape {found.get('image_shape')} (now {expected['image_shape']})")
    raise ValueError(
        f"{out_dir} holds a run with other settings: {'; '.join(diffs) or 'other fields'}."
        " Resume it with the same arguments, or choose another --out"
    )


def read_shard(out_dir: Path, identity: dict) -> np.ndarray:
    """Shard k's images (k_images, H, W, 3) uint8, if its identity file records `identity` and
    its images hash to the SHA-256 recorded there; else Rejected, saying why."""
    recorded = _recorded_identity(out_dir, identity)
    shape = tuple(identity["shape"])
    digest, data = read_npz(shard_path(out_dir, identity["shard"]), shape, keep=True)
    if digest != recorded["sha256"]:
        raise Rejected("does not hold the images its identity records (SHA-256 differs)")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _recorded_identity(out_dir: Path, identity: dict) -> dict:
    """Shard k's identity file, if it records `identity` and a SHA-256; else Rejected."""
    path = identity_path(out_dir, identity["shard"])
    if not (path.exists() or path.is_symlink()):
        raise Rejected(f"has no identity file {path.name}")
    try:
        recorded = _read_json(path)
    except Rejected as err:
        raise Rejected(f"has an identity file that {err}") from None
    if not isinstance(recorded, dict) or {key: recorded.get(key) for key in identity} != identity:
        raise Rejected("belongs to another run or shard (its identity differs)")
    digest = recorded.get("sha256")
    if not (isinstance(digest, str) and len(digest) == 64):
        raise Rejected("has an identity file without a SHA-256")
    return recorded


def _shard_reason(out_dir: Path, identity: dict) -> str | None:
    """Why shard k cannot be adopted without reading it ("missing" when it was never written),
    or None. Raises ValueError for a directory where the shard belongs (that is not ours to remove)."""
    path = shard_path(out_dir, identity["shard"])
    if path.is_dir() and not path.is_symlink():
        raise ValueError(f"{path} is a directory, not a shard: remove it")
    if not (path.exists() or path.is_symlink()):
        return "missing"
    try:
        if path.is_symlink() or not path.is_file():
            raise Rejected(
                "is a symbolic link, not a file of this run" if path.is_symlink() else "is not a regular file"
            )
        _recorded_identity(out_dir, identity)
    except Rejected as err:
        return str(err)
    return None


def read_npz(path: Path, shape: tuple[int, ...], keep: bool = False) -> tuple[str, bytes | None]:
    """(SHA-256 of arr_0's data, the data if `keep`) of an .npz that holds one (shape) uint8 arr_0 as
    save_npz_chunks writes it; else Rejected, saying why. The header is checked before any data is
    read (a lying one cannot make it allocate), the data streamed, the zip's CRC checked at its end."""
    kept = bytearray() if keep else None
    try:
        with _open_regular(path) as f, zipfile.ZipFile(f) as archive:
            if archive.namelist() != ["arr_0.npy"]:
                raise Rejected(f"holds {archive.namelist()[:3]}, not one arr_0")
            with archive.open("arr_0.npy") as member:
                version = np.lib.format.read_magic(member)
                if version != (1, 0):
                    raise Rejected(f"has .npy format {version}, not the (1, 0) fastddpm writes")
                found, fortran, dtype = np.lib.format.read_array_header_1_0(member)
                if found != shape or fortran or dtype != np.uint8:
                    raise Rejected(f"holds {dtype} {found}, expected uint8 {shape}")
                h, size = hashlib.sha256(), 0
                while chunk := member.read(1 << 24):
                    h.update(chunk)
                    size += len(chunk)
                    if size > math.prod(shape):
                        raise Rejected(f"holds more than the {math.prod(shape)} bytes of images expected")
                    if kept is not None:
                        kept += chunk
    except Rejected:
        raise
    except _READ_ERRORS as err:
        raise Rejected(f"is not a readable .npz ({type(err).__name__}: {err})") from None
    if size != math.prod(shape):
        raise Rejected(f"holds {size} bytes of images, expected {math.prod(shape)}")
    return h.hexdigest(), None if kept is None else bytes(kept)


@contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive flock on out_dir/.lock (made with out_dir if missing) for the block; a
    ValueError naming the holder's pid if another process holds it. The kernel releases a flock
    when its process exits, however it dies, so a killed run never blocks the next."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file: remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(f"{out_dir} is in use by another fastddpm process (pid {pid})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete what killed writers left (STALE). Only under the lock: no live process writes them then."""
    for folder, patterns in STALE.items():
        for pattern in patterns:
            for stale in (out_dir / folder).glob(pattern):
                if stale.is_symlink() or stale.is_file():
                    stale.unlink()


def run(
    sampler: Sampler,
    out_dir: str | os.PathLike,
    spec: RunSpec,
    world: World | None = None,
    progress: bool = True,
    log: Callable[[str], None] = notice,
) -> Path:
    """Sample `spec` into out_dir (see the module docstring), resuming what is there.

    world: this process's rank and the number of ranks (fastddpm.distributed.init); every rank
    calls run() with the same arguments; rank 0 holds the lock and decides what is missing.
    log: where the one-line notices of files sampled again go. Returns the path of samples.npz.
    """
    world = world or World()
    out_dir = Path(out_dir)
    expected = manifest(spec, sampler)
    fingerprint = run_fingerprint(expected)
    image_shape = tuple(expected["image_shape"])
    identities = [shard_identity(spec, fingerprint, image_shape, k) for k in range(spec.num_shards)]
    final = out_dir / SAMPLES
    with ExitStack() as held:
        plan, error = None, None
        if world.is_main:  # rank 0 locks and decides; every rank hears its answer, or its error
            try:
                held.enter_context(locked(out_dir))
                plan = _prepare(out_dir, spec, expected, identities, log)
            except (ValueError, OSError) as err:
                error = err
        answer = world.all_gather((fingerprint, plan, None if error is None else str(error)))[0]
        if error is not None:
            raise error
        if answer[2] is not None:
            raise ValueError(answer[2])
        if answer[0] != fingerprint:
            raise ValueError(f"rank {world.rank} has another model or other settings than rank 0")
        missing = answer[1]
        if missing is None:  # samples.npz is complete and verified
            return final

        mine = missing[world.rank :: world.size]
        total = sum(len(spec.shard_range(k)) for k in mine)
        desc = f"rank {world.rank}/{world.size}" if world.size > 1 else "sampling"
        with tqdm(total=total, unit="img", desc=desc, disable=not (progress and world.is_main)) as bar:
            for k in mine:
                bar.update(len(_sample_shard(sampler, out_dir, spec, identities[k])))
        world.barrier()
        if world.is_main:
            digest = hashlib.sha256()
            shards = _assembled(sampler, out_dir, spec, identities, digest, log)
            images.save_npz_chunks(final, (spec.n, *image_shape), shards)
            found = dict(expected, **{SAMPLES_HASH: digest.hexdigest()})
            atomic_write(out_dir / MANIFEST, lambda p: Path(p).write_text(json.dumps(found, indent=2)))
        world.barrier()
    return final


def _prepare(out_dir: Path, spec: RunSpec, expected: dict, identities: list[dict], log) -> list[int] | None:
    """Under the lock: clean up, check or write run.json, and return the shards to sample, or None
    when samples.npz is this run's, verified."""
    remove_stale_temporaries(out_dir)
    path = out_dir / MANIFEST
    if path.exists() or path.is_symlink():
        found = check_manifest(out_dir, expected)
    else:
        found = expected
        atomic_write(path, lambda p: Path(p).write_text(json.dumps(expected, indent=2)))
    final = out_dir / SAMPLES
    if final.is_dir() and not final.is_symlink():
        raise ValueError(f"{final} is a directory, not the run's samples: remove it")
    if final.exists() or final.is_symlink():
        recorded = found.get(SAMPLES_HASH)
        try:
            if recorded is None:
                raise Rejected(f"has no SHA-256 recorded in {MANIFEST}")
            if read_npz(final, (spec.n, *expected["image_shape"]))[0] != recorded:
                raise Rejected(f"does not hold the images {MANIFEST} records (SHA-256 differs)")
            return None
        except Rejected as err:
            log(f"{final} {err}: writing it again from the shards")
    missing = []
    for identity in identities:
        reason = _shard_reason(out_dir, identity)
        if reason is not None:
            if reason != "missing":
                log(f"{shard_path(out_dir, identity['shard'])} {reason}: sampling it again")
            missing.append(identity["shard"])
    return missing


def _sample_shard(sampler: Sampler, out_dir: Path, spec: RunSpec, identity: dict) -> np.ndarray:
    """Sample shard k, write its identity then its images (both atomically), return the images."""
    k, r = identity["shard"], spec.shard_range(identity["shard"])
    try:
        x = sampler.sample(
            len(r),
            steps=spec.steps,
            method=spec.method,
            eta=spec.eta,
            use_clipped_model_output=spec.use_clipped_model_output,
            batch_size=spec.batch_size,
            seed=identity["seed"],
            progress=False,
        )
    except NonFiniteSamplesError as err:
        raise NonFiniteSamplesError(f"shard {k} (run images {r.start}..{r.stop - 1}), {err}") from None
    shard = images.to_rgb(images.to_uint8(x))
    record = dict(identity, sha256=hashlib.sha256(shard.tobytes()).hexdigest())
    atomic_write(identity_path(out_dir, k), lambda p: Path(p).write_text(json.dumps(record, indent=2)))
    images.save_npz(shard_path(out_dir, k), shard)
    return shard


def _assembled(
    sampler: Sampler, out_dir: Path, spec: RunSpec, identities: list[dict], digest, log
) -> Iterator[np.ndarray]:
    """Every shard in order, each verified as it is read (a shard that fails is sampled again,
    with a notice); `digest` takes every image byte."""
    for identity in identities:
        try:
            shard = read_shard(out_dir, identity)
        except Rejected as err:
            log(f"{shard_path(out_dir, identity['shard'])} {err}: sampling it again")
            shard = _sample_shard(sampler, out_dir, spec, identity)
        digest.update(shard.tobytes())
        yield shard
