"""Triton kernels for the memory-bound work between matmuls, used on CUDA in eager mode.

Each kernel computes what a short chain of PyTorch ops computes, in one pass over the tensor, and
rounds where that chain rounds (so it agrees with the plain path within bf16 rounding). The plain
path stays the reference: it runs on CPU, when Triton is missing, and under ``torch.compile``
(Inductor fuses the same chains itself, and across more ops than a hand-written kernel can).
"""

from __future__ import annotations

import functools
import os

import torch

_DISABLE_ENV = "DIFFGEN_DISABLE_TRITON"


_enabled: bool | None = None  # None: on where Triton imports, unless DIFFGEN_DISABLE_TRITON is set


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def set_fused_kernels(enabled: bool | None) -> None:
    """Force the Triton kernels on or off for this process (None: the default); benchmarks compare both."""
    global _enabled
    _enabled = enabled


def use_fused_kernel(x: torch.Tensor) -> bool:
    """True where the Triton path applies: a CUDA tensor, Triton importable, not inside torch.compile."""
    if not x.is_cuda or torch.compiler.is_compiling():
        return False
    enabled = _enabled if _enabled is not None else os.environ.get(_DISABLE_ENV, "") in ("", "0")
    return enabled and _triton_available()


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_rope_kernel(x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, seq_len, rows_per_token,
                        stride_b, stride_s, stride_r, eps,
                        WIDTH: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, ROPE_DIM: tl.constexpr,
                        NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROUND_BEFORE_SCALE: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < WIDTH)[None, :]
        r = rows % rows_per_token
        s = (rows // rows_per_token) % seq_len
        b = rows // (rows_per_token * seq_len)
        base = x_ptr + (b.to(tl.int64) * stride_b + s.to(tl.int64) * stride_s + r.to(tl.int64) * stride_r)[:, None]
        partner = cols ^ 1  # the other channel of each rotated pair (x0, x1), (x2, x3), ...
        x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(base + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        if NORM:
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / WIDTH + eps)[:, None]
            x, xp = x * rstd, xp * rstd
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=cols < WIDTH, other=0.0)
                wp = tl.load(weight_ptr + partner, mask=cols < WIDTH, other=0.0)
                if ROUND_BEFORE_SCALE:  # diffusers' RMSNorm: round, then scale in the weight's dtype
                    x = x.to(w.dtype).to(tl.float32)
                    xp = xp.to(w.dtype).to(tl.float32)
                x, xp = x * w.to(tl.float32)[None, :], xp * wp.to(tl.float32)[None, :]
            # the plain path stores the norm's output in the input dtype before rotating it
            x = x.to(out_ptr.dtype.element_ty).to(tl.float32)
            xp = xp.to(out_ptr.dtype.element_ty).to(tl.float32)
        table = s[:, None] * ROPE_DIM + (cols % ROPE_DIM)[None, :]
        cos = tl.load(cos_ptr + table, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + table, mask=mask, other=0.0)
        rotated = tl.where((cols % 2 == 0)[None, :], -xp, xp)
        out = x * cos + rotated * sin
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * WIDTH + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask)

    return {"rms_rope": rms_rope_kernel, "next_power_of_2": triton.next_power_of_2}


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, cos: torch.Tensor,
                  sin: torch.Tensor, norm_over_heads: bool = False, round_before_scale: bool = False) -> torch.Tensor:
    """One kernel for RMS-normalise (optional; ``eps`` None skips it) then rotate (B, S, H, D) by (S, D) tables.

    The norm runs over each head's D channels, or over all H*D channels of a token (``norm_over_heads``,
    Wan). Returns a new contiguous (B, S, H, D) tensor in x's dtype.
    """
    kernels = _kernels()
    batch, seq_len, heads, head_dim = x.shape
    if x.stride(-1) != 1 or (norm_over_heads and x.stride(2) != head_dim):
        x = x.contiguous()
    width, rows_per_token = (heads * head_dim, 1) if norm_over_heads else (head_dim, heads)
    out = torch.empty(batch, seq_len, heads, head_dim, dtype=x.dtype, device=x.device)
    n_rows = batch * seq_len * rows_per_token
    block = kernels["next_power_of_2"](width)
    rows = max(1, 4096 // block)
    num_warps = min(16, max(4, block // 512))  # wide rows (Wan-14B: 5120 channels) spread over more threads
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    grid = (triton_cdiv(n_rows, rows),)
    kernels["rms_rope"][grid](
        x, weight if weight is not None else x, cos, sin, out, n_rows, seq_len, rows_per_token,
        x.stride(0), x.stride(1), x.stride(2), eps or 0.0,
        WIDTH=width, BLOCK=block, ROWS=rows, ROPE_DIM=head_dim, NORM=eps is not None,
        HAS_WEIGHT=weight is not None, ROUND_BEFORE_SCALE=round_before_scale, num_warps=num_warps)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
