"""HunyuanVideo (v1): dual-stream then single-stream blocks over video and text tokens, with a text token refiner.

Parameter names follow diffusers' ``HunyuanVideoTransformer3DModel`` so its checkpoints load unchanged.
Shapes: latents (B, C, F, H, W) are cut into (1, 2, 2) patches -> video tokens (B, F*H/2*W/2, dim); text
(B, L, 4096) are hidden states of Llava-Llama-3 with a mask (B, L); ``pooled_projections`` (B, 768) is
CLIP-L's pooled output. The model is guidance-distilled: the guidance scale (x1000) is embedded like a
timestep.

The reference orders the joint sequence [video, text] and rotates video tokens only. Attention does
not depend on the order of its tokens, so the shared joint attention is used as it is, with text
first like the other MMDiTs, and text rows of the RoPE table set to the identity rotation
(cos 1, sin 0: exact in any dtype). Only the order of the softmax sums differs (~1e-7 in float32).

Image-to-video ("token_replace", HunyuanVideo-I2V): the first latent frame holds the clean image; its
tokens are modulated with the embedding of timestep 0 instead of the step's (:class:`FirstFrame`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffgen.layers.attention import attention
from diffgen.layers.block_loop import BlockSegment, run_blocks
from diffgen.layers.embeddings import FeedForward, MLPEmbedder, sinusoidal_embedding
from diffgen.layers.joint_attention import JointAttention
from diffgen.layers.linear import linear_gelu, linear_of_concat
from diffgen.layers.modulation import AdaLayerNorm, gated_add, modulate, norm_modulate
from diffgen.layers.norm import layer_norm_no_affine
from diffgen.layers.rope import multi_axis_rope
from diffgen.parallel.sequence import shard_tokens


@dataclass
class HunyuanVideoConfig:
    in_channels: int = 16
    out_channels: int | None = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    image_condition_type: str | None = None  # I2V: "latent_concat" (33 input channels) or "token_replace"

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def hunyuan_rope(grid: tuple[int, int, int], axes_dims: tuple[int, ...], theta: float, text_len: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for [text, video]: identity rows for the text, (frame, row, col) rotations for the video.

    The reference builds these frequencies in float32.
    """
    positions = torch.stack(torch.meshgrid(*(torch.arange(n, device=device) for n in grid), indexing="ij"),
                            dim=-1).reshape(-1, 3)
    cos, sin = multi_axis_rope(positions, axes_dims, theta, dtype=torch.float32)
    return torch.cat([cos.new_ones(text_len, cos.shape[1]), cos]), torch.cat([sin.new_zeros(text_len, sin.shape[1]),
                                                                             sin])


@dataclass
class FirstFrame:
    """Token replace: tokens [start, start + count) take their own modulation vectors (one per chunk)."""

    start: int
    count: int
    vectors: tuple[torch.Tensor, ...]


def norm_modulate_tokens(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                         first: FirstFrame | None = None, shift_index: int = 0, scale_index: int = 1) -> torch.Tensor:
    """AdaLN ``modulate(norm(x))`` (one fused pass on CUDA); with ``first``, its span uses that set's vectors
    (diffusers' token-replace norms)."""
    if first is None:
        return norm_modulate(norm, x, shift, scale)
    x = norm(x)
    a, b = first.start, first.start + first.count
    return torch.cat([modulate(x[:, :a], shift, scale),
                      modulate(x[:, a:b], first.vectors[shift_index], first.vectors[scale_index]),
                      modulate(x[:, b:], shift, scale)], dim=1)


def add_gated_tokens(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, first: FirstFrame | None = None,
                     gate_index: int = 2) -> torch.Tensor:
    """The gated residual ``x + y * gate`` (one fused pass on CUDA); with ``first``, its span uses that set's gate."""
    if first is None:
        return gated_add(x, gate, y)
    a, b = first.start, first.start + first.count
    return x + torch.cat([y[:, :a] * gate.unsqueeze(1), y[:, a:b] * first.vectors[gate_index].unsqueeze(1),
                          y[:, b:] * gate.unsqueeze(1)], dim=1)


