"""Wan 2.1 / 2.2: a video DiT with self-attention over 3-D patches, text cross-attention and AdaLN.

Parameter names follow diffusers' ``WanTransformer3DModel`` so its checkpoints load unchanged.
Shapes: latents (B, C, F, H, W) are cut into (1, 2, 2) patches -> tokens (B, F*H/2*W/2, dim); text
(B, L, text_dim) from UMT5; for Wan2.1 I2V also CLIP image tokens (B, 257, image_dim).

Timesteps are the scheduler's (0..1000). Wan2.2 TI2V-5B gives one timestep per token (B, S), so the
modulation is kept as (B, S or 1, 6, dim) throughout: one code path for both.

Precision follows the reference: the timestep MLP, the modulation tables and the LayerNorms stay in
float32 (``keep_in_fp32_modules``), and the residual stream is updated in float32 before it is cast
back to the model dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from diffgen.layers.attention import attention
from diffgen.layers.block_loop import BlockSegment, run_blocks
from diffgen.layers.embeddings import FeedForward, MLPEmbedder, sinusoidal_embedding
from diffgen.layers.linear import fuse_linears
from diffgen.layers.modulation import gated_add, norm_modulate
from diffgen.layers.norm import FP32LayerNorm, RMSNorm
from diffgen.layers.rope import multi_axis_rope, norm_and_rope
from diffgen.parallel.sequence import shard_tokens


@dataclass
class WanConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"  # the reference always normalises q/k across heads
    eps: float = 1e-6
    image_dim: int | None = None  # CLIP image features (Wan2.1 I2V); None for T2V and Wan2.2
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None  # first-last-frame models: learned positions of 2 x 257 image tokens

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def wan_rope(grid: tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0):
    """cos/sin tables (F*H*W, head_dim) for a (frames, rows, cols) token grid.

    Rows and columns each get 2*(head_dim//6) channels, frames the rest (44/42/42 for head_dim 128).
    """
    frames, rows, cols = grid
    hw_dim = 2 * (head_dim // 6)
    axes_dims = (head_dim - 2 * hw_dim, hw_dim, hw_dim)
    positions = torch.stack(torch.meshgrid(
        torch.arange(frames, device=device), torch.arange(rows, device=device), torch.arange(cols, device=device),
        indexing="ij"), dim=-1).reshape(-1, 3)
    return multi_axis_rope(positions, axes_dims, theta)


class WanImageEmbedder(nn.Module):
    """CLIP penultimate-layer tokens -> model width: LayerNorm, GELU MLP, LayerNorm."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim)  # eps 1e-5, affine: as the reference
        self.ff = FeedForward(image_dim, hidden_dim=image_dim, dim_out=dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim)) if pos_embed_seq_len else None

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:  # first and last frame: their tokens side by side in one sequence
            _, length, channels = image_tokens.shape
            image_tokens = image_tokens.view(-1, 2 * length, channels) + self.pos_embed
        return self.norm2(self.ff(self.norm1(image_tokens)))


class WanConditionEmbedder(nn.Module):
    """Timestep -> (temb, 6-way modulation); UMT5 text and CLIP image tokens -> model width."""

    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.inner_dim
        self.freq_dim = config.freq_dim
        self.time_embedder = MLPEmbedder(config.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = MLPEmbedder(config.text_dim, dim, act="gelu_tanh")
        self.image_embedder = (WanImageEmbedder(config.image_dim, dim, config.pos_embed_seq_len)
                               if config.image_dim is not None else None)

    def forward(self, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None):
        """``timestep`` (B,) or (B, S) -> temb (B, 1|S, dim) and modulation (B, 1|S, 6, dim)."""
        freqs = sinusoidal_embedding(timestep.flatten(), self.freq_dim)
        if timestep.ndim == 2:
            freqs = freqs.unflatten(0, timestep.shape)
        temb = self.time_embedder(freqs.to(self.time_embedder.linear_1.weight.dtype)).to(text.dtype)
        modulation = self.time_proj(nn.functional.silu(temb))
        if timestep.ndim == 1:  # unsqueeze only now: a 3-D matmul rounds differently from the reference's 2-D one
            temb, modulation = temb.unsqueeze(1), modulation.unsqueeze(1)
        modulation = modulation.unflatten(-1, (6, -1))
        text = self.text_embedder(text)
        if image is not None:
            image = self.image_embedder(image)
        return temb, modulation, text, image


class WanAttention(nn.Module):
    """Multi-head attention with RMS q/k norm across all heads.

    Self-attention passes ``rope``; cross-attention passes ``context`` (text) and, in Wan2.1 I2V,
    ``image_context``, attended separately with its own key/value projections and summed.
    """

    def __init__(self, dim: int, heads: int, eps: float, cross: bool, image_kv_dim: int | None = None):
        super().__init__()
        self.heads, self.cross = heads, cross
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        if image_kv_dim is not None:
            self.add_k_proj, self.add_v_proj = nn.Linear(image_kv_dim, dim), nn.Linear(image_kv_dim, dim)
            self.norm_added_k = RMSNorm(dim, eps)

    def fuse_projections(self) -> int:
        """One matmul for q/k/v (self-attention) or k/v (cross-attention: q reads other tokens), after loading."""
        names = ("to_k", "to_v") if self.cross else ("to_q", "to_k", "to_v")
        fused = fuse_linears(*(getattr(self, name, None) for name in names))
        if fused is None:
            return 0
        for name in names:
            delattr(self, name)
        setattr(self, "to_kv" if self.cross else "to_qkv", fused)
        return 1

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))

    def _project(self, x: torch.Tensor, context: torch.Tensor | None):
        if hasattr(self, "to_qkv"):
            return self.to_qkv(x).chunk(3, dim=-1)
        if hasattr(self, "to_kv"):
            return (self.to_q(x), *self.to_kv(context).chunk(2, dim=-1))
        source = x if context is None else context
        return self.to_q(x), self.to_k(source), self.to_v(source)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                image_context: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (self._heads(t) for t in self._project(x, context))
        if rope is not None:
            q = norm_and_rope(q, self.norm_q, *rope, norm_over_heads=True)
            k = norm_and_rope(k, self.norm_k, *rope, norm_over_heads=True)
        else:
            q, k = self._heads(self.norm_q(q.flatten(2))), self._heads(self.norm_k(k.flatten(2)))
        out = attention(q, k, v, replicated_kv=context is not None).flatten(2).type_as(q)
        if image_context is not None:
            image_k = self._heads(self.norm_added_k(self.add_k_proj(image_context)))
            image_v = self._heads(self.add_v_proj(image_context))
            out = out + attention(q, image_k, image_v, replicated_kv=True).flatten(2).type_as(q)
        return self.to_out[0](out)


