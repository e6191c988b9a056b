"""Training by Algorithm 1 of Ho et al. (2020): L_simple = E ||eps - eps_theta(x_t, t)||^2, t uniform.

Adam with linear learning-rate warm-up and gradient-norm clipping, an EMA of the weights,
dropout, optional horizontal flips, bf16 autocast on CUDA. Every random draw (batch
indices, t, eps, flips) comes from one seeded torch.Generator, and dropout from torch's
global generator; both states are checkpointed, so a resumed run continues exactly as
an uninterrupted one.

Under torchrun (see fastddpm.distributed) the network is wrapped in DistributedDataParallel:
`batch_size` is the global batch, split evenly over the ranks; each rank draws its share,
its t and its eps from generators seeded by `rank_seed(seed, rank, step)`, and backward
averages the gradients, so every rank takes the same Adam step. Rank 0 alone keeps the EMA
and writes the log and the files; the checkpoint holds every rank's generator states.

`out_dir` holds `checkpoint.safetensors` (the whole training state; no pickle),
`model.safetensors` (the EMA network, loadable by `fastddpm.load`) and
`train_log.jsonl`. Both files are rewritten atomically every `save_every` steps, the
checkpoint first, and both record their step: a kill between the two renames leaves the
checkpoint one save ahead, and `resume` rewrites the model from the checkpoint's EMA, so the
pair is always the last good one. Each log line is one append, and `resume` drops a torn
last line. A run holds an exclusive lock on `out_dir` (flock, released when the process
ends, so a killed run leaves no stale lock), and a fresh run refuses a folder that already
holds any of the three files.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import config_schema as schema
from . import data as datasets
from .checkpoints import (
    check_finite,
    configs_from_metadata,
    load_safetensors,
    read_header,
    save_native,
)
from .distributed import World
from .io import atomic_write
from .sampler import Sampler
from .schedule import DiffusionConfig
from .unet import UNet, UNetConfig

TRAIN_FORMAT = "fastddpm-train-1"
CHECKPOINT, MODEL, LOG = "checkpoint.safetensors", "model.safetensors", "train_log.jsonl"
RUN_FILES = (CHECKPOINT, MODEL, LOG)
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")  # what torch.optim.Adam keeps per parameter


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the defaults are the paper's where it gives one."""

    data: str = "digits"  # "digits", an .npz of uint8 images, or a folder of images
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 5000  # steps of linear learning-rate warm-up; 0: none
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    ema_decay: float = 0.9999
    hflip: bool = False
    seed: int = 0
    save_every: int = 1000
    log_every: int = 100
    amp: bool = True  # bf16 autocast where the device is CUDA; no effect on CPU

    def __post_init__(self) -> None:
        """Every field's type and range (config_schema.TRAIN): ConfigError, a ValueError, naming it."""
        for name, value in schema.check(schema.TRAIN, asdict(self), "training config").items():
            object.__setattr__(self, name, value)  # as checked: an int given for a float is a float

    @classmethod
    def from_dict(cls, d: dict, source: str = "training config") -> TrainConfig:
        return cls(**schema.check(schema.TRAIN, d, source))


def new_unet(config: UNetConfig, seed: int, backend: str = "auto") -> UNet:
    """A freshly initialised network whose weights depend only on `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(config, backend=backend)


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay used after `step` updates: min(decay, (1 + step) / (10 + step)), so that
    early weights, which are far from the final ones, are forgotten fast."""
    return min(decay, (1 + step) / (10 + step))


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a rank's generators when it starts at `step`: `seed` itself for rank 0 at step 0
    (so one process trains as it always has), else a 64-bit seed derived from (seed, rank, step),
    whose stream is independent of every other rank's."""
    if rank == 0 and step == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])


