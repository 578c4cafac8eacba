"""Triton kernels for the memory-bound work between matmuls, used on CUDA.

Each kernel computes what a short chain of PyTorch ops computes, in one pass over the tensor, and
rounds where that chain rounds (so it agrees with the plain path within bf16 rounding). The plain
path stays the reference: it runs on CPU and when Triton is missing. Under ``torch.compile``
Inductor fuses the same chains itself, and across more ops than a hand-written kernel can, except
where a kernel here (or a matmul layout of diffgen.layers.linear) measured faster or no slower:
compiled graphs call those (:data:`GRAPH_KERNELS`) instead (``DIFFGEN_GRAPH_KERNELS``: 0 for
Inductor's own kernels everywhere, or a comma list of :data:`GRAPH_CAPABLE`).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

_DISABLE_ENV = "DIFFGEN_DISABLE_TRITON"
GRAPH_KERNELS_ENV = "DIFFGEN_GRAPH_KERNELS"


_enabled: bool | None = None  # None: Triton kernels where Triton imports unless DIFFGEN_DISABLE_TRITON is set
_disabled: frozenset[str] = frozenset()  # kernels left out (benchmarks measure each one's gain)
_opted_in: frozenset[str] = frozenset()  # OPT_IN families asked for in eager code
_graphs: tuple[str, ...] | None = None  # families in compiled graphs; None: DIFFGEN_GRAPH_KERNELS, else GRAPH_KERNELS
#: the kernel families, as ``use_fused_kernel`` and ``set_fused_kernels`` name them
KERNELS = ("norm_rope", "modulation", "channel_norm", "linear_gelu", "concat_linear")
#: the families that use no Triton (cuBLASLt's GELU epilogue, the split projection): they run (the split projection
#: where named, :data:`OPT_IN`) even where Triton is missing or DIFFGEN_DISABLE_TRITON is set;
#: ``set_fused_kernels`` and DIFFGEN_GRAPH_KERNELS still choose them
NOT_TRITON = frozenset({"linear_gelu", "concat_linear"})
#: families that run only where named (``set_fused_kernels(opt_in=...)``, ``graphs=``, DIFFGEN_GRAPH_KERNELS): the split
#: projection measured 1.46x farther from the float32 result than the one matmul over the concatenation at FLUX's
#: single-block shape on an H200 (more than its one extra rounding explains), and no faster compiled
#: (docs/benchmarks.md, "FlashAttention-4")
OPT_IN = frozenset({"concat_linear"})
#: the families compiled graphs can be told to use (each of a family of KERNELS). Custom ops: the q/k norm + RoPE
#: with the norm per head (FLUX, Qwen-Image, HunyuanVideo) or across the heads of a token (Wan) and the modulation
#: kernels (Triton), and cuBLASLt's bias + tanh-GELU epilogue (``diffgen::linear_gelu``). ``concat_linear`` is no
#: op: the projection of a concatenation as one matmul per part, plain aten ops traced into the graph
#: (diffgen.layers.linear.linear_gelu, linear_of_concat)
GRAPH_CAPABLE = {"norm_rope": "norm_rope", "norm_rope_across_heads": "norm_rope", "modulation": "modulation",
                 "linear_gelu": "linear_gelu", "concat_linear": "concat_linear"}
#: those compiled graphs call by default, in the served forward against Inductor's own kernels (one H200,
#: docs/benchmarks.md): the q/k norm + RoPE per head and across heads, faster ("A tiled q/k RMS-norm + RoPE kernel":
#: Qwen-Image -9 ms per true-CFG step, FLUX -1 ms per forward, Wan -13 ms per CFG step); cuBLASLt's GELU epilogue
#: ("GELU in the matmul's epilogue"), faster for Qwen-Image (-7.9 ms per true-CFG step) and Wan (-16.1 ms per CFG
#: step) and within the spread for FLUX (two runs, ms per forward: before 127.1 / 132.7, the epilogue alone
#: 129.2 / 134.0). The modulation ops lost or tied (Inductor fuses them with their neighbours); the split projection
#: is :data:`OPT_IN`.
GRAPH_KERNELS = ("norm_rope", "norm_rope_across_heads", "linear_gelu")
# What compiled graphs call, resolved outside tracing (set_fused_kernels, prepare_graph_kernels): Dynamo reads it
# while tracing and guards on its value, so a change of setting retraces instead of reusing the other graph.
_in_graphs: tuple[str, ...] = ()
_GRAPH_DEVICE = "cuda"  # where compiled graphs call the ops (CPU tests set "cpu": the ops' plain implementation)


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def set_fused_kernels(enabled: bool | None, disabled: tuple[str, ...] = (),
                      graphs: bool | tuple[str, ...] | None = None, opt_in: tuple[str, ...] = ()) -> None:
    """Force the kernels on or off for this process (None: the default; False: the plain PyTorch ops everywhere,
    the families of :data:`NOT_TRITON` too; True: the Triton kernels even where DIFFGEN_DISABLE_TRITON is set),
    leaving out the ``disabled`` families (of :data:`KERNELS`); ``graphs``: the families compiled graphs call (of
    :data:`GRAPH_CAPABLE`; True: :data:`GRAPH_KERNELS`, False: none, None: the default); ``opt_in``: families of
    :data:`OPT_IN` eager code uses too. Benchmarks compare them."""
    global _enabled, _disabled, _graphs, _opted_in
    unknown = set(disabled) - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernel families {sorted(unknown)}; known: {', '.join(KERNELS)}")
    if set(opt_in) - OPT_IN:
        raise ValueError(f"opt_in: {sorted(set(opt_in) - OPT_IN)} are not opt-in families ({', '.join(OPT_IN)})")
    _enabled, _disabled, _opted_in = enabled, frozenset(disabled), frozenset(opt_in)
    _graphs = None if graphs is None else GRAPH_KERNELS if graphs is True else () if graphs is False else \
        _graph_families(graphs, "graphs")
    prepare_graph_kernels()


def _graph_families(families, where: str) -> tuple[str, ...]:
    unknown = set(families) - set(GRAPH_CAPABLE)
    if unknown:
        raise ValueError(f"{where}: no custom op for {sorted(unknown)}; compiled graphs can call "
                         f"{', '.join(GRAPH_CAPABLE)}")
    return tuple(families)


def _graphs_from_env() -> tuple[str, ...]:
    """DIFFGEN_GRAPH_KERNELS: unset or 1 -> GRAPH_KERNELS, 0 -> none, else a comma list of families."""
    value = os.environ.get(GRAPH_KERNELS_ENV, "").strip()
    if value in ("", "1"):
        return GRAPH_KERNELS
    if value == "0":
        return ()
    return _graph_families([f.strip() for f in value.split(",") if f.strip()], GRAPH_KERNELS_ENV)


def _family_enabled(family: str, named: bool = False) -> bool:
    """Whether ``family`` may run, before the device and gradient checks: a Triton family where Triton imports and
    is not turned off, a family of :data:`NOT_TRITON` unless ``set_fused_kernels(False)``, one of :data:`OPT_IN`
    only where named (``named``: by the compiled graphs' list; ``set_fused_kernels(opt_in=...)`` for eager code)."""
    if family in OPT_IN:
        return (named or family in _opted_in) and _enabled is not False
    if family in NOT_TRITON:
        return _enabled is not False
    enabled = _enabled if _enabled is not None else os.environ.get(_DISABLE_ENV, "") in ("", "0")
    return enabled and _triton_available()


def prepare_graph_kernels() -> tuple[str, ...]:
    """Decide (before compiling) which families compiled graphs call as custom ops; returns them."""
    global _in_graphs
    graphs = _graphs if _graphs is not None else _graphs_from_env()
    _in_graphs = tuple(k for k in graphs
                       if GRAPH_CAPABLE[k] not in _disabled and _family_enabled(GRAPH_CAPABLE[k], named=True))
    return _in_graphs


def use_fused_kernel(x: torch.Tensor, kernel: str = "", graph_kernel: str | None = None,
                     inputs: tuple[torch.Tensor | None, ...] = ()) -> bool:
    """True where the fast path applies: a CUDA tensor, Triton importable (except for :data:`NOT_TRITON`), the
    family not left out, no gradient wanted for ``x`` or the kernel's other ``inputs`` (the kernels have no
    backward); inside torch.compile only where compiled graphs call it (``graph_kernel``, of :data:`GRAPH_CAPABLE`,
    default ``kernel``; :func:`prepare_graph_kernels`)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *inputs)):
        return False
    if torch.compiler.is_compiling():
        return x.device.type == _GRAPH_DEVICE and (graph_kernel or kernel) in _in_graphs
    if not x.is_cuda or kernel in _disabled:
        return False
    return _family_enabled(kernel)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def norm_rope_kernel(x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, n_tokens, seq_len, stride_b, stride_s,
                         stride_h, eps, HEADS: tl.constexpr, HEAD_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                         DIM_BLOCK: tl.constexpr, TOKENS: tl.constexpr, NORM: tl.constexpr, OVER_HEADS: tl.constexpr,
                         HAS_WEIGHT: tl.constexpr, ROUND_BEFORE_SCALE: tl.constexpr):
        # A (TOKENS, HEAD_BLOCK, HEAD_DIM) tile: each row read once with wide loads and split into its rotation
        # pairs in registers; each token's cos/sin row read once for all the tile's heads.
        tokens = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
        heads = tl.program_id(1) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
        dims = tl.arange(0, DIM_BLOCK)  # HEAD_DIM rounded up to a power of two
        token_ok = tokens < n_tokens
        # masks constant along the channels where no padding is needed, so that the loads and stores stay wide
        dim_ok = dims < HEAD_DIM
        mask = token_ok[:, None, None] & (heads < HEADS)[None, :, None]
        table_mask = token_ok[:, None]
        if DIM_BLOCK != HEAD_DIM:
            mask = mask & dim_ok[None, None, :]
            table_mask = table_mask & dim_ok[None, :]
        s = tokens % seq_len
        rows = (tokens // seq_len).to(tl.int64) * stride_b + s.to(tl.int64) * stride_s
        offsets = rows[:, None, None] + (heads * stride_h)[None, :, None] + dims[None, None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        even, odd = tl.split(tl.reshape(x, (TOKENS, HEAD_BLOCK, DIM_BLOCK // 2, 2)))
        if NORM:
            squares = tl.sum(even * even + odd * odd, axis=2)
            if OVER_HEADS:  # Wan: one norm over all the token's channels (the tile holds all its heads)
                rstd = tl.rsqrt(tl.sum(squares, axis=1) / (HEADS * HEAD_DIM) + eps)[:, None, None]
            else:
                rstd = tl.rsqrt(squares / HEAD_DIM + eps)[:, :, None]
            even, odd = even * rstd, odd * rstd
            if HAS_WEIGHT:
                if OVER_HEADS:
                    w = tl.load(weight_ptr + heads[:, None] * HEAD_DIM + dims[None, :],
                                mask=(heads < HEADS)[:, None] & dim_ok[None, :], other=0.0)
                    w_even, w_odd = tl.split(tl.reshape(w, (HEAD_BLOCK, DIM_BLOCK // 2, 2)))
                    w_even, w_odd = w_even[None, :, :], w_odd[None, :, :]
                else:
                    w_even, w_odd = tl.split(tl.reshape(tl.load(weight_ptr + dims, mask=dim_ok, other=0.0),
                                                          (DIM_BLOCK // 2, 2)))
                    w_even, w_odd = w_even[None, None, :], w_odd[None, None, :]
                if ROUND_BEFORE_SCALE:  # diffusers' RMSNorm: round, then scale in the weight's dtype
                    even = even.to(w_even.dtype).to(tl.float32)
                    odd = odd.to(w_odd.dtype).to(tl.float32)
                even, odd = even * w_even.to(tl.float32), odd * w_odd.to(tl.float32)
            # the plain path stores the norm's output in the input dtype before rotating it
            even = even.to(out_ptr.dtype.element_ty).to(tl.float32)
            odd = odd.to(out_ptr.dtype.element_ty).to(tl.float32)
        table = s[:, None] * HEAD_DIM + dims[None, :]
        cos_even, cos_odd = tl.split(tl.reshape(tl.load(cos_ptr + table, mask=table_mask, other=0.0),
                                                (TOKENS, 1, DIM_BLOCK // 2, 2)))
        sin_even, sin_odd = tl.split(tl.reshape(tl.load(sin_ptr + table, mask=table_mask, other=0.0),
                                                (TOKENS, 1, DIM_BLOCK // 2, 2)))
        # (x0, x1) -> (x0 cos0 - x1 sin0, x1 cos1 + x0 sin1), as apply_rope's x * cos + rotated * sin
        out = tl.reshape(tl.join(even * cos_even + -odd * sin_even, odd * cos_odd + even * sin_odd),
                         (TOKENS, HEAD_BLOCK, DIM_BLOCK))
        out_offsets = (tokens.to(tl.int64) * (HEADS * HEAD_DIM))[:, None, None] + (heads * HEAD_DIM)[None, :, None] \
            + dims[None, None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def channel_rms_norm_kernel(x_ptr, gamma_ptr, bias_ptr, out_ptr, n_rows, rows_per_batch, stride_xb, stride_ob,
                                scale, eps, WIDTH: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                                SILU: tl.constexpr, HAS_BIAS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows < n_rows)[:, None] & (cols < WIDTH)[None, :]
        b = (rows // rows_per_batch).to(tl.int64)
        r = (rows % rows_per_batch).to(tl.int64)
        x = tl.load(x_ptr + (b * stride_xb + r * WIDTH)[:, None] + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        if HAS_BIAS:  # the previous convolution's bias, rounded in as its own add would round it
            bias = tl.load(bias_ptr + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
            x = (x + bias[None, :]).to(dtype).to(tl.float32)
        # F.normalize in float32, rounded; then * scale and * gamma, each rounded as the plain ops round
        norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
        y = (x / norm[:, None]).to(dtype).to(tl.float32)
        y = (y * scale).to(dtype).to(tl.float32)
        gamma = tl.load(gamma_ptr + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
        y = (y * gamma[None, :]).to(dtype).to(tl.float32)
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(out_ptr + (b * stride_ob + r * WIDTH)[:, None] + cols[None, :], y.to(dtype), mask=mask)

    @triton.jit
    def bias_residual_add_kernel(x_ptr, bias_ptr, y_ptr, n_rows, rows_per_batch, stride_xb, stride_yb,
                                 WIDTH: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows < n_rows)[:, None] & (cols < WIDTH)[None, :]
        b = (rows // rows_per_batch).to(tl.int64)
        r = (rows % rows_per_batch).to(tl.int64)
        x_offsets = (b * stride_xb + r * WIDTH)[:, None] + cols[None, :]
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + (b * stride_yb + r * WIDTH)[:, None] + cols[None, :], mask=mask, other=0.0)
        bias = tl.load(bias_ptr + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
        dtype = x_ptr.dtype.element_ty
        x = (x + bias[None, :]).to(dtype).to(tl.float32)  # rounded as the bias add and the residual add round
        tl.store(x_ptr + x_offsets, (x + y.to(tl.float32)).to(dtype), mask=mask)

    @triton.jit
    def round_bf16(v):
        """float32 -> the nearest bfloat16 (ties to even), kept in float32. Integer ops: a cast pair would let the
        compiler fuse the product and the next sum into one bf16 FMA and skip the rounding the plain ops do."""
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    globals()["round_bf16"] = round_bf16  # kernels find the jit functions they call among the module's globals

    @triton.jit
    def layer_norm_modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, n_rows, seq_len, stride_x, stride_mb,
                                   stride_ms, eps, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                                   ROUND: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < WIDTH
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / WIDTH
        centered = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / WIDTH + eps)
        y = centered * rstd
        mod = (row // seq_len) * stride_mb + (row % seq_len) * stride_ms + cols
        shift = tl.load(shift_ptr + mod, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + mod, mask=mask, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        if ROUND:  # the plain path's ops in bfloat16: norm, 1 + scale, product, sum each rounded
            y = round_bf16(round_bf16(round_bf16(y) * round_bf16(1.0 + scale)) + shift)
        else:
            y = y * (1.0 + scale) + shift
        tl.store(out_ptr + row * WIDTH + cols, y.to(dtype), mask=mask)

    @triton.jit
    def gated_add_kernel(x_ptr, gate_ptr, y_ptr, out_ptr, seq_len, stride_x, stride_y, stride_gb, stride_gs,
                         WIDTH: tl.constexpr, BLOCK: tl.constexpr, ROUND: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < WIDTH
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + (row // seq_len) * stride_gb + (row % seq_len) * stride_gs + cols, mask=mask,
                       other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        if ROUND:  # the plain path rounds the bfloat16 product before the sum
            out = round_bf16(x + round_bf16(gate * y))
        else:
            out = x + gate * y
        tl.store(out_ptr + row * WIDTH + cols, out.to(dtype), mask=mask)

    return {"norm_rope": norm_rope_kernel, "channel_rms_norm": channel_rms_norm_kernel,
            "bias_residual_add": bias_residual_add_kernel,
            "layer_norm_modulate": layer_norm_modulate_kernel, "gated_add": gated_add_kernel,
            "next_power_of_2": triton.next_power_of_2}


#: elements of q/k one program of the norm + RoPE kernel holds (TOKENS x HEAD_BLOCK x head_dim; bench/norm_rope.py
#: sweeps it)
NORM_ROPE_TILE = 4096


def _norm_rope_blocks(heads: int, head_dim: int, norm_over_heads: bool, next_power_of_2) -> tuple[int, int, int, int]:
    """(heads per program, head_dim rounded up to a power of two, tokens per program, warps) for the norm + RoPE
    kernel: all heads of a token when the norm spans them, else the largest power of two up to 8 dividing the heads
    (no masked lanes), cos/sin read once per token for all of them."""
    dim_block = next_power_of_2(head_dim)
    if norm_over_heads:
        head_block = next_power_of_2(heads)
    else:
        head_block = next((b for b in (8, 4, 2) if heads % b == 0), min(8, next_power_of_2(heads)))
    tokens = max(1, NORM_ROPE_TILE // (head_block * dim_block))
    return head_block, dim_block, tokens, min(16, max(4, tokens * head_block * dim_block // 1024))


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, cos: torch.Tensor,
                  sin: torch.Tensor, norm_over_heads: bool = False, round_before_scale: bool = False) -> torch.Tensor:
    """One kernel for RMS-normalise (optional; ``eps`` None skips it) then rotate (B, S, H, D) by (S, D) tables.

    The norm runs over each head's D channels, or over all H*D channels of a token (``norm_over_heads``,
    Wan). x may be any view with unit channel stride (q of a fused qkv output). Returns a new contiguous
    (B, S, H, D) tensor in x's dtype.
    """
    kernels = _kernels()
    batch, seq_len, heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(batch, seq_len, heads, head_dim, dtype=x.dtype, device=x.device)
    head_block, dim_block, tokens, num_warps = _norm_rope_blocks(heads, head_dim, norm_over_heads,
                                                                 kernels["next_power_of_2"])
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    grid = (triton_cdiv(batch * seq_len, tokens), triton_cdiv(heads, head_block))
    kernels["norm_rope"][grid](
        x, weight if weight is not None else x, cos, sin, out, batch * seq_len, seq_len,
        x.stride(0), x.stride(1), x.stride(2), eps or 0.0,
        HEADS=heads, HEAD_BLOCK=head_block, HEAD_DIM=head_dim, DIM_BLOCK=dim_block, TOKENS=tokens,
        NORM=eps is not None, OVER_HEADS=norm_over_heads, HAS_WEIGHT=weight is not None,
        ROUND_BEFORE_SCALE=round_before_scale, num_warps=num_warps)
    return out


# -- the norm + RoPE kernel as a custom op, so compiled graphs call it (Inductor cannot trace a launch) -----------
@torch.library.custom_op("diffgen::rms_norm_rope", mutates_args=(), schema=(
    "(Tensor x, Tensor? weight, float? eps, Tensor cos, Tensor sin, bool norm_over_heads, bool round_before_scale)"
    " -> Tensor"))
def rms_norm_rope_op(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, cos: torch.Tensor,
                     sin: torch.Tensor, norm_over_heads: bool, round_before_scale: bool) -> torch.Tensor:
    """:func:`rms_norm_rope` as an operator: the Triton kernel on CUDA, elsewhere the plain path it replaces
    (:func:`~diffgen.layers.norm.rms_norm` then :func:`~diffgen.layers.rope.apply_rope`)."""
    from diffgen.layers.norm import rms_norm
    from diffgen.layers.rope import norm_and_rope_plain

    norm = None if eps is None else lambda t: rms_norm(t, weight, eps, round_before_scale)
    return norm_and_rope_plain(norm, x, cos, sin, norm_over_heads).contiguous()


@rms_norm_rope_op.register_kernel("cuda")
def _rms_norm_rope_cuda(x, weight, eps, cos, sin, norm_over_heads, round_before_scale):
    return rms_norm_rope(x, weight, eps, cos, sin, norm_over_heads, round_before_scale)


@rms_norm_rope_op.register_fake
def _rms_norm_rope_fake(x, weight, eps, cos, sin, norm_over_heads, round_before_scale):
    return x.new_empty(x.shape)  # a new contiguous tensor in x's dtype, as both implementations return


# -- AdaLN norm + modulate and the gated residual as custom ops -------------------------------------------------
@torch.library.custom_op("diffgen::layer_norm_modulate", mutates_args=(),
                         schema="(Tensor x, Tensor shift, Tensor scale, float eps, bool round_steps) -> Tensor")
def layer_norm_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                           round_steps: bool) -> torch.Tensor:
    """:func:`layer_norm_modulate_triton` as an operator: the Triton kernel on CUDA, elsewhere the plain ops it
    replaces (``round_steps`` False: the reference's float32 LayerNorm and modulation, cast back)."""
    from diffgen.layers.modulation import norm_modulate_plain

    norm = lambda t: F.layer_norm(t, t.shape[-1:], eps=eps)  # noqa: E731 (the parameter-free LayerNorm)
    return norm_modulate_plain(norm, x, shift, scale, float32=not round_steps).contiguous()


@layer_norm_modulate_op.register_kernel("cuda")
def _layer_norm_modulate_cuda(x, shift, scale, eps, round_steps):
    return layer_norm_modulate_triton(x, shift, scale, eps, round_steps)


@layer_norm_modulate_op.register_fake
def _layer_norm_modulate_fake(x, shift, scale, eps, round_steps):
    return x.new_empty(x.shape)


@torch.library.custom_op("diffgen::gated_add", mutates_args=(),
                         schema="(Tensor x, Tensor gate, Tensor y, bool round_steps) -> Tensor")
def gated_add_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, round_steps: bool) -> torch.Tensor:
    """:func:`gated_add_triton` as an operator: the Triton kernel on CUDA, elsewhere ``x + gate * y`` (``round_steps``
    False: summed in float32 and cast back, as the reference)."""
    from diffgen.layers.modulation import gated_add_plain

    return gated_add_plain(x, gate, y, float32=not round_steps).contiguous()


