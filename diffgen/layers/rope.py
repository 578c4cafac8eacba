"""Rotary position embeddings over several position axes (time/row/col, or text positions).

All supported DiTs rotate interleaved channel pairs (x0, x1), (x2, x3), ...; frequencies are built
in float64 where the device allows it, as the reference implementations do, then cast to float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _freq_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def rope_angles(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Angles (S, dim/2) for one axis: position times theta^(-2i/dim).

    ``dtype`` None means float64 where the device allows it; a model whose reference builds its
    frequencies in float32 (Qwen-Image) passes torch.float32 to round exactly as it does.
    """
    dtype = dtype or _freq_dtype(positions.device)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype, device=positions.device) / dim))
    return torch.outer(positions.to(dtype), inv_freq)


def multi_axis_rope(positions: torch.Tensor, axes_dims: list[int] | tuple[int, ...], theta: float,
                    dtype: torch.dtype | None = None):
    """cos/sin tables (S, sum(axes_dims)) for integer positions (S, n_axes), one slice of channels per axis."""
    angles = torch.cat([rope_angles(positions[:, i], d, theta, dtype) for i, d in enumerate(axes_dims)], dim=-1)
    return rope_tables(angles)


def rope_tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn (S, D/2) angles into interleaved (S, D) float32 cos and sin tables."""
    cos = angles.cos().repeat_interleave(2, dim=-1).float()
    sin = angles.sin().repeat_interleave(2, dim=-1).float()
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, S, H, D) by (S, D) tables; computed in float32, returned in x's dtype."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # exact in any dtype
    out = x.float() * cos[None, :, None, :] + rotated.float() * sin[None, :, None, :]
    return out.to(x.dtype)


def norm_and_rope(x: torch.Tensor, norm: torch.nn.Module | None, cos: torch.Tensor, sin: torch.Tensor,
                  norm_over_heads: bool = False) -> torch.Tensor:
    """``apply_rope(norm(x), cos, sin)`` for (B, S, H, D) q or k; one Triton kernel on CUDA (eager, and in compiled
    graphs as the custom op ``diffgen::rms_norm_rope``, per head and across heads by default).

    ``norm`` is an :class:`~diffgen.layers.norm.RMSNorm` (or None) over each head's D channels, or over
    all H*D channels of a token with ``norm_over_heads`` (Wan normalises q/k across heads).
    Unfused (per PyTorch op), this is ~10 passes over q/k in float32; fused it is one read and one write.
    """
    from diffgen.layers.fused import rms_norm_rope, rms_norm_rope_op, use_fused_kernel
    from diffgen.layers.norm import RMSNorm

    fusable = norm is None or (isinstance(norm, RMSNorm) and (norm.weight is None or norm.weight.dtype == x.dtype
                                                                or norm.weight.dtype == torch.float32))
    weight = None if norm is None else norm.weight
    graph_kernel = "norm_rope_across_heads" if norm_over_heads else "norm_rope"
    if fusable and use_fused_kernel(x, "norm_rope", graph_kernel, inputs=(weight,)):
        round_before_scale = (weight is not None and norm.round_before_scale and weight.dtype == x.dtype
                              and x.dtype in (torch.float16, torch.bfloat16))
        # eager calls the launcher itself: the operator's dispatch costs microseconds on each of ~200 calls
        fused = rms_norm_rope_op if torch.compiler.is_compiling() else rms_norm_rope
        return fused(x, weight, None if norm is None else norm.eps, cos, sin, norm_over_heads, round_before_scale)
    return norm_and_rope_plain(norm, x, cos, sin, norm_over_heads)


def norm_and_rope_plain(norm: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, norm_over_heads: bool = False) -> torch.Tensor:
    """:func:`norm_and_rope` as plain ops (the reference; also the custom op's implementation off CUDA)."""
    if norm is not None:
        x = norm(x.flatten(2)).unflatten(2, x.shape[2:]) if norm_over_heads else norm(x)
    return apply_rope(x, cos, sin)
