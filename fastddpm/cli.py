"""The `fastddpm` command: sample, train, info, check, convert, export, interpolate.

Each command is a `cmd_<name>(args)` with its options in `_add_<name>_parser(sub)` beside it; the
option groups several commands take (`_add_model_options`, `_add_sampling_options`,
`_add_device_options`) and the argparse types (`_parsed`) come first.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NoReturn, TypeVar

import torch

from . import checkpoints, figures, images, io, ops
from ._version import __version__
from .devices import check_device
from .precision import AUTO, MODES, Precision
from .sampler import SAMPLERS, Sampler
from .schedule import METHODS, SPACINGS, DiffusionConfig, check_steps

SEED_LIMIT = 2**63  # seeds are ints in [0, 2**63): what a torch.Generator and a run's Philox seeds take
DEFAULT_BATCH = 256  # images per network call when --batch-size is not given: min(n, 256)
MAX_IN_MEMORY_BYTES = 4 * 2**30  # a grid's or --npz's samples (float32) beyond this need --out DIR
# --out names that are files of another kind, not a run directory (a name ending .png is a grid).
FILE_SUFFIXES = (
    ".npz", ".npy", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp",
    ".safetensors", ".onnx", ".engine", ".pt", ".pth", ".ckpt", ".bin", ".json", ".txt",
)  # fmt: skip


class UsageError(ValueError):
    """A command line argparse refuses; main prints it as one line and returns 1."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors reach main as UsageError (one line, status 1, like every other
    error) instead of a usage text and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


Value = TypeVar("Value")


def _parsed(
    convert: Callable[[str], Value],
    expected: str,
    valid: Callable[[Value], bool] | None = None,
    refused: str = "",
) -> Callable[[str], Value]:
    """An argparse type: `convert(value)`, which raises ValueError on a value it cannot read, then
    `valid` of the result. A value refused either way is named as "expected <expected>, got 'value'",
    or, where it converts but is not valid and `refused` is given, as `refused` formatted with it."""

    def parse(value: str) -> Value:
        wrong = f"expected {expected}, got {value!r}"
        try:
            result = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(wrong) from None
        if valid is not None and not valid(result):
            raise argparse.ArgumentTypeError(refused.format(value) if refused else wrong)
        return result

    return parse


_steps = _parsed(
    lambda value: check_steps(int(value) if value.isdigit() else value),
    "a number of steps or a spacing like 10,20 or ddim50",
)
_positive_int = _parsed(int, "a positive int", lambda number: number >= 1)
_seed = _parsed(int, "an int", lambda seed: 0 <= seed < SEED_LIMIT, "a seed must be in [0, 2**63), got {}")
_eta = _parsed(float, "a finite number >= 0", lambda eta: math.isfinite(eta) and eta >= 0)
# '999,750,0' -> [999, 750, 0]
_ints = _parsed(lambda value: [int(v) for v in value.split(",")], "comma-separated ints")
# '11' -> 11 (evenly spaced values 0..1); '0,0.5,1' -> [0.0, 0.5, 1.0]
_lambdas = _parsed(
    lambda value: int(value) if value.isdigit() else [float(v) for v in value.split(",")],
    "a count or numbers a,b,...",
)


# --- option groups more than one command takes ---------------------------------------------------


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """How a checkpoint is read: --preset (a pytorch_diffusion file's network), --allow-pickle."""
    p.add_argument(
        "--preset",
        choices=["cifar10", "lsun256", "celebahq256"],
        help="the network of a pytorch_diffusion checkpoint (those files carry no config)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow a pickled .ckpt/.pt/.pth/.bin, read with torch.load(weights_only=True)",
    )


