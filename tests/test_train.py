"""Training: Algorithm 1 learns, checkpoints are atomic and pickle-free, resume is exact."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastddpm
from fastddpm import data, train
from fastddpm.schedule import DiffusionConfig
from fastddpm.unet import UNetConfig

SMALL = UNetConfig(
    in_channels=1,
    out_channels=1,
    ch=16,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    resolution=8,
    dropout=0.1,
    num_groups=8,
)


def trainer(out_dir, **overrides) -> train.Trainer:
    config = train.TrainConfig(
        **{
            "batch_size": 16,
            "warmup": 5,
            "save_every": 3,
            "log_every": 1,
            "ema_decay": 0.99,
            "lr": 1e-3,
            **overrides,
        }
    )
    return train.Trainer(train.new_unet(SMALL, config.seed), DiffusionConfig(), config, out_dir)


def fixed_loss(t: train.Trainer) -> float:
    """L_simple on one fixed batch, t and eps (its own generator), in eval mode."""
    g = torch.Generator().manual_seed(123)
    x0 = data.to_model_range(t.images[:64])
    steps = torch.randint(0, 1000, (64,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = t.sqrt_abar[steps].view(-1, 1, 1, 1) * x0 + t.sqrt_one_minus_abar[steps].view(-1, 1, 1, 1) * eps
    t.unet.eval()
    with torch.no_grad():
        loss = torch.nn.functional.mse_loss(t.unet(x_t, steps), eps).item()
    t.unet.train()
    return loss


def test_algorithm_1_reduces_the_loss(tmp_path):
    t = trainer(tmp_path, steps=150, save_every=1000)
    before = fixed_loss(t)
    t.run(progress=False)
    after = fixed_loss(t)
    assert before > 0.9 and after < 0.6 * before, (before, after)


def test_warmup_clipping_and_ema(tmp_path):
    t = trainer(tmp_path, steps=4, warmup=4, grad_clip=1e-3)
    start = [p.detach().clone() for p in t.unet.parameters()]
    t.train_step()
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    t.train_step()
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 / 4)
    # EMA after 2 updates with decays d0, d1: e = d1 (d0 p0 + (1 - d0) p1) + (1 - d1) p2 — check one tensor.
    assert train.ema_decay_at(0, 0.99) == pytest.approx(0.1) and train.ema_decay_at(10_000, 0.99) == 0.99
    moved = [(p.detach() - s).abs().max().item() for p, s in zip(t.unet.parameters(), start, strict=True)]
    assert max(moved) <= 2 * 2e-3 * 1.01  # Adam moves each weight by about lr per step


def test_ema_follows_the_formula(tmp_path):
    t = trainer(tmp_path, steps=3)
    history = [[p.detach().clone() for p in t.unet.parameters()]]
    for _ in range(3):
        t.train_step()
        history.append([p.detach().clone() for p in t.unet.parameters()])
    expected = [h.clone() for h in history[0]]
    for step in range(3):
        d = train.ema_decay_at(step, 0.99)
        expected = [d * e + (1 - d) * p for e, p in zip(expected, history[step + 1], strict=True)]
    for e, got in zip(expected, t.ema.parameters(), strict=True):
        torch.testing.assert_close(got, e, rtol=1e-6, atol=1e-7)


def test_hflip_flips_about_half(tmp_path):
    t = trainer(tmp_path, hflip=True, batch_size=200)
    t.images = torch.from_numpy(data.digits("train")[:1])  # one asymmetric image
    x = t.batch()
    flipped = (x == x[:1].flip(-1)).flatten(1).all(1) if not torch.equal(x[0], x[0].flip(-1)) else None
    same = (x == x[:1]).flatten(1).all(1)
    assert flipped is not None and torch.all(flipped | same) and 60 < int(same.sum()) < 140


def test_resume_continues_exactly(tmp_path):
    whole = trainer(tmp_path / "whole", steps=6)
    whole.run(progress=False)
    first = trainer(tmp_path / "split", steps=3)
    first.run(progress=False)
    resumed = train.Trainer.resume(tmp_path / "split", steps=6)
    assert resumed.step == 3
    resumed.run(progress=False)
    for a, b in ((whole.unet, resumed.unet), (whole.ema, resumed.ema)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    assert torch.equal(whole.generator.get_state(), resumed.generator.get_state())
    log = [json.loads(line) for line in (tmp_path / "split" / train.LOG).read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_are_safetensors_and_the_model_loads(tmp_path):
    t = trainer(tmp_path, steps=3)
    t.run(progress=False)
    with safe_open(str(tmp_path / train.CHECKPOINT), framework="pt") as f:
        assert f.metadata()["format"] == train.TRAIN_FORMAT and f.metadata()["step"] == "3"
    sampler = fastddpm.load(tmp_path / train.MODEL)
    ema = load_file(tmp_path / train.CHECKPOINT)
    assert torch.equal(sampler.unet.state_dict()["conv_in.weight"], ema["ema.conv_in.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [train.CHECKPOINT, train.MODEL, train.LOG]


def cli_train(out, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fastddpm",
        "train",
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--warmup",
        "5",
        "--no-progress",
        *extra,
    ]


def checkpoint_step(out) -> int:
    try:
        with safe_open(str(out / train.CHECKPOINT), framework="pt") as f:
            return int(f.metadata()["step"])
    except Exception:
        return -1


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL a training process after its second checkpoint, resume it, and compare with a
    run that was never interrupted: the same weights, bit for bit."""
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        cli_train(killed, "--steps", "100000", "--save-every", "4"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while checkpoint_step(killed) < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = checkpoint_step(killed)
    assert step >= 8 and step % 4 == 0
    target = step + 6
    resumed = subprocess.run(
        cli_train(killed, "--resume", "--steps", str(target)), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    clean = tmp_path / "clean"
    run = subprocess.run(
        cli_train(clean, "--steps", str(target), "--save-every", "4"), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    a, b = load_file(killed / train.CHECKPOINT), load_file(clean / train.CHECKPOINT)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (killed / train.LOG).read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == target


def test_existing_checkpoint_needs_resume(tmp_path):
    trainer(tmp_path, steps=3).run(progress=False)
    out = subprocess.run(cli_train(tmp_path, "--steps", "5"), capture_output=True, text=True)
    assert out.returncode == 1 and "already holds checkpoint.safetensors" in out.stderr
    assert "pass --resume" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(cli_train(tmp_path / "none", "--resume"), capture_output=True, text=True)
    assert out.returncode == 1 and "no training checkpoint to resume" in out.stderr


@pytest.mark.parametrize("name", train.RUN_FILES)
def test_a_fresh_run_refuses_any_run_file(tmp_path, name):
    """A model kept after its checkpoint was deleted, or a log alone, is not written over."""
    (tmp_path / name).write_bytes(b"precious")
    with pytest.raises(ValueError, match=f"already holds {name}: pass --resume"):
        trainer(tmp_path, steps=1).run(progress=False)
    assert (tmp_path / name).read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_one_process_at_a_time_in_a_run_folder(tmp_path):
    """The folder's flock refuses a second run; a killed holder leaves no stale lock."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from pathlib import Path; from fastddpm import train; import time;"
            f" train.lock_run_dir(Path({str(tmp_path)!r})); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match="another process is training in this folder"):
            trainer(tmp_path, steps=1).run(progress=False)
        assert list(tmp_path.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
    t = trainer(tmp_path, steps=1)
    t.run(progress=False)
    assert t.step == 1


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"grad_clip": -1.0}, "grad_clip must be a number > 0"),
        ({"grad_clip": 0.0}, "grad_clip must be a number > 0"),
        ({"lr": 0.0}, "lr must be a number > 0"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"ema_decay": 1.0}, r"ema_decay must be a number >= 0 and < 1"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"warmup": -1}, "warmup must be an int >= 0"),
        ({"steps": True}, "steps must be an int, got True"),
        ({"steps": 5.0}, "steps must be an int, got 5.0"),
        ({"seed": 2**70}, "seed must be an int >= 0"),
        ({"hflip": "false"}, "hflip must be true or false"),
    ],
)
def test_training_settings_are_validated(setting, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**setting)


def test_bad_training_flags_name_the_flag(tmp_path):
    for flags, message in (
        (["--grad-clip", "-1"], "--grad-clip must be a number > 0, got -1.0"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--device", "foo"], "--device 'foo' is not a device"),
        (["--device", "meta"], "--device 'meta': fastddpm runs on"),
    ):
        out = subprocess.run(
            cli_train(tmp_path / "x", "--steps", "1", *flags), capture_output=True, text=True
        )
        assert out.returncode == 1 and message in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    assert not (tmp_path / "x").exists()


def test_warmup_0_is_none_and_grad_clip_none_does_not_clip(tmp_path):
    t = trainer(tmp_path, steps=2, warmup=0, grad_clip=None)
    t.train_step()
    assert t.optimizer.param_groups[0]["lr"] == 1e-3


def tampered(src, dst, tensors=None, **meta):
    """A copy of the training checkpoint `src` with metadata entries (and tensors) replaced; a
    None entry is deleted."""
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(src)
    for store, changes in ((metadata, meta), (state, tensors or {})):
        for key, value in changes.items():
            if value is None:
                del store[key]
            else:
                store[key] = value
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, dst / train.CHECKPOINT, metadata=metadata)
    return dst


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A run folder trained for 3 steps (a checkpoint at step 3)."""
    out = tmp_path_factory.mktemp("three")
    trainer(out, steps=3).run(progress=False)
    return out


@pytest.mark.parametrize(
    "meta, tensors, message",
    [
        ({"step": "-5"}, None, "step must be a non-negative int, got '-5'"),
        ({"step": "three"}, None, "step must be a non-negative int, got 'three'"),
        ({"step": "7"}, None, "optim.0.step is 3; the checkpoint's step is 7"),
        ({"step": None}, None, "its metadata has no step"),
        ({}, {"optim.5.exp_avg": None}, r"missing optim.5.exp_avg \(Adam's state\)"),
        ({"train_config": '{"steps": 3}'}, None, "train_config: missing key"),
        ({"train_config": "[1]"}, None, "train_config: expected a JSON object, got list"),
        (
            {"unet_config": json.dumps({**SMALL.to_dict(), "ch": "16"})},
            None,
            "unet_config: ch must be an int",
        ),
        (
            {"unet_config": json.dumps({**SMALL.to_dict(), "depth": 3})},
            None,
            "unet_config: unknown key depth",
        ),
        ({"param_groups": "[]"}, None, "param_groups must be one group"),
        ({}, {"model.conv_in.weight": torch.full((16, 1, 3, 3), float("nan"))}, "model.conv_in.weight holds"),
        ({}, {"ema.conv_in.bias": torch.zeros(3)}, r"ema.conv_in.bias is F32 \(3,\)"),
    ],
)
def test_a_tampered_checkpoint_is_refused_naming_the_key(three_steps, tmp_path, meta, tensors, message):
    folder = tampered(three_steps / train.CHECKPOINT, tmp_path / "run", tensors, **meta)
    with pytest.raises(ValueError, match=message):
        train.Trainer.resume(folder)
    train.lock_run_dir(folder)  # a refused resume released the folder's lock


def test_resume_refuses_flags_that_differ_from_the_checkpoint(three_steps, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in train.RUN_FILES:
        (folder / name).write_bytes((three_steps / name).read_bytes())
    out = subprocess.run(
        cli_train(folder, "--resume", "--lr", "0.5", "--preset", "tiny"), capture_output=True, text=True
    )
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr
    assert "--batch-size 4 (checkpoint: 16)" in out.stderr and "--lr 0.5 (checkpoint: 0.001)" in out.stderr
    assert "--preset tiny" in out.stderr and "--warmup 5 (checkpoint: 5)" not in out.stderr
    with pytest.raises(ValueError, match="--steps 2 is below the checkpoint's step 3"):
        train.Trainer.resume(folder, steps=2)
    resumed = train.Trainer.resume(folder, steps=4, given={"lr": 1e-3, "batch_size": 16})  # the same: fine
    resumed.run(progress=False)
    assert resumed.step == 4


def test_a_torn_log_line_does_not_break_resume(three_steps, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in train.RUN_FILES:
        (folder / name).write_bytes((three_steps / name).read_bytes())
    with open(folder / train.LOG, "a") as f:
        f.write('{"step": 4, "lo')  # killed during the append
    resumed = train.Trainer.resume(folder, steps=5)
    resumed.run(progress=False)
    steps = [json.loads(line)["step"] for line in (folder / train.LOG).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    (folder / train.LOG).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not a log entry"):
        train.Trainer.resume(folder)


def test_a_kill_between_the_renames_leaves_a_consistent_pair(tmp_path):
    """The checkpoint is written first: a kill before the model's rename leaves the model one save
    behind. Both record their step; resume rewrites the model from the checkpoint's EMA."""
    t = trainer(tmp_path, steps=3)
    t.run(progress=False)
    old_model = (tmp_path / train.MODEL).read_bytes()
    t = train.Trainer.resume(tmp_path, steps=6)
    t.run(progress=False)
    (tmp_path / train.MODEL).write_bytes(old_model)  # as if killed between the two renames
    resumed = train.Trainer.resume(tmp_path)
    assert resumed.repaired.endswith("was from step 3; rewrote it from the checkpoint's EMA at step 6")
    resumed.close()
    with safe_open(str(tmp_path / train.MODEL), framework="pt") as f:
        assert f.metadata()["train_step"] == "6"
    model, state = load_file(tmp_path / train.MODEL), load_file(tmp_path / train.CHECKPOINT)
    assert all(torch.equal(v, state[f"ema.{k}"]) for k, v in model.items())
    (tmp_path / train.MODEL).unlink()
    assert train.Trainer.resume(tmp_path).repaired.startswith(f"{tmp_path / train.MODEL} was missing")


# --- data ------------------------------------------------------------------------------------------


def test_digits_splits():
    train_images, heldout = data.digits("train"), data.digits("heldout")
    assert train_images.shape == (1437, 1, 8, 8) and heldout.shape == (360, 1, 8, 8)
    assert train_images.dtype == np.uint8 and train_images.max() == 255
    assert len(data.digit_labels("heldout")) == 360


def test_npz_and_folder_sources(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", arr_0=images)
    np.testing.assert_array_equal(data.load(str(tmp_path / "d.npz"), 12, 3), images.transpose(0, 3, 1, 2))
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 16), (255, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(folder / "sub" / "b.jpg")
    loaded = data.load(str(folder), 8, 3)
    assert loaded.shape == (2, 3, 8, 8) and loaded[0, 0].min() > 250 and loaded[1, 2].min() > 240


def test_bad_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data folder or .npz file"):
        data.load(str(tmp_path / "nope"), 8, 1)
    np.savez(tmp_path / "d.npz", arr_0=np.zeros((2, 12, 12, 3), dtype=np.uint8))
    with pytest.raises(
        ValueError, match=r"has images of shape \(3, 12, 12\), but the model takes \(1, 8, 8\)"
    ):
        data.load(str(tmp_path / "d.npz"), 8, 1)
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 12, 12, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="arr_0 must be uint8"):
        data.load(str(tmp_path / "f.npz"), 12, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        data.load(str(tmp_path / "empty"), 8, 3)


def test_damaged_data_files_name_the_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    for content in (b"", b"not an image"):
        (tmp_path / "imgs" / "a.png").write_bytes(content)
        with pytest.raises(ValueError, match=r"imgs/a.png: not a readable image"):
            data.load(str(tmp_path / "imgs"), 8, 1)
    (tmp_path / "e.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"e.npz: not a readable .npz file"):
        data.load(str(tmp_path / "e.npz"), 8, 1)
    np.savez(tmp_path / "z.npz", arr_0=np.zeros((0, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match=r"z.npz: arr_0 holds no images"):
        data.load(str(tmp_path / "z.npz"), 8, 1)
    np.savez(tmp_path / "o.npz", arr_0=np.array([None], dtype=object))
    with pytest.raises(ValueError, match=r"o.npz: not a readable .npz file \(Object arrays"):
        data.load(str(tmp_path / "o.npz"), 8, 1)
