"""Timestep and conditioning embeddings and the feed-forward block, with diffusers parameter names."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffgen.layers.linear import linear_gelu


def sinusoidal_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                         downscale_freq_shift: float = 0.0, max_period: float = 10000.0,
                         scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal features (N, dim) of 1-D (possibly fractional) timesteps, in float32.

    ``scale`` multiplies the angles after ``t * freqs`` (models fed sigmas in [0, 1] use 1000),
    in that order so the rounding matches diffusers' ``Timesteps(scale=...)``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = t[:, None].float() * freqs[None, :]
    if scale != 1.0:
        args = scale * args
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)],
                    dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def token_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An ``nn.Embedding`` without its random initialisation, for models whose checkpoint fills it: on the meta
    device (where native models are built) ``normal_`` goes through torch._refs, which imports torch._dynamo
    (about a second of a one-shot run). Built outside the meta device, its values are undefined until loaded."""
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))


class MLPEmbedder(nn.Module):
    """linear_1 -> activation -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None, act: str = "silu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.act = _activation(act)
        self.linear_2 = nn.Linear(hidden_dim, out_dim or hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class _ProjectedActivation(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, approximate: str, activation: str):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate, self.activation = approximate, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "silu":
            return F.silu(self.proj(x))
        return linear_gelu(self.proj, x, self.approximate)


class FeedForward(nn.Module):
    """Linear -> GELU (or SiLU) -> Linear, stored as ``net.0.proj`` / ``net.2`` like diffusers' FeedForward.

    ``activation="silu"`` is diffusers' "linear-silu" (HunyuanVideo's token refiner).
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, dim_out: int | None = None,
                 approximate: str = "tanh", activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "silu"):
            raise ValueError(f"unknown feed-forward activation {activation!r}")
        hidden_dim = hidden_dim or 4 * dim
        self.net = nn.ModuleList([
            _ProjectedActivation(dim, hidden_dim, approximate, activation),
            nn.Identity(),  # diffusers keeps a Dropout here; the index keeps weight names aligned
            nn.Linear(hidden_dim, dim_out or dim),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


def _activation(name: str) -> nn.Module:
    if name == "silu":
        return nn.SiLU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}")
