"""The DDPM paper's U-Net (Ho et al. 2020, diffusion_tf/models/unet.py).

Parameter names follow the original network as pytorch_diffusion ports it
(temb.dense.*, down.{i}.block.{j}, mid.attn_1, up.{i}.upsample, norm_out, ...), so
those checkpoints load by name. Every GroupNorm(+SiLU) and attention core goes
through `fastddpm.ops`: a backend swaps in without touching this file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import config_schema, ops
from .folds import Fold, FoldMemo, compute_now
from .reference import memory_format_of


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


def timestep_frequencies(dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """w_k = 10000^(-k/(dim/2 - 1)), k < dim/2: the sinusoidal embedding's frequencies, float32."""
    half = dim // 2
    return torch.exp(torch.arange(half, dtype=torch.float32, device=device) * (-math.log(10000) / (half - 1)))


def timestep_embedding(t: torch.Tensor, dim: int, freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim) float32: [sin(t w_k), cos(t w_k)] (timestep_frequencies,
    or `freqs` where the caller holds them), zero-padded to an odd dim."""
    freqs = timestep_frequencies(dim, t.device) if freqs is None else freqs
    args = t[:, None] * freqs  # float32 (t's integers promote exactly below 2^24)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class Act(NamedTuple):
    """An activation as the U-Net's forward carries it: a (N, C, H, W) and a per-channel bias not
    yet added, pending (C,) or None; its value is a + pending[:, None, None].

    A convolution's bias is carried as pending until an op can take it without a pass of its own:
    the next GroupNorm's add (GN(a + p) is group_norm_silu(a, add=p)), the next block's bias, a
    1x1 shortcut's bias (W (a + p) = W a + W p), the attention block's residual add. Before an
    op that cannot (a Downsample's or Upsample's zero-padded convolution) the block before it
    materializes: its last convolution takes the pending sum as its bias.
    """

    a: torch.Tensor
    pending: torch.Tensor | None = None

    def add(self) -> torch.Tensor | None:
        """pending as a GroupNorm's (N, C) add (a broadcast view), or None."""
        return None if self.pending is None else self.pending.expand(self.a.shape[0], -1)

    def value(self) -> torch.Tensor:
        """a + pending (a itself when nothing is pending)."""
        return self.a if self.pending is None else self.a + self.pending.view(-1, 1, 1).to(self.a.dtype)


