"""HunyuanVideo-1.5: dual-stream blocks over video tokens and three kinds of condition tokens.

Parameter names follow diffusers' ``HunyuanVideo15Transformer3DModel`` so its checkpoints load unchanged.
Shapes: the DiT input (B, 2C+1, F, H, W) is the noisy latent, the condition latent (I2V: the image's
latent in frame 0, zeros after) and a mask channel (1 on conditioned frames); patch 1 -> video tokens
(B, F*H*W, dim). Condition tokens: Qwen2.5-VL hidden states (B, L, 3584) through the token refiner,
ByT5 states of the quoted ("glyph") text (B, G, 1472) and, for I2V, SigLIP tokens of the input image
(B, 729, 1152); each kind adds its own learned type embedding.

The blocks are HunyuanVideo v1's dual-stream blocks (:class:`~diffgen.models.dits.hunyuan_video.DoubleStreamBlock`,
same weights and arithmetic), without v1's single-stream tail. As in v1, the reference orders the joint
sequence [video, text] and rotates video tokens only; the shared joint attention takes [text, video]
with identity RoPE rows for the text. The reference packs each sample's valid condition tokens first
and padding after; attention does not depend on the order of its keys, so here the condition kinds
are simply concatenated and every token that no sample of the batch uses is dropped (with one prompt:
no mask at all, the fast kernels). Text tokens are the replicated part of a sequence-parallel shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffgen.layers.block_loop import BlockSegment, run_blocks
from diffgen.layers.embeddings import MLPEmbedder, sinusoidal_embedding, token_embedding
from diffgen.layers.modulation import AdaLayerNorm, norm_modulate
from diffgen.models.dits.hunyuan_video import DoubleStreamBlock, PatchEmbed, TokenRefiner, hunyuan_rope
from diffgen.parallel.sequence import shard_tokens

# cond_type_embed rows
TEXT, GLYPH, IMAGE = 0, 1, 2


@dataclass
class HunyuanVideo15Config:
    in_channels: int = 65
    out_channels: int | None = 32
    num_attention_heads: int = 16
    attention_head_dim: int = 128
    num_layers: int = 54
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 1
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    text_embed_dim: int = 3584
    text_embed_2_dim: int = 1472
    image_embed_dim: int = 1152
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    target_size: int = 640  # pixels: 640 -> 480p, 960 -> 720p (the pipeline's size buckets)
    task_type: str = "i2v"
    use_meanflow: bool = False  # step-distilled: a second timestep embedding for the step's end

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class TimeEmbedding(nn.Module):
    """Timestep (and, MeanFlow-distilled, the step's end ``timestep_r``) -> conditioning vector."""

    def __init__(self, dim: int, use_meanflow: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.timestep_embedder_r = MLPEmbedder(256, dim) if use_meanflow else None

    def forward(self, timestep: torch.Tensor, timestep_r: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.timestep_embedder.linear_1.weight.dtype  # the reference casts to the timestep's (model) dtype
        emb = self.timestep_embedder(sinusoidal_embedding(timestep, 256).to(dtype))
        if timestep_r is not None:
            emb = emb + self.timestep_embedder_r(sinusoidal_embedding(timestep_r, 256).to(dtype))
        return emb


class GlyphProjection(nn.Module):
    """ByT5 states -> model width: LayerNorm, then three linears with GELU between."""

    def __init__(self, in_dim: int, hidden_dim: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, hidden_dim)
        self.linear_3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.linear_1(self.norm(x)))
        return self.linear_3(nn.functional.gelu(self.linear_2(x)))


class ImageProjection(nn.Module):
    """SigLIP tokens -> model width: LayerNorm, GELU MLP, LayerNorm."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, in_dim)
        self.linear_2 = nn.Linear(in_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.linear_2(nn.functional.gelu(self.linear_1(self.norm_in(x)))))


def join_condition_tokens(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One text sequence from (tokens (B, n, D), mask (B, n)) parts, without the tokens no sample uses.

    Returns the tokens and their bool key mask, or None when every kept token is valid for every sample.
    """
    tokens = torch.cat([t for t, _ in parts], dim=1)
    mask = torch.cat([m for _, m in parts], dim=1).bool()
    used = mask.any(dim=0)
    tokens, mask = tokens[:, used], mask[:, used]
    return tokens, None if bool(mask.all()) else mask


class HunyuanVideo15Transformer(nn.Module):
    config_class = HunyuanVideo15Config

    def __init__(self, config: HunyuanVideo15Config):
        super().__init__()
        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        patch = (config.patch_size_t, config.patch_size, config.patch_size)
        self.x_embedder = PatchEmbed(patch, config.in_channels, dim)
        self.image_embedder = ImageProjection(config.image_embed_dim, dim)
        self.context_embedder = TokenRefiner(config.text_embed_dim, dim, heads, config.num_refiner_layers)
        self.context_embedder_2 = GlyphProjection(config.text_embed_2_dim, 2048, dim)
        self.time_embed = TimeEmbedding(dim, config.use_meanflow)
        self.cond_type_embed = token_embedding(3, dim)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(dim, heads, head_dim, config.mlp_ratio)
                                                for _ in range(config.num_layers))
        self.norm_out = AdaLayerNorm(dim, 2)
        out_channels = config.out_channels or config.in_channels
        self.proj_out = nn.Linear(dim, config.patch_size_t * config.patch_size**2 * out_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        encoder_hidden_states_2: torch.Tensor,
        encoder_attention_mask_2: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        timestep_r: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity (B, C_out, F, H, W); ``timestep`` (B,) in 0..1000.

        ``image_embeds`` (B, N, image_dim): SigLIP tokens of the input image (I2V); None for T2V
        (the reference feeds zeros there and masks them out, the same as leaving them away).
        """
        batch, _, frames, height, width = hidden_states.shape
        p, p_t = self.config.patch_size, self.config.patch_size_t
        grid = (frames // p_t, height // p, width // p)

        temb = self.time_embed(timestep, timestep_r)
        x = self.x_embedder(hidden_states)

        type_embed = self.cond_type_embed.weight
        text_key_mask = encoder_attention_mask.bool()
        text = self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask,
                                     None if bool(text_key_mask.all()) else text_key_mask) + type_embed[TEXT]
        glyph = self.context_embedder_2(encoder_hidden_states_2) + type_embed[GLYPH]
        parts = [(glyph, encoder_attention_mask_2), (text, encoder_attention_mask)]
        if image_embeds is not None:
            image = self.image_embedder(image_embeds) + type_embed[IMAGE]
            parts.insert(0, (image, image.new_ones(image.shape[:2])))
        context, context_mask = join_condition_tokens(parts)

        text_len = context.shape[1]
        rope = hunyuan_rope(grid, self.config.rope_axes_dim, self.config.rope_theta, text_len, x.device)
        tokens = shard_tokens(x.shape[1])  # sequence parallel: this rank's video tokens (text stays whole)
        x, rope = tokens.split(x), tokens.split(rope, dim=0, prefix=text_len)

        (x, _) = run_blocks(self, (x, context), [
            BlockSegment(self.transformer_blocks, lambda block, h: block(*h, context_mask, temb, rope)),
        ], conditioning=temb)

        scale, shift = self.norm_out(temb)  # diffusers' AdaLayerNormContinuous stores scale first
        x = tokens.gather(self.proj_out(norm_modulate(self.norm_out.norm, x, shift, scale)))

        # tokens (B, F'*H'*W', C*pt*p*p) -> (B, C, F, H, W)
        x = x.reshape(batch, *grid, -1, p_t, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(batch, -1, frames, height, width)
