"""Generated bad inputs for the loading, training and ONNX side: every one must end in a correct
result or in a clean error, a ValueError (or KeyError, FileNotFoundError: what the CLI turns into
exit 1) whose message is one line naming the file or the setting. Never a traceback of another
kind, never a silent wrong answer.

The table is built from a few healthy files (the bundled digits model, a diffusers folder saved
from it, a 1-step training run of a small network, a 10-step ONNX step export) by damaging them
systematically: safetensors headers truncated or lying, every config key given values of the
wrong type or range, JSON that is not an object, pickles, training settings and flags, data
files, and ONNX metadata that lies. `test_zz_counts` prints how many cases ran and how each ended.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastddpm
from fastddpm import checkpoints, data, train
from fastddpm.cli import main
from fastddpm.unet import UNetConfig

CLEAN = (ValueError, KeyError, FileNotFoundError)  # what fastddpm.cli.main reports as exit 1
OUTCOMES: collections.Counter = collections.Counter()
MODEL = checkpoints.DEFAULT_MODEL
RAW = MODEL.read_bytes()
HEADER_LENGTH = int.from_bytes(RAW[:8], "little")
HEADER = json.loads(RAW[8 : 8 + HEADER_LENGTH])
META = HEADER["__metadata__"]
TENSORS = sorted(k for k in HEADER if k != "__metadata__")
UNET = json.loads(META["unet_config"])
DIFFUSION = json.loads(META["diffusion_config"])

# Values of every wrong type, and edge values of the right one; FEW_VALUES where a case is slower.
BAD_VALUES = [None, "1", "false", True, False, -1, 0, 1, 0.5, 1.5, 10**6, 10**12, [], [1], {}, "nan"]
FEW_VALUES = [None, "1", True, -1, 0, 1.5, 10**6, []]
SMALL = UNetConfig(
    in_channels=1,
    out_channels=1,
    ch=16,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    resolution=8,
    dropout=0.0,
    num_groups=8,
)


def message_of(err: BaseException) -> str:
    return err.args[0] if isinstance(err, KeyError) and err.args else str(err)


def outcome(call, names: tuple[str, ...], *, must_fail: bool) -> str:
    """Run `call`; "ok" if it returned (and may), "clean" for a one-line error naming one of
    `names`; anything else fails the test."""
    try:
        result = call()
    except CLEAN as err:
        text = message_of(err)
        assert text and "\n" not in text and "Traceback" not in text, repr(text)
        assert "weights_only=False" not in text
        assert any(name in text for name in names), f"{text!r} names none of {names}"
        return "clean"
    assert not must_fail, f"accepted: {result!r:.200}"
    return "ok"


def record(kind: str, result: str) -> None:
    OUTCOMES[(kind, result)] += 1


# --- native safetensors ------------------------------------------------------------------------------


def with_header(header: dict, body: bytes = RAW[8 + HEADER_LENGTH :]) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def with_metadata(**entries) -> bytes:
    header = json.loads(json.dumps(HEADER))
    for key, value in entries.items():
        if value is None:
            header["__metadata__"].pop(key, None)
        else:
            header["__metadata__"][key] = value
    return with_header(header)


def with_entry(name: str, **change) -> bytes:
    header = json.loads(json.dumps(HEADER))
    header[name] = {**header[name], **change} if change else ["not", "an", "entry"]
    return with_header(header)


def native_cases() -> list[tuple[str, bytes, bool]]:
    """(id, file bytes, must fail)."""
    cases = []
    for n in (0, 1, 7, 8, 9, 100, HEADER_LENGTH + 7, HEADER_LENGTH + 8, len(RAW) // 2, len(RAW) - 1):
        cases.append((f"truncated-{n}", RAW[:n], True))
    for length in (0, HEADER_LENGTH - 1, HEADER_LENGTH + 1, len(RAW), 2**63, 2**64 - 1):
        cases.append((f"length-{length}", length.to_bytes(8, "little") + RAW[8:], True))
    for text in (b"[]", b"null", b"{", b'"x"', b"1", b"\xff\xfe{}", b'{"__metadata__": 3}', b"{}"):
        cases.append((f"header-{text[:6]!r}", len(text).to_bytes(8, "little") + text + b"\0" * 16, True))
    for name in TENSORS[:: max(1, len(TENSORS) // 8)][:8]:
        begin, end = HEADER[name]["data_offsets"]
        shape = HEADER[name]["shape"]
        lies = {
            "shift": {"data_offsets": [begin + 4, end + 4]},
            "beyond": {"data_offsets": [begin, end + 10**9]},
            "reversed": {"data_offsets": [end, begin]},
            "overlap": {"data_offsets": [0, end - begin]} if begin else {"data_offsets": [4, end + 4]},
            "wider": {"shape": [shape[0] + 1, *shape[1:]]},
            "negative": {"shape": [-1, *shape[1:]]},
            "string-shape": {"shape": "big"},
            "float-offsets": {"data_offsets": [float(begin), float(end)]},
            "I32": {"dtype": "I32"},
            "BOOL": {"dtype": "BOOL", "shape": [*shape[:-1], shape[-1] * 4]},
            "unknown-dtype": {"dtype": "F128"},
            "not-an-entry": {},
        }
        for lie, change in lies.items():
            cases.append((f"{name}-{lie}", with_entry(name, **change), True))
    for key in UNET:
        for v in BAD_VALUES:
            cases.append(
                (f"unet-{key}={v!r}", with_metadata(unet_config=json.dumps({**UNET, key: v})), False)
            )
    for v in ("[1, 2]", "{", "", "null", '"x"', json.dumps({**UNET, "depth": 3}), json.dumps({"ch": 32})):
        cases.append((f"unet-text-{v[:10]}", with_metadata(unet_config=v), True))
    for key in DIFFUSION:
        for v in BAD_VALUES + [1e-9, 0.02, 10**9, "linear"]:
            text = json.dumps({**DIFFUSION, key: v})
            cases.append((f"diffusion-{key}={v!r}", with_metadata(diffusion_config=text), False))
    for d in ({**DIFFUSION, "beta_start": 0.5}, {**DIFFUSION, "num_timesteps": 10**9}):
        cases.append((f"diffusion-{d}", with_metadata(diffusion_config=json.dumps(d)), True))
    cases.append(
        (
            "diffusion-NaN",
            with_metadata(diffusion_config=META["diffusion_config"].replace("0.02", "NaN")),
            True,
        )
    )
    for key in ("format", "unet_config", "diffusion_config"):
        cases.append((f"no-{key}", with_metadata(**{key: None}), True))
    return cases


NATIVE = native_cases()


@pytest.mark.parametrize("name, content, must_fail", NATIVE, ids=[c[0] for c in NATIVE])
def test_native_file(tmp_path, name, content, must_fail):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    result = outcome(lambda: fastddpm.load(path), (str(path),), must_fail=must_fail)
    record("native safetensors", result)


WEIGHTS = load_file(MODEL)


def weights_with(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**WEIGHTS, name: value}


def weight_cases() -> list[tuple[str, dict, tuple[str, ...]]]:
    cases = []
    for name in TENSORS[:: max(1, len(TENSORS) // 10)][:10]:
        w = WEIGHTS[name]
        for bad in (float("nan"), float("inf"), -float("inf")):
            damaged = w.clone()
            damaged.view(-1)[damaged.numel() // 2] = bad
            cases.append((f"{name}-{bad}", weights_with(name, damaged), (name,)))
        cases.append((f"{name}-bool", weights_with(name, w > 0), (name,)))
        cases.append((f"{name}-int", weights_with(name, w.long()), (name,)))
        cases.append((f"{name}-shape", weights_with(name, w.unsqueeze(0)), (name,)))
        cases.append((f"{name}-missing", {k: v for k, v in WEIGHTS.items() if k != name}, (name,)))
    return cases


WEIGHT_CASES = weight_cases()


@pytest.mark.parametrize("name, state, names", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_native_weights(tmp_path, name, state, names):
    path = tmp_path / "model.safetensors"
    save_file(state, path, metadata=META)
    record("native weights", outcome(lambda: fastddpm.load(path), names, must_fail=True))


def test_a_lying_config_fails_before_allocating(tmp_path):
    """ch = 1024 over a 4.5 MB file: refused from the header's shapes in well under a second."""
    import time

    path = tmp_path / "model.safetensors"
    for change in ({"ch": 1024}, {"ch": 10**6}, {"ch_mult": [1, 2, 2, 2, 2, 2, 2, 2]}):
        path.write_bytes(with_metadata(unet_config=json.dumps({**UNET, **change})))
        start = time.perf_counter()
        record("native safetensors", outcome(lambda: fastddpm.load(path), (str(path),), must_fail=True))
        assert time.perf_counter() - start < 1.0


