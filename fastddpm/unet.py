"""The DDPM paper's U-Net (Ho et al. 2020, diffusion_tf/models/unet.py).

Parameter names follow the original network as pytorch_diffusion ports it
(temb.dense.*, down.{i}.block.{j}, mid.attn_1, up.{i}.upsample, norm_out, ...), so
those checkpoints load by name. Every GroupNorm(+SiLU) and attention core goes
through `fastddpm.ops`: a backend swaps in without touching this file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import config_schema, ops


@dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of the paper's U-Net.

    attn_head_dim: None for the paper's single-head attention over all C channels;
    an int D splits each attention block into C // D heads (how diffusers runs
    UNet2DModel configs that leave attention_head_dim at its default of 8).
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 32
    dropout: float = 0.1
    num_groups: int = 32
    eps: float = 1e-6
    attn_head_dim: int | None = None

    def __post_init__(self) -> None:
        """Types and ranges through fastddpm.config_schema; ConfigError (a ValueError) naming the field."""
        object.__setattr__(self, "ch_mult", _as_tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", _as_tuple(self.attn_resolutions))
        config_schema.check_unet(self.to_dict(), "U-Net config")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "U-Net config") -> UNetConfig:
        """Every field, checked (config_schema.UNET); errors name `source` (a file) and the key."""
        return cls(**config_schema.check_unet(d, source))


def _as_tuple(v: object) -> object:
    """A list or tuple as a tuple; anything else as it is, for the schema to refuse."""
    return tuple(v) if isinstance(v, list | tuple) else v


PRESETS: dict[str, UNetConfig] = {
    "cifar10": UNetConfig(),
    "lsun256": UNetConfig(ch_mult=(1, 1, 2, 2, 4, 4), resolution=256, dropout=0.0),
    "celebahq256": UNetConfig(ch_mult=(1, 1, 2, 2, 4, 4), resolution=256, dropout=0.0),
    # The bundled default model: scikit-learn's 8x8 digits, 1.1M parameters.
    "digits": UNetConfig(
        in_channels=1,
        out_channels=1,
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        resolution=8,
        dropout=0.1,
        num_groups=8,
    ),
    "tiny": UNetConfig(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        resolution=16,
        dropout=0.0,
        num_groups=8,
    ),
}


def preset(name: str) -> UNetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim): [sin(t w_k), cos(t w_k)], w_k = 10000^(-k/(dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000) / (half - 1))
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class Norm(nn.Module):
    """Holds a GroupNorm's weight and bias; applies it (with SiLU and add) through ops."""

    def __init__(self, channels: int, num_groups: int, eps: float) -> None:
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(
        self, x: torch.Tensor, *, silu: bool, add: torch.Tensor | None = None, backend: str = "auto"
    ) -> torch.Tensor:
        return ops.group_norm_silu(
            x,
            self.weight,
            self.bias,
            self.num_groups,
            self.eps,
            silu=silu,
            add=add,
            backend=backend,
        )


