"""CLIP's text model (FLUX's and HunyuanVideo's CLIP-L): a causal pre-norm transformer; the pooled output is
the final state at each row's end-of-text token.

Parameter names follow transformers' ``CLIPTextModel``: its files name them with or without the
``text_model.`` prefix (the hub's, and transformers 5's own ``save_pretrained``); both load. Every
operation is evaluated in transformers' order (quick GELU op for op), so outputs equal its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffgen.layers.attention import sdpa
from diffgen.layers.embeddings import token_embedding
from diffgen.models.encoders.common import NativeTextEncoder, TextEncoderOutput

PREFIX = "text_model."


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = token_embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = token_embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length, limit = input_ids.shape[-1], self.position_embedding.num_embeddings
        if length > limit:
            raise ValueError(f"{length} tokens: the CLIP text model takes at most {limit} (max_position_embeddings)")
        positions = torch.arange(length, device=input_ids.device)[None, :]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        dim = config.hidden_size
        self.head_dim = dim // config.num_attention_heads
        self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (proj(x).view(batch, length, -1, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if mask is None:
            out = sdpa(q, k, v, scale=self.head_dim ** -0.5, causal=True, library_kernels=True)
        else:
            out = sdpa(q, k, v, mask, scale=self.head_dim ** -0.5, library_kernels=True)
        return self.out_proj(out.reshape(batch, length, -1))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class CLIPTextModel(NativeTextEncoder):
    """transformers' ``CLIPTextModel``: token ids (B, T) -> last hidden state (B, T, dim) and pooled (B, dim)."""

    config_class = CLIPTextConfig
    ignored_checkpoint_keys = ("position_ids",)  # a buffer that older files saved; rebuilt here, as transformers

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @classmethod
    def unsupported(cls, config: dict) -> str | None:
        """Why a checkpoint's config.json needs transformers' model instead (None: built here)."""
        activation = config.get("hidden_act", CLIPTextConfig.hidden_act)
        if activation not in ACTIVATIONS:
            return f"hidden_act {activation!r} (built natively: {', '.join(ACTIVATIONS)})"
        if not isinstance(config.get("eos_token_id", CLIPTextConfig.eos_token_id), int):
            return f"eos_token_id {config['eos_token_id']!r} (built natively: one id)"
        return None

    @classmethod
    def checkpoint_names(cls, keys: list[str]) -> dict[str, str | None]:
        return {key: key.removeprefix(PREFIX) for key in keys if key.startswith(PREFIX)}


    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextEncoderOutput:
        x = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None:  # causal and not padding, as one boolean mask
            length = input_ids.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        return TextEncoderOutput(x, x[torch.arange(x.shape[0], device=x.device), self.end_of_text(input_ids)])

    def end_of_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each row's end-of-text position as transformers picks it: configs saved before its fix say
        eos_token_id 2 (FLUX's CLIP-L among them) and get the highest token id (CLIP's end-of-text is the last of
        the vocabulary); others the first position of eos_token_id."""
        ids = input_ids.to(dtype=torch.int, device=self.device)
        if self.config.eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == self.config.eos_token_id).int().argmax(dim=-1)
