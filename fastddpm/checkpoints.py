"""Load and save checkpoints: diffusers folders, pytorch_diffusion files, native safetensors.

Nothing here touches the network. Nothing is unpickled unless the caller asks for
a pickled file (.ckpt, .pt, .pth, .bin) with allow_pickle=True, and then only
through torch.load(weights_only=True).

Native names are the original network's (see fastddpm.unet), which is also how
pytorch_diffusion names them. diffusers' UNet2DModel names map to them by
`native_to_diffusers_key`; its up_blocks run in the opposite order (up.i is
up_blocks.{L-1-i}) and its attention projections are Linear [C, C] where ours are
1x1 convs [C, C, 1, 1]. Older diffusers files name the attention weights
query/key/value/proj_attn; both spellings load.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from . import __version__
from .io import atomic_write
from .sampler import DiffusionConfig, Sampler
from .unet import UNet, UNetConfig, preset

PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The bundled default: a small U-Net trained on scikit-learn's 8x8 digits (fastddpm/models/digits).
DEFAULT_MODEL = Path(__file__).parent / "models" / "digits" / "model.safetensors"
NATIVE_FORMAT = "fastddpm-1"
_ATTN_PROJ = re.compile(r"\.attn(?:_1|\.\d+)\.(q|k|v|proj_out)\.weight$")

# --- diffusers names ------------------------------------------------------------------------

_RESNET_PARTS = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut"}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_ATTN_PARTS = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def native_to_diffusers_key(key: str, levels: int) -> str:
    """A native parameter name -> its UNet2DModel name, for a U-Net with `levels` resolutions."""
    fixed = {
        "temb.dense.0": "time_embedding.linear_1",
        "temb.dense.1": "time_embedding.linear_2",
        "norm_out": "conv_norm_out",
        "mid.block_1": "mid_block.resnets.0",
        "mid.attn_1": "mid_block.attentions.0",
        "mid.block_2": "mid_block.resnets.1",
    }
    for old, new in fixed.items():
        if key.startswith(old + "."):
            key = new + key[len(old) :]
            break
    m = re.match(r"(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.*)", key)
    if m:
        side, level, kind, rest = m.groups()
        index = int(level) if side == "down" else levels - 1 - int(level)
        prefix = f"{side}_blocks.{index}"
        if kind in ("downsample", "upsample"):
            key = f"{prefix}.{kind}rs.0.{rest}"
        else:
            key = f"{prefix}.{'resnets' if kind == 'block' else 'attentions'}.{rest}"
    parts = key.split(".")
    table = _ATTN_PARTS if ".attentions." in key else _RESNET_PARTS
    if len(parts) >= 2 and parts[-2] in table:
        parts[-2] = table[parts[-2]]
    return ".".join(parts)


def _modern_diffusers_key(key: str) -> str:
    """Rename the older attention names (query, key, value, proj_attn) to the current ones."""
    parts = key.split(".")
    if ".attentions." in key and len(parts) >= 2 and parts[-2] in _LEGACY_ATTN_PARTS:
        parts[-2] = _LEGACY_ATTN_PARTS[parts[-2]]
    return ".".join(parts)


def diffusers_to_native(state: dict[str, torch.Tensor], unet: UNet) -> dict[str, torch.Tensor]:
    """Rename and reshape a UNet2DModel state dict into `unet`'s names and shapes."""
    levels = len(unet.config.ch_mult)
    by_diffusers = {native_to_diffusers_key(k, levels): k for k in unet.state_dict()}
    native, unexpected = {}, []
    for key, value in state.items():
        name = by_diffusers.get(_modern_diffusers_key(key))
        if name is None:
            unexpected.append(key)
        else:
            native[name] = value[:, :, None, None] if _ATTN_PROJ.search(name) and value.dim() == 2 else value
    missing = sorted(set(by_diffusers) - {_modern_diffusers_key(k) for k in state})
    _raise_on_key_mismatch("diffusers", missing, unexpected)
    return native