def _add_sampling_options(p: argparse.ArgumentParser, steps_help: str, seed_help: str) -> None:
    """The reverse process: --steps, --sampler, --eta (DDIM's), --spacing, and the --seed of its noise."""
    p.add_argument("--steps", type=_steps, default=None, help=steps_help)
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="ddpm",
        help="ddpm (ancestral), ddim, or a few-step solver equal to its diffusers scheduler"
        " (dpmpp-2m, unipc, euler, ...: they need --steps)",
    )
    p.add_argument("--eta", type=_eta, default=None, help="with --sampler ddim: DDIM eta (default 0)")
    p.add_argument(
        "--clipped-model-output",
        action="store_true",
        help="with --sampler ddim: eps re-derived from the clipped x0 (diffusers' use_clipped_model_output)",
    )
    p.add_argument(
        "--spacing",
        choices=SPACINGS,
        default=None,
        help="which timesteps --steps S visits (default: the model's; a diffusers folder's scheduler"
        " timestep_spacing, else improved, Improved DDPM's rule)",
    )
    p.add_argument("--seed", type=_seed, default=0, help=seed_help)


def _add_device_options(p: argparse.ArgumentParser) -> None:
    """--device (default cpu) and the --backend of the fused ops."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=ops.BACKENDS, default="auto")


def _load(args: argparse.Namespace, path: str) -> Sampler:
    """The checkpoint at `path` as a Sampler, with --spacing (where the command has it) applied."""
    options = {"preset_name": args.preset, "allow_pickle": args.allow_pickle}
    unet, diffusion = checkpoints.load(path, **options, backend=getattr(args, "backend", "auto"))
    return Sampler(unet, _spaced(args, diffusion))


def _spaced(args: argparse.Namespace, diffusion: DiffusionConfig) -> DiffusionConfig:
    """The diffusion with --spacing's override: part of the diffusion, so a run's model identity
    records it."""
    spacing = getattr(args, "spacing", None)
    return diffusion if spacing is None else replace(diffusion, spacing=spacing)


def _is_run_dir(out: str | None) -> bool:
    """--out names a PNG grid when it ends in .png, else a run directory (fastddpm.runs)."""
    return out is not None and not out.lower().endswith(".png")


def _check_eta(args: argparse.Namespace) -> float:
    """--eta's value (0 when not given); it and --clipped-model-output are refused with a sampler
    other than ddim."""
    for flag, given in (
        ("--eta", args.eta is not None),
        ("--clipped-model-output", args.clipped_model_output),
    ):
        if given and args.sampler != "ddim":
            raise ValueError(f"{flag} applies to --sampler ddim, not --sampler {args.sampler}")
    return 0.0 if args.eta is None else args.eta


def _check_sample_outputs(args: argparse.Namespace) -> None:
    """Refuse --out, --npz and --progress-strip names that cannot be written, before any work."""
    if args.out == "":
        raise ValueError("--out is empty: give a FILE.png grid or a run directory")
    if _is_run_dir(args.out):
        out = Path(args.out)
        if out.suffix.lower() in FILE_SUFFIXES:
            raise ValueError(
                f"--out {args.out}: --out takes a FILE.png grid or a run directory;"
                " for an .npz of the samples use --npz FILE.npz"
            )
        if os.path.lexists(out) and not os.path.isdir(out):
            raise ValueError(f"--out {args.out} is a file, not a run directory")
        io.check_output(out / "run.json", "--out")
    elif args.out is not None:
        io.check_output(args.out, "--out")
    for option, path, suffix in (
        ("--npz", args.npz, ".npz"),
        ("--progress-strip", args.progress_strip, ".png"),
    ):
        if path is not None:
            if not path.lower().endswith(suffix):
                raise ValueError(f"{option} takes a file name ending in {suffix}, got {path!r}")
            io.check_output(path, option)


def _check_in_memory(args: argparse.Namespace, sampler) -> None:
    """Refuse a grid or --npz whose samples would not fit in memory, and a PNG too large to write,
    before sampling."""
    cfg = sampler.unet.config
    size = args.n * cfg.in_channels * cfg.resolution**2 * 4
    if size > MAX_IN_MEMORY_BYTES:
        raise ValueError(
            f"-n {args.n} samples take {size / 2**30:.1f} GiB in memory, more than the"
            f" {MAX_IN_MEMORY_BYTES // 2**30} GiB a grid or --npz may: sample into a run directory, --out DIR"
        )
    if args.out is not None:
        images.grid_size(args.n, cfg.resolution, cfg.resolution, scale=args.png_scale)
    if args.progress_strip is not None:
        rows = min(args.n, figures.DEFAULT_ROWS) if args.strip_rows is None else args.strip_rows
        columns = (
            len(args.strip_steps) + 1 if args.strip_steps else args.strip_columns or figures.DEFAULT_COLUMNS
        )
        images.grid_size(rows * columns, cfg.resolution, cfg.resolution, columns, pad=0, scale=args.png_scale)


def cmd_sample(args: argparse.Namespace) -> None:
    from .distributed import TORCHRUN_ENV

    _check_strip_options(args)
    if args.out is None and args.npz is None and args.progress_strip is None:
        args.out = "samples.png"
    if not _is_run_dir(args.out) and any(name in os.environ for name in TORCHRUN_ENV):
        raise ValueError("under torchrun, fastddpm sample needs --out DIR, a run split over the ranks")
    if _is_run_dir(args.out) and args.npz:
        raise ValueError(f"a run directory gets its .npz at {args.out}/samples.npz: drop --npz")
    eta = _check_eta(args)
    check_device(args.device)
    _check_sample_outputs(args)
    model = str(args.model or checkpoints.DEFAULT_MODEL)
    if model.endswith(".onnx"):  # a fastddpm ONNX export, run by onnxruntime
        from . import ort

        if args.precision or args.channels_last:
            raise ValueError(
                f"{model} is an ONNX export: its dtype was fixed at export (--dtype);"
                " drop --precision and --channels-last"
            )
        sampler = ort.load(model, device=args.device)
        if isinstance(sampler, Sampler):  # a denoiser export: its steps are sampled here
            sampler.diffusion = _spaced(args, sampler.diffusion)
    else:
        sampler = _load(args, model)
        if not _is_run_dir(args.out):  # a run moves it to its rank's device (_sample_run)
            sampler.unet.to(args.device)
        # "auto" (the default) for the device the run will use: a run moves the network later.
        precision = Precision(args.precision or AUTO, args.channels_last).resolved(torch.device(args.device))
        sampler = Sampler(
            sampler.unet, sampler.diffusion, precision=precision.mode, channels_last=args.channels_last
        )
    if not _is_run_dir(args.out):
        _check_in_memory(args, sampler)
    options = {
        "batch_size": args.batch_size or min(args.n, DEFAULT_BATCH),
        "generator": torch.Generator().manual_seed(args.seed),
        "progress": not args.no_progress,
    }
    if args.noise == "philox":
        if not isinstance(sampler, Sampler):
            raise ValueError(f"{model} is a full-step export: it takes its noise as an input; drop --noise")
        options["seed"] = options.pop("generator").initial_seed()
    if isinstance(sampler, Sampler):
        options |= {
            "steps": args.steps, "method": args.sampler, "eta": eta,
            "use_clipped_model_output": args.clipped_model_output,
        }  # fmt: skip
    elif (
        args.steps is not None
        or args.sampler != "ddpm"
        or args.eta is not None
        or args.spacing
        or args.clipped_model_output
    ):
        raise ValueError(
            f"{model} is a full-step export: its steps and sampler were fixed when it was exported"
        )
    if args.cuda_graph is not None:
        if not isinstance(sampler, Sampler):
            raise ValueError(f"{model} is a full-step export, run by onnxruntime: drop --(no-)cuda-graph")
        sampler.cuda_graph = args.cuda_graph
    if _is_run_dir(args.out):
        if not isinstance(sampler, Sampler):
            raise ValueError("a sharded run (--out DIR) needs a PyTorch model, not an ONNX export")
        _sample_run(args, sampler)
        return
    if args.progress_strip:
        x = _sample_with_strip(args, sampler, options)
    else:
        x = sampler.sample(args.n, **options)
    if args.out:
        images.save_grid(args.out, x, scale=args.png_scale)
        print(f"wrote {args.out}")
    if args.npz:
        images.save_npz(args.npz, images.to_rgb(images.to_uint8(x)))
        print(f"wrote {args.npz} ({args.n} images under arr_0)")


def _check_strip_options(args: argparse.Namespace) -> None:
    names = ("strip_columns", "strip_steps", "strip_rows")
    given = [name for name in names if getattr(args, name) is not None]
    if args.progress_strip is None and given:
        raise ValueError(f"--{given[0].replace('_', '-')} needs --progress-strip FILE.png")
    if args.progress_strip is not None and _is_run_dir(args.out):
        raise ValueError("--progress-strip records one process's samples: not with --out DIR (a run)")
    if args.shard_size is not None and not _is_run_dir(args.out):
        raise ValueError("--shard-size applies to a run directory (--out DIR), not to a grid or an .npz")


def _sample_with_strip(args: argparse.Namespace, sampler: Sampler, options: dict) -> torch.Tensor:
    """Sample, writing the progressive-generation strip (fastddpm.figures) to --progress-strip."""
    if not isinstance(sampler, Sampler):
        raise ValueError("--progress-strip needs the network: a denoiser export, not a full-step one")
    x, frames, ts = figures.progress_strip(
        sampler,
        args.n,
        columns=args.strip_columns,
        timesteps=args.strip_steps,
        rows=args.strip_rows,
        **options,
    )
    figures.save_strip(args.progress_strip, frames, scale=args.png_scale)
    print(
        f"wrote {args.progress_strip}: {frames.shape[0]} samples, a row each;"
        f" predicted x0 at t = {', '.join(map(str, ts[:-1]))}, then the samples"
    )
    return x


def _sample_run(args: argparse.Namespace, sampler: Sampler) -> None:
    """`fastddpm sample --out DIR`: a resumable sharded run, split over torchrun's ranks."""
    from . import distributed, runs

    batch_size = args.batch_size or min(args.n, DEFAULT_BATCH)
    spec = runs.RunSpec(
        n=args.n,
        shard_size=args.shard_size or batch_size,
        batch_size=batch_size,
        seed=args.seed,
        steps=args.steps,
        method=args.sampler,
        eta=_check_eta(args),
        use_clipped_model_output=args.clipped_model_output,
    )
    world = distributed.init(args.device)
    try:
        sampler.unet.to(world.device)
        path = runs.run(sampler, args.out, spec, world, progress=not args.no_progress)
    finally:
        distributed.finish(world)
    if world.is_main:
        print(f"wrote {path} ({spec.n} images under arr_0, from {spec.num_shards} shards)")


