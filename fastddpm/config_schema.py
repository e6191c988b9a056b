"""One schema for every config fastddpm reads from a file: types and ranges, checked before use.

Each config is a closed set of fields (`UNET`, `DIFFUSION`, `TRAIN`); `check(fields, d, source)`
returns the values of dict `d` (every key known, present, of its type and in its range) or
raises `ConfigError`, one line naming `source` (a file, or what the dict is) and the key.
The loaders (native and training checkpoints, diffusers JSON, ONNX metadata and TensorRT
headers, pytorch_diffusion presets) all pass through here before anything is built, so a
config that would divide by zero, allocate terabytes or read a string as a bool is refused.

Types are strict: an int field takes an int but not a bool or "3"; a float field takes an
int or a float, finite; a bool field takes only true or false.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

# Bounds well beyond every published DDPM, and small enough that nothing built from them is huge.
MAX_CHANNELS = 4096  # ch, ch * mult, in/out channels
MAX_RESOLUTION = 4096
MAX_LEVELS = 8
MAX_RES_BLOCKS = 16
MAX_TIMESTEPS = 100_000
MAX_STEPS = 10**12  # training steps


class ConfigError(ValueError):
    """A config (or metadata) value of the wrong type or outside its range; one line."""


@dataclass(frozen=True)
class Field:
    """kind: "int", "float", "bool", "str", "ints" (a list of ints), "json" (any JSON value);
    lo/hi: inclusive bounds (for "ints", of each element; lo_open makes lo exclusive);
    choices: the allowed strings; optional: None is allowed; nonempty: for "ints"."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False
    nonempty: bool = False


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def value(field: Field, v: object, source: str, key: str) -> object:
    """`v` checked against `field`; ints lists come back as tuples."""

    def fail(what: str) -> ConfigError:
        return ConfigError(f"{source}: {key} must be {what}, got {_describe(v)}")

    if (v is None and field.optional) or field.kind == "json":
        return v
    if field.kind == "bool":
        if not isinstance(v, bool):
            raise fail("true or false (a bool)")
        return v
    if field.kind == "str":
        if not isinstance(v, str):
            raise fail("a string")
        if field.choices is not None and v not in field.choices:
            raise fail(f"one of {', '.join(field.choices)}")
        return v
    if field.kind == "ints":
        if not isinstance(v, list | tuple) or (field.nonempty and not v):
            raise fail("a non-empty list of ints" if field.nonempty else "a list of ints")
        return tuple(
            value(Field("int", field.lo, field.hi), x, source, f"{key}[{i}]") for i, x in enumerate(v)
        )
    if field.kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise fail("an int")
        number = v
    elif field.kind == "float":
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise fail("a finite number")
        number = float(v)
    else:
        raise AssertionError(f"unknown field kind {field.kind}")
    if field.lo is not None and (number <= field.lo if field.lo_open else number < field.lo):
        raise fail(_range(field))
    if field.hi is not None and (number >= field.hi if field.hi_open else number > field.hi):
        raise fail(_range(field))
    return number


def _range(field: Field) -> str:
    def text(x: float) -> str:
        return str(int(x)) if field.kind == "int" else f"{x:g}"

    lo = "" if field.lo is None else f"{'>' if field.lo_open else '>='} {text(field.lo)}"
    hi = "" if field.hi is None else f"{'<' if field.hi_open else '<='} {text(field.hi)}"
    return f"a{'n int' if field.kind == 'int' else ' number'} {' and '.join(p for p in (lo, hi) if p)}"


