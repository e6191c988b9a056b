"""The `fastddpm` command: sample, train, info, convert, export."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from . import __version__, checkpoints, images, ops
from .sampler import METHODS, Sampler


def _steps(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _load(args: argparse.Namespace, path: str) -> Sampler:
    return checkpoints.load(
        path,
        preset_name=args.preset,
        allow_pickle=args.allow_pickle,
        backend=getattr(args, "backend", "auto"),
    )


def cmd_sample(args: argparse.Namespace) -> None:
    if args.out is None and args.npz is None:
        args.out = "samples.png"
    model = str(args.model or checkpoints.DEFAULT_MODEL)
    if model.endswith(".onnx"):  # a fastddpm ONNX export, run by onnxruntime
        from . import ort

        sampler = ort.load(model, device=args.device)
    else:
        sampler = _load(args, model)
        sampler.unet.to(args.device)
    options = {
        "batch_size": args.batch_size,
        "generator": torch.Generator().manual_seed(args.seed),
        "progress": not args.no_progress,
    }
    if isinstance(sampler, Sampler):
        options |= {"steps": args.steps, "method": args.sampler, "eta": args.eta}
    elif args.steps is not None or args.sampler != "ddpm" or args.eta:
        raise ValueError(
            f"{model} is a full-step export: its steps and sampler were fixed when it was exported"
        )
    x = sampler.sample(args.n, **options)
    if args.out:
        images.save_grid(args.out, x, scale=args.png_scale)
        print(f"wrote {args.out}")
    if args.npz:
        images.save_npz(args.npz, images.to_rgb(images.to_uint8(x)))
        print(f"wrote {args.npz} ({args.n} images under arr_0)")


def cmd_train(args: argparse.Namespace) -> None:
    from . import train
    from .sampler import DiffusionConfig
    from .unet import preset

    if args.resume:
        trainer = train.Trainer.resume(args.out, args.device, args.backend, steps=args.steps)
    else:
        if train.has_checkpoint(args.out):
            raise ValueError(
                f"{args.out} already holds a training checkpoint: pass --resume to continue it,"
                " or choose another --out"
            )
        defaults = train.TrainConfig()
        config = train.TrainConfig(
            **{
                name: getattr(args, name) if getattr(args, name) is not None else getattr(defaults, name)
                for name in defaults.__dataclass_fields__
            }
        )
        unet = train.new_unet(preset(args.preset), config.seed, args.backend)
        trainer = train.Trainer(unet, DiffusionConfig(), config, args.out, args.device)
    trainer.run(progress=not args.no_progress)
    print(f"trained to step {trainer.step}; EMA model in {trainer.out_dir / train.MODEL}")


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


def cmd_convert(args: argparse.Namespace) -> None:
    sampler = _load(args, args.src)
    if args.to == "native":
        checkpoints.save_native(sampler, args.dst)
    else:
        checkpoints.save_diffusers(sampler, args.dst)
    print(f"wrote {args.dst} ({args.to})")


# --- export: ONNX and TensorRT (fastddpm.export, fastddpm.trt) ------------------------------------


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from . import export
    from .unet import UNet, preset

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
        f" attention as {ops_used['MatMul']} MatMul + {ops_used['Softmax']} Softmax"
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


def _add_export_parser(sub) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastddpm", description="Fast, faithful DDPM sampling.")
    parser.add_argument("--version", action="version", version=f"fastddpm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser) -> None:
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

    s = sub.add_parser("sample", help="draw samples and write a PNG grid and/or an .npz")
    s.add_argument(
        "--model",
        help="diffusers folder, fastddpm .safetensors, fastddpm .onnx export (run by onnxruntime),"
        " or pytorch_diffusion file (default: the bundled 8x8 digits model)",
    )
    model_options(s)
    s.add_argument("-n", type=int, default=16, help="number of images (default 16)")
    s.add_argument("--batch-size", type=int, default=None, help="images per batch (default: all n)")
    s.add_argument(
        "--steps",
        type=_steps,
        default=None,
        help="number of steps, or a spacing like 'ddim50' (default: all T)",
    )
    s.add_argument("--sampler", choices=METHODS, default="ddpm")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="PNG grid to write (default samples.png when no --npz is given)")
    s.add_argument("--png-scale", type=int, default=1, help="enlarge the grid's pixels K times (default 1)")
    s.add_argument("--npz", help=".npz to write (N x H x W x 3 uint8 under arr_0)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--backend", choices=ops.BACKENDS, default="auto")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)

    tr = sub.add_parser("train", help="train a U-Net by Algorithm 1 (L_simple), with EMA and checkpoints")
    tr.add_argument("--out", type=Path, required=True, help="folder for checkpoint, EMA model and log")
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue --out's checkpoint; every setting then comes from it, except --steps",
    )
    tr.add_argument("--preset", default="digits", help="network preset (default digits)")
    tr.add_argument("--data", help="'digits' (default), an .npz of uint8 images, or an image folder")
    tr.add_argument("--steps", type=int, help="total optimizer steps (default 10000)")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    tr.add_argument("--warmup", type=int, help="learning-rate warm-up steps (default 5000)")
    tr.add_argument("--grad-clip", type=float, help="max gradient norm (default 1.0)")
    tr.add_argument("--ema-decay", type=float, help="EMA decay (default 0.9999)")
    tr.add_argument("--hflip", action="store_true", default=None, help="random horizontal flips")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--save-every", type=int, help="checkpoint every N steps (default 1000)")
    tr.add_argument("--log-every", type=int, help="log every N steps (default 100)")
    tr.add_argument(
        "--no-amp", dest="amp", action="store_false", default=None, help="no bf16 autocast on CUDA"
    )
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--backend", choices=ops.BACKENDS, default="auto")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=cmd_train)

    i = sub.add_parser("info", help="version, device, and which backends are built and usable")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert a checkpoint to the native or the diffusers format")
    c.add_argument("src")
    c.add_argument("dst", type=Path)
    c.add_argument("--to", choices=["native", "diffusers"], required=True)
    model_options(c)
    c.set_defaults(func=cmd_convert)
    _add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError, ops.BackendUnavailableError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"fastddpm: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