# --- pickles and pytorch_diffusion files -------------------------------------------------------------


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def pickle_cases(tmp: Path) -> list[tuple[str, Path, bool]]:
    files = {}
    torch.save({"a": Evil()}, tmp / "evil.ckpt")
    torch.save([1, 2], tmp / "list.ckpt")
    torch.save({"conv_in.weight": 3}, tmp / "not-tensor.ckpt")
    torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp / "wrong-keys.ckpt")
    (tmp / "garbage.ckpt").write_bytes(b"garbage" * 10)
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "zip.pth").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    for path in sorted(tmp.iterdir()):
        files[path.name] = path
    return [(name, path, True) for name, path in files.items()]


def test_pickles(tmp_path):
    for _, path, _ in pickle_cases(tmp_path):
        for allow in (False, True):

            def call(path=path, allow=allow):
                return checkpoints.load(path, preset_name="cifar10", allow_pickle=allow)

            record("pickle", outcome(call, (str(path),), must_fail=True))
    assert not (tmp_path / "pwned").exists()


def test_pytorch_diffusion_shapes(tmp_path):
    """The digits weights named as a cifar10 file, and cifar10 names with digits shapes: refused
    from the header, nothing of cifar10's size built."""
    path = tmp_path / "w.safetensors"
    save_file(WEIGHTS, path)
    for preset in ("cifar10", "lsun256", "celebahq256"):
        call = lambda preset=preset: checkpoints.load(path, preset_name=preset)  # noqa: E731
        record("pytorch_diffusion", outcome(call, (str(path),), must_fail=True))