def _add_sample_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sample", help="draw samples and write a PNG grid and/or an .npz")
    s.add_argument(
        "--model",
        help="diffusers folder, fastddpm .safetensors, fastddpm .onnx export (run by onnxruntime),"
        " or pytorch_diffusion file (default: the bundled 8x8 digits model)",
    )
    _add_model_options(s)
    s.add_argument("-n", type=_positive_int, default=16, help="number of images (default 16)")
    s.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help=f"images per batch (default min(n, {DEFAULT_BATCH}))",
    )
    _add_sampling_options(
        s,
        steps_help="number of steps, or a spacing like 'ddim50' (default: all T)",
        seed_help="in [0, 2**63) (default 0)",
    )
    s.add_argument(
        "--noise",
        choices=["generator", "philox"],
        default="generator",
        help="generator (default): a seeded torch.Generator, drawn in DDPMPipeline's order;"
        " philox: counter-based noise made in the step kernel, the same on every device, and what"
        " CUDA graphs replay (runs with --out DIR always use it)",
    )
    s.add_argument(
        "--out",
        help="FILE.png: a PNG grid (default samples.png when no --npz is given); any other name: a run"
        " directory, sampled in shards written atomically, resumed when run again with the same"
        " arguments, split over the ranks under torchrun, ending with DIR/samples.npz",
    )
    s.add_argument(
        "--shard-size",
        type=_positive_int,
        default=None,
        help="with --out DIR: images per shard file (default: the batch size, which defaults to min(n, 256))",
    )
    s.add_argument(
        "--png-scale", type=_positive_int, default=1, help="enlarge the grid's pixels K times (default 1)"
    )
    s.add_argument("--npz", help=".npz to write (N x H x W x 3 uint8 under arr_0)")
    _add_device_options(s)
    s.add_argument(
        "--precision",
        choices=(*MODES, AUTO),
        default=None,
        help="the network's precision (default auto: bf16 where the device has bf16 units that beat fp32,"
        " else fp32; see the README); x_t and the step stay fp32",
    )
    s.add_argument("--channels-last", action="store_true", help="run the network channels_last (NHWC)")
    s.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on CUDA, replay one captured step per step (fastddpm.graphs); default: where possible."
        " Steps that add noise replay only with seeded noise, which --out DIR runs use (a grid's"
        " generator noise samples eagerly, with a notice)",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_strip_options(s)
    s.set_defaults(func=cmd_sample)


