"""Training by Algorithm 1 of Ho et al. (2020): L_simple = E ||eps - eps_theta(x_t, t)||^2, t uniform.

Adam with linear learning-rate warm-up and gradient-norm clipping, an EMA of the weights,
dropout, optional horizontal flips, bf16 autocast on CUDA. Every random draw (batch
indices, t, eps, flips) comes from one seeded torch.Generator, and dropout from torch's
global generator; both states are checkpointed, so a resumed run continues exactly as
an uninterrupted one.

`out_dir` holds `checkpoint.safetensors` (the whole training state; no pickle),
`model.safetensors` (the EMA network, loadable by `fastddpm.load`) and
`train_log.jsonl`. Both files are rewritten atomically every `save_every` steps, so a
crash or Ctrl-C at any moment leaves the last good ones intact.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from tqdm.auto import tqdm

from . import data as datasets
from .checkpoints import save_native
from .io import atomic_write
from .sampler import DiffusionConfig, Sampler
from .unet import UNet, UNetConfig

TRAIN_FORMAT = "fastddpm-train-1"
CHECKPOINT, MODEL, LOG = "checkpoint.safetensors", "model.safetensors", "train_log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the defaults are the paper's where it gives one."""

    data: str = "digits"  # "digits", an .npz of uint8 images, or a folder of images
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 5000  # steps of linear learning-rate warm-up
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = 0.9999
    hflip: bool = False
    seed: int = 0
    save_every: int = 1000
    log_every: int = 100
    amp: bool = True  # bf16 autocast where the device is CUDA; no effect on CPU

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def new_unet(config: UNetConfig, seed: int, backend: str = "auto") -> UNet:
    """A freshly initialised network whose weights depend only on `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(config, backend=backend)


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay used after `step` updates: min(decay, (1 + step) / (10 + step)), so that
    early weights, which are far from the final ones, are forgotten fast."""
    return min(decay, (1 + step) / (10 + step))


class Trainer:
    """Owns the network, its EMA, the optimizer, the random state and the data."""

    def __init__(
        self,
        unet: UNet,
        diffusion: DiffusionConfig,
        config: TrainConfig,
        out_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config, self.diffusion, self.out_dir = config, diffusion, Path(out_dir)
        self.device = torch.device(device)
        self.unet = unet.to(self.device).train()
        self.ema = UNet(unet.config, backend=unet.backend).to(self.device).eval()
        self.ema.load_state_dict(unet.state_dict())
        self.ema.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.unet.parameters(), lr=config.lr)
        self.step = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)  # dropout
        abar = diffusion.schedule().abar
        self.sqrt_abar = torch.tensor(np.sqrt(abar), dtype=torch.float32, device=self.device)
        self.sqrt_one_minus_abar = torch.tensor(np.sqrt(1 - abar), dtype=torch.float32, device=self.device)
        cfg = unet.config
        self.images = torch.from_numpy(datasets.load(config.data, cfg.resolution, cfg.in_channels))

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        """L_simple for a batch x0 (B, C, H, W) in [-1, 1]: one t and one eps per image."""
        g, B = self.generator, x0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), generator=g).to(self.device)
        eps = torch.randn(x0.shape, generator=g).to(self.device)
        x_t = self.sqrt_abar[t].view(B, 1, 1, 1) * x0 + self.sqrt_one_minus_abar[t].view(B, 1, 1, 1) * eps
        amp = self.config.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            eps_pred = self.unet(x_t, t)
        return F.mse_loss(eps_pred.float(), eps)

    def batch(self) -> torch.Tensor:
        """B images drawn uniformly with replacement, flipped at random if hflip; (B, C, H, W) in [-1, 1]."""
        g, B = self.generator, self.config.batch_size
        x0 = datasets.to_model_range(self.images[torch.randint(0, len(self.images), (B,), generator=g)])
        if self.config.hflip:
            flip = torch.rand(B, generator=g) < 0.5
            x0[flip] = x0[flip].flip(-1)
        return x0.to(self.device)

    def train_step(self) -> float:
        """One Adam step with warm-up and clipping, then the EMA update; returns the loss."""
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup)
        loss = self.loss(self.batch())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg.grad_clip)
        self.optimizer.step()
        decay = ema_decay_at(self.step, cfg.ema_decay)
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        self.step += 1
        return loss.item()

    def run(self, progress: bool = True) -> None:
        """Train up to config.steps, saving every save_every steps and at the end."""
        cfg, start = self.config, time.time()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        smoothed = None
        with tqdm(total=cfg.steps, initial=self.step, disable=not progress, unit="step") as bar:
            while self.step < cfg.steps:
                loss = self.train_step()
                smoothed = loss if smoothed is None else 0.98 * smoothed + 0.02 * loss
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    bar.set_postfix(loss=f"{smoothed:.4f}")
                    self._log(
                        {
                            "step": self.step,
                            "loss": round(smoothed, 6),
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "seconds": round(time.time() - start, 1),
                        }
                    )
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()

    def _log(self, entry: dict) -> None:
        with open(self.out_dir / LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")

    # --- checkpoints ------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything that changes during training, as named tensors."""
        tensors = {f"model.{k}": v for k, v in self.unet.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        for index, state in self.optimizer.state_dict()["state"].items():
            tensors |= {f"optim.{index}.{name}": torch.as_tensor(v) for name, v in state.items()}
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def save(self) -> None:
        """Atomically write the training checkpoint, then the EMA model."""
        metadata = {
            "format": TRAIN_FORMAT,
            "step": str(self.step),
            "unet_config": json.dumps(self.unet.config.to_dict()),
            "diffusion_config": json.dumps(self.diffusion.to_dict()),
            "train_config": json.dumps(asdict(self.config)),
            "param_groups": json.dumps(self.optimizer.state_dict()["param_groups"]),
        }
        tensors = self.state_tensors()
        atomic_write(self.out_dir / CHECKPOINT, lambda p: save_file(tensors, p, metadata=metadata))
        save_native(Sampler(self.ema, self.diffusion), self.out_dir / MODEL)

    @classmethod
    def resume(
        cls,
        out_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        backend: str = "auto",
        steps: int | None = None,
    ) -> Trainer:
        """Rebuild a Trainer from out_dir's checkpoint; `steps` may extend the run."""
        path = Path(out_dir) / CHECKPOINT
        if not path.exists():
            raise FileNotFoundError(f"no training checkpoint to resume: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != TRAIN_FORMAT:
            raise ValueError(f"{path} is not a fastddpm training checkpoint")
        config = TrainConfig(**json.loads(meta["train_config"]))
        if steps is not None:
            config = replace(config, steps=steps)
        unet = UNet(UNetConfig.from_dict(json.loads(meta["unet_config"])), backend=backend)
        trainer = cls(
            unet, DiffusionConfig.from_dict(json.loads(meta["diffusion_config"])), config, out_dir, device
        )
        tensors = load_file(str(path))

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        trainer.unet.load_state_dict(part("model."))
        trainer.ema.load_state_dict(part("ema."))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in part("optim.").items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        trainer.optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        trainer.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], trainer.device)
        trainer.step = int(meta["step"])
        trainer._truncate_log()
        return trainer

    def _truncate_log(self) -> None:
        """Drop log lines past the checkpoint's step (written by the run that was interrupted)."""
        path = self.out_dir / LOG
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= self.step]
            atomic_write(path, lambda p: Path(p).write_text("".join(ln + "\n" for ln in lines)))


def has_checkpoint(out_dir: str | os.PathLike) -> bool:
    return (Path(out_dir) / CHECKPOINT).exists()