def native_to_diffusers(unet: UNet) -> dict[str, torch.Tensor]:
    """`unet`'s state dict under current UNet2DModel names and shapes."""
    levels = len(unet.config.ch_mult)
    return {
        native_to_diffusers_key(k, levels): (v[:, :, 0, 0] if _ATTN_PROJ.search(k) else v)
        for k, v in unet.state_dict().items()
    }


def _raise_on_key_mismatch(source: str, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise KeyError(
            f"{source} checkpoint does not fit the model: "
            f"{len(missing)} missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"{len(unexpected)} unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
        )


# --- diffusers configs -------------------------------------------------------------------------

_DIFFUSERS_DEFAULTS = {  # UNet2DModel's defaults for the settings the paper's network fixes
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "downsample_type": "conv",
    "upsample_type": "conv",
}
_PAPER_SETTINGS = {
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "downsample_type": "conv",
    "upsample_type": "conv",
}


def unet_config_from_diffusers(cfg: dict, paper_attention: bool = False) -> UNetConfig:
    """A UNet2DModel config.json -> UNetConfig; ValueError naming any setting the paper's net lacks.

    attention_head_dim follows diffusers: absent means 8 (heads = C // 8), null means
    one head. paper_attention=True forces the original single-head attention.
    """
    for key, want in _PAPER_SETTINGS.items():
        got = cfg.get(key, _DIFFUSERS_DEFAULTS.get(key))
        if got != want:
            raise ValueError(f"unsupported UNet2DModel setting {key}={got!r}: the DDPM U-Net needs {want!r}")
    groups = cfg.get("attn_norm_num_groups")
    if groups is not None and groups != cfg.get("norm_num_groups", 32):
        raise ValueError(f"unsupported attn_norm_num_groups={groups}: must equal norm_num_groups")
    channels = list(cfg["block_out_channels"])
    if any(c % channels[0] for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of {channels[0]}")
    down, up = cfg["down_block_types"], cfg["up_block_types"]
    if len(down) != len(channels) or len(up) != len(channels):
        raise ValueError("down_block_types, up_block_types and block_out_channels differ in length")
    size, attn_resolutions = cfg.get("sample_size"), []
    if not isinstance(size, int):
        raise ValueError(f"config sample_size must be one int (square images), got {size!r}")
    for i, (d, u) in enumerate(zip(down, reversed(up), strict=True)):
        kinds = {d: ("DownBlock2D", "AttnDownBlock2D"), u: ("UpBlock2D", "AttnUpBlock2D")}
        for name, allowed in kinds.items():
            if name not in allowed:
                raise ValueError(f"unsupported block type {name!r}; the DDPM U-Net has {allowed}")
        if d.startswith("Attn") != u.startswith("Attn"):
            raise ValueError(f"level {i} has attention on one side only ({d}, {u})")
        if d.startswith("Attn"):
            attn_resolutions.append(size // 2**i)
    head_dim = cfg.get("attention_head_dim", 8)
    return UNetConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        ch=channels[0],
        ch_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attn_resolutions=tuple(attn_resolutions),
        resolution=size,
        dropout=cfg.get("dropout", 0.0),
        num_groups=cfg.get("norm_num_groups", 32),
        eps=cfg.get("norm_eps", 1e-5),
        attn_head_dim=None if paper_attention else head_dim,
    )


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """UNetConfig -> a UNet2DModel config.json dict that builds the same network."""
    levels = len(cfg.ch_mult)
    attn = [cfg.resolution // 2**i in cfg.attn_resolutions for i in range(levels)]
    return {
        "_class_name": "UNet2DModel",
        **_PAPER_SETTINGS,
        "sample_size": cfg.resolution,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "layers_per_block": cfg.num_res_blocks,
        "attention_head_dim": cfg.attn_head_dim,
        "norm_num_groups": cfg.num_groups,
        "norm_eps": cfg.eps,
        "dropout": cfg.dropout,
    }


_DIFFUSERS_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "quad",
    "squaredcos_cap_v2": "cosine",
    "sigmoid": "sigmoid",
}
_DIFFUSERS_VARIANCES = {"fixed_large": "fixedlarge", "fixed_small": "fixedsmall"}


def diffusion_config_from_diffusers(cfg: dict) -> DiffusionConfig:
    """A DDPMScheduler scheduler_config.json -> DiffusionConfig."""
    checks = {
        "prediction_type": ("epsilon", "epsilon"),
        "thresholding": (False, False),
        "clip_sample_range": (1.0, 1.0),
        "trained_betas": (None, None),
    }
    for key, (default, want) in checks.items():
        if cfg.get(key, default) != want:
            raise ValueError(f"unsupported scheduler setting {key}={cfg[key]!r}: fastddpm needs {want!r}")
    schedule = cfg.get("beta_schedule", "linear")
    variance = cfg.get("variance_type", "fixed_small")
    if schedule not in _DIFFUSERS_SCHEDULES:
        raise ValueError(f"unsupported beta_schedule {schedule!r}; supported: {sorted(_DIFFUSERS_SCHEDULES)}")
    if variance not in _DIFFUSERS_VARIANCES:
        raise ValueError(f"unsupported variance_type {variance!r}; supported: {sorted(_DIFFUSERS_VARIANCES)}")
    return DiffusionConfig(
        beta_schedule=_DIFFUSERS_SCHEDULES[schedule],
        num_timesteps=cfg.get("num_train_timesteps", 1000),
        beta_start=cfg.get("beta_start", 1e-4),
        beta_end=cfg.get("beta_end", 0.02),
        variance=_DIFFUSERS_VARIANCES[variance],
        clip_x0=cfg.get("clip_sample", True),
    )


def diffusion_config_to_diffusers(cfg: DiffusionConfig) -> dict:
    """DiffusionConfig -> a DDPMScheduler scheduler_config.json dict."""
    schedules = {v: k for k, v in _DIFFUSERS_SCHEDULES.items()}
    if cfg.beta_schedule not in schedules:
        raise ValueError(f"diffusers' DDPMScheduler has no {cfg.beta_schedule!r} schedule")
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": cfg.num_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": schedules[cfg.beta_schedule],
        "variance_type": {v: k for k, v in _DIFFUSERS_VARIANCES.items()}[cfg.variance],
        "clip_sample": cfg.clip_x0,
        "prediction_type": "epsilon",
    }


# --- files --------------------------------------------------------------------------------------


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint file or folder: {path}")
    return path


def _read_json(path: Path) -> dict:
    with open(_existing(path)) as f:
        return json.load(f)


def _load_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    path = _existing(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in PICKLED_SUFFIXES:
        if not allow_pickle:
            raise ValueError(
                f"{path} is a pickled file; pass allow_pickle=True (CLI: --allow-pickle) to load it"
                " with torch.load(weights_only=True), or convert it to .safetensors"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise ValueError(f"unknown weights format {path.suffix!r} for {path}")


def load_diffusers(
    folder: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    paper_attention: bool = False,
    backend: str = "auto",
) -> Sampler:
    """A downloaded diffusers DDPM (e.g. google/ddpm-cifar10-32) -> Sampler.

    `folder` holds config.json, diffusion_pytorch_model.safetensors and
    scheduler_config.json, either at its top (the hub layout of the DDPM repos) or
    in unet/ and scheduler/ (what DDPMPipeline.save_pretrained writes).
    """
    folder = _existing(Path(folder))
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").exists() else folder
    sched_dir = folder / "scheduler" if (folder / "scheduler").is_dir() else folder
    config = unet_config_from_diffusers(_read_json(unet_dir / "config.json"), paper_attention)
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    if not weights.exists() and (unet_dir / "diffusion_pytorch_model.bin").exists():
        weights = unet_dir / "diffusion_pytorch_model.bin"
    unet = UNet(config, backend=backend)
    unet.load_state_dict(diffusers_to_native(_load_weights(weights, allow_pickle), unet))
    diffusion = diffusion_config_from_diffusers(_read_json(sched_dir / "scheduler_config.json"))
    return Sampler(unet.eval(), diffusion)


def save_diffusers(sampler: Sampler, folder: str | os.PathLike) -> None:
    """Write config.json, diffusion_pytorch_model.safetensors and scheduler_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in native_to_diffusers(sampler.unet).items()}
    atomic_write(folder / "diffusion_pytorch_model.safetensors", lambda p: save_file(state, p))
    for name, cfg in (
        ("config.json", unet_config_to_diffusers(sampler.unet.config)),
        ("scheduler_config.json", diffusion_config_to_diffusers(sampler.diffusion)),
    ):
        atomic_write(folder / name, lambda p, cfg=cfg: Path(p).write_text(json.dumps(cfg, indent=2)))


def load_pytorch_diffusion(
    path: str | os.PathLike,
    preset_name: str,
    *,
    allow_pickle: bool = False,
    backend: str = "auto",
) -> Sampler:
    """A pytorch_diffusion (pesser) checkpoint -> Sampler; those files carry no config.

    preset_name: "cifar10", "lsun256" or "celebahq256", the network the file holds.
    CIFAR10 samples with fixedlarge variance, the 256x256 models with fixedsmall.
    """
    config = preset(preset_name)
    unet = UNet(config, backend=backend)
    state = _load_weights(Path(path), allow_pickle)
    expected = unet.state_dict()
    _raise_on_key_mismatch(
        "pytorch_diffusion", sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    )
    unet.load_state_dict(state)
    variance = "fixedlarge" if preset_name == "cifar10" else "fixedsmall"
    return Sampler(unet.eval(), DiffusionConfig(variance=variance))


def save_native(sampler: Sampler, path: str | os.PathLike) -> None:
    """One .safetensors file: the weights plus both configs as metadata."""
    metadata = {
        "format": NATIVE_FORMAT,
        "fastddpm_version": __version__,
        "unet_config": json.dumps(sampler.unet.config.to_dict()),
        "diffusion_config": json.dumps(sampler.diffusion.to_dict()),
    }
    state = {k: v.contiguous() for k, v in sampler.unet.state_dict().items()}
    atomic_write(Path(path), lambda p: save_file(state, p, metadata=metadata))


def load_native(path: str | os.PathLike, *, backend: str = "auto") -> Sampler:
    """A file written by `save_native` -> Sampler."""
    path = _existing(Path(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != NATIVE_FORMAT:
        raise ValueError(f"{path} is not a fastddpm native checkpoint (no '{NATIVE_FORMAT}' metadata)")
    unet = UNet(UNetConfig.from_dict(json.loads(metadata["unet_config"])), backend=backend)
    state = load_file(str(path))
    expected = unet.state_dict()
    _raise_on_key_mismatch("native", sorted(set(expected) - set(state)), sorted(set(state) - set(expected)))
    unet.load_state_dict(state)
    return Sampler(unet.eval(), DiffusionConfig.from_dict(json.loads(metadata["diffusion_config"])))


def load(
    path: str | os.PathLike,
    *,
    preset_name: str | None = None,
    allow_pickle: bool = False,
    backend: str = "auto",
) -> Sampler:
    """Load any supported checkpoint: a diffusers folder, a native .safetensors, or a
    pytorch_diffusion file (which needs `preset_name`)."""
    path = _existing(Path(path))
    if path.is_dir():
        return load_diffusers(path, allow_pickle=allow_pickle, backend=backend)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") == NATIVE_FORMAT:
                return load_native(path, backend=backend)
    if preset_name is None:
        raise ValueError(
            f"{path} is not a fastddpm native checkpoint; if it is a pytorch_diffusion file, name its"
            " network with preset_name (CLI: --preset cifar10|lsun256|celebahq256)"
        )
    return load_pytorch_diffusion(path, preset_name, allow_pickle=allow_pickle, backend=backend)
