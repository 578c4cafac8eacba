"""Latent helpers shared by the 2x2-packed flow-matching image pipelines (FLUX, Qwen-Image)."""

from __future__ import annotations

import torch


def resolution_shift_mu(image_seq_len: int, config) -> float:
    """The resolution-dependent timestep shift ``mu``: linear in the number of image tokens.

    ``config`` is the scheduler's config; its base/max sequence lengths and shifts set the line.
    """
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    intercept = base_shift - slope * base_len  # this evaluation order rounds exactly as diffusers does
    return image_seq_len * slope + intercept


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches as tokens."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent grid of (height, width)."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)
