"""AdaLN modulation: a conditioning vector produces shift/scale/gate vectors around a LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffgen.layers.norm import layer_norm_no_affine


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, with (B, D) or (B, S, D) modulation broadcast over the sequence."""
    if shift.ndim == x.ndim - 1:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


class AdaLayerNorm(nn.Module):
    """SiLU -> Linear(cond_dim, num_chunks * dim) and a parameter-free LayerNorm.

    ``forward`` returns the ``num_chunks`` modulation vectors in the order the checkpoint stores them;
    the block decides what each one means (shift, scale, gate...).
    """

    def __init__(self, dim: int, num_chunks: int, cond_dim: int | None = None, eps: float = 1e-6,
                 bias: bool = True):
        super().__init__()
        self.num_chunks = num_chunks
        self.linear = nn.Linear(cond_dim or dim, num_chunks * dim, bias=bias)
        self.norm = layer_norm_no_affine(dim, eps)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(cond)).chunk(self.num_chunks, dim=-1)
