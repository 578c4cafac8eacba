"""Qwen-Image (and Qwen-Image-Edit): an MMDiT of dual-stream blocks only.

Parameter names follow diffusers' ``QwenImageTransformer2DModel`` so its checkpoints load unchanged.
Shapes: image tokens (B, N, in_channels) packed 2x2 (for editing, the noisy latents followed by the
condition images' latents), text tokens (B, T, joint_attention_dim) from Qwen2.5-VL.

RoPE: each image token has a (frame, row, column) position; rows and columns are centred on the
image (-h/2 .. h/2-1), frame is the image's index in the sequence (0 = the output, 1.. = the edit
inputs). Text token j sits at (p, p, p) with p = max_image_half_extent + j, i.e. after every image
position on all three axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffgen.layers.block_loop import BlockSegment, run_blocks
from diffgen.layers.embeddings import FeedForward, MLPEmbedder, sinusoidal_embedding
from diffgen.layers.joint_attention import JointAttention
from diffgen.layers.modulation import AdaLayerNorm, gated_add, norm_modulate
from diffgen.layers.norm import RMSNorm, layer_norm_no_affine
from diffgen.layers.rope import multi_axis_rope
from diffgen.parallel.sequence import shard_tokens

ImageShape = tuple[int, int, int]  # (frames, rows, columns) of one image's token grid


@dataclass
class QwenImageConfig:
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    zero_cond_t: bool = False  # Edit-2511: edit-input tokens are modulated with the embedding of t=0
    use_additional_t_cond: bool = False  # Qwen-Image-Layered; not supported
    use_layer3d_rope: bool = False  # Qwen-Image-Layered; not supported
    rope_theta: float = 10000.0

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def qwen_rope_positions(image_shapes: list[ImageShape], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer (frame, row, col) positions: (sum of image tokens, 3) and (text_len, 3)."""
    image_positions, max_half_extent = [], 0
    for index, (frames, rows, cols) in enumerate(image_shapes):
        grid = torch.stack(torch.meshgrid(
            torch.arange(index, index + frames),
            torch.arange(rows) - (rows - rows // 2),  # centred: -(rows - rows//2) .. rows//2 - 1
            torch.arange(cols) - (cols - cols // 2),
            indexing="ij"), dim=-1)
        image_positions.append(grid.reshape(-1, 3))
        max_half_extent = max(max_half_extent, rows // 2, cols // 2)
    text_positions = (max_half_extent + torch.arange(text_len))[:, None].expand(text_len, 3)
    return torch.cat(image_positions), text_positions


class QwenImageBlock(nn.Module):
    """Image and text streams, each with its own modulation, projections and MLP, attending jointly."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        # diffusers stores these as Sequential(SiLU, Linear): hence the ".1." in their weight names.
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1 = layer_norm_no_affine(dim, eps)
        self.attn = JointAttention(dim, heads, head_dim, joint=True, eps=eps, norm_round_before_scale=True)
        self.img_norm2 = layer_norm_no_affine(dim, eps)
        self.img_mlp = FeedForward(dim)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_norm1 = layer_norm_no_affine(dim, eps)
        self.txt_norm2 = layer_norm_no_affine(dim, eps)
        self.txt_mlp = FeedForward(dim)

    @staticmethod
    def _per_token(params: torch.Tensor, is_condition: torch.Tensor | None) -> torch.Tensor:
        """(B, k*D) modulation -> (B, 1, k*D); with zero_cond_t, (2B, k*D) -> (B, N, k*D) chosen per token."""
        if is_condition is None:
            return params.unsqueeze(1)
        current, condition = params.chunk(2, dim=0)
        return torch.where(is_condition[..., None], condition.unsqueeze(1), current.unsqueeze(1))

    def forward(self, x, context, context_mask, temb, rope, is_condition=None):
        img_params = self._per_token(self.img_mod(temb), is_condition)
        txt_temb = temb if is_condition is None else temb.chunk(2, dim=0)[0]
        txt_params = self.txt_mod(txt_temb).unsqueeze(1)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = img_params.chunk(6, dim=-1)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = txt_params.chunk(6, dim=-1)

        attn_x, attn_c = self.attn(norm_modulate(self.img_norm1, x, shift, scale), rope,
                                   context=norm_modulate(self.txt_norm1, context, c_shift, c_scale),
                                   context_mask=context_mask)
        x = gated_add(x, gate, attn_x)
        context = gated_add(context, c_gate, attn_c)
        x = gated_add(x, gate_mlp, self.img_mlp(norm_modulate(self.img_norm2, x, shift_mlp, scale_mlp)))
        context = gated_add(context, c_gate_mlp,
                            self.txt_mlp(norm_modulate(self.txt_norm2, context, c_shift_mlp, c_scale_mlp)))
        if context.dtype == torch.float16:
            context, x = context.clip(-65504, 65504), x.clip(-65504, 65504)
        return x, context


class QwenImageTimestepEmbedding(nn.Module):
    """Sinusoidal features of the sigma (scaled by 1000) -> MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(sinusoidal_embedding(timestep, 256, scale=1000.0).to(dtype))


class QwenImageTransformer(nn.Module):
    config_class = QwenImageConfig

    def __init__(self, config: QwenImageConfig):
        super().__init__()
        if config.use_additional_t_cond or config.use_layer3d_rope or config.guidance_embeds:
            raise NotImplementedError(
                "Qwen-Image variants with use_additional_t_cond, use_layer3d_rope or guidance_embeds "
                "(Qwen-Image-Layered) are not supported yet")
        if sum(config.axes_dims_rope) != config.attention_head_dim:
            raise ValueError(f"axes_dims_rope {config.axes_dims_rope} must sum to the head dim "
                             f"{config.attention_head_dim}")
        self.config = config
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.time_text_embed = QwenImageTimestepEmbedding(dim)
        self.txt_norm = RMSNorm(config.joint_attention_dim, eps=1e-6, round_before_scale=True)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(QwenImageBlock(dim, heads, head_dim) for _ in range(config.num_layers))
        self.norm_out = AdaLayerNorm(dim, 2)
        out_channels = config.out_channels or config.in_channels
        self.proj_out = nn.Linear(dim, config.patch_size**2 * out_channels)

    def rope(self, image_shapes: list[ImageShape], text_len: int, device: torch.device):
        """cos/sin tables for the joint [text, image] sequence; float32 angles as the reference builds them.

        Built on the CPU (the reference's rounding) once per shape and kept on ``device``: every step of a
        request reuses them instead of copying them to the GPU again.
        """
        key = (tuple(tuple(shape) for shape in image_shapes), text_len, str(device))
        tables = self._rope_cache.get(key)
        if tables is None:
            image_pos, text_pos = qwen_rope_positions(image_shapes, text_len)
            cos, sin = multi_axis_rope(torch.cat([text_pos, image_pos]), self.config.axes_dims_rope,
                                       self.config.rope_theta, dtype=torch.float32)
            if len(self._rope_cache) >= 8:  # a few request shapes at a time; keep memory bounded
                self._rope_cache.clear()
            tables = self._rope_cache[key] = (cos.to(device), sin.to(device))
        return tables

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        image_shapes: list[ImageShape],
        encoder_hidden_states_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity for every image token.

        ``timestep``: sigmas in [0, 1] (B,). ``image_shapes``: the token grid of each image in
        ``hidden_states``, in order (the output first). ``encoder_hidden_states_mask``: (B, T), nonzero
        for text tokens to attend to; None attends to all.
        """
        x = self.img_in(hidden_states)
        timestep = timestep.to(x.dtype)
        is_condition = None
        if self.config.zero_cond_t:
            # Tokens after the output image (the edit inputs) are modulated as if already clean (t=0).
            timestep = torch.cat([timestep, timestep * 0])
            output_tokens = image_shapes[0][0] * image_shapes[0][1] * image_shapes[0][2]
            is_condition = torch.arange(x.shape[1], device=x.device)[None, :].expand(x.shape[0], -1) >= output_tokens
        temb = self.time_text_embed(timestep, x.dtype)
        context = self.txt_in(self.txt_norm(encoder_hidden_states))
        context_mask = encoder_hidden_states_mask.bool() if encoder_hidden_states_mask is not None else None
        rope = self.rope(image_shapes, context.shape[1], x.device)
        tokens = shard_tokens(x.shape[1])  # sequence parallel: this rank's image tokens (text stays whole)
        x, rope = tokens.split(x), tokens.split(rope, dim=0, prefix=context.shape[1])
        if is_condition is not None:
            is_condition = tokens.split(is_condition)

        x, context = run_blocks(self, (x, context), [
            BlockSegment(self.transformer_blocks, lambda block, h: block(*h, context_mask, temb, rope, is_condition)),
        ], conditioning=temb)

        if is_condition is not None:
            temb = temb.chunk(2, dim=0)[0]
        scale, shift = self.norm_out(temb)  # diffusers' AdaLayerNormContinuous stores scale first
        return tokens.gather(self.proj_out(norm_modulate(self.norm_out.norm, x, shift, scale)))
