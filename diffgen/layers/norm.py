"""Normalisation layers shared by the DiTs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def layer_norm_no_affine(dim: int, eps: float = 1e-6) -> nn.LayerNorm:
    """The parameter-free LayerNorm that AdaLN modulation wraps."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=eps)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (weights too), returned in the input's dtype (diffusers' FP32LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm accumulated in float32, with an optional learned scale.

    The references round differently in half precision: ``torch.nn.RMSNorm`` (FLUX, Wan) scales and
    then rounds once; diffusers' own RMSNorm (Qwen-Image) rounds the normalised value to the weight's
    dtype and then scales. ``round_before_scale=True`` follows the latter, so bf16 runs match too.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True,
                 round_before_scale: bool = False):
        super().__init__()
        self.eps = eps
        self.round_before_scale = round_before_scale
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.round_before_scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             round_before_scale: bool = False) -> torch.Tensor:
    """:class:`RMSNorm`'s forward over x's last dimension, as a function of its parameters."""
    shape = (x.shape[-1],)
    half_weight = weight is not None and weight.dtype in (torch.float16, torch.bfloat16)
    if weight is None or (weight.dtype == x.dtype and not (round_before_scale and half_weight)):
        return F.rms_norm(x, shape, weight, eps)  # one fused kernel on CUDA
    if half_weight:
        return F.rms_norm(x, shape, None, eps).to(weight.dtype) * weight
    return F.rms_norm(x.float(), shape, weight.float(), eps).to(x.dtype)