@gated_add_op.register_kernel("cuda")
def _gated_add_cuda(x, gate, y, round_steps):
    return gated_add_triton(x, gate, y, round_steps)


@gated_add_op.register_fake
def _gated_add_fake(x, gate, y, round_steps):
    return x.new_empty(x.shape)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def channel_rms_norm_plain(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool = False,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' Wan VAE norm: ``F.normalize`` over the channels (dim 1, float32 for half inputs), rounded to
    x's dtype, times ``scale`` and ``gamma``; then SiLU if asked. ``bias`` (C,): added to x first (the bias of
    the convolution that made x, when it was left out of that convolution)."""
    if bias is not None:
        x = x + _per_channel(bias, x)
    half = x.dtype in (torch.float16, torch.bfloat16)
    y = F.normalize(x.float() if half else x, dim=1).to(x.dtype) * scale * gamma
    return F.silu(y) if silu else y


def _per_channel(bias: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return bias.view(-1, *([1] * (like.ndim - 2)))


def _channel_rows(t: torch.Tensor) -> bool:
    """Whether each sample of ``t`` (B, C, *spatial) is dense rows of C channels (channels-last; a frame slice too)."""
    expected = t.shape[1]
    for dim in range(t.ndim - 1, 1, -1):
        if t.shape[dim] > 1 and t.stride(dim) != expected:
            return False
        expected *= t.shape[dim]
    return t.stride(1) == 1 or t.shape[1] == 1


_CHANNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the channel kernels take


def channel_rms_norm(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool = False,
                     out: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`channel_rms_norm_plain` (+ SiLU, after a bias), written to ``out`` if given; on CUDA one Triton
    pass (:func:`channel_rms_norm_triton`) instead of the plain path's four to nine."""
    if not use_fused_kernel(x, "channel_norm", inputs=(gamma, bias)) or x.dtype not in _CHANNEL_DTYPES:
        y = channel_rms_norm_plain(x, gamma, scale, silu, bias)
        return y if out is None else out.copy_(y)
    return channel_rms_norm_triton(x, gamma, scale, silu, out, bias)


