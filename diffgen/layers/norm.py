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
    """RMSNorm computed in float32 (as the references do), with an optional learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.weight.dtype == x.dtype:
            # One fused kernel on CUDA; it accumulates in float32 like the references.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            if self.weight.dtype in (torch.float16, torch.bfloat16):
                return (x32.to(self.weight.dtype)) * self.weight
            return (x32 * self.weight).to(dtype)
        return x32.to(dtype)