class Trainer:
    """Owns the network, its EMA, the optimizer, the random state and the data.

    world: this process's place in a torchrun job (fastddpm.distributed.init); None for one
    process. Its device must be `device`.
    """

    def __init__(
        self,
        unet: UNet,
        diffusion: DiffusionConfig,
        config: TrainConfig,
        out_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        world: World | None = None,
    ) -> None:
        self.config, self.diffusion, self.out_dir = config, diffusion, Path(out_dir)
        self._lock: int | None = None  # the run directory's lock, held while run() runs
        self._continues = False  # whether run() continues this run's files (resumed, or run before)
        self.repaired: str | None = None  # what resume() rewrote, if anything
        self.device = torch.device(device)
        self.world = World(device=self.device) if world is None else world
        if self.world.device != self.device:
            raise ValueError(f"device {self.device} differs from the world's device {self.world.device}")
        if config.batch_size % self.world.size:
            raise ValueError(
                f"batch_size {config.batch_size} (the global batch) must be divisible by the"
                f" {self.world.size} ranks"
            )
        self.local_batch_size = config.batch_size // self.world.size
        self.unet = unet.to(self.device).train()
        self.model = self.world.parallel(self.unet)  # what the loss calls; self.unet in one process
        self.ema = None  # rank 0 alone keeps the EMA
        if self.world.is_main:
            self.ema = UNet(unet.config, backend=unet.backend).to(self.device).eval()
            self.ema.load_state_dict(unet.state_dict())
            self.ema.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.unet.parameters(), lr=config.lr)
        self.step = 0
        self.generator = torch.Generator()
        self.seed_generators()
        abar = diffusion.schedule().abar
        self.sqrt_abar = torch.tensor(np.sqrt(abar), dtype=torch.float32, device=self.device)
        self.sqrt_one_minus_abar = torch.tensor(np.sqrt(1 - abar), dtype=torch.float32, device=self.device)
        cfg = unet.config
        self.images = torch.from_numpy(datasets.load(config.data, cfg.resolution, cfg.in_channels))

    def seed_generators(self) -> None:
        """Seed this rank's draws (self.generator) and dropout (torch's global generator) from
        rank_seed(config.seed, rank, self.step)."""
        seed = rank_seed(self.config.seed, self.world.rank, self.step)
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        """L_simple for this rank's batch x0 (B, C, H, W) in [-1, 1]: one t and one eps per image."""
        g, B = self.generator, x0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), generator=g).to(self.device)
        eps = torch.randn(x0.shape, generator=g).to(self.device)
        x_t = self.sqrt_abar[t].view(B, 1, 1, 1) * x0 + self.sqrt_one_minus_abar[t].view(B, 1, 1, 1) * eps
        amp = self.config.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            eps_pred = self.model(x_t, t)
        return F.mse_loss(eps_pred.float(), eps)

    def batch(self) -> torch.Tensor:
        """This rank's B = batch_size / ranks images, drawn uniformly with replacement and flipped at
        random if hflip; (B, C, H, W) in [-1, 1]."""
        g, B = self.generator, self.local_batch_size
        x0 = datasets.to_model_range(self.images[torch.randint(0, len(self.images), (B,), generator=g)])
        if self.config.hflip:
            flip = torch.rand(B, generator=g) < 0.5
            x0[flip] = x0[flip].flip(-1)
        return x0.to(self.device)

    def train_step(self) -> float:
        """One Adam step with warm-up and clipping, then the EMA update; returns this rank's loss."""
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * (min(1.0, (self.step + 1) / cfg.warmup) if cfg.warmup else 1.0)
        loss = self.loss(self.batch())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            decay = ema_decay_at(self.step, cfg.ema_decay)
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.unet.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        self.step += 1
        return loss.item()

    def run(self, progress: bool = True) -> None:
        """Train up to config.steps, saving every save_every steps and at the end. The logged loss
        is the smoothed loss averaged over the ranks."""
        if self.world.is_main and self._lock is None:
            self._lock = lock_run_dir(self.out_dir)
        try:
            if self.world.is_main and not self._continues:  # fresh: never write over another run
                check_fresh(self.out_dir)
            self._continues = True
            self._run(progress, time.time())
        finally:
            self.close()

    def close(self) -> None:
        """Release the run directory's lock (run() does, when it ends)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _run(self, progress: bool, start: float) -> None:
        cfg, main = self.config, self.world.is_main
        smoothed = None
        with tqdm(total=cfg.steps, initial=self.step, disable=not (progress and main), unit="step") as bar:
            while self.step < cfg.steps:
                loss = self.train_step()
                smoothed = loss if smoothed is None else 0.98 * smoothed + 0.02 * loss
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    mean = self.world.mean(smoothed)
                    bar.set_postfix(loss=f"{mean:.4f}")
                    if main:
                        self._log(
                            {
                                "step": self.step,
                                "loss": round(mean, 6),
                                "lr": self.optimizer.param_groups[0]["lr"],
                                "seconds": round(time.time() - start, 1),
                            }
                        )
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()

    def _log(self, entry: dict) -> None:
        """Append one line, in one write (a kill tears at most the last line; resume drops it)."""
        fd = os.open(self.out_dir / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, (json.dumps(entry) + "\n").encode())
        finally:
            os.close(fd)

    # --- checkpoints ------------------------------------------------------------------------------

    def rng_states(self) -> dict[str, torch.Tensor]:
        """This rank's generator states: its draws, dropout, and CUDA's where the device is CUDA."""
        states = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def state_tensors(self, rng_states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Everything that changes during training, as named tensors; `rng_states` holds each
        rank's `rng_states()`, stacked here into `rng.NAME` of shape (ranks, state size)."""
        tensors = {f"model.{k}": v for k, v in self.unet.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        for index, state in self.optimizer.state_dict()["state"].items():
            tensors |= {f"optim.{index}.{name}": torch.as_tensor(v) for name, v in state.items()}
        for name in rng_states[0]:
            tensors[f"rng.{name}"] = torch.stack([states[name] for states in rng_states])
        return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def save(self) -> None:
        """Gather every rank's generator states; rank 0 atomically writes the training checkpoint,
        then the EMA model, while the other ranks wait."""
        rng_states = self.world.all_gather(self.rng_states())
        if self.world.is_main:
            self._write(rng_states)
        self.world.barrier()

    def _write(self, rng_states: list[dict[str, torch.Tensor]]) -> None:
        metadata = {
            "format": TRAIN_FORMAT,
            "step": str(self.step),
            "unet_config": json.dumps(self.unet.config.to_dict()),
            "diffusion_config": json.dumps(self.diffusion.to_dict()),
            "train_config": json.dumps(asdict(self.config)),
            "param_groups": json.dumps(self.optimizer.state_dict()["param_groups"]),
        }
        tensors = self.state_tensors(rng_states)
        atomic_write(self.out_dir / CHECKPOINT, lambda p: save_file(tensors, p, metadata=metadata))
        self._write_model()

    def _write_model(self) -> None:
        """The EMA network, with the step it is from (which the checkpoint records too)."""
        save_native(
            Sampler(self.ema, self.diffusion), self.out_dir / MODEL, extra={"train_step": str(self.step)}
        )

    @classmethod
    def resume(
        cls,
        out_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        backend: str = "auto",
        steps: int | None = None,
        world: World | None = None,
        given: dict[str, object] | None = None,
    ) -> Trainer:
        """Rebuild a Trainer from out_dir's checkpoint; `steps` may extend the run.

        Every setting comes from the checkpoint: `given` (settings asked for, as TrainConfig
        fields, and "preset", a UNet preset name) must match it, else ValueError naming each
        that differs. The checkpoint is checked before anything is built: its metadata through
        config_schema, its step, and every tensor's presence, dtype and shape from the header
        (the network, the EMA, Adam's state of each parameter, the generators); then finiteness.

        With as many ranks as the run that saved it, every rank gets its generator states back
        and the run continues bit for bit. With another number of ranks, each rank re-seeds from
        rank_seed(seed, rank, step): a valid continuation (same weights, Adam state, EMA, step
        and global batch), but not the run that was never interrupted.
        """
        out_dir = Path(out_dir)
        world = World(device=torch.device(device)) if world is None else world
        lock = lock_run_dir(out_dir) if world.is_main and out_dir.is_dir() else None
        try:
            trainer = cls._resume(out_dir, device, backend, steps, world, given or {})
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise
        trainer._lock, trainer._continues = lock, True
        return trainer

    @classmethod
    def _resume(cls, out_dir, device, backend, steps, world, given) -> Trainer:
        path = out_dir / CHECKPOINT
        if not path.exists():
            raise FileNotFoundError(f"no training checkpoint to resume: {path}")
        header = read_header(path)
        meta, source = header.metadata, str(path)
        if meta.get("format") != TRAIN_FORMAT:
            raise ValueError(f"{path} is not a fastddpm training checkpoint")
        for key in ("step", "train_config", "param_groups"):
            if key not in meta:
                raise schema.ConfigError(f"{source}: its metadata has no {key}")
        step = meta["step"]
        if not (step.isascii() and step.isdecimal()) or int(step) > schema.MAX_STEPS:
            raise schema.ConfigError(f"{source}: step must be a non-negative int, got {step!r:.40}")
        step = int(step)
        unet_config, diffusion = configs_from_metadata(meta, source)
        config = TrainConfig.from_dict(
            schema.json_object(meta["train_config"], f"{source}: train_config"), f"{source}: train_config"
        )
        _check_given(config, unet_config, given)
        if steps is not None:
            if steps < step:
                raise ValueError(f"--steps {steps} is below the checkpoint's step {step}")
            config = replace(config, steps=steps)
        shapes = _checkpoint_shapes(header, unet_config, source)
        unet = UNet(unet_config, backend=backend)
        trainer = cls(unet, diffusion, config, out_dir, device, world)
        tensors = load_safetensors(path)
        check_finite(source, {k: v for k, v in tensors.items() if not k.startswith("rng.")})

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        trainer.unet.load_state_dict(part("model."))
        if trainer.ema is not None:
            trainer.ema.load_state_dict(part("ema."))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in part("optim.").items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        for index, entry in state.items():
            if entry["step"].item() != step:
                found = entry["step"].item()
                raise ValueError(
                    f"{source}: optim.{index}.step is {found:g}; the checkpoint's step is {step}"
                )
        _check_param_groups(meta["param_groups"], len(shapes), source)
        # The groups are rebuilt from config (lr is set every step); the file's were checked above.
        groups = trainer.optimizer.state_dict()["param_groups"]
        trainer.optimizer.load_state_dict({"state": state, "param_groups": groups})
        trainer.step = step
        # (ranks, state size); checkpoints written before distributed training hold one 1-D state.
        rng = {k: v if v.dim() == 2 else v[None] for k, v in part("rng.").items()}
        if len(rng["generator"]) == trainer.world.size:
            # A copy of the row: set_state reads a view from its storage's start (torch 2.13).
            mine = {name: states[trainer.world.rank].clone() for name, states in rng.items()}
            try:
                trainer.generator.set_state(mine["generator"])
                torch.set_rng_state(mine["torch"])
            except RuntimeError:
                raise ValueError(f"{source}: rng.generator or rng.torch is not a generator state") from None
            if "cuda" in mine and trainer.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], trainer.device)
        else:
            trainer.seed_generators()
        if trainer.world.is_main:
            trainer._truncate_log()
            trainer.repaired = trainer._repair_model()
        return trainer

    def _repair_model(self) -> str | None:
        """Rewrite model.safetensors from the checkpoint's EMA if it is missing or from another step
        (a kill between the two renames); returns what was done, or None."""
        path = self.out_dir / MODEL
        was = "missing"
        if path.exists():
            try:
                found = read_header(path).metadata.get("train_step")
                was = f"from step {found}" if found else "of no recorded step"
            except ValueError:
                found, was = None, "unreadable"
            if found == str(self.step):
                return None
        self._write_model()
        return f"{path} was {was}; rewrote it from the checkpoint's EMA at step {self.step}"

    def _truncate_log(self) -> None:
        """Drop log lines past the checkpoint's step (written by the run that was interrupted), and
        a torn last line (a kill during its append); ValueError naming any other bad line."""
        path = self.out_dir / LOG
        if not path.exists():
            return
        lines = path.read_bytes().split(b"\n")
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                at = entry["step"]
                if isinstance(at, bool) or not isinstance(at, int):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                if number >= len(lines) - 1:  # the last line, with or without its newline: torn
                    continue
                raise ValueError(
                    f"{path}: line {number} is not a log entry (a JSON object with a step)"
                ) from None
            if at <= self.step:
                kept.append(line.decode() + "\n")
        atomic_write(path, lambda p: Path(p).write_text("".join(kept)))


