"""Load and save checkpoints: diffusers folders, pytorch_diffusion files, native safetensors.

The loaders return the network and its diffusion config, (UNet, DiffusionConfig); fastddpm.load
and its siblings make a Sampler of them. Nothing here touches the network. Nothing is unpickled
unless the caller asks for a pickled file (.ckpt, .pt, .pth, .bin) with allow_pickle=True, and
then only through torch.load(weights_only=True).

Native names are the original network's (see fastddpm.unet), which is also how
pytorch_diffusion names them. diffusers' UNet2DModel names map to them by
`native_to_diffusers_key`; its up_blocks run in the opposite order (up.i is
up_blocks.{L-1-i}) and its attention projections are Linear [C, C] where ours are
1x1 convs [C, C, 1, 1]. Older diffusers files name the attention weights
query/key/value/proj_attn; both spellings load.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import config_schema as schema
from ._version import __version__
from .io import atomic_write
from .schedule import DiffusionConfig
from .unet import UNet, UNetConfig, preset

if TYPE_CHECKING:
    from .sampler import Sampler

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


def _raise_on_key_mismatch(
    source: str, missing: list[str], unexpected: list[str], path: str | None = None
) -> None:
    if missing or unexpected:
        raise KeyError(
            f"{path + ': ' if path else ''}{source} checkpoint does not fit the model: "
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


_DIFFUSERS_UNET = {  # the settings read from a UNet2DModel config.json, with their types
    "block_out_channels": schema.Field("ints", 1, schema.MAX_CHANNELS, nonempty=True),
    "down_block_types": schema.Field("json"),
    "up_block_types": schema.Field("json"),
    "in_channels": schema.Field("int", 1, schema.MAX_CHANNELS),
    "out_channels": schema.Field("int", 1, schema.MAX_CHANNELS),
    "layers_per_block": schema.Field("int", 1, schema.MAX_RES_BLOCKS),
    "dropout": schema.Field("float", 0, 1, hi_open=True),
    "norm_num_groups": schema.Field("int", 1, schema.MAX_CHANNELS),
    "norm_eps": schema.Field("float", 0, 1, lo_open=True),
    "attention_head_dim": schema.Field("int", 1, schema.MAX_CHANNELS, optional=True),
    "attn_norm_num_groups": schema.Field("int", 1, schema.MAX_CHANNELS, optional=True),
}


def _typed(fields: dict[str, schema.Field], cfg: object, source: str) -> dict:
    """The entries of an open-format dict (diffusers adds keys of its own) whose types we know, checked."""
    if not isinstance(cfg, dict):
        raise schema.ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    return {key: schema.value(field, cfg[key], source, key) for key, field in fields.items() if key in cfg}


def _names(v: object, source: str, key: str) -> list[str]:
    if not isinstance(v, list | tuple) or not v or not all(isinstance(x, str) for x in v):
        raise schema.ConfigError(f"{source}: {key} must be a non-empty list of block names, got {v!r:.60}")
    return list(v)


def unet_config_from_diffusers(
    cfg: dict, paper_attention: bool = False, source: str = "UNet2DModel config"
) -> UNetConfig:
    """A UNet2DModel config.json -> UNetConfig; ValueError naming any setting the paper's net lacks,
    or a value of the wrong type (errors name `source`, the file).

    attention_head_dim follows diffusers: absent means 8 (heads = C // 8), null means
    one head. paper_attention=True forces the original single-head attention.
    """
    typed = _typed(_DIFFUSERS_UNET, cfg, source)
    for key, want in _PAPER_SETTINGS.items():
        got = cfg.get(key, _DIFFUSERS_DEFAULTS.get(key))
        if got != want or isinstance(got, bool) != isinstance(want, bool):
            raise ValueError(
                f"{source}: unsupported UNet2DModel setting {key}={got!r}: the DDPM U-Net needs {want!r}"
            )
    groups = typed.get("attn_norm_num_groups")
    if groups is not None and groups != typed.get("norm_num_groups", 32):
        raise ValueError(f"{source}: unsupported attn_norm_num_groups={groups}: must equal norm_num_groups")
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key not in cfg:
            raise schema.ConfigError(f"{source}: missing key {key}")
    channels = list(typed["block_out_channels"])
    if any(c % channels[0] for c in channels):
        raise ValueError(f"{source}: block_out_channels {channels} are not multiples of {channels[0]}")
    down = _names(cfg["down_block_types"], source, "down_block_types")
    up = _names(cfg["up_block_types"], source, "up_block_types")
    if len(down) != len(channels) or len(up) != len(channels):
        raise ValueError(
            f"{source}: down_block_types, up_block_types and block_out_channels differ in length"
        )
    size, attn_resolutions = cfg.get("sample_size"), []
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= schema.MAX_RESOLUTION:
        raise ValueError(
            f"{source}: sample_size must be one int (square images) in 1..4096, got {size!r:.60}"
        )
    for i, (d, u) in enumerate(zip(down, reversed(up), strict=True)):
        kinds = {d: ("DownBlock2D", "AttnDownBlock2D"), u: ("UpBlock2D", "AttnUpBlock2D")}
        for name, allowed in kinds.items():
            if name not in allowed:
                raise ValueError(f"{source}: unsupported block type {name!r}; the DDPM U-Net has {allowed}")
        if d.startswith("Attn") != u.startswith("Attn"):
            raise ValueError(f"{source}: level {i} has attention on one side only ({d}, {u})")
        if d.startswith("Attn"):
            attn_resolutions.append(max(size // 2**i, 1))
    head_dim = typed.get("attention_head_dim", 8) if "attention_head_dim" in cfg else 8
    config = {
        "in_channels": typed.get("in_channels", 3),
        "out_channels": typed.get("out_channels", 3),
        "ch": channels[0],
        "ch_mult": [c // channels[0] for c in channels],
        "num_res_blocks": typed.get("layers_per_block", 2),
        "attn_resolutions": attn_resolutions,
        "resolution": size,
        "dropout": typed.get("dropout", 0.0),
        "num_groups": typed.get("norm_num_groups", 32),
        "eps": typed.get("norm_eps", 1e-5),
        "attn_head_dim": None if paper_attention else head_dim,
    }
    return UNetConfig.from_dict(config, source)


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


_DIFFUSERS_SCHEDULER = {  # the settings read from a DDPMScheduler scheduler_config.json
    "num_train_timesteps": schema.DIFFUSION["num_timesteps"],
    "beta_start": schema.DIFFUSION["beta_start"],
    "beta_end": schema.DIFFUSION["beta_end"],
    "beta_schedule": schema.Field("str", choices=tuple(_DIFFUSERS_SCHEDULES)),
    "variance_type": schema.Field("str", choices=tuple(_DIFFUSERS_VARIANCES)),
    "clip_sample": schema.Field("bool"),
    "prediction_type": schema.Field("str", choices=("epsilon",)),
    "thresholding": schema.Field("bool"),
    "clip_sample_range": schema.Field("float"),
    "trained_betas": schema.Field("json", optional=True),
    "timestep_spacing": schema.Field("str", choices=("leading", "trailing", "linspace")),
    "steps_offset": schema.DIFFUSION["steps_offset"],
    "set_alpha_to_one": schema.Field("bool"),
}


def diffusion_config_from_diffusers(cfg: dict, source: str = "DDPMScheduler config") -> DiffusionConfig:
    """A DDPMScheduler scheduler_config.json -> DiffusionConfig; errors name `source` and the key."""
    typed = _typed(_DIFFUSERS_SCHEDULER, cfg, source)
    checks = {"thresholding": (False, False), "clip_sample_range": (1.0, 1.0), "trained_betas": (None, None)}
    for key, (default, want) in checks.items():
        if typed.get(key, default) != want:
            raise ValueError(
                f"{source}: unsupported scheduler setting {key}={cfg[key]!r:.60}: fastddpm needs {want!r}"
            )
    config = {
        "beta_schedule": _DIFFUSERS_SCHEDULES[typed.get("beta_schedule", "linear")],
        "num_timesteps": typed.get("num_train_timesteps", 1000),
        "beta_start": typed.get("beta_start", 1e-4),
        "beta_end": typed.get("beta_end", 0.02),
        "variance": _DIFFUSERS_VARIANCES[typed.get("variance_type", "fixed_small")],
        "clip_x0": typed.get("clip_sample", True),
        # Respaced steps as diffusers' DDPMScheduler / DDIMScheduler take them, diffusers' defaults
        # where the file has no key (google/ddpm-cifar10-32's has none: leading, 0, True).
        "spacing": typed.get("timestep_spacing", "leading"),
        "steps_offset": typed.get("steps_offset", 0),
        "set_alpha_to_one": typed.get("set_alpha_to_one"),  # None: each scheduler's default
    }
    return diffusion_config_from_dict(config, source)


def diffusion_config_from_dict(d: dict, source: str = "diffusion config") -> DiffusionConfig:
    """A DiffusionConfig from a dict, every field checked by config_schema.DIFFUSION first; errors
    name `source`."""
    values = schema.check_diffusion(d, source)
    try:
        return DiffusionConfig(**values)
    except ValueError as err:  # the schedule's own checks: its name, a schedule that ends at abar = 0
        raise schema.ConfigError(f"{source}: {err}") from None


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
        # diffusers has no Improved-DDPM spacing: a config that respaces by it is written with
        # diffusers' default ("leading"), which is what a diffusers pipeline will run.
        "timestep_spacing": cfg.spacing if cfg.spacing != "improved" else "leading",
        "steps_offset": cfg.steps_offset,
        **({} if cfg.set_alpha_to_one is None else {"set_alpha_to_one": cfg.set_alpha_to_one}),
    }


# --- files --------------------------------------------------------------------------------------

# Bytes per element of each safetensors dtype; weights must be one of FLOAT_DTYPES.
_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_TORCH_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class Header:
    """What a .safetensors file's header says: its metadata and each tensor's (dtype, shape)."""

    metadata: dict[str, str]
    tensors: dict[str, tuple[str, tuple[int, ...]]]


def read_header(path: str | os.PathLike) -> Header:
    """Read and check a .safetensors header without loading any tensor: an 8-byte little-endian
    length, that many bytes of JSON, and every tensor's byte range inside the file, of the size its
    dtype and shape imply, no two overlapping. ValueError naming the file otherwise."""
    path = _existing(Path(path))
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, no 8-byte header length)")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(
                f"{path}: truncated or not safetensors: its header claims {length} bytes of {size}"
            )
        raw = f.read(length)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a safetensors file (its header is not UTF-8 JSON)") from None
    header = schema.json_object(text, f"{path} (safetensors header)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: safetensors __metadata__ must map names to strings")
    data_size, tensors, ranges = size - 8 - length, {}, []
    for name, entry in header.items():
        where = f"{path}: tensor {name}"
        if not isinstance(entry, dict) or entry.get("dtype") not in _ITEMSIZE:
            raise ValueError(f"{where}: its header entry has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{where}: shape must be a list of non-negative ints, got {shape!r:.60}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ValueError(f"{where}: data_offsets must be two ints, got {offsets!r:.60}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * _ITEMSIZE[entry["dtype"]]:
            raise ValueError(
                f"{where}: bytes {begin}..{end} do not hold a {entry['dtype']} {tuple(shape)} tensor inside"
                f" the file's {data_size} data bytes (truncated or lying header)"
            )
        tensors[name] = (entry["dtype"], tuple(shape))
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, a), (begin, _, b) in zip(ranges, ranges[1:], strict=False):
        if begin < end:
            raise ValueError(f"{path}: tensors {a} and {b} overlap in the file (a lying header)")
    return Header(metadata, tensors)


def expected_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """The native name -> shape of every tensor of the network `config` builds, with nothing
    allocated (the network is built on the meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}


def _check_tensors(
    source: str,
    kind: str,
    found: dict[str, tuple[str, tuple[int, ...]]],
    expected: dict[str, tuple[int, ...]],
) -> None:
    """Keys (KeyError listing them), then dtypes and shapes, of `found` against `expected`."""
    _raise_on_key_mismatch(
        kind, sorted(set(expected) - set(found)), sorted(set(found) - set(expected)), source
    )
    for name, (dtype, _) in found.items():
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{source}: {name} is {dtype}; weights must be one of {', '.join(FLOAT_DTYPES)}")
    wrong = [name for name, (_, shape) in found.items() if shape != expected[name]]
    if wrong:
        name = wrong[0]
        raise ValueError(
            f"{source}: {name} has shape {found[name][1]} where its config's network has {expected[name]}"
            + (f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else "")
        )


def _described(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: (_TORCH_DTYPES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in state.items()}


def check_finite(source: str, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """ValueError naming the first tensor that holds a NaN or an Inf."""
    for name, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{source}: {prefix}{name} holds non-finite values (NaN or Inf)")


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint file or folder: {path}")
    return path


def _read_json(path: Path) -> dict:
    return schema.read_json_object(_existing(path))


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file whose header read_header has checked."""
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def load_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A pickled state dict, read with torch.load(weights_only=True) if allow_pickle, else refused."""
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickled file; pass allow_pickle=True (CLI: --allow-pickle) to load it"
            " with torch.load(weights_only=True), or convert it to .safetensors"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            raise ValueError(
                f"{path}: refused: the pickle holds objects other than tensors and plain containers,"
                " which fastddpm does not unpickle"
            ) from None
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (a damaged pickle)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path}: expected a state dict (names -> tensors), got a {type(state).__name__}")
    return state


def _weights(
    path: Path,
    kind: str,
    expected: dict[str, tuple[int, ...]],
    allow_pickle: bool,
    rename=lambda k: k,
    reshape=lambda k, shape: shape,
) -> dict[str, torch.Tensor]:
    """The file's tensors, under `rename`d keys, checked against `expected` (names -> shapes): the
    keys, dtypes and shapes from a safetensors header before any tensor is read, finiteness after.
    `reshape(name, shape)` gives the shape a file's tensor takes in the network."""
    path = _existing(path)
    if path.suffix == ".safetensors":
        found = read_header(path).tensors
    elif path.suffix in PICKLED_SUFFIXES:
        state = load_pickle(path, allow_pickle)
        found = _described(state)
    else:
        raise ValueError(f"unknown weights format {path.suffix!r} for {path}")
    renamed = {}
    for key, (dtype, shape) in found.items():
        name = rename(key)
        renamed[name] = (dtype, reshape(name, shape) if name in expected else shape)
    _check_tensors(str(path), kind, renamed, expected)
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    check_finite(str(path), state)
    return state


def load_diffusers(
    folder: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    paper_attention: bool = False,
    backend: str = "auto",
) -> tuple[UNet, DiffusionConfig]:
    """A downloaded diffusers DDPM (e.g. google/ddpm-cifar10-32) -> (network, diffusion config).

    `folder` holds config.json, diffusion_pytorch_model.safetensors and
    scheduler_config.json, either at its top (the hub layout of the DDPM repos) or
    in unet/ and scheduler/ (what DDPMPipeline.save_pretrained writes). Both configs,
    and the weights' names, dtypes and shapes, are checked before the network is built.
    """
    folder = _existing(Path(folder))
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").exists() else folder
    sched_dir = folder / "scheduler" if (folder / "scheduler").is_dir() else folder
    path = unet_dir / "config.json"
    config = unet_config_from_diffusers(_read_json(path), paper_attention, str(path))
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    if not weights.exists() and (unet_dir / "diffusion_pytorch_model.bin").exists():
        weights = unet_dir / "diffusion_pytorch_model.bin"
    _existing(weights)
    path = sched_dir / "scheduler_config.json"
    diffusion = diffusion_config_from_diffusers(_read_json(path), str(path))
    levels = len(config.ch_mult)
    expected = {native_to_diffusers_key(k, levels): v for k, v in expected_shapes(config).items()}
    state = _weights(
        weights,
        "diffusers",
        expected,
        allow_pickle,
        rename=_modern_diffusers_key,
        # attention projections: Linear (C, C) in diffusers, 1x1 conv (C, C, 1, 1) here
        reshape=lambda name, shape: expected[name] if expected[name] == (*shape, 1, 1) else shape,
    )
    unet = UNet(config, backend=backend)
    unet.load_state_dict(diffusers_to_native(state, unet))
    return unet.eval(), diffusion


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
) -> tuple[UNet, DiffusionConfig]:
    """A pytorch_diffusion (pesser) checkpoint -> (network, diffusion config); those files carry no
    config.

    preset_name: "cifar10", "lsun256" or "celebahq256", the network the file holds.
    CIFAR10 samples with fixedlarge variance, the 256x256 models with fixedsmall.
    """
    config = preset(preset_name)
    state = _weights(Path(path), "pytorch_diffusion", expected_shapes(config), allow_pickle)
    unet = UNet(config, backend=backend)
    unet.load_state_dict(state)
    variance = "fixedlarge" if preset_name == "cifar10" else "fixedsmall"
    return unet.eval(), DiffusionConfig(variance=variance)


def save_native(sampler: Sampler, path: str | os.PathLike, *, extra: dict[str, str] | None = None) -> None:
    """One .safetensors file: the weights plus both configs as metadata (and `extra` entries)."""
    metadata = {
        **(extra or {}),
        "format": NATIVE_FORMAT,
        "fastddpm_version": __version__,
        "unet_config": json.dumps(sampler.unet.config.to_dict()),
        "diffusion_config": json.dumps(sampler.diffusion.to_dict()),
    }
    state = {k: v.contiguous() for k, v in sampler.unet.state_dict().items()}
    atomic_write(Path(path), lambda p: save_file(state, p, metadata=metadata))


def load_native(path: str | os.PathLike, *, backend: str = "auto") -> tuple[UNet, DiffusionConfig]:
    """A file written by `save_native` -> (network, diffusion config); its configs, and its weights'
    names, dtypes and shapes, are checked against each other before anything is built."""
    path = _existing(Path(path))
    metadata = read_header(path).metadata
    if metadata.get("format") != NATIVE_FORMAT:
        raise ValueError(f"{path} is not a fastddpm native checkpoint (no '{NATIVE_FORMAT}' metadata)")
    config, diffusion = configs_from_metadata(metadata, str(path))
    state = _weights(path, "native", expected_shapes(config), allow_pickle=False)
    unet = UNet(config, backend=backend)
    unet.load_state_dict(state)
    return unet.eval(), diffusion


def configs_from_metadata(metadata: dict[str, str], source: str) -> tuple[UNetConfig, DiffusionConfig]:
    """The unet_config and diffusion_config JSON entries of a file's metadata, checked."""
    texts = {}
    for key in ("unet_config", "diffusion_config"):
        if key not in metadata:
            raise schema.ConfigError(f"{source}: its metadata has no {key}")
        texts[key] = schema.json_object(metadata[key], f"{source}: {key}")
    config = UNetConfig.from_dict(texts["unet_config"], f"{source}: unet_config")
    return config, diffusion_config_from_dict(texts["diffusion_config"], f"{source}: diffusion_config")


def load(
    path: str | os.PathLike,
    *,
    preset_name: str | None = None,
    allow_pickle: bool = False,
    backend: str = "auto",
) -> tuple[UNet, DiffusionConfig]:
    """The network and diffusion config of any supported checkpoint: a diffusers folder, a native
    .safetensors, or a pytorch_diffusion file (which needs `preset_name`)."""
    path = _existing(Path(path))
    if path.is_dir():
        return load_diffusers(path, allow_pickle=allow_pickle, backend=backend)
    if path.suffix == ".safetensors":
        if read_header(path).metadata.get("format") == NATIVE_FORMAT:
            return load_native(path, backend=backend)
    if preset_name is None:
        raise ValueError(
            f"{path} is not a fastddpm native checkpoint; if it is a pytorch_diffusion file, name its"
            " network with preset_name (CLI: --preset cifar10|lsun256|celebahq256)"
        )
    return load_pytorch_diffusion(path, preset_name, allow_pickle=allow_pickle, backend=backend)