def _add_strip_options(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--progress-strip",
        metavar="FILE.png",
        help="also write the paper's progressive-generation figure: a row per sample, the predicted x0"
        " from t = T-1 (left) down to the final samples (last column); scaled by --png-scale",
    )
    s.add_argument(
        "--strip-columns",
        type=_positive_int,
        help=f"strip columns at evenly spaced steps, the last the samples ({figures.DEFAULT_COLUMNS})",
    )
    s.add_argument(
        "--strip-steps",
        type=_ints,
        metavar="T1,T2,...",
        help="strip columns at these timesteps instead (e.g. 999,750,500,250,0; 0, the samples, is always"
        " the last column); each must be a timestep the sampler visits",
    )
    s.add_argument(
        "--strip-rows",
        type=_positive_int,
        help=f"samples in the strip (default: all n, at most {figures.DEFAULT_ROWS})",
    )


def cmd_train(args: argparse.Namespace) -> None:
    from . import config_schema, distributed, train
    from .schedule import DiffusionConfig
    from .unet import preset

    given = {name: getattr(args, name) for name in train.TrainConfig.__dataclass_fields__}
    for name, value in given.items():  # each flag's type and range, named as the flag
        if value is not None:
            config_schema.value(
                config_schema.TRAIN[name], value, "fastddpm train", "--" + name.replace("_", "-")
            )
    if args.preset is not None:
        preset(args.preset)
    device = check_device(args.device)
    if not args.resume:
        train.check_fresh(args.out)  # on every rank; rank 0 checks again under the folder's lock
    world = distributed.init(device)  # under torchrun: join the job (DDP training)
    trainer = None
    try:
        if args.resume:
            trainer = train.Trainer.resume(
                args.out,
                world.device,
                args.backend,
                steps=args.steps,
                world=world,
                given=given | {"preset": args.preset},
            )
            if trainer.repaired and world.is_main:
                print(f"fastddpm: {trainer.repaired}", file=sys.stderr)
        else:
            defaults = train.TrainConfig()
            config = train.TrainConfig(
                **{name: getattr(defaults, name) if value is None else value for name, value in given.items()}
            )
            unet = train.new_unet(preset(args.preset or "digits"), config.seed, args.backend)
            trainer = train.Trainer(unet, DiffusionConfig(), config, args.out, world.device, world)
        trainer.run(progress=not args.no_progress)
        done = f"trained to step {trainer.step}; EMA model in {trainer.out_dir / train.MODEL}"
    finally:
        # Free DDP's reducer, which holds the gloo group, before the group is destroyed: freed
        # after it (at exit), ~ProcessGroupGloo joined a thread that never ended (seen, torch 2.13).
        if trainer is not None:
            trainer.close()
        trainer = None
        distributed.finish(world)
    if world.is_main:
        print(done)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train a U-Net by Algorithm 1 (L_simple), with EMA and checkpoints")
    tr.add_argument("--out", type=Path, required=True, help="folder for checkpoint, EMA model and log")
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue --out's checkpoint; every setting then comes from it: --steps may extend the"
        " run, any other flag that differs from the checkpoint is refused (the number of torchrun"
        " ranks may change: see docs/design-notes.md)",
    )
    tr.add_argument("--preset", help="network preset (default digits)")
    tr.add_argument("--data", help="'digits' (default), an .npz of uint8 images, or an image folder")
    tr.add_argument("--steps", type=int, help="total optimizer steps (default 10000)")
    tr.add_argument(
        "--batch-size", type=int, help="global batch, split evenly over torchrun's ranks (default 128)"
    )
    tr.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    tr.add_argument("--warmup", type=int, help="learning-rate warm-up steps, 0 for none (default 5000)")
    tr.add_argument("--grad-clip", type=float, help="max gradient norm (default 1.0)")
    tr.add_argument("--ema-decay", type=float, help="EMA decay (default 0.9999)")
    tr.add_argument("--hflip", action="store_true", default=None, help="random horizontal flips")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--save-every", type=int, help="checkpoint every N steps (default 1000)")
    tr.add_argument("--log-every", type=int, help="log every N steps (default 100)")
    tr.add_argument(
        "--no-amp", dest="amp", action="store_false", default=None, help="no bf16 autocast on CUDA"
    )
    _add_device_options(tr)
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=cmd_train)