def check(fields: dict[str, Field], d: object, source: str, *, defaults: dict | None = None) -> dict:
    """The checked values of the dict `d`, a closed format: unknown keys are refused, and keys
    missing from `d` are refused unless `defaults` gives them."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    unknown = sorted(str(k) for k in d if k not in fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    out = {}
    for key, field in fields.items():
        if key in d:
            out[key] = value(field, d[key], source, key)
        elif defaults is not None and key in defaults:
            out[key] = defaults[key]
        else:
            raise ConfigError(f"{source}: missing key {key}")
    return out


# --- the formats -------------------------------------------------------------------------------

UNET = {
    "in_channels": Field("int", 1, MAX_CHANNELS),
    "out_channels": Field("int", 1, MAX_CHANNELS),
    "ch": Field("int", 1, MAX_CHANNELS),
    "ch_mult": Field("ints", 1, MAX_CHANNELS, nonempty=True),
    "num_res_blocks": Field("int", 1, MAX_RES_BLOCKS),
    "attn_resolutions": Field("ints", 1, MAX_RESOLUTION),
    "resolution": Field("int", 1, MAX_RESOLUTION),
    "dropout": Field("float", 0, 1, hi_open=True),
    "num_groups": Field("int", 1, MAX_CHANNELS),
    "eps": Field("float", 0, 1, lo_open=True),
    "attn_head_dim": Field("int", 1, MAX_CHANNELS, optional=True),
}

DIFFUSION = {
    "beta_schedule": Field("str"),  # the name is checked by fastddpm.schedule
    "num_timesteps": Field("int", 1, MAX_TIMESTEPS),
    "beta_start": Field("float", 0, 1, lo_open=True),
    "beta_end": Field("float", 0, 1, lo_open=True),
    "variance": Field("str", choices=("fixedlarge", "fixedsmall")),
    "clip_x0": Field("bool"),
    "spacing": Field("str", choices=("improved", "leading", "trailing", "linspace")),
    "steps_offset": Field("int", 0, MAX_TIMESTEPS),
    "set_alpha_to_one": Field("bool", optional=True),
}
# How a diffusion config respaces, for configs written before these keys existed: the
# Improved-DDPM rule, as every fastddpm release before them sampled.
DIFFUSION_DEFAULTS = {"spacing": "improved", "steps_offset": 0, "set_alpha_to_one": None}

TRAIN = {
    "data": Field("str"),
    "steps": Field("int", 1, MAX_STEPS),
    "batch_size": Field("int", 1, 2**20),
    "lr": Field("float", 0, 1, lo_open=True),
    "warmup": Field("int", 0, MAX_STEPS),
    "grad_clip": Field("float", 0, None, lo_open=True, optional=True),
    "ema_decay": Field("float", 0, 1, hi_open=True),
    "hflip": Field("bool"),
    "seed": Field("int", 0, 2**63 - 1),
    "save_every": Field("int", 1, MAX_STEPS),
    "log_every": Field("int", 1, MAX_STEPS),
    "amp": Field("bool"),
}


def check_unet(d: dict, source: str) -> dict:
    """U-Net config values (fastddpm.unet.UNetConfig's fields), with the cross-field rules: every
    level's channels ch * mult within MAX_CHANNELS and divisible by num_groups and attn_head_dim,
    the resolution divisible by 2^(levels - 1)."""
    out = check(UNET, d, source)
    levels = len(out["ch_mult"])
    if levels > MAX_LEVELS:
        raise ConfigError(f"{source}: ch_mult has {levels} levels; at most {MAX_LEVELS}")
    for c in [out["ch"], *(out["ch"] * m for m in out["ch_mult"])]:
        if c > MAX_CHANNELS:
            raise ConfigError(f"{source}: ch * ch_mult gives {c} channels; at most {MAX_CHANNELS}")
        if c % out["num_groups"]:
            raise ConfigError(f"{source}: num_groups={out['num_groups']} does not divide {c} channels")
        if out["attn_head_dim"] is not None and c % out["attn_head_dim"]:
            raise ConfigError(f"{source}: attn_head_dim={out['attn_head_dim']} does not divide {c} channels")
    if out["resolution"] % 2 ** (levels - 1):
        raise ConfigError(
            f"{source}: resolution {out['resolution']} is not divisible by 2^{levels - 1} for {levels} levels"
        )
    return out


def check_diffusion(d: dict, source: str) -> dict:
    """Diffusion config values (fastddpm.schedule.DiffusionConfig's fields); beta_start <= beta_end."""
    out = check(DIFFUSION, d, source, defaults=DIFFUSION_DEFAULTS)
    if out["beta_start"] > out["beta_end"]:
        raise ConfigError(f"{source}: beta_start {out['beta_start']} is above beta_end {out['beta_end']}")
    return out


# --- JSON --------------------------------------------------------------------------------------


def parse_json(text: str, source: str) -> object:
    """json.loads, with an error naming `source` (NaN and Infinity, which are not JSON, refused)."""

    def constant(name: str) -> float:
        raise ConfigError(f"{source}: {name} is not a JSON value")

    try:
        return json.loads(text, parse_constant=constant)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{source}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    except RecursionError:
        raise ConfigError(f"{source}: JSON nested too deeply") from None


def json_object(text: str, source: str) -> dict:
    """A JSON text that must hold an object (a dict)."""
    d = parse_json(text, source)
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    return d


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in file `path`; ConfigError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    return json_object(text, str(path))
