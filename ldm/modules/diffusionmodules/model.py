"""First-stage (autoencoder) ``Encoder`` / ``Decoder`` of latent-diffusion / taming-transformers, with CompVis'
parameter names; attention on ``scaled_dot_product_attention`` (no N x N score matrix is kept)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:  # noqa: N802 (CompVis name)
    """The first stage's GroupNorm: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest x2 upsampling followed by an optional 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """x2 downsampling: asymmetric (0, 1, 0, 1) zero pad + strided 3x3 conv, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (norm, swish, conv) x 2 with an optional timestep projection."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int = 512,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels with 1x1 conv ``q``, ``k``, ``v``, ``proj_out``."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        # [B, 1, HW, C], last dim contiguous: SDPA's memory-efficient kernels need it (else the math kernel holds HW x HW)
        q, k, v = (conv(h).reshape(b, 1, c, hh * ww).transpose(-1, -2).contiguous() for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        out = out.transpose(-1, -2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """``vanilla`` attention block or ``none`` (identity)."""
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type={attn_type!r} is unknown; use 'vanilla' or 'none'")


def _level(
    block_in: int, block_out: int, n_blocks: int, attention: bool, attn_type: str, dropout: float
) -> tuple[nn.Module, int]:
    """One resolution level (CompVis' ``block`` / ``attn``) and its output channels."""
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(), nn.ModuleList()
    for _ in range(n_blocks):
        level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0, dropout=dropout))
        block_in = block_out
        if attention:
            level.attn.append(make_attn(block_in, attn_type))
    return level, block_in


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i_block, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i_block](h)
    return h


def _mid(block_in: int, attn_type: str, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
    mid.attn_1 = make_attn(block_in, attn_type)
    mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
    return mid


class Encoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` -> latent ``[B, (2 if double_z else 1) * z_channels, H / f, W / f]``,
    ``f = 2 ** (len(ch_mult) - 1)``."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        attn_type: str = "vanilla",
    ):
        super().__init__()
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            attend = curr_res in attn_resolutions
            down, block_in = _level(ch * in_ch_mult[i_level], ch * ch_mult[i_level], num_res_blocks, attend, attn_type, dropout)
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)
        self.mid = _mid(block_in, attn_type, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1)

    @property
    def high_channels(self) -> int:
        """Channels of :meth:`forward_high`'s output."""
        return self.conv_out.in_channels

    def forward_high(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional down path (local: may run tile by tile): ``[B, C, H, W] -> [B, high_channels, H/f, W/f]``."""
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            h = _run_level(down, h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        return h

    def forward_low(self, h: torch.Tensor) -> torch.Tensor:
        """The mid block (global attention) and output conv at the latent resolution."""
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_low(self.forward_high(x))


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` -> image ``[B, out_ch, h * f, w * f]``."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        attn_type: str = "vanilla",
        double_z: bool = False,
    ):
        super().__init__()
        del double_z  # accepted so that one ddconfig serves Encoder and Decoder, as in CompVis configs
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid(block_in, attn_type, dropout)
        ups: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            up, block_in = _level(
                block_in, ch * ch_mult[i_level], num_res_blocks + 1, curr_res in attn_resolutions, attn_type, dropout
            )
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward_low(self, z: torch.Tensor) -> torch.Tensor:
        """Input conv and mid block (global attention) at the latent resolution: ``[B, z, h, w] -> [B, C, h, w]``."""
        h = self.conv_in(z)
        return self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward_high(self.forward_low(z))

    def forward_high(self, h: torch.Tensor) -> torch.Tensor:
        """The convolutional up path and output (local: may run tile by tile): ``[B, C, h, w] -> [B, out_ch, h*f, w*f]``."""
        for i_level in reversed(range(self.num_resolutions)):
            h = _run_level(self.up[i_level], h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