def _check_given(config: TrainConfig, unet_config: UNetConfig, given: dict[str, object]) -> None:
    """ValueError naming every setting in `given` that differs from the checkpoint's."""
    from .unet import preset

    differ = []
    for name, value in given.items():
        if value is None or name == "steps":
            continue
        if name == "preset":
            if preset(value) != unet_config:
                differ.append(f"--preset {value} (the checkpoint's network is not that preset)")
        elif value != getattr(config, name):
            differ.append(f"--{name.replace('_', '-')} {value} (checkpoint: {getattr(config, name)})")
    if differ:
        raise ValueError(
            "--resume continues the checkpoint's settings, and these differ from it: "
            + "; ".join(differ)
            + ". Drop them, or train into a new --out"
        )


def _checkpoint_shapes(header, unet_config: UNetConfig, source: str) -> list[tuple[int, ...]]:
    """Check a training checkpoint's tensors from its header: model.* and ema.* as the network's,
    Adam's step, exp_avg and exp_avg_sq for each parameter, the generator states. Returns the
    network's parameter shapes in the optimizer's order."""
    found = header.tensors
    with torch.device("meta"):  # shapes only, nothing allocated
        net = UNet(unet_config)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    params = [tuple(p.shape) for p in net.parameters()]
    want: dict[str, tuple[tuple[int, ...] | None, tuple[str, ...]]] = {}
    floats = ("F16", "BF16", "F32", "F64")
    for prefix in ("model.", "ema."):
        want |= {prefix + k: (shape, floats) for k, shape in expected.items()}
    for i, shape in enumerate(params):
        want |= {f"optim.{i}.step": ((), floats), f"optim.{i}.exp_avg": (shape, floats)}
        want[f"optim.{i}.exp_avg_sq"] = (shape, floats)
    want |= {"rng.generator": (None, ("U8",)), "rng.torch": (None, ("U8",))}
    for key, (shape, dtypes) in want.items():
        if key not in found:
            raise ValueError(
                f"{source}: missing {key}" + (" (Adam's state)" if key.startswith("optim.") else "")
            )
        dtype, got = found[key]
        if dtype not in dtypes or (shape is not None and got != shape):
            raise ValueError(f"{source}: {key} is {dtype} {got}; expected {'/'.join(dtypes)} {shape or ''}")
    unknown = sorted(set(found) - set(want) - {"rng.cuda"})
    if unknown:
        raise ValueError(f"{source}: unexpected tensors {unknown[:5]}")
    return params


def _check_param_groups(text: str, count: int, source: str) -> None:
    groups = schema.parse_json(text, f"{source}: param_groups")
    if not (
        isinstance(groups, list)
        and len(groups) == 1
        and isinstance(groups[0], dict)
        and groups[0].get("params") == list(range(count))
    ):
        raise schema.ConfigError(f"{source}: param_groups must be one group over the {count} parameters")


def lock_run_dir(out_dir: Path) -> int:
    """An exclusive lock (flock) on the folder `out_dir`, made if needed; the open descriptor,
    whose closing (or the process's end, killed or not) releases it. ValueError if another
    process holds it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"{out_dir}: another process is training in this folder (it holds its lock)"
        ) from None
    return fd


def check_fresh(out_dir: str | os.PathLike) -> None:
    """ValueError if `out_dir` already holds a run's files (a fresh run would write over them)."""
    found = [name for name in RUN_FILES if (Path(out_dir) / name).exists()]
    if found:
        raise ValueError(
            f"{out_dir} already holds {', '.join(found)}: pass --resume to continue its training"
            " checkpoint, or choose another --out"
        )


def has_checkpoint(out_dir: str | os.PathLike) -> bool:
    return (Path(out_dir) / CHECKPOINT).exists()