class ResnetBlock(nn.Module):
    """GN, SiLU, conv3, + Dense(SiLU(temb)), GN, SiLU, dropout, conv3; 1x1 shortcut if C changes."""

    def __init__(self, c_in: int, c_out: int, temb_ch: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.norm1 = Norm(c_in, cfg.num_groups, cfg.eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, c_out)
        self.norm2 = Norm(c_out, cfg.num_groups, cfg.eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, backend: str) -> torch.Tensor:
        """x (N, c_in, H, W), temb (N, c_out) = temb_proj(SiLU(temb)) -> (N, c_out, H, W).

        The residual add is folded into the last op: in place into conv2's output, or, with a 1x1
        shortcut, as a GEMM accumulating nin_shortcut(x) into it (conv2 carrying both biases).
        """
        h = self.conv1(self.norm1(x, silu=True, backend=backend))
        h = self.dropout(self.norm2(h, silu=True, add=temb, backend=backend))
        if self.nin_shortcut is None:
            return self.conv2(h).add_(x)
        if torch.compiler.is_exporting():  # ONNX: the shortcut stays a Conv, not a MatMul
            return self.nin_shortcut(x) + self.conv2(h)
        out = F.conv2d(h, self.conv2.weight, self.conv2.bias + self.nin_shortcut.bias, padding=1)
        N, C, H, W = out.shape
        add_pointwise_(out.view(N, C, H * W), self.nin_shortcut.weight.flatten(1), x.flatten(2))
        return out


class AttnBlock(nn.Module):
    """x + proj_out(attention(q, k, v)) over the H*W positions of GN(x); q, k, v, proj_out are 1x1
    convs (the original network's parameters), applied as batched GEMMs."""

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.norm = Norm(channels, cfg.num_groups, cfg.eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.heads = 1 if cfg.attn_head_dim is None else channels // cfg.attn_head_dim

    def forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        """x (N, C, H, W) -> (N, C, H, W) in x's memory format; attention over L = H*W positions
        with D = C // heads per head.

        GN(x) is read in place as (N, L, C) tokens (a transposed view for NCHW): q, k and v are each
        one batched GEMM with the bias as its initial value (baddbmm), written (N, L, C) contiguous
        and viewed (N, heads, L, D) with unit stride along D, as attention kernels read best. The
        output projection accumulates into x + proj_out.bias in x's layout: the residual add and the
        projection are one GEMM.
        """
        N, C, H, W = x.shape
        L, D = H * W, C // self.heads
        tokens = self.norm(x, silu=False, backend=backend).view(N, C, L).mT  # (N, L, C)

        def project(conv: nn.Conv2d) -> torch.Tensor:  # tokens -> (N, heads, L, D)
            weight_t = conv.weight.view(C, C).mT.expand(N, C, C)  # (N, C_in, C_out), not copied
            return torch.baddbmm(conv.bias, tokens, weight_t).view(N, L, self.heads, D).transpose(1, 2)

        o = ops.attention(project(self.q), project(self.k), project(self.v), backend=backend)
        o = o.transpose(1, 2).reshape(N, L, C)  # a view unless the backend wrote (N, heads, L, D)
        out = x + self.proj_out.bias.view(C, 1, 1).to(x.dtype)  # x's dtype under autocast too
        add_pointwise_(out.view(N, C, L), self.proj_out.weight.view(C, C), o.mT)
        return out


def add_pointwise_(acc: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """acc += weight @ x at each of L positions (a 1x1 convolution's arithmetic), in place, as one
    batched GEMM whose epilogue reads acc: acc (N, C_out, L), weight (C_out, C_in), x (N, C_in, L).

    acc has unit stride along L (NCHW) or along C (NHWC); x is read in place with either. weight and
    x are cast to acc's dtype (a no-op but under autocast, which leaves in-place ops alone).
    """
    N = acc.shape[0]
    weight, x = weight.to(acc.dtype), x.to(acc.dtype)
    if acc.stride(2) == 1:  # (C_out, L) += (C_out, C_in) @ (C_in, L)
        return acc.baddbmm_(weight.expand(N, -1, -1), x)
    acc.mT.baddbmm_(x.mT, weight.mT.expand(N, -1, -1))  # (L, C_out) += (L, C_in) @ (C_in, C_out)
    return acc


class Downsample(nn.Module):
    """Stride-2 conv3 with the original's padding: right and bottom only."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): (N, in_channels, H, W), (N,) -> (N, out_channels, H, W).

    H and W must be divisible by 2^(levels - 1). `backend` selects the fused-op
    implementation (see fastddpm.ops); it can be changed at any time.
    """

    def __init__(self, config: UNetConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config, self.backend = config, backend
        cfg, ch = config, config.ch
        temb_ch = 4 * ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        levels = len(cfg.ch_mult)
        skip_channels, block_in, res = [ch], ch, cfg.resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * mult, temb_ch, cfg))
                block_in = ch * mult
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, cfg))
                skip_channels.append(block_in)
            if i != levels - 1:
                level.downsample = Downsample(block_in)
                skip_channels.append(block_in)
                res //= 2
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, cfg)
        self.mid.attn_1 = AttnBlock(block_in, cfg)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, cfg)

        up_levels = []
        for i in reversed(range(levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(
                    ResnetBlock(block_in + skip_channels.pop(), ch * cfg.ch_mult[i], temb_ch, cfg)
                )
                block_in = ch * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, cfg))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            up_levels.insert(0, level)
        self.up = nn.ModuleList(up_levels)

        self.norm_out = Norm(block_in, cfg.num_groups, cfg.eps)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def _check_input(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"x must have shape (N, {cfg.in_channels}, H, W) for this model, got {tuple(x.shape)}"
            )
        factor = 2 ** (len(cfg.ch_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"image size {tuple(x.shape[2:])} is not divisible by {factor}, as this model's"
                f" {len(cfg.ch_mult)} levels need"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.dtype.is_complex or t.dtype == torch.bool or t.dim() > 1:
            raise ValueError(f"t must be a real scalar or a (N,) tensor, got {t.dtype} {tuple(t.shape)}")
        if t.dim() == 1 and t.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"t has {t.shape[0]} entries for a batch of {x.shape[0]}")
        return t.expand(x.shape[0])

    def resnet_blocks(self) -> tuple[ResnetBlock, ...]:
        """Every ResnetBlock, in the order forward calls them."""
        return (
            *(block for level in self.down for block in level.block),
            self.mid.block_1,
            self.mid.block_2,
            *(block for level in reversed(self.up) for block in level.block),
        )

    def time_projections(self, silu_temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """silu_temb (N, 4 ch) -> every ResnetBlock's temb_proj(silu_temb) (N, c_out), in the order
        forward calls the blocks: one GEMM over their weights, stacked at use."""
        projs = [block.temb_proj for block in self.resnet_blocks()]
        weight = torch.cat([p.weight for p in projs])  # (sum of c_out, 4 ch)
        bias = torch.cat([p.bias for p in projs])
        return F.linear(silu_temb, weight, bias).split([p.out_features for p in projs], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = self._check_input(x, t)
        backend = self.backend
        temb = timestep_embedding(t, self.config.ch).to(self.conv_in.weight.dtype)
        silu_temb = F.silu(self.temb.dense[1](F.silu(self.temb.dense[0](temb))))
        temb_proj = iter(self.time_projections(silu_temb))

        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(hs[-1], next(temb_proj), backend)
                if len(level.attn):
                    h = level.attn[j](h, backend)
                hs.append(h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))

        h = self.mid.block_1(hs[-1], next(temb_proj), backend)
        h = self.mid.attn_1(h, backend)
        h = self.mid.block_2(h, next(temb_proj), backend)

        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), next(temb_proj), backend)
                if len(level.attn):
                    h = level.attn[j](h, backend)
            if hasattr(level, "upsample"):
                h = level.upsample(h)

        return self.conv_out(self.norm_out(h, silu=True, backend=backend))