class WanBlock(nn.Module):
    """Self-attention and FFN under AdaLN modulation (scale_shift_table + timestep), plain cross-attention."""

    def __init__(self, config: WanConfig):
        super().__init__()
        dim, eps = config.inner_dim, config.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, config.num_attention_heads, eps, cross=False)
        self.attn2 = WanAttention(dim, config.num_attention_heads, eps, cross=True,
                                  image_kv_dim=config.added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, hidden_dim=config.ffn_dim, approximate="tanh")
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None, modulation: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # (B, 1|S, 6, dim) in float32 -> six (B, 1|S, dim) vectors
        shift, scale, gate, ff_shift, ff_scale, ff_gate = (
            self.scale_shift_table.unsqueeze(0) + modulation.float()).unbind(dim=2)

        h = norm_modulate(self.norm1, x, shift, scale, float32=True)
        x = gated_add(x, gate, self.attn1(h, rope=rope), float32=True)

        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2(h, context=text, image_context=image)

        h = norm_modulate(self.norm3, x, ff_shift, ff_scale, float32=True)
        return gated_add(x, ff_gate, self.ffn(h), float32=True)


class WanTransformer(nn.Module):
    config_class = WanConfig
    keep_in_fp32_modules = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
    # norm_added_q: present in some conversions, unused by the reference. to_gate_compress: the gate of
    # Video Sparse Attention's compressed branch (FastWan2.1), unused with full attention.
    ignored_checkpoint_keys = ("norm_added_q", "to_gate_compress")
    # Inductor tunes its pointwise/reduction kernels' block sizes (lossless): -3 ms per 480x832x81 CFG step with
    # the norm+RoPE op, spreads apart, for ~15 s more of a cold compile (docs/benchmarks.md, "A tiled q/k RMS-norm")
    inductor_options = {"coordinate_descent_tuning": True}

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.condition_embedder = WanConditionEmbedder(config)
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        out_channels = config.out_channels or config.in_channels
        self.proj_out = nn.Linear(dim, out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity (B, C_out, F, H, W) of latents (B, C_in, F, H, W).

        ``timestep``: (B,) scheduler timesteps, or (B, S) one per token (Wan2.2 TI2V).
        """
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        rope = wan_rope(grid, self.config.attention_head_dim, hidden_states.device)

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        temb, modulation, text, image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image)
        tokens = shard_tokens(x.shape[1])  # sequence parallel: this rank's video tokens (per-token tables alike)
        x, rope = tokens.split(x), tokens.split(rope, dim=0)
        temb, modulation = tokens.split(temb), tokens.split(modulation)  # (B, 1|S, ...): per token for TI2V

        (x,) = run_blocks(self, (x,), [
            BlockSegment(self.blocks, lambda block, h: (block(h[0], text, image, modulation, rope),)),
        ], conditioning=modulation)

        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(dim=2)
        x = norm_modulate(self.norm_out, x, shift, scale, float32=True)
        x = tokens.gather(self.proj_out(x))

        # tokens (B, F'*H'*W', pt*ph*pw*C) -> (B, C, F, H, W)
        x = x.reshape(batch, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(batch, -1, frames, height, width)
