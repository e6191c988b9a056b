"""Bad input gets a clear error that names the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastddpm
from fastddpm import ops
from fastddpm.checkpoints import load_pytorch_diffusion, unet_config_from_diffusers
from fastddpm.schedule import Schedule
from fastddpm.unet import PRESETS, UNet, UNetConfig

from .conftest import TINY_DIFFUSERS_UNET


@pytest.fixture(scope="module")
def tiny():
    return UNet(PRESETS["tiny"]).eval()


# --- the model's input -----------------------------------------------------------------------------


def test_wrong_channels(tiny):
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, H, W\).*\(1, 4, 16, 16\)"):
        tiny(torch.randn(1, 4, 16, 16), 0)


def test_image_size_the_levels_cannot_halve(tiny):
    with pytest.raises(ValueError, match=r"image size \(15, 16\) is not divisible by 2"):
        tiny(torch.randn(1, 3, 15, 16), 0)


def test_t_of_the_wrong_length(tiny):
    with pytest.raises(ValueError, match="t has 3 entries for a batch of 2"):
        tiny(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))


# --- ops -------------------------------------------------------------------------------------------


def test_groups_that_do_not_divide_the_channels():
    x = torch.randn(1, 48, 4, 4)
    with pytest.raises(ValueError, match="num_groups=32 must be a positive int dividing the 48 channels"):
        ops.group_norm_silu(x, torch.ones(48), torch.zeros(48), 32)
    with pytest.raises(ValueError, match="num_groups=32 does not divide 48 channels"):
        UNetConfig(ch=48, ch_mult=(1,), num_groups=32)


def test_group_norm_shape_checks():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.group_norm_silu(x, torch.ones(4), torch.zeros(8), 4)
    with pytest.raises(ValueError, match=r"add must have shape \(2, 8\)"):
        ops.group_norm_silu(x, torch.ones(8), torch.zeros(8), 4, add=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="x must be 4-D"):
        ops.group_norm_silu(torch.randn(8, 4), torch.ones(8), torch.zeros(8), 4)
    with pytest.raises(ValueError, match="x must be contiguous or channels_last"):
        ops.group_norm_silu(x.transpose(2, 3), torch.ones(8), torch.zeros(8), 4)
    with pytest.raises(ValueError, match="x has dtype torch.int64"):
        ops.group_norm_silu(x.long(), torch.ones(8), torch.zeros(8), 4)


def test_mismatched_devices():
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="weight is on device meta but x is on cpu"):
        ops.group_norm_silu(x, torch.ones(8, device="meta"), torch.zeros(8), 4)
    table = Schedule.from_name().step_table()
    with pytest.raises(ValueError, match="eps is on device meta but x_t is on cpu"):
        ops.ddpm_step(x, torch.randn(1, 8, 4, 4, device="meta"), 5, table, noise=x)
    with pytest.raises(ValueError, match="the step table is on meta"):
        ops.ddpm_step(x, x, 5, table.to("meta"), noise=x)


def test_mismatched_dtypes():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="k is on dtype torch.float16 but q is on torch.float32"):
        ops.attention(q, q.half(), q)
    table = Schedule.from_name().step_table()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="eps is on dtype torch.bfloat16 but x_t is on torch.float32"):
        ops.ddpm_step(x, x.bfloat16(), 5, table, noise=x)


def test_attention_shape_checks():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="must agree in batch, heads and head dim"):
        ops.attention(q, torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ops.attention(q, q, torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="q must be 4-D"):
        ops.attention(q[0], q, q)


def test_t_out_of_range():
    table = Schedule.from_name().respace(50).step_table()
    x = torch.randn(1, 3, 4, 4)
    for bad in (50, -1):
        with pytest.raises(ValueError, match=rf"i={bad} is out of range: the table has steps 0..49"):
            ops.ddpm_step(x, x, bad, table, noise=x)
    with pytest.raises(ValueError, match="i is out of range"):
        ops.ddpm_step(x, x, torch.tensor([60]), table, noise=x)
    with pytest.raises(ValueError, match="i must be an integer tensor"):
        ops.ddpm_step(x, x, torch.tensor(3.0), table, noise=x)
    with pytest.raises(ValueError, match="cannot take 2000 steps"):
        fastddpm.Sampler(UNet(PRESETS["tiny"])).sample(1, steps=2000, progress=False)


def test_noise_is_required_where_the_step_adds_noise():
    table = Schedule.from_name().step_table()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="pass exactly one of noise= or seed="):
        ops.ddpm_step(x, x, 5, table)
    with pytest.raises(ValueError, match=r"noise must have shape \(1, 3, 4, 4\)"):
        ops.ddpm_step(x, x, 5, table, noise=torch.randn(1, 3, 4, 5))
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\), got -1"):
        ops.ddpm_step(x, x, 5, table, seed=-1)
    with pytest.raises(ValueError, match=r"offset must be in \[0, 2\*\*64\), got 18446744073709551616"):
        ops.ddpm_step(x, x, 5, table, seed=1, offset=2**64)


def test_device_seed_and_offset_must_be_int64_scalars_on_x_t_device():
    table = Schedule.from_name().step_table()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="offset must be an int64 tensor, got dtype torch.int32"):
        ops.ddpm_step(x, x, 5, table, seed=1, offset=torch.tensor(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"offset must be a tensor of shape \(\), got shape \(1,\)"):
        ops.ddpm_step(x, x, 5, table, seed=1, offset=torch.tensor([3]))
    with pytest.raises(ValueError, match="seed is on device meta but x_t is on cpu"):
        ops.ddpm_step(x, x, 5, table, seed=torch.tensor(1, device="meta"))
    with pytest.raises(TypeError, match="offset must be an int or an int64 tensor, got float"):
        ops.ddpm_step(x, x, 5, table, seed=1, offset=3.0)


def test_unknown_and_unbuilt_backends():
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        ops.group_norm_silu(x, torch.ones(8), torch.zeros(8), 4, backend="jax")
    # cuda is built wherever nvcc is (CI too): tests/test_cuda_library.py checks why it cannot run;
    # triton runs here through its interpreter: tests/test_triton_backend.py checks why it cannot
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"


# --- names -----------------------------------------------------------------------------------------


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown preset 'imagenet'; choose one of cifar10, lsun256"):
        fastddpm.preset("imagenet")
    with pytest.raises(ValueError, match="unknown beta schedule 'warmup10'"):
        fastddpm.DiffusionConfig(beta_schedule="warmup10")
    with pytest.raises(ValueError, match="unknown variance 'learned'"):
        fastddpm.DiffusionConfig(variance="learned")
    with pytest.raises(ValueError, match="unknown sampling method 'plms'"):
        fastddpm.Sampler(UNet(PRESETS["tiny"])).sample(1, method="plms")


# --- checkpoints -----------------------------------------------------------------------------------


def test_missing_and_unexpected_keys_are_listed(cifar10_diffusers, tmp_path):
    folder, _ = cifar10_diffusers
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    del state["mid_block.attentions.0.to_q.weight"]
    state["mid_block.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    for name in ("config.json", "scheduler_config.json"):
        (tmp_path / name).write_text((folder / name).read_text())
    with pytest.raises(KeyError) as err:
        fastddpm.load(tmp_path)
    message = str(err.value)
    assert "1 missing keys ['mid_block.attentions.0.to_q.weight']" in message
    assert "1 unexpected keys ['mid_block.extra.weight']" in message


def test_pytorch_diffusion_key_mismatch_is_listed(tmp_path):
    state = UNet(fastddpm.preset("cifar10")).state_dict()
    state.pop("mid.attn_1.q.bias")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"1 missing keys \['mid.attn_1.q.bias'\]"):
        load_pytorch_diffusion(tmp_path / "model.safetensors", "cifar10")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file or folder: .*nope"):
        fastddpm.load(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(TINY_DIFFUSERS_UNET))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        fastddpm.load(tmp_path)


def test_pickles_need_explicit_permission(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save(UNet(PRESETS["tiny"]).state_dict(), path)
    with pytest.raises(ValueError, match="is a pickled file; pass allow_pickle=True"):
        fastddpm.load(path, preset_name="cifar10")


def test_a_safetensors_file_without_config_needs_a_preset(tmp_path):
    save_file({"w": torch.zeros(1)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="name its network with preset_name"):
        fastddpm.load(tmp_path / "weights.safetensors")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"flip_sin_to_cos": True}, "unsupported UNet2DModel setting flip_sin_to_cos=True"),
        ({"downsample_padding": 1}, "unsupported UNet2DModel setting downsample_padding=1"),
        ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "unsupported block type"),
        ({"sample_size": [16, 32]}, "sample_size must be one int"),
    ],
)
def test_unsupported_diffusers_configs(change, message):
    with pytest.raises(ValueError, match=message):
        unet_config_from_diffusers({**TINY_DIFFUSERS_UNET, **change})


# --- empty batches, non-finite attention, devices, images ------------------------------------------


@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 4), (2, 0, 4, 4)])
def test_group_norm_refuses_an_empty_x(shape):
    C = shape[1]
    with pytest.raises(ValueError, match=r"group_norm_silu needs a non-empty \(N, C, H, W\)"):
        ops.group_norm_silu(torch.randn(shape), torch.ones(C), torch.zeros(C), 4, backend="torch")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), True, "0.5"])
def test_attention_refuses_a_non_finite_scale_on_every_backend(scale):
    q = torch.randn(1, 1, 4, 8)
    for backend in ("torch", "triton", "auto"):
        with pytest.raises(ValueError, match="scale must be a finite number or None"):
            ops.attention(q, q, q, scale, backend=backend)


def test_a_nan_query_row_gives_nan_on_the_torch_backend_as_on_triton():
    """SDPA's CPU kernel gave zeros for a query row holding NaN; the formula, and Triton, give NaN."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    q[0, 1, 3, 5] = float("nan")
    ours = ops.attention(q, k, v, backend="torch")
    formula = (q @ k.transpose(-1, -2) * 0.25).softmax(-1) @ v
    triton = ops.attention(q, k, v, backend="triton")
    for out in (formula, triton):
        assert torch.equal(ours.isnan(), out.isnan())
    assert ours[0, 1, 3].isnan().all() and ours.isnan().sum() == 16
    torch.testing.assert_close(ours.nan_to_num(), formula.nan_to_num(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "device, message",
    [
        ("meta", "fastddpm runs on cpu, cuda, mps, not meta"),
        ("xpu", "fastddpm runs on cpu, cuda, mps, not xpu"),
        ("foo", "'foo' is not a device"),
        ("", "'' is not a device"),
        ("cuda:-1", "is not a device"),
        (3, "must be a device name"),
    ],
)
def test_devices_are_checked_before_any_work(device, message):
    from fastddpm.devices import check_device

    with pytest.raises(ValueError, match=message):
        check_device(device)


def test_only_the_accelerators_this_machine_has_are_accepted():
    from fastddpm.devices import check_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    absent = "torch sees no CUDA device here" if count == 0 else f"this machine has {count} CUDA device"
    with pytest.raises(ValueError, match=rf"--device 'cuda:{count}': {absent}"):
        check_device(f"cuda:{count}")
    if count == 0:
        with pytest.raises(ValueError, match="--device 'cuda': torch sees no CUDA device here"):
            check_device("cuda")
    else:
        assert check_device("cuda") == torch.device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="torch sees no Metal"):
            check_device("mps")
    assert check_device("cpu") == torch.device("cpu")