class TimestepTextEmbedding(nn.Module):
    """Timestep (+ embedded guidance) + pooled text -> conditioning vector (diffusers' names)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool = False):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance else None

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None):
        emb = self.timestep_embedder(sinusoidal_embedding(timestep, 256).to(pooled.dtype))
        if guidance is not None:  # the token-replace embedding (I2V) has none
            emb = emb + self.guidance_embedder(sinusoidal_embedding(guidance, 256).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


class RefinerAttention(nn.Module):
    """Plain multi-head self-attention over the text tokens (no q/k norm)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)) for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out[0](attention(q, k, v, mask=mask).flatten(2).type_as(x))


class RefinerBlock(nn.Module):
    """Pre-norm self-attention and SiLU MLP, their residuals gated by the conditioning vector."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefinerAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim, int(dim * mlp_ratio), activation="silu")
        self.norm_out = AdaLayerNorm(dim, 2)  # gates only: diffusers' HunyuanVideoAdaNorm

    def forward(self, x: torch.Tensor, temb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        gate_attn, gate_ff = (g.unsqueeze(1) for g in self.norm_out(temb))
        x = x + self.attn(self.norm1(x), mask) * gate_attn
        return x + self.ff(self.norm2(x)) * gate_ff


class TokenRefiner(nn.Module):
    """Text hidden states -> model width, refined by a few self-attention blocks conditioned on
    the timestep and the masked mean of the text itself.

    Padded text tokens attend to the valid ones here (the reference lets them attend to the first
    token); they are masked as keys everywhere after, so the video tokens never see them.
    """

    def __init__(self, text_dim: int, dim: int, heads: int, layers: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.time_text_embed = TimestepTextEmbedding(dim, text_dim)
        self.proj_in = nn.Linear(text_dim, dim)
        # diffusers nests the blocks one level deeper: token_refiner.refiner_blocks.N
        self.token_refiner = nn.ModuleDict({"refiner_blocks": nn.ModuleList(
            RefinerBlock(dim, heads, mlp_ratio) for _ in range(layers))})

    def forward(self, text: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        """``mask`` (B, L) weights the pooled mean; ``key_mask`` (bool; None: no padding) masks the attention."""
        weights = mask.float().unsqueeze(-1)
        pooled = ((text * weights).sum(dim=1) / weights.sum(dim=1)).to(text.dtype)
        temb = self.time_text_embed(timestep, pooled)
        x = self.proj_in(text)
        for block in self.token_refiner["refiner_blocks"]:
            x = block(x, temb, key_mask)
        return x


class DoubleStreamBlock(nn.Module):
    """Video and text streams with their own weights and modulation, attending jointly."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = AdaLayerNorm(dim, 6)
        self.norm1_context = AdaLayerNorm(dim, 6)
        self.attn = JointAttention(dim, heads, head_dim, joint=True, norm_round_before_scale=True)
        self.norm2 = layer_norm_no_affine(dim)
        self.ff = FeedForward(dim, int(dim * mlp_ratio))
        self.norm2_context = layer_norm_no_affine(dim)
        self.ff_context = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x, context, context_mask, temb, rope, first_frame_temb=None, first_frame_tokens=0):
        shift, scale, gate, shift_ff, scale_ff, gate_ff = self.norm1(temb)
        c_shift, c_scale, c_gate, c_shift_ff, c_scale_ff, c_gate_ff = self.norm1_context(temb)
        first = None if first_frame_temb is None else FirstFrame(0, first_frame_tokens, self.norm1(first_frame_temb))
        attn_x, attn_c = self.attn(norm_modulate_tokens(self.norm1.norm, x, shift, scale, first), rope,
                                   context=norm_modulate(self.norm1_context.norm, context, c_shift, c_scale),
                                   context_mask=context_mask)
        x = add_gated_tokens(x, attn_x, gate, first)
        h = norm_modulate_tokens(self.norm2, x, shift_ff, scale_ff, first, shift_index=3, scale_index=4)
        x = add_gated_tokens(x, self.ff(h), gate_ff, first, gate_index=5)
        context = gated_add(context, c_gate, attn_c)
        context = gated_add(context, c_gate_ff, self.ff_context(
            norm_modulate(self.norm2_context, context, c_shift_ff, c_scale_ff)))
        return x, context