def cmd_info(args: argparse.Namespace) -> None:
    print(f"fastddpm {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    if torch.cuda.is_available():
        print(f"device: cuda ({torch.cuda.get_device_name()})")
    else:
        print("device: cpu (no CUDA device visible)")
    for name, status in ops.backend_status().items():
        print(f"backend {name}: {status}")
    from .cuda import library_info

    lib = library_info()  # which GPUs the library is built for; the backend line says if it runs here
    print("cuda library:", f"{lib['info']} ({lib['path']})" if lib["error"] is None else lib["error"])


def _add_info_parser(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("info", help="version, device, and which backends are built and usable")
    i.set_defaults(func=cmd_info)


def cmd_check(args: argparse.Namespace) -> None:
    from . import check

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # checked by check.run
    if args.json:
        io.check_output(args.json, "--json")
    report = check.run(device, quick=args.quick)
    print(report.table())
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    failures = report.failures
    if failures:
        first = failures[0]
        raise ValueError(
            f"{len(failures)} of {len(report.checks)} checks failed, first: backend {first['backend']}"
            f" {first['op']} ({first['case']}, {first['dtype']}): {first['message']}"
        )


def _add_check_parser(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser(
        "check",
        help="each available backend's ops against the reference at the DDPM shapes, then their timings",
    )
    k.add_argument("--device", help="cpu or cuda (default: cuda where a CUDA device is visible, else cpu)")
    k.add_argument("--quick", action="store_true", help="correctness only: no timings")
    k.add_argument("--json", help="also write the figures to this JSON file")
    k.set_defaults(func=cmd_check)


def cmd_convert(args: argparse.Namespace) -> None:
    if args.to == "native":
        io.check_output(args.dst, "DST")
    elif args.dst.exists() and not args.dst.is_dir():
        raise ValueError(f"DST {args.dst}: a diffusers checkpoint is a folder, and this is a file")
    sampler = _load(args, args.src)
    if args.to == "native":
        checkpoints.save_native(sampler, args.dst)
    else:
        checkpoints.save_diffusers(sampler, args.dst)
    print(f"wrote {args.dst} ({args.to})")


def _add_convert_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="convert a checkpoint to the native or the diffusers format")
    c.add_argument("src")
    c.add_argument("dst", type=Path)
    c.add_argument("--to", choices=["native", "diffusers"], required=True)
    _add_model_options(c)
    c.set_defaults(func=cmd_convert)


# --- export: ONNX and TensorRT (fastddpm.export, fastddpm.trt) ------------------------------------


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from . import export
    from .unet import UNet, preset

    io.check_output(args.out, "--out")
    if args.model is None and args.preset is not None:
        torch.manual_seed(0)
        model = UNet(preset(args.preset))
        print(
            f"exporting the {args.preset} preset with random weights (seed 0): pass --model for trained ones"
        )
    else:
        model = _load(args, args.model or checkpoints.DEFAULT_MODEL)
    info = export.to_onnx(
        model,
        args.out,
        kind=args.kind,
        batch=args.batch,
        opset=args.opset,
        dtype=args.dtype,
        steps=args.steps,
        method=args.sampler,
        eta=args.eta,
        verify=not args.no_verify,
    )
    ops_used = export.exported_ops(args.out)
    batch = "dynamic batch" if info.batch is None else f"batch {info.batch}"
    print(
        f"wrote {args.out}: {info.kind} {' '.join(info.inputs)} -> {info.outputs[0]}, {info.dtype}, {batch}"
    )
    print(
        f"  opset {info.opset}; GroupNorm as {ops_used['InstanceNormalization']} InstanceNormalization,"
        f" attention as {ops_used['MatMul']} MatMul (with its projections) + {ops_used['Softmax']} Softmax"
    )
    if info.max_abs_error is not None:
        print(f"  verified with onnxruntime against PyTorch: max abs error {info.max_abs_error:.3g}")


def cmd_export_trt(args: argparse.Namespace) -> None:
    from . import trt

    header = trt.build_engine(
        args.onnx,
        args.out,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        timing_cache=args.timing_cache,
        workspace_gib=args.workspace_gib,
    )
    dtype = header.info().dtype
    print(
        f"wrote {args.out}: TensorRT {header.tensorrt} engine for {header.gpu}, {dtype} (strongly typed),"
        f" batch {header.min_batch}..{header.max_batch} (optimized for {header.opt_batch})"
    )
    if dtype == "float32":
        print("  for an fp16 engine, export the ONNX with --dtype float16")


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    from .unet import PRESETS

    e = sub.add_parser("export", help="export to ONNX, or build a TensorRT engine from an ONNX export")
    kinds = e.add_subparsers(dest="format", required=True)

    o = kinds.add_parser(
        "onnx", help="export the denoiser (x, t) -> eps, or a full step (x_t, t, z) -> x_prev"
    )
    o.add_argument("--model", help="checkpoint to export (default: the bundled digits model)")
    o.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="without --model: that network with random weights; with it: a pytorch_diffusion file's network",
    )
    o.add_argument("--allow-pickle", action="store_true", help="allow a pickled checkpoint (weights_only)")
    o.add_argument("--out", required=True, help="the .onnx file to write")
    o.add_argument("--kind", choices=["denoiser", "step"], default="denoiser")
    o.add_argument("--batch", type=int, default=None, help="a static batch size (default: dynamic)")
    o.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or newer (default 18)")
    o.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="the network's dtype")
    o.add_argument(
        "--steps", type=_steps, default=None, help="--kind step: steps, or a spacing like 'ddim50'"
    )
    o.add_argument("--sampler", choices=METHODS, default="ddpm", help="--kind step: ddpm or ddim")
    o.add_argument("--eta", type=float, default=0.0, help="--kind step: DDIM eta (default 0)")
    o.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check against PyTorch")
    o.set_defaults(func=cmd_export_onnx)

    r = kinds.add_parser(
        "trt", help="build a TensorRT engine from a denoiser ONNX export (needs tensorrt, a GPU)"
    )
    r.add_argument("onnx", help="a fastddpm denoiser .onnx")
    r.add_argument("--out", required=True, help="the engine file to write")
    r.add_argument("--min-batch", type=int, default=1)
    r.add_argument("--opt-batch", type=int, default=None, help="the batch to tune for (default: max)")
    r.add_argument("--max-batch", type=int, default=None, help="default 64")
    r.add_argument("--timing-cache", help="a timing cache file, read if present and written after the build")
    r.add_argument("--workspace-gib", type=float, default=None, help="limit TensorRT's workspace memory")
    r.set_defaults(func=cmd_export_trt)


