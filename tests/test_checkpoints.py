"""Checkpoint formats: pytorch_diffusion by key name, native safetensors, pickles only on request."""

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastddpm
from fastddpm import checkpoints
from fastddpm.checkpoints import load_native, load_pytorch_diffusion, save_native
from fastddpm.unet import PRESETS, UNet


def random_unet(name: str, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(fastddpm.preset(name)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return unet


def same_output(a: UNet, b: UNet) -> bool:
    cfg = a.config
    x = torch.randn(2, cfg.in_channels, cfg.resolution, cfg.resolution)
    with torch.no_grad():
        return torch.equal(a(x, torch.tensor([3, 400])), b(x, torch.tensor([3, 400])))


def test_pytorch_diffusion_pickle_loads_with_weights_only(tmp_path):
    unet = random_unet("cifar10")
    path = tmp_path / "ema_cifar10.ckpt"
    torch.save(unet.state_dict(), path)  # how pytorch_diffusion's files are stored
    loaded, diffusion = load_pytorch_diffusion(path, "cifar10", allow_pickle=True)
    assert diffusion.variance == "fixedlarge"
    assert same_output(unet, loaded)


def test_pytorch_diffusion_safetensors_and_256_variance(tmp_path):
    unet = UNet(fastddpm.preset("lsun256"))
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp_path / "church.safetensors")
    sampler = fastddpm.load(tmp_path / "church.safetensors", preset_name="lsun256")
    assert sampler.diffusion.variance == "fixedsmall"
    ours, theirs = unet.state_dict(), sampler.unet.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_native_round_trip_keeps_weights_and_configs(tmp_path):
    unet = UNet(PRESETS["tiny"]).eval()
    diffusion = fastddpm.DiffusionConfig(
        beta_schedule="cosine", num_timesteps=200, variance="fixedsmall", clip_x0=False
    )
    save_native(fastddpm.Sampler(unet, diffusion), tmp_path / "tiny.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.safetensors"]  # no temporary left behind
    again, again_diffusion = load_native(tmp_path / "tiny.safetensors")
    assert again.config == unet.config and again_diffusion == diffusion
    assert same_output(unet, again)
    assert fastddpm.load(tmp_path / "tiny.safetensors").diffusion == diffusion


def test_diffusers_folder_in_pipeline_layout(tiny_diffusers, tmp_path):
    """DDPMPipeline.save_pretrained writes unet/ and scheduler/ subfolders."""
    import diffusers

    folder, model = tiny_diffusers
    pipe = diffusers.DDPMPipeline(unet=model, scheduler=diffusers.DDPMScheduler.from_pretrained(folder))
    pipe.save_pretrained(tmp_path)
    sampler = fastddpm.load(tmp_path)
    assert sampler.diffusion.num_timesteps == 20
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([4])
    with torch.no_grad():
        assert (sampler.unet(x, t) - model(x, t).sample).abs().max().item() <= 1e-5


# --- damaged and lying files: refused from the header, one line naming the file and the key ------

RAW = checkpoints.DEFAULT_MODEL.read_bytes()
LENGTH = int.from_bytes(RAW[:8], "little")
HEADER = json.loads(RAW[8 : 8 + LENGTH])


def rewritten(header: dict) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + RAW[8 + LENGTH :]


def with_unet(**change) -> bytes:
    header = json.loads(json.dumps(HEADER))
    unet = json.loads(header["__metadata__"]["unet_config"])
    header["__metadata__"]["unet_config"] = json.dumps({**unet, **change})
    return rewritten(header)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"not a safetensors file \(0 bytes"),
        (RAW[:1000], "truncated or not safetensors: its header claims"),
        (RAW[: len(RAW) // 2], "truncated or lying header"),
        ((2**63).to_bytes(8, "little") + RAW[8:], "truncated or not safetensors"),
        (b"\x02\0\0\0\0\0\0\0[]", r"safetensors header\): expected a JSON object, got list"),
    ],
)
def test_truncated_empty_or_lying_headers(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        fastddpm.load(path)


def test_a_config_that_lies_about_the_shapes_fails_before_building(tmp_path):
    """The 4.5 MB digits file claiming ch = 1024 (4.8 GB to build) fails on the header's shapes."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(with_unet(ch=1024))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"conv_in.bias has shape \(32,\) where its config's network has"):
        fastddpm.load(path)
    assert time.perf_counter() - start < 1.0
    path.write_bytes(with_unet(ch=10**6))
    with pytest.raises(ValueError, match="unet_config: ch must be an int >= 1 and <= 4096, got 1000000"):
        fastddpm.load(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ch_mult": 2}, "ch_mult must be a non-empty list of ints, got 2"),
        ({"ch_mult": []}, "ch_mult must be a non-empty list of ints"),
        ({"num_groups": 0}, "num_groups must be an int >= 1"),
        ({"attn_head_dim": 0}, "attn_head_dim must be an int >= 1"),
        ({"resolution": "8"}, "resolution must be an int, got '8'"),
        ({"num_res_blocks": -1}, "num_res_blocks must be an int >= 1"),
        ({"extra": 1}, "unknown key extra"),
    ],
)
def test_native_configs_of_the_wrong_type(tmp_path, change, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(with_unet(**change))
    with pytest.raises(ValueError, match=f"model.safetensors: unet_config: {message}"):
        fastddpm.load(path)


@pytest.mark.parametrize("bad", ["nan", "inf", "bool", "int64"])
def test_non_finite_or_non_float_weights_are_refused_naming_the_key(tmp_path, bad):
    state = load_file(checkpoints.DEFAULT_MODEL)
    w = state["mid.attn_1.q.weight"].clone()
    if bad in ("nan", "inf"):
        w.view(-1)[7] = float(bad)
    else:
        w = w > 0 if bad == "bool" else w.long()
    save_file(
        {**state, "mid.attn_1.q.weight": w}, tmp_path / "m.safetensors", metadata=HEADER["__metadata__"]
    )
    message = "holds non-finite values" if bad in ("nan", "inf") else "is (BOOL|I64); weights must be one of"
    with pytest.raises(ValueError, match=f"m.safetensors: mid.attn_1.q.weight {message}"):
        fastddpm.load(tmp_path / "m.safetensors")


def test_betas_and_clip_sample_from_a_scheduler_config(tmp_path):
    sampler = fastddpm.load(checkpoints.DEFAULT_MODEL)
    checkpoints.save_diffusers(sampler, tmp_path)
    scheduler = json.loads((tmp_path / "scheduler_config.json").read_text())
    for change, message in (
        ({"clip_sample": "false"}, "clip_sample must be true or false"),
        ({"beta_start": 0.5}, "beta_start 0.5 is above beta_end 0.02"),
        ({"beta_end": 1.5}, r"beta_end must be a number > 0 and <= 1"),
        ({"num_train_timesteps": 10**9}, "num_train_timesteps must be an int >= 1 and <= 100000"),
    ):
        (tmp_path / "scheduler_config.json").write_text(json.dumps({**scheduler, **change}))
        with pytest.raises(ValueError, match=f"scheduler_config.json: {message}"):
            fastddpm.load(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(scheduler))
    for text, message in (("[1, 2]", "expected a JSON object, got list"), ("", "not valid JSON")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=f"config.json: {message}"):
            fastddpm.load(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_refused_pickle_is_one_line_without_torchs_advice(tmp_path):
    torch.save({"w": _Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError) as err:
        fastddpm.load(tmp_path / "evil.ckpt", preset_name="cifar10", allow_pickle=True)
    text = str(err.value)
    assert "refused: the pickle holds objects other than tensors" in text
    assert "\n" not in text and "weights_only=False" not in text and err.value.__cause__ is None
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt: not a readable PyTorch checkpoint"):
        fastddpm.load(tmp_path / "empty.pt", preset_name="cifar10", allow_pickle=True)