class SingleStreamBlock(nn.Module):
    """One stream over [text, video]: attention and MLP in parallel, one output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNorm(dim, 3)
        self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.attn = JointAttention(dim, heads, head_dim, joint=False, norm_round_before_scale=True)
        self.proj_out = nn.Linear(dim + mlp_dim, dim)

    def forward(self, x, text_len, context_mask, temb, rope, first_frame_temb=None, first_frame_tokens=0):
        shift, scale, gate = self.norm(temb)
        first = (None if first_frame_temb is None
                 else FirstFrame(text_len, first_frame_tokens, self.norm(first_frame_temb)))
        h = norm_modulate_tokens(self.norm.norm, x, shift, scale, first)
        mlp = linear_gelu(self.proj_mlp, h)
        attn = self.attn(h, rope, context_mask=context_mask, text_len=text_len)
        out = linear_of_concat(self.proj_out, [attn, mlp])
        return add_gated_tokens(x, out, gate, first)


class PatchEmbed(nn.Module):
    def __init__(self, patch: tuple[int, int, int], in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, F, H, W) -> (B, F*H*W, dim)


class HunyuanVideoTransformer(nn.Module):
    config_class = HunyuanVideoConfig

    def __init__(self, config: HunyuanVideoConfig):
        super().__init__()
        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        patch = (config.patch_size_t, config.patch_size, config.patch_size)
        self.x_embedder = PatchEmbed(patch, config.in_channels, dim)
        self.context_embedder = TokenRefiner(config.text_embed_dim, dim, heads, config.num_refiner_layers)
        self.time_text_embed = TimestepTextEmbedding(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(dim, heads, head_dim, config.mlp_ratio)
                                                for _ in range(config.num_layers))
        self.single_transformer_blocks = nn.ModuleList(SingleStreamBlock(dim, heads, head_dim, config.mlp_ratio)
                                                       for _ in range(config.num_single_layers))
        self.norm_out = AdaLayerNorm(dim, 2)
        out_channels = config.out_channels or config.in_channels
        self.proj_out = nn.Linear(dim, config.patch_size_t * config.patch_size**2 * out_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity (B, C_out, F, H, W); ``timestep`` (B,) in 0..1000, ``guidance`` (B,) x1000."""
        batch, _, frames, height, width = hidden_states.shape
        p, p_t = self.config.patch_size, self.config.patch_size_t
        grid = (frames // p_t, height // p, width // p)

        temb = self.time_text_embed(timestep, pooled_projections, guidance)
        first_frame_temb, first_frame_tokens = None, grid[1] * grid[2]
        if self.config.image_condition_type == "token_replace":  # the clean first frame sits at timestep 0
            first_frame_temb = self.time_text_embed(torch.zeros_like(timestep), pooled_projections)
        x = self.x_embedder(hidden_states)
        # No padded text (the pipeline drops the padding every prompt shares): attention without a mask,
        # which lets CUDA use its fastest (mask-free) kernels.
        text_mask = None if bool(encoder_attention_mask.all()) else encoder_attention_mask.bool()
        context = self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask, text_mask)
        rope = hunyuan_rope(grid, self.config.rope_axes_dim, self.config.rope_theta, context.shape[1], x.device)
        tokens = shard_tokens(x.shape[1])  # sequence parallel: this rank's video tokens (text stays whole)
        x, rope = tokens.split(x), tokens.split(rope, dim=0, prefix=context.shape[1])
        first_frame_tokens = tokens.count_below(first_frame_tokens)

        text_len = context.shape[1]
        extra = (text_mask, temb, rope, first_frame_temb, first_frame_tokens)
        (joint,) = run_blocks(self, (x, context), [
            BlockSegment(self.transformer_blocks, lambda block, h: block(*h, *extra)),
            BlockSegment(self.single_transformer_blocks, lambda block, h: (block(h[0], text_len, *extra),),
                         enter=lambda h: (torch.cat([h[1], h[0]], dim=1),)),  # one [text, video] sequence
        ], conditioning=temb)
        x = joint[:, text_len:]

        scale, shift = self.norm_out(temb)  # diffusers' AdaLayerNormContinuous stores scale first
        x = tokens.gather(self.proj_out(norm_modulate(self.norm_out.norm, x, shift, scale)))

        # tokens (B, F'*H'*W', C*pt*p*p) -> (B, C, F, H, W)
        x = x.reshape(batch, *grid, -1, p_t, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(batch, -1, frames, height, width)