def cmd_interpolate(args: argparse.Namespace) -> None:
    if args.images and (len(args.images) != 2 or args.seeds is not None):
        raise ValueError("interpolate takes two images, or --seeds A,B instead of images")
    seeds = args.seeds if args.seeds is not None else [0, 1]
    if len(seeds) != 2:
        raise ValueError(f"--seeds takes two seeds A,B, got {len(seeds)}")
    if not all(0 <= seed < SEED_LIMIT for seed in seeds):
        raise ValueError(f"--seeds must be in [0, 2**63), got {','.join(map(str, seeds))}")
    options = {
        "steps": args.steps, "method": args.sampler, "eta": _check_eta(args),
        "use_clipped_model_output": args.clipped_model_output,
    }  # fmt: skip
    check_device(args.device)
    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out takes a file name ending in .png, got {args.out!r}")
    io.check_output(args.out, "--out")
    lambdas = figures.lambdas_from(args.lambdas)
    sampler = _load(args, str(args.model or checkpoints.DEFAULT_MODEL))
    sampler.unet.to(args.device)
    for t in args.t:  # check the options before drawing any source
        figures.start_step(sampler, t, args.steps, args.sampler)
    cfg = sampler.unet.config
    columns = len(lambdas) + (0 if args.no_sources else 2)
    images.grid_size(
        len(args.t) * columns, cfg.resolution, cfg.resolution, columns, pad=0, scale=args.png_scale
    )
    if args.images:
        sources = [figures.read_image(path, cfg.in_channels, cfg.resolution) for path in args.images]
    else:  # the images `fastddpm sample -n 1 --seed A` (and B) draws with the same steps
        sources = [
            sampler.sample(1, generator=torch.Generator().manual_seed(seed), progress=False, **options)[0]
            for seed in seeds
        ]
    frames = figures.interpolation_strip(
        sampler,
        *sources,
        args.t,
        sources=not args.no_sources,
        lambdas=args.lambdas,
        seed=args.seed,
        progress=not args.no_progress,
        **options,
    )
    figures.save_strip(args.out, frames, scale=args.png_scale)
    ends = "sources at both ends, " if not args.no_sources else ""
    print(f"wrote {args.out}: a row per t = {', '.join(map(str, args.t))}; {ends}lambda 0 to 1 left to right")