# --- diffusers folders -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers")
    checkpoints.save_diffusers(fastddpm.load(MODEL), folder)
    return folder


def diffusers_cases() -> list[tuple[str, str, str, bool]]:
    """(id, file, its new text, must fail); texts built from the folder's healthy configs at run time
    by `edit`: here, descriptions."""
    cases = []
    for file in ("config.json", "scheduler_config.json"):
        for text in ("", "[]", "[1]", "null", "{", '"x"', "3", "NaN", "\xff"):
            cases.append((f"{file}-{text!r}", file, f"text:{text}", True))
    unet_keys = ["block_out_channels", "down_block_types", "up_block_types", "sample_size", "in_channels",
                 "layers_per_block", "norm_num_groups", "norm_eps", "attention_head_dim", "dropout",
                 "flip_sin_to_cos", "freq_shift", "downsample_padding"]  # fmt: skip
    for key in unet_keys:
        for v in FEW_VALUES:
            cases.append((f"unet-{key}={v!r}", "config.json", f"set:{key}:{json.dumps(v)}", False))
    sched_keys = ["num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "variance_type",
                  "clip_sample", "prediction_type", "thresholding", "trained_betas"]  # fmt: skip
    for key in sched_keys:
        for v in FEW_VALUES:
            cases.append((f"sched-{key}={v!r}", "scheduler_config.json", f"set:{key}:{json.dumps(v)}", False))
    return cases


DIFFUSERS = diffusers_cases()


@pytest.mark.parametrize("name, file, edit, must_fail", DIFFUSERS, ids=[c[0] for c in DIFFUSERS])
def test_diffusers_folder(diffusers_folder, tmp_path, name, file, edit, must_fail):
    folder = tmp_path / "model"
    shutil.copytree(diffusers_folder, folder)
    if edit.startswith("text:"):
        (folder / file).write_text(edit[5:])
    else:
        _, key, value = edit.split(":", 2)
        config = json.loads((folder / file).read_text())
        (folder / file).write_text(json.dumps({**config, key: json.loads(value)}))

    def load():
        sampler = fastddpm.load(folder)
        for p in sampler.unet.parameters():
            assert torch.isfinite(p).all()
        return sampler

    record("diffusers folder", outcome(load, (str(folder / file),), must_fail=must_fail))


