"""The image VAE of FLUX.1 (diffusers' ``AutoencoderKL``): a convolutional encoder and decoder around a KL latent.

Parameter names follow diffusers' ``AutoencoderKL`` so its checkpoints load unchanged (strictly, through the
pipeline's ``native_models``). Built here so that a FLUX run never imports diffusers: on an H200 importing
diffusers' VAE class costs ~12 s of a one-shot ``generate`` (``diffusers.utils`` pulls torch._dynamo, its model
packages the rest). Every operation runs in diffusers' order, so decode and encode equal diffusers' in float32
(tests/test_flux_vae.py). Shapes: images (B, 3, H, W) in [-1, 1], latents (B, latent_channels, H/f, W/f).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffgen.configs.mapping import MappingConfig
from diffgen.layers.attention import attention
from diffgen.models.vaes import NATIVE_VAE_ENV


@dataclass(frozen=True)
class AutoencoderKLConfig(MappingConfig):
    """config.json of the VAE; readable as attributes (``vae.config.scaling_factor``) and as a mapping
    (``vae.config.get(...)``, ``dict(vae.config)``), as diffusers' config is."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the (1x1-projected where the width changes) input."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class MidAttention(nn.Module):
    """Single-head self-attention over every pixel of the lowest-resolution grid (head dim = channels)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.group_norm(x.view(batch, channels, height * width)).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unsqueeze(2) for proj in (self.to_q, self.to_k, self.to_v))  # (B, HW, 1, C)
        out = self.to_out[0](attention(q, k, v).flatten(2))
        return out.transpose(1, 2).reshape(batch, channels, height, width) + x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([MidAttention(channels, groups)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """3x3 conv with stride 2 after padding right and bottom by one (diffusers' ``downsample_padding=0``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """2x nearest upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                     for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                     for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    """Image -> mean and log-variance of the latent (2 * latent_channels), downsampling after every block but
    the last."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], width, config.layers_per_block, groups, downsample=i < len(widths) - 1)
            for i, width in enumerate(widths))
        self.mid_block = MidBlock(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent -> image, widest first, upsampling after every block but the last; each up block has one residual
    block more than the encoder's."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        widths, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(widths[max(i - 1, 0)], width, config.layers_per_block + 1, groups, upsample=i < len(widths) - 1)
            for i, width in enumerate(widths))
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior: ``mean``, ``mode()``, ``sample(generator)`` (as diffusers' latent_dist)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # drawn on the generator's device, then moved, as diffusers' randn_tensor does
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


class AutoencoderKL(nn.Module):
    """``decode(z, return_dict=True)`` and ``encode(x, return_dict=True)`` as diffusers' class answers them."""

    config_class = AutoencoderKLConfig
    native_env = NATIVE_VAE_ENV  # 0: diffusers' class (the loader's native_class)

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None

    @classmethod
    def unsupported(cls, config: dict[str, Any]) -> str | None:
        """Why this config.json is not the network built here (None: it is): the loader then loads diffusers'
        class."""
        if config.get("act_fn", "silu") != "silu":
            return f"act_fn {config['act_fn']!r}"
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(name != block for name in config.get(key, (block,))):
                return f"{key} {config[key]}"
        return None

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        image = self.decoder(z)
        return SimpleNamespace(sample=image) if return_dict else (image,)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        posterior = DiagonalGaussian(moments)
        return SimpleNamespace(latent_dist=posterior) if return_dict else (posterior,)