def _add_interpolate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "interpolate",
        help="the paper's interpolation: encode two images to x_t with the same noise, mix, decode",
    )
    p.add_argument("images", nargs="*", help="two image files of the model's size (default: --seeds)")
    p.add_argument(
        "--seeds",
        type=_ints,
        metavar="A,B",
        help="instead of images: the samples of these two seeds, drawn first (default 0,1)",
    )
    p.add_argument(
        "--t",
        type=_ints,
        default=[500],
        metavar="T[,T2,...]",
        help="timestep to mix at, 0..T-1 (default 500); several give a row each",
    )
    p.add_argument(
        "--lambdas",
        type=_lambdas,
        default=11,
        help="how many lambdas from 0 to 1 (default 11: 0, 0.1, ..., 1), or the values, e.g. 0,0.5,1",
    )
    p.add_argument("--no-sources", action="store_true", help="leave the two source images off the ends")
    p.add_argument("--out", default="interpolation.png", help="PNG to write (default interpolation.png)")
    p.add_argument(
        "--png-scale", type=_positive_int, default=1, help="enlarge the pixels K times (default 1)"
    )
    p.add_argument("--model", help="checkpoint (default: the bundled 8x8 digits model)")
    _add_model_options(p)
    _add_sampling_options(
        p,
        steps_help="reverse-process steps (default: all T)",
        seed_help="seed of the encoder's and the decoder's noise",
    )
    _add_device_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_interpolate)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastddpm", description="Fast, faithful DDPM sampling.")
    parser.add_argument("--version", action="version", version=f"fastddpm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in (
        _add_sample_parser,
        _add_train_parser,
        _add_info_parser,
        _add_check_parser,
        _add_convert_parser,
        _add_export_parser,
        _add_interpolate_parser,
    ):
        add_parser(sub)
    return parser


def _interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C leaves, and how to go on."""
    if args.func is cmd_sample and _is_run_dir(args.out):
        return (
            f"interrupted; the finished shards in {args.out} are kept: run the same command again to resume"
        )
    if args.func is cmd_train:
        return (
            f"interrupted; run the same command with --resume to continue from {args.out}'s last checkpoint"
        )
    return "interrupted; nothing was written (files are written whole or not at all)"


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad input (ValueError, KeyError, a missing backend) and a failing file system
    (OSError) print one line and return 1, Ctrl-C one line and 130. Any other exception is a bug in
    fastddpm and keeps its traceback."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(_one_line(str(err)), file=sys.stderr)
        return 1
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"fastddpm: {_interrupted(args)}", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, ops.BackendUnavailableError) as err:
        if isinstance(err, KeyError) and err.args:
            message = err.args[0]
        elif isinstance(err, OSError) and err.strerror and not isinstance(err, FileNotFoundError):
            message = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
        else:
            message = err
        print(f"fastddpm: error: {_one_line(str(message))}", file=sys.stderr)
        return 1
    return 0


def _one_line(message: str) -> str:
    return re.sub(r"\s*\n\s*", " ", message.strip())


if __name__ == "__main__":
    sys.exit(main())
