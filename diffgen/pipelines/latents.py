"""Pixel and latent helpers shared by the pipelines (FLUX, Qwen-Image, Wan)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def resolution_shift_mu(image_seq_len: int, config) -> float:
    """The resolution-dependent timestep shift ``mu``: linear in the number of image tokens.

    ``config`` is the scheduler's config; its base/max sequence lengths and shifts set the line.
    """
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    intercept = base_shift - slope * base_len  # this evaluation order rounds exactly as diffusers does
    return image_seq_len * slope + intercept


def set_shifted_flow_timesteps(scheduler, steps: int, image_seq_len: int, device: torch.device) -> None:
    """FLUX / Qwen-Image schedule: sigmas 1 -> 1/steps, shifted by :func:`resolution_shift_mu`."""
    sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
    mu = resolution_shift_mu(image_seq_len, scheduler.config)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)
    scheduler.set_begin_index(0)


def vae_latent_stats(vae, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Wan-style VAE's per-channel latent mean and std, shaped (1, z, 1, 1, 1), cast to ``dtype``.

    Callers that need 1/std take the reciprocal of this cast value, as the references do (in bf16 a
    float32 reciprocal rounds differently).
    """
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(device, dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(device, dtype)
    return mean, std


def vae_tiling_wanted(height: int, width: int, min_pixels: int) -> bool:
    """Decode in spatial tiles when a frame has more than ``min_pixels`` pixels.

    ``DIFFGEN_VAE_TILING=1`` forces tiling, ``=0`` disables it (default ``auto``).
    """
    forced = os.environ.get("DIFFGEN_VAE_TILING", "auto").lower()
    if forced in ("1", "true", "on"):
        return True
    if forced in ("0", "false", "off"):
        return False
    return height * width > min_pixels


def decode_videos_one_by_one(vae, latents: torch.Tensor, tiling: bool) -> torch.Tensor:
    """Scaled video latents (B, C, F, h, w) -> pixels (B, F, H, W, 3) in [0, 1], one video at a time (VAE
    slicing: the peak memory of one output whatever the batch), spatially tiled when ``tiling``."""
    vae.use_tiling = tiling
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    video = torch.cat([vae.decode(sample, return_dict=False)[0] for sample in latents.split(1)])
    return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).float()


def image_to_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1]; ``size`` (height, width) resizes with Lanczos first."""
    image = image.convert("RGB")
    if size is not None:
        image = image.resize((size[1], size[0]), resample=Image.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches as tokens."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent grid of (height, width)."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)
