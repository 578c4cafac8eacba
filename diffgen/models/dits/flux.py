"""FLUX.1 (dev and schnell): an MMDiT with double-stream then single-stream blocks.

Parameter names follow diffusers' ``FluxTransformer2DModel`` so its checkpoints load unchanged.
Shapes: image tokens (B, N, in_channels) packed 2x2, text tokens (B, T, joint_attention_dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffgen.layers.block_loop import BlockSegment, run_blocks
from diffgen.layers.embeddings import FeedForward, MLPEmbedder, sinusoidal_embedding
from diffgen.layers.joint_attention import JointAttention
from diffgen.layers.linear import fuse_linears, linear_gelu, linear_of_concat
from diffgen.layers.modulation import AdaLayerNorm, gated_add, norm_modulate
from diffgen.layers.norm import layer_norm_no_affine
from diffgen.layers.rope import multi_axis_rope
from diffgen.parallel.sequence import shard_tokens


@dataclass
class FluxConfig:
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    rope_theta: float = 10000.0

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class FluxTimeTextEmbedding(nn.Module):
    """Timestep (+ guidance for dev) + pooled CLIP text embedding -> the block conditioning vector."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedder(sinusoidal_embedding(timestep, 256).to(pooled.dtype))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(sinusoidal_embedding(guidance, 256).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


class FluxDoubleBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNorm(dim, 6)
        self.norm1_context = AdaLayerNorm(dim, 6)
        self.attn = JointAttention(dim, heads, head_dim, joint=True)
        self.norm2 = layer_norm_no_affine(dim)
        self.ff = FeedForward(dim)
        self.norm2_context = layer_norm_no_affine(dim)
        self.ff_context = FeedForward(dim)

    def forward(self, x, context, temb, rope):
        shift, scale, gate, shift_ff, scale_ff, gate_ff = self.norm1(temb)
        c_shift, c_scale, c_gate, c_shift_ff, c_scale_ff, c_gate_ff = self.norm1_context(temb)
        attn_x, attn_c = self.attn(norm_modulate(self.norm1.norm, x, shift, scale), rope,
                                   context=norm_modulate(self.norm1_context.norm, context, c_shift, c_scale))
        x = gated_add(x, gate, attn_x)
        x = gated_add(x, gate_ff, self.ff(norm_modulate(self.norm2, x, shift_ff, scale_ff)))
        context = gated_add(context, c_gate, attn_c)
        context = gated_add(context, c_gate_ff, self.ff_context(
            norm_modulate(self.norm2_context, context, c_shift_ff, c_scale_ff)))
        if context.dtype == torch.float16:
            context = context.clip(-65504, 65504)
        return x, context


class FluxSingleBlock(nn.Module):
    """One stream over [text, image]: attention and MLP in parallel, fused output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.dim, self.mlp_dim = dim, int(dim * mlp_ratio)
        self.norm = AdaLayerNorm(dim, 3)
        self.proj_mlp = nn.Linear(dim, self.mlp_dim)
        self.attn = JointAttention(dim, heads, head_dim, joint=False)
        self.proj_out = nn.Linear(dim + self.mlp_dim, dim)

    def fuse_projections(self) -> int:
        """q, k, v and the MLP input all read ``h``: one (dim -> 3*dim + mlp_dim) matmul after loading.
        A block already fused has none of them left: nothing to do (0)."""
        fused = fuse_linears(*(getattr(self.attn, name, None) for name in ("to_q", "to_k", "to_v")),
                             getattr(self, "proj_mlp", None))
        if fused is None:
            return 0
        del self.attn.to_q, self.attn.to_k, self.attn.to_v, self.proj_mlp
        self.to_qkv_mlp = fused
        return 1

    def forward(self, x, temb, rope, text_len):
        shift, scale, gate = self.norm(temb)
        h = norm_modulate(self.norm.norm, x, shift, scale)
        if hasattr(self, "to_qkv_mlp"):
            q, k, v, mlp = self.to_qkv_mlp(h).split([self.dim, self.dim, self.dim, self.mlp_dim], dim=-1)
            attn = self.attn.attend(q, k, v, rope, text_len=text_len)
            mlp = nn.functional.gelu(mlp, approximate="tanh")
        else:
            attn, mlp = self.attn(h, rope, text_len=text_len), linear_gelu(self.proj_mlp, h)
        out = linear_of_concat(self.proj_out, [attn, mlp])
        x = gated_add(x, gate, out)
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


class FluxTransformer(nn.Module):
    config_class = FluxConfig

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.time_text_embed = FluxTimeTextEmbedding(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(FluxDoubleBlock(dim, heads, head_dim)
                                                for _ in range(config.num_layers))
        self.single_transformer_blocks = nn.ModuleList(FluxSingleBlock(dim, heads, head_dim)
                                                       for _ in range(config.num_single_layers))
        self.norm_out = AdaLayerNorm(dim, 2)
        out_channels = config.out_channels or config.in_channels
        self.proj_out = nn.Linear(dim, config.patch_size**2 * out_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity. ``timestep`` and ``guidance`` are sigmas in [0, 1] (scaled by 1000 here)."""
        x = self.x_embedder(hidden_states)
        timestep = timestep.to(x.dtype) * 1000
        guidance = guidance.to(x.dtype) * 1000 if guidance is not None else None
        temb = self.time_text_embed(timestep, guidance, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        rope = multi_axis_rope(torch.cat([txt_ids, img_ids], 0), self.config.axes_dims_rope, self.config.rope_theta)
        rope = tuple(t.to(x.device) for t in rope)
        # Sequence parallel: this rank's image and text tokens (the text runs through every block's linears too)
        tokens = shard_tokens(x.shape[1], text_length=context.shape[1])
        x, context = tokens.split(x), tokens.split_text(context)
        rope = tokens.split(rope, dim=0, prefix=txt_ids.shape[0])

        text_len = context.shape[1]
        (joint,) = run_blocks(self, (x, context), [
            BlockSegment(self.transformer_blocks, lambda block, h: block(*h, temb, rope)),
            BlockSegment(self.single_transformer_blocks, lambda block, h: (block(h[0], temb, rope, text_len),),
                         enter=lambda h: (torch.cat([h[1], h[0]], dim=1),)),  # one [text, image] sequence
        ], conditioning=temb)
        x = joint[:, text_len:]

        scale, shift = self.norm_out(temb)  # diffusers' AdaLayerNormContinuous stores scale first
        return tokens.gather(self.proj_out(norm_modulate(self.norm_out.norm, x, shift, scale)))