def test_images_refuse_what_they_cannot_write(tmp_path):
    from fastddpm import images

    with pytest.raises(ValueError, match="a grid needs at least one image, got 0"):
        images.save_grid(tmp_path / "g.png", torch.zeros(0, 3, 8, 8))
    with pytest.raises(ValueError, match=r"1 of 2 images hold non-finite values \(NaN\)"):
        images.to_uint8(torch.tensor([0.0, float("nan")]).view(2, 1, 1, 1))
    with pytest.raises(ValueError, match=r"images hold non-finite values \(Inf\)"):
        images.save_grid(tmp_path / "g.png", torch.full((1, 3, 8, 8), float("inf")))
    with pytest.raises(ValueError, match="the PNG would be 12000000x12000000 pixels"):
        images.save_grid(tmp_path / "g.png", torch.zeros(1, 3, 8, 8), scale=10**6)
    for scale in (0, 1.5, True):
        with pytest.raises(ValueError, match="scale must be an int >= 1"):
            images.save_grid(tmp_path / "g.png", torch.zeros(1, 3, 8, 8), scale=scale)
    with pytest.raises(ValueError, match="expected float images"):
        images.to_uint8(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    assert not list(tmp_path.iterdir())


def test_output_locations_are_checked_before_work(tmp_path):
    from fastddpm.io import check_output

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*file/x.png: .*file is not a directory"):
        check_output(tmp_path / "file" / "x.png", "--out")
    with pytest.raises(ValueError, match=r"longer than the 255 bytes the file system allows"):
        check_output(tmp_path / ("a" * 245 + ".png"), "--out")  # fits alone, not with the temp prefix
    with pytest.raises(ValueError, match="cannot write in /proc"):
        check_output("/proc/x.png", "--out")
    with pytest.raises(ValueError, match="--npz is empty"):
        check_output("", "--npz")
    with pytest.raises(ValueError, match="is a directory, not a file"):
        check_output(tmp_path, "--out")
    assert (
        check_output(tmp_path / "new" / "deeper" / "x.png", "--out") == tmp_path / "new" / "deeper" / "x.png"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