def _sum(*biases: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of the biases given (None for none): (C,) vectors."""
    given = [b for b in biases if b is not None]
    return None if not given else sum(given[1:], given[0])


class Norm(nn.Module):
    """Holds a GroupNorm's weight and bias; applies it (with SiLU and add) through ops."""

    def __init__(self, channels: int, num_groups: int, eps: float) -> None:
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(
        self,
        x: torch.Tensor,
        *,
        silu: bool,
        add: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """The norm of x, or of cat([x, skip], dim=1) read in place (see ops.group_norm_silu)."""
        return ops.group_norm_silu(
            x,
            self.weight,
            self.bias,
            self.num_groups,
            self.eps,
            silu=silu,
            add=add,
            skip=skip,
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
        """x (N, c_in, H, W), temb (N, c_out) = temb_proj(SiLU(temb)) -> (N, c_out, H, W)."""
        return self.run(Act(x), temb + self.conv1.bias, backend, compute_now, materialize=True).a

    def run(
        self,
        x: Act,
        temb_b: torch.Tensor,
        backend: str,
        fold: Fold,
        materialize: bool,
        skip: Act | None = None,
    ) -> Act:
        """The block on x, or on the channel concatenation of x and `skip` (the up path's input,
        never made: GN1 reads both in place and the 1x1 shortcut is one GEMM per part);
        temb_b (N, c_out) = temb_proj(SiLU(temb)) + conv1.bias: conv1's bias rides in GN2's add.
        The output's pending bias is conv2's plus the shortcut's (the input's pending through it);
        with `materialize` conv2 adds it and nothing stays pending.

        The residual add is folded into the last op: in place into conv2's output, or, with a 1x1
        shortcut, as GEMMs accumulating nin_shortcut(input) into it.
        """
        if skip is not None and torch.compiler.is_exporting():  # ONNX: one Concat, as the original
            x, skip = Act(torch.cat([x.a, skip.a], dim=1), _concat_pending(x, skip)()), None
        parts = (x,) if skip is None else (x, skip)
        pending_in = x.pending if skip is None else fold((self, "input pending"), _concat_pending(x, skip))
        add = None if pending_in is None else pending_in.expand(x.a.shape[0], -1)
        h = self.norm1(x.a, silu=True, add=add, skip=None if skip is None else skip.a, backend=backend)
        h = F.conv2d(h, self.conv1.weight, padding=1)
        h = self.dropout(self.norm2(h, silu=True, add=temb_b, backend=backend))
        nin = self.nin_shortcut
        if nin is None:
            pending = fold((self, "pending"), lambda: _sum(self.conv2.bias, pending_in))
        else:
            through = (lambda: None) if pending_in is None else (lambda: nin.weight.flatten(1) @ pending_in)
            pending = fold((self, "pending"), lambda: _sum(self.conv2.bias, nin.bias, through()))  # + W p
        out = F.conv2d(h, self.conv2.weight, pending if materialize else None, padding=1)
        if nin is None:
            out.add_(x.a)
        elif torch.compiler.is_exporting():  # ONNX: the shortcut stays a Conv, not a MatMul
            out = out + F.conv2d(x.a, nin.weight)
        else:
            N, C, H, W = out.shape
            w, first = nin.weight.flatten(1), 0  # (c_out, c_in)
            for part in parts:  # W x = W[:, :C1] x + W[:, C1:] skip
                c = part.a.shape[1]
                add_pointwise_(out.view(N, C, H * W), w[:, first : first + c], part.a.flatten(2))
                first += c
        return Act(out, None if materialize else pending)


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
        """x (N, C, H, W) -> (N, C, H, W) in x's memory format."""
        return self.run(Act(x), backend, compute_now, materialize=True, in_place=False).a

    def run(self, x: Act, backend: str, fold: Fold, materialize: bool, in_place: bool) -> Act:
        """The block on x; attention over L = H*W positions with D = C // heads per head.

        GN(x) is read in place as (N, L, C) tokens (a transposed view for NCHW): q, k and v are one
        GEMM over their stacked weights, written (N, L, 3C) and viewed (N, heads, L, D) each, unit
        stride along D: where the tokens are one (N L, C) matrix (NHWC, or N = 1) a 2-D GEMM with
        the stacked bias in its epilogue, else a batched GEMM with the bias as its initial value.
        The output projection accumulates into x.a (a copy, or with `in_place` x.a itself: the
        U-Net's forward without gradients reads it no more) in x's layout, one GEMM for projection
        and residual; the input's pending bias and proj_out's stay pending, or with `materialize`
        are added to the copy first.
        """
        N, C, H, W = x.a.shape
        L, D = H * W, C // self.heads
        tokens = self.norm(x.a, silu=False, add=x.add(), backend=backend).view(N, C, L).mT  # (N, L, C)
        convs = (self.q, self.k, self.v)
        weight = fold((self, "qkv weight"), lambda: torch.cat([c.weight.view(C, C) for c in convs]).mT)
        bias = fold((self, "qkv bias"), lambda: torch.cat([c.bias for c in convs]))
        matrix = N == 1 or tokens.stride(0) == L * tokens.stride(1)  # NHWC, or one image
        if matrix and not torch.compiler.is_exporting():  # (ONNX: one MatMul whatever the batch)
            qkv = torch.addmm(bias, tokens.reshape(N * L, C), weight).view(N, L, 3 * C)  # bias epilogue
        else:
            qkv = torch.baddbmm(bias, tokens, weight.expand(N, C, 3 * C))  # (N, L, 3C)
        q, k, v = (part.view(N, L, self.heads, D).transpose(1, 2) for part in qkv.split(C, dim=2))
        o = ops.attention(q, k, v, backend=backend)
        o = o.transpose(1, 2).reshape(N, L, C)  # a view where the backend wrote (N, L, heads, D)
        pending_in = x.pending
        pending = fold((self, "pending"), lambda: _sum(pending_in, self.proj_out.bias))
        if materialize:
            out, pending = x.a + pending.view(C, 1, 1).to(x.a.dtype), None  # x's dtype under autocast
        else:  # the same arithmetic either way: the biases stay pending
            out = x.a if in_place else x.a.clone()
        add_pointwise_(out.view(N, C, L), self.proj_out.weight.view(C, C), o.mT)
        return Act(out, pending)


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
        return self.run(Act(x)).value()

    def run(self, x: Act) -> Act:
        """The convolution of x's value; its bias stays pending."""
        return Act(F.conv2d(F.pad(x.value(), (0, 1, 0, 1)), self.conv.weight, stride=2), self.conv.bias)


# The 1-D taps of a 3x3 convolution (rows: offsets -1, 0, +1) that a stride-2 transposed
# convolution's 4 taps sum, for nearest x2 upsampling then the convolution (padding 1): output row
# 2m reads input rows m-1 (tap 3: w[-1]) and m (tap 1: w[0] + w[1]), row 2m+1 rows m (tap 2:
# w[-1] + w[0]) and m+1 (tap 0: w[1]).
_UPSAMPLE_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def upsample_conv_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 convolution's weight (C_out, C_in, 3, 3) as the (C_in, C_out, 4, 4) weight of
    conv_transpose2d(stride=2, padding=1) that equals nearest x2 upsampling then the convolution
    (padding 1): each of its 16 taps a sum of the 3x3 taps, computed in float32."""
    taps = torch.tensor(_UPSAMPLE_TAPS, dtype=torch.float32, device=weight.device)  # (4, 3)
    kernel = torch.einsum("ky,oiyx,lx->iokl", taps, weight.float(), taps)
    return kernel.to(weight.dtype).contiguous(memory_format=memory_format_of(weight))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(Act(x), compute_now).value()

    def run(self, x: Act, fold: Fold) -> Act:
        """Upsampling and convolution of x's value as one stride-2 transposed convolution
        (upsample_conv_kernel: 4/9 of the FLOPs, no upsampled copy); its bias stays pending.
        Exported to ONNX as the upsampling and the convolution."""
        if torch.compiler.is_exporting():
            return Act(self.conv(F.interpolate(x.value(), scale_factor=2.0, mode="nearest")))
        kernel = fold((self, "kernel"), lambda: upsample_conv_kernel(self.conv.weight))
        return Act(F.conv_transpose2d(x.value(), kernel, stride=2, padding=1), self.conv.bias)


class UNet(nn.Module):
    """eps_theta(x_t, t): (N, in_channels, H, W), (N,) -> (N, out_channels, H, W).

    H and W must be divisible by 2^(levels - 1). `backend` selects the fused-op
    implementation (see fastddpm.ops); it can be changed at any time.
    """

    def __init__(self, config: UNetConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config, self.backend = config, backend
        self._folds = FoldMemo()  # tensors derived from the weights (fastddpm.folds), not parameters
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

    def time_projections(self, silu_temb: torch.Tensor, fold: Fold = compute_now) -> tuple[torch.Tensor, ...]:
        """silu_temb (N, 4 ch) -> every ResnetBlock's temb_proj(silu_temb) + conv1.bias (N, c_out),
        in the order forward calls the blocks (conv1's bias rides in GN2's add with the projection):
        one GEMM over their stacked weights and summed biases."""
        blocks = self.resnet_blocks()
        weight = fold(
            "temb weight", lambda: torch.cat([b.temb_proj.weight for b in blocks])
        )  # (sum c_out, 4 ch)
        bias = fold("temb bias", lambda: torch.cat([b.temb_proj.bias + b.conv1.bias for b in blocks]))
        return F.linear(silu_temb, weight, bias).split([b.temb_proj.out_features for b in blocks], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The network on x (N, in_channels, H, W) at timesteps t; activations travel as Act, their
        convolution biases pending (see Act), and the tensors derived from the weights come from
        `fold` (fastddpm.folds: memoized while no gradient is taken)."""
        t = self._check_input(x, t)
        backend, fold = self.backend, self._folds.for_forward(self)
        in_place = not torch.is_grad_enabled()  # attention may overwrite an input nothing reads again
        ch = self.config.ch
        device = x.device
        freqs = fold("timestep frequencies", lambda: timestep_frequencies(ch, device))
        temb = timestep_embedding(t, ch, freqs).to(self.conv_in.weight.dtype)
        silu_temb = F.silu(self.temb.dense[1](F.silu(self.temb.dense[0](temb))))
        temb_proj = iter(self.time_projections(silu_temb, fold))

        def level_blocks(level: nn.Module, h: Act | None, down: bool) -> Act:
            """A level's blocks (and attention): down, each on the last skip and pushing its output
            as the next; up, each on h and the skip it pops. The last materializes before a
            resampling."""
            last = len(level.block) - 1 if hasattr(level, "downsample") or hasattr(level, "upsample") else -1
            for j, block in enumerate(level.block):
                attn = level.attn[j] if len(level.attn) else None
                x_j, skip = (hs[-1], None) if down else (h, hs.pop())
                h = block.run(x_j, next(temb_proj), backend, fold, j == last and attn is None, skip)
                if attn is not None:
                    h = attn.run(h, backend, fold, materialize=j == last, in_place=in_place)
                if down:
                    hs.append(h)
            return h

        hs = [Act(F.conv2d(x, self.conv_in.weight, padding=1), self.conv_in.bias)]
        for level in self.down:
            level_blocks(level, None, down=True)
            if hasattr(level, "downsample"):
                hs.append(level.downsample.run(hs[-1]))

        h = self.mid.block_1.run(hs[-1], next(temb_proj), backend, fold, materialize=False)
        h = self.mid.attn_1.run(h, backend, fold, materialize=False, in_place=in_place)
        h = self.mid.block_2.run(h, next(temb_proj), backend, fold, materialize=False)

        for level in reversed(self.up):
            h = level_blocks(level, h, down=False)
            if hasattr(level, "upsample"):
                h = level.upsample.run(h, fold)

        h = self.norm_out(h.a, silu=True, add=h.add(), backend=backend)
        return F.conv2d(h, self.conv_out.weight, self.conv_out.bias, padding=1)


def _concat_pending(x: Act, skip: Act) -> Callable[[], torch.Tensor | None]:
    """The computation of x and skip's channel concatenation's pending bias (zeros for a part
    without one; None if neither has one), holding their pending biases and shapes, not them."""
    parts = [(t.pending, t.a.shape[1], t.a.dtype, t.a.device) for t in (x, skip)]

    def pending() -> torch.Tensor | None:
        if all(p is None for p, *_ in parts):
            return None
        return torch.cat(
            [p if p is not None else torch.zeros(c, dtype=d, device=dev) for p, c, d, dev in parts]
        )

    return pending