def test_clip_sample_false_as_a_string_is_refused(diffusers_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(diffusers_folder, folder)
    config = json.loads((folder / "scheduler_config.json").read_text())
    (folder / "scheduler_config.json").write_text(json.dumps({**config, "clip_sample": "false"}))
    with pytest.raises(ValueError, match=r"scheduler_config.json: clip_sample must be true or false"):
        fastddpm.load(folder)


# --- training ----------------------------------------------------------------------------------------

RUN = {"steps": 1, "batch_size": 4, "warmup": 1, "save_every": 1, "log_every": 1}
TRAIN_VALUES = BAD_VALUES + [float("nan"), float("inf"), -0.5, 2**70, 1e30]


def train_setting_cases() -> list[tuple[str, str, object]]:
    return [
        (f"{name}={v!r}", name, v) for name in train.TrainConfig.__dataclass_fields__ for v in TRAIN_VALUES
    ]


TRAIN_SETTINGS = train_setting_cases()


@pytest.mark.parametrize("name, key, value", TRAIN_SETTINGS, ids=[c[0] for c in TRAIN_SETTINGS])
def test_training_setting(name, key, value):
    def make():
        config = train.TrainConfig(**{key: value})
        v = getattr(config, key)
        assert type(v) is type(getattr(train.TrainConfig(), key)) or v is None, (key, v)
        assert not (isinstance(v, float) and not math.isfinite(v))
        return config

    record("training setting", outcome(make, (key,), must_fail=False))


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    np.savez(out.parent / "four.npz", arr_0=data.digits("train")[:4].transpose(0, 2, 3, 1))
    config = train.TrainConfig(**RUN, data=str(out.parent / "four.npz"))
    train.Trainer(train.new_unet(SMALL, 0), fastddpm.DiffusionConfig(), config, out).run(progress=False)
    return out


def checkpoint_cases() -> list[tuple[str, dict, dict]]:
    """(id, metadata changes, tensor changes); None deletes."""
    cases = []
    for step in ("-5", "abc", "", " 1", "1e3", "1.0", "2", "0", "99999999999999999999", "١"):
        cases.append((f"step={step!r}", {"step": step}, {}))
    config = train.TrainConfig(**RUN).__dict__
    for key in config:
        for v in FEW_VALUES:
            cases.append((f"train_config-{key}={v!r}", {"train_config": json.dumps({**config, key: v})}, {}))
    for text in ("[]", "{", "null", json.dumps({**config, "extra": 1})):
        cases.append((f"train_config-{text[:8]}", {"train_config": text}, {}))
    for key in ("step", "train_config", "param_groups", "unet_config", "diffusion_config", "format"):
        cases.append((f"no-{key}", {key: None}, {}))
    cases.append(("param_groups-list", {"param_groups": "[]"}, {}))
    for key in (
        "optim.0.exp_avg",
        "optim.3.step",
        "model.conv_in.weight",
        "ema.conv_out.bias",
        "rng.generator",
    ):
        cases.append((f"drop-{key}", {}, {key: None}))
    cases.append(("nan-exp_avg_sq", {}, {"optim.1.exp_avg_sq": "nan"}))
    cases.append(("nan-ema", {}, {"ema.conv_in.bias": "nan"}))
    cases.append(("step-tensor", {}, {"optim.0.step": torch.tensor(-5.0)}))
    cases.append(("rng-short", {}, {"rng.generator": torch.zeros(1, 3, dtype=torch.uint8)}))
    cases.append(("extra", {}, {"model.extra": torch.zeros(1)}))
    return cases


CHECKPOINTS = checkpoint_cases()


@pytest.mark.parametrize("name, meta, tensors", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_training_checkpoint(one_step, tmp_path, name, meta, tensors):
    from safetensors import safe_open

    folder = tmp_path / "run"
    shutil.copytree(one_step, folder)
    path = folder / train.CHECKPOINT
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    for store, changes in ((metadata, meta), (state, tensors)):
        for key, value in changes.items():
            if value is None:
                store.pop(key, None)
            elif isinstance(value, str) and store is state:
                store[key] = torch.full_like(store[key], float(value))
            else:
                store[key] = value
    save_file(state, path, metadata=metadata)

    def resume():
        trainer = train.Trainer.resume(folder)
        trainer.close()
        assert trainer.step == int(metadata["step"])
        return trainer

    names = (str(path), "no such data folder")  # a train_config naming other data: that data is named
    record("training checkpoint", outcome(resume, names, must_fail=False))


def cli_train_cases() -> list[tuple[str, list[str]]]:
    flags = {
        "--grad-clip": ["-1", "0", "nan", "inf"],
        "--lr": ["0", "-1", "nan", "inf", "2"],
        "--ema-decay": ["1", "-0.1", "nan"],
        "--batch-size": ["0", "-4", str(2**40)],
        "--warmup": ["-1"],
        "--steps": ["0", "-5"],
        "--seed": ["-1", str(2**70)],
        "--save-every": ["0"],
        "--log-every": ["0"],
        "--device": ["foo", "meta", "mps", "cuda:7", ""],
        "--preset": ["imagenet"],
        "--data": ["/nonexistent.npz", "/nonexistent-folder"],
    }
    return [(f"{flag}={v}", [flag, v]) for flag, values in flags.items() for v in values]


CLI_TRAIN = cli_train_cases()


@pytest.mark.parametrize("name, argv", CLI_TRAIN, ids=[c[0] for c in CLI_TRAIN])
def test_train_command(tmp_path, capsys, name, argv):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--steps", "1", "--batch-size", "2", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("fastddpm: error: ") and err.count("\n") == 1, err
    assert argv[0] in err or argv[1] in err or "device" in err, err
    assert not (out / train.MODEL).exists()
    record("train command", "clean")


def data_cases(tmp: Path) -> list[tuple[str, Path]]:
    (tmp / "zero").mkdir()
    (tmp / "zero" / "a.png").write_bytes(b"")
    (tmp / "text").mkdir()
    (tmp / "text" / "a.png").write_text("not an image")
    (tmp / "cut").mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp / "cut" / "a.png")
    (tmp / "cut" / "a.png").write_bytes((tmp / "cut" / "a.png").read_bytes()[:40])
    (tmp / "empty.npz").write_bytes(b"")
    (tmp / "text.npz").write_text("hello")
    np.savez(tmp / "none.npz", arr_0=np.zeros((0, 8, 8, 1), np.uint8))
    np.savez(tmp / "float.npz", arr_0=np.zeros((2, 8, 8, 1), np.float32))
    np.savez(tmp / "object.npz", arr_0=np.array([None], dtype=object))
    np.savez(tmp / "other.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    np.savez(tmp / "shape.npz", arr_0=np.zeros((2, 9, 9, 1), np.uint8))
    (tmp / "dir.npz").mkdir()
    names = ["zero", "text", "cut", "empty.npz", "text.npz", "none.npz", "float.npz", "object.npz",
             "other.npz", "shape.npz", "dir.npz"]  # fmt: skip
    return [(name, tmp / name) for name in names]


def test_training_data(tmp_path):
    for _, path in data_cases(tmp_path):
        call = lambda path=path: data.load(str(path), 8, 1)  # noqa: E731
        record("training data", outcome(call, (path.name,), must_fail=True))


# --- ONNX ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def step_export(tmp_path_factory):
    pytest.importorskip("onnx", reason="ONNX export needs onnx (part of .[test])")
    from fastddpm import export

    path = tmp_path_factory.mktemp("onnx") / "step.onnx"
    export.to_onnx(fastddpm.load(MODEL), path, kind="step", steps=10, verify=False)
    return path


def onnx_cases() -> list[tuple[str, str, str | None]]:
    """(id, metadata key, new value or None to delete)."""
    step = {"steps": 10, "method": "ddpm", "eta": 0.0, "variance": None, "clip_x0": True}
    cases = [(f"step-{k}={v!r}", "fastddpm.step", json.dumps({**step, k: v}))
             for k, v in [("steps", 20), ("steps", 9), ("steps", "ddim10"), ("method", "ddim"), ("eta", 1.0),
                          ("variance", "fixedsmall"), ("clip_x0", "false"), ("steps", True), ("steps", -1),
                          ("eta", "nan"), ("method", 3), ("steps", [10])]]  # fmt: skip
    cases += [(f"unet-{k}={v!r}", "fastddpm.unet_config", json.dumps({**UNET, k: v}))
              for k, v in [("ch", "32"), ("ch", 0), ("ch_mult", 5), ("num_groups", 0), ("resolution", 16),
                           ("attn_head_dim", 0), ("in_channels", 3), ("extra", 1)]]  # fmt: skip
    cases += [(f"diffusion-{k}={v!r}", "fastddpm.diffusion_config", json.dumps({**DIFFUSION, k: v}))
              for k, v in [("num_timesteps", 10**9), ("beta_start", 0.5), ("clip_x0", "false"),
                           ("beta_end", 2), ("num_timesteps", 500), ("variance", "learned")]]  # fmt: skip
    cases += [(f"{k}={v!r}", k, v) for k, v in [
        ("fastddpm.kind", "denoiser"), ("fastddpm.kind", "other"), ("fastddpm.batch", "-3"),
        ("fastddpm.batch", "two"), ("fastddpm.batch", "4"), ("fastddpm.dtype", "float64"),
        ("fastddpm.graph_sha256", "0" * 64), ("fastddpm.graph_sha256", "xyz"),
        ("fastddpm.graph_sha256", None),
        ("fastddpm.step", None), ("fastddpm.step", "{"), ("fastddpm.unet_config", "[]"),
        ("fastddpm.diffusion_config", None), ("fastddpm.format", "fastddpm-onnx-0"),
    ]]  # fmt: skip
    return cases


ONNX = onnx_cases()


@pytest.mark.parametrize("name, key, value", ONNX, ids=[c[0] for c in ONNX])
def test_onnx_metadata_lie(step_export, tmp_path, name, key, value):
    import onnx

    from fastddpm import ort

    model = onnx.load(str(step_export))
    meta = {p.key: p.value for p in model.metadata_props}
    if value is None:
        meta.pop(key)
    else:
        meta[key] = value
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    path = tmp_path / "lie.onnx"
    onnx.save(model, str(path))
    record("onnx metadata", outcome(lambda: ort.load(path), (str(path),), must_fail=True))


def test_onnx_weights_and_graph(step_export, tmp_path):
    import onnx

    from fastddpm import ort

    for i in range(12):
        model = onnx.load(str(step_export))
        if i < 8:  # flip one byte of a weight
            tensors = [t for t in model.graph.initializer if len(t.raw_data) > 64]
            t = tensors[(i * 37) % len(tensors)]
            raw = bytearray(t.raw_data)
            raw[(i * 131) % len(raw)] ^= 0x40
            t.raw_data = bytes(raw)
        elif i == 8:  # an Identity graph under copied metadata
            del model.graph.node[:]
            del model.graph.initializer[:]
            model.graph.node.append(onnx.helper.make_node("Identity", ["x_t"], ["x_prev"]))
        elif i == 9:  # one node removed
            del model.graph.node[len(model.graph.node) // 2]
        elif i == 10:  # a node's op changed
            node = next(n for n in model.graph.node if n.op_type == "Mul")
            node.op_type = "Add"
        else:  # not protobuf at all
            path = tmp_path / f"g{i}.onnx"
            path.write_bytes(b"\x08\x07" + os.urandom(64))
            record("onnx graph", outcome(lambda: ort.load(path), (str(path),), must_fail=True))  # noqa: B023
            continue
        path = tmp_path / f"g{i}.onnx"
        onnx.save(model, str(path))
        record("onnx graph", outcome(lambda: ort.load(path), (str(path),), must_fail=True))  # noqa: B023


def test_zz_counts():
    """How many bad inputs ran and how each ended (shown with -s; CI logs it)."""
    total = sum(OUTCOMES.values())
    clean = sum(n for (_, result), n in OUTCOMES.items() if result == "clean")
    by_kind = collections.defaultdict(dict)
    for (kind, result), n in sorted(OUTCOMES.items()):
        by_kind[kind][result] = n
    print(f"\nbad inputs tried: {total}; clean one-line errors: {clean}; correct results: {total - clean}")
    for kind, counts in by_kind.items():
        print(f"  {kind}: {counts}")
    assert total >= 200 or total == 0  # a partial run (-k) counts fewer
