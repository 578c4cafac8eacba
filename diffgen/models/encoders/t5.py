"""T5's encoder (T5 v1.1: FLUX's T5-XXL) and UMT5's (Wan): relative position bias, RMS norm, gated GELU.

Parameter names follow transformers' ``T5EncoderModel`` / ``UMT5EncoderModel`` so their checkpoints load
unchanged, and every operation is evaluated in transformers' order, so outputs equal its own in float32,
bfloat16 and float16 on the same kernels. T5 has one table of relative position biases (in its first
block), shared by all blocks; UMT5 has one per block. Scores are not scaled by 1/sqrt(d): T5 folds that
into its initialisation. Precision as transformers loads it: under float16 the ``wo`` projections stay
float32 (its ``_keep_in_fp32_modules``), which makes the residual stream float32 from the first
feed-forward on; under bfloat16 everything is bfloat16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from diffgen.layers.attention import sdpa
from diffgen.layers.embeddings import token_embedding
from diffgen.layers.norm import RMSNorm
from diffgen.models.encoders.common import NativeTextEncoder, TextEncoderOutput

#: the feed-forwards built here (T5 v1.1, UMT5); a checkpoint with another one is left to transformers
GATED_GELU = ("gated-gelu", "gated-gelu_new")


@dataclass
class T5EncoderConfig:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """(L, L) bucket of key position j seen from query position i, bidirectional (T5's encoder).

    Half the buckets for keys after the query; in each half, exact distances up to a quarter of the
    buckets, then logarithmically wider ones up to ``max_distance`` (Mesh TensorFlow's scheme).
    """
    position = torch.arange(length, dtype=torch.long, device=device)
    relative = position[None, :] - position[:, None]
    num_buckets //= 2
    buckets = (relative > 0).to(torch.long) * num_buckets
    distance = torch.abs(relative)
    max_exact = num_buckets // 2
    far = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).to(torch.long)
    far = torch.min(far, torch.full_like(far, num_buckets - 1))
    return buckets + torch.where(distance < max_exact, distance, far)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU written out as transformers' ``gelu_new`` (in half precision each step rounds, unlike
    ``F.gelu(approximate="tanh")``, so it is kept op for op)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def clamp_float16(x: torch.Tensor) -> torch.Tensor:
    """transformers' guard against float16 overflow after each sublayer (nothing for other dtypes)."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-limit, max=limit)


class T5Attention(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_position_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.head_dim, self.config = config.d_kv, config
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.relative_attention_bias = (token_embedding(config.relative_attention_num_buckets, config.num_heads)
                                        if has_position_bias else None)

    def position_bias(self, buckets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(1 or B, H, L, L) added to the scores, from the (L, L) :func:`relative_position_buckets`; padded keys
        (``mask`` 0) get the dtype's minimum."""
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            bias = torch.where(mask[:, None, None, :].bool(), bias, torch.finfo(bias.dtype).min)
        return bias.contiguous()

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (proj(x).view(batch, length, -1, self.head_dim) for proj in (self.q, self.k, self.v))
        return self.o(sdpa(q, k, v, bias, scale=1.0, library_kernels=True).reshape(batch, length, -1))


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_position_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_position_bias)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, round_before_scale=True)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5GatedFeedForward(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = gelu_new(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))  # float32 under a float16 model


class T5FeedForwardLayer(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.DenseReluDense = T5GatedFeedForward(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, round_before_scale=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_position_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(config, has_position_bias), T5FeedForwardLayer(config)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = clamp_float16(self.layer[0](x, bias))
        return clamp_float16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, config: T5EncoderConfig, bias_per_block: bool):
        super().__init__()
        self.config = config
        self.block = nn.ModuleList([T5Block(config, bias_per_block or i == 0) for i in range(config.num_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, round_before_scale=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # one bucket table for every block (UMT5's blocks each look it up in their own bias table)
        buckets = relative_position_buckets(x.shape[1], self.config.relative_attention_num_buckets,
                                            self.config.relative_attention_max_distance, x.device)
        bias = None
        for block in self.block:
            attention = block.layer[0].SelfAttention
            if attention.relative_attention_bias is not None:  # T5: the first block's, for all; UMT5: each its own
                bias = attention.position_bias(buckets, mask)
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(NativeTextEncoder):
    """transformers' ``T5EncoderModel``: token ids (B, T) -> last hidden state (B, T, d_model)."""

    config_class = T5EncoderConfig
    keep_in_fp32_modules_under_fp16 = ("wo",)
    bias_per_block = False

    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.config = config
        self.shared = token_embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.bias_per_block)

    @classmethod
    def unsupported(cls, config: dict) -> str | None:
        """Why a checkpoint's config.json needs transformers' model instead (None: built here)."""
        projection = config.get("feed_forward_proj", T5EncoderConfig.feed_forward_proj)
        if projection not in GATED_GELU:
            return f"feed_forward_proj {projection!r} (built natively: {', '.join(GATED_GELU)})"
        return None

    @classmethod
    def checkpoint_names(cls, keys: list[str]) -> dict[str, str | None]:
        """The input embedding is tied to ``shared``: files hold it under either name, or both (then the alias,
        which transformers overwrites with ``shared``, is not read)."""
        if "encoder.embed_tokens.weight" not in keys:
            return {}
        return {"encoder.embed_tokens.weight": None if "shared.weight" in keys else "shared.weight"}


    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextEncoderOutput:
        return TextEncoderOutput(self.encoder(self.shared(input_ids), attention_mask))


class UMT5Encoder(T5Encoder):
    """transformers' ``UMT5EncoderModel`` (Wan's text encoder): T5 with a position-bias table in every block."""

    bias_per_block = True