def _channel_row_launch(x: torch.Tensor, kernels: dict) -> tuple[int, int, int, int, int]:
    """Launch geometry of the channel-row kernels over x (B, C, ...) channels-last: the row width (C), rows per
    batch item, all rows, the power-of-two block over a row and the rows per program (~4096 elements)."""
    width = x.shape[1]
    rows_per_batch = x[0, 0].numel()
    block = kernels["next_power_of_2"](width)
    return width, rows_per_batch, x.shape[0] * rows_per_batch, block, max(1, 4096 // block)


def channel_rms_norm_triton(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool = False,
                            out: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel behind :func:`channel_rms_norm`: rows of channels, channels-last (a copy makes x so)."""
    channels_last = torch.channels_last_3d if x.ndim == 5 else torch.channels_last
    if not _channel_rows(x):
        x = x.contiguous(memory_format=channels_last)
    target = out if out is not None and _channel_rows(out) and out.dtype == x.dtype else None
    if target is None:
        target = torch.empty_like(x, memory_format=channels_last)
    kernels = _kernels()
    width, rows_per_batch, n_rows, block, rows = _channel_row_launch(x, kernels)
    kernels["channel_rms_norm"][(triton_cdiv(n_rows, rows),)](
        x, gamma.reshape(-1), gamma if bias is None else bias.contiguous(), target, n_rows, rows_per_batch,
        x.stride(0), target.stride(0), float(scale), 1e-12, WIDTH=width, BLOCK=block, ROWS=rows, SILU=silu,
        HAS_BIAS=bias is not None, num_warps=4)
    if out is not None and target is not out:
        return out.copy_(target)
    return target


def bias_residual_add(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``x += bias`` (per channel, dim 1) ``+ residual``, in place: a convolution's output whose bias was left
    out, then a residual connection. Rounded as the two adds round; on CUDA one Triton pass."""
    if use_fused_kernel(x, "channel_norm", inputs=(bias, residual)) and x.dtype in _CHANNEL_DTYPES:
        return bias_residual_add_triton(x, bias, residual)
    return x.add_(_per_channel(bias, x)).add_(residual)


def bias_residual_add_triton(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The Triton kernel behind :func:`bias_residual_add` (x rows of channels; else the plain ops)."""
    if not _channel_rows(x) or residual.shape != x.shape or residual.dtype != x.dtype:
        return x.add_(_per_channel(bias, x)).add_(residual)
    if not _channel_rows(residual):
        residual = residual.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
    kernels = _kernels()
    width, rows_per_batch, n_rows, block, rows = _channel_row_launch(x, kernels)
    kernels["bias_residual_add"][(triton_cdiv(n_rows, rows),)](
        x, bias.contiguous(), residual, n_rows, rows_per_batch, x.stride(0), residual.stride(0),
        WIDTH=width, BLOCK=block, ROWS=rows, num_warps=4)
    return x


def _per_token(t: torch.Tensor, batch: int, seq_len: int) -> tuple[torch.Tensor, int, int]:
    """A (B, D), (B, 1, D) or (B, S, D) modulation vector as (tensor, batch stride, token stride)."""
    if t.ndim == 2:
        t = t.unsqueeze(1)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, S, D) with unit channel stride and rows evenly strided (a copy otherwise)."""
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) != x.shape[1] * x.stride(1)):
        x = x.contiguous()
    return x


def layer_norm_modulate_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                               round_steps: bool) -> torch.Tensor:
    """One pass of LayerNorm (no affine) over x (B, S, D) then ``* (1 + scale) + shift``; a new (B, S, D) tensor.

    ``round_steps``: round after the norm and after each op to bfloat16 (x's dtype), as the plain ops do;
    otherwise (float32 plain path) round once at the end.
    """
    kernels = _kernels()
    x = _rows(x)
    batch, seq_len, width = x.shape
    shift, scale = (t.unsqueeze(1) if t.ndim == 2 else t for t in (shift, scale))
    if shift.shape != scale.shape or shift.stride() != scale.stride():  # one index for both
        common = torch.broadcast_shapes(shift.shape, scale.shape)
        shift, scale = shift.expand(common).contiguous(), scale.expand(common).contiguous()
    shift, stride_mb, stride_ms = _per_token(shift, batch, seq_len)
    scale = scale if scale.stride(-1) == 1 else scale.contiguous()
    if scale.stride() != shift.stride():
        scale = scale.expand_as(shift).contiguous()
        shift = shift.contiguous()
        shift, stride_mb, stride_ms = _per_token(shift, batch, seq_len)
    out = torch.empty(batch, seq_len, width, dtype=x.dtype, device=x.device)
    block = kernels["next_power_of_2"](width)
    kernels["layer_norm_modulate"][(batch * seq_len,)](
        x, shift, scale, out, batch * seq_len, seq_len, x.stride(1), stride_mb, stride_ms, eps,
        WIDTH=width, BLOCK=block, ROUND=round_steps and x.dtype == torch.bfloat16,
        num_warps=min(16, max(4, block // 256)))
    return out


def gated_add_triton(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, round_steps: bool) -> torch.Tensor:
    """x + gate * y in one pass, x and y (B, S, D), gate (B, D) or (B, 1|S, D); a new tensor in x's dtype.

    ``round_steps``: round the product to bfloat16 (x's dtype) before the sum, as the plain ops do.
    """
    kernels = _kernels()
    x, y = _rows(x), _rows(y)
    batch, seq_len, width = x.shape
    gate, stride_gb, stride_gs = _per_token(gate, batch, seq_len)
    out = torch.empty(batch, seq_len, width, dtype=x.dtype, device=x.device)
    block = min(2048, kernels["next_power_of_2"](width))
    kernels["gated_add"][(batch * seq_len, triton_cdiv(width, block))](
        x, gate, y, out, seq_len, x.stride(1), y.stride(1), stride_gb, stride_gs,
        WIDTH=width, BLOCK=block, ROUND=round_steps and x.dtype == torch.bfloat16, num_warps=4)
    return out
