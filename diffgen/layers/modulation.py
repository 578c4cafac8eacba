"""AdaLN modulation: a conditioning vector produces shift/scale/gate vectors around a LayerNorm."""

from __future__ import annotations

from collections.abc import Callable

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


def norm_modulate(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                  float32: bool = False) -> torch.Tensor:
    """``modulate(norm(x), shift, scale)`` for a parameter-free LayerNorm; one Triton pass on CUDA (in compiled
    graphs as the custom op ``diffgen::layer_norm_modulate`` where they call the modulation kernels).

    ``float32``: the reference computes in float32 and casts the result back to x's dtype (Wan:
    ``modulate(norm(x.float()), ...).type_as(x)``); otherwise each op runs (and rounds) in x's dtype.
    """
    if _fusable(x, shift, scale, float32) and norm.weight is None and tuple(norm.normalized_shape) == (x.shape[-1],):
        from diffgen.layers.fused import layer_norm_modulate_op, layer_norm_modulate_triton

        fused = layer_norm_modulate_op if torch.compiler.is_compiling() else layer_norm_modulate_triton
        return fused(x, shift, scale, norm.eps, not float32)
    return norm_modulate_plain(norm, x, shift, scale, float32)


def norm_modulate_plain(norm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, shift: torch.Tensor,
                        scale: torch.Tensor, float32: bool = False) -> torch.Tensor:
    """:func:`norm_modulate` as plain ops (the reference; also the custom op's implementation off CUDA)."""
    if float32:
        return modulate(norm(x.float()), shift, scale).type_as(x)
    return modulate(norm(x), shift, scale)


def gated_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, float32: bool = False) -> torch.Tensor:
    """The gated residual ``x + gate * y`` (gate (B, D) or (B, 1|S, D)); one Triton pass on CUDA (in compiled graphs
    as the custom op ``diffgen::gated_add`` where they call the modulation kernels).

    ``float32``: the reference sums in float32 and casts back (Wan: ``(x.float() + y * gate).type_as(x)``).
    """
    if _fusable(x, gate, y, float32) and y.shape == x.shape:
        from diffgen.layers.fused import gated_add_op, gated_add_triton

        fused = gated_add_op if torch.compiler.is_compiling() else gated_add_triton
        return fused(x, gate, y, not float32)
    return gated_add_plain(x, gate, y, float32)


def gated_add_plain(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, float32: bool = False) -> torch.Tensor:
    """:func:`gated_add` as plain ops (the reference; also the custom op's implementation off CUDA)."""
    if gate.ndim == x.ndim - 1:
        gate = gate.unsqueeze(1)
    if float32:
        return (x.float() + y * gate).type_as(x)
    return x + gate * y


def _fusable(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, float32: bool) -> bool:
    """The Triton path applies: CUDA, (B, S, D) in a float dtype, modulation in x's dtype (or float32 when the
    reference computes in float32), no gradient wanted (see ``use_fused_kernel``)."""
    from diffgen.layers.fused import use_fused_kernel

    if x.ndim != 3 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if not use_fused_kernel(x, "modulation", inputs=(a, b)):
        return False
    if not float32 and x.dtype == torch.float16:  # the kernels round intermediates to bfloat16 only
        return False
    allowed = (x.dtype, torch.float32) if float32 else (x.dtype,)
    return a.dtype in allowed and b.dtype in allowed and a.shape[-1] == x.shape[-1]
