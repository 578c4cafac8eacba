"""Tensor parallelism of the large text encoders (T5-XXL, UMT5-XXL, Qwen2.5-VL's language model).

Chosen: wrap transformers' own modules after loading rather than re-implement the encoders. In
each attention, q/k/v become column-parallel (this rank's heads) and the output projection
row-parallel (partial products summed by an all-reduce); in each MLP the input projections are
column-, the output one row-parallel. The modules' head counts are divided to match, and T5's
relative-position bias keeps this rank's heads. The weights not in those linears (embeddings,
norms, Qwen's vision tower) stay whole: T5-XXL's linears are ~97% of its weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from diffgen.parallel.state import Axis

# (column-parallel names, row-parallel names) of the linears inside each attention / MLP module
_T5 = ({"q", "k", "v", "wi", "wi_0", "wi_1"}, {"o", "wo"})
_QWEN = ({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}, {"o_proj", "down_proj"})
_HEAD_COUNTS = ("n_heads", "num_heads", "num_key_value_heads")


class TensorParallelLinear(nn.Module):
    """A slice of an nn.Linear: ``column`` keeps a block of output features, ``row`` a block of input
    features (its outputs are partial sums, all-reduced over the group; the bias is added once after)."""

    def __init__(self, linear: nn.Linear, axis: Axis, mode: str):
        super().__init__()
        if mode not in ("column", "row"):
            raise ValueError(f"mode {mode!r} is not column or row")
        self.axis, self.mode = axis, mode
        dim = 0 if mode == "column" else 1
        if linear.weight.shape[dim] % axis.size:
            raise ValueError(f"{linear.weight.shape[dim]} features do not divide over tp_size {axis.size}")
        self.weight = nn.Parameter(linear.weight.detach().chunk(axis.size, dim)[axis.rank].clone(),
                                   requires_grad=False)
        bias = linear.bias
        if bias is not None and mode == "column":
            bias = bias.detach().chunk(axis.size)[axis.rank].clone()
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.in_features, self.out_features = self.weight.shape[1], self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "column":
            return F.linear(x, self.weight, self.bias)
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.axis.group)
        return out if self.bias is None else out + self.bias


def shard_encoder(model: nn.Module, axis: Axis) -> int:
    """Shard every attention and MLP of a T5/UMT5/Qwen2(-VL) text model in place; returns the linears replaced."""
    replaced = 0
    visual = getattr(getattr(model, "model", model), "visual", None)  # Qwen2.5-VL's vision tower stays whole
    skip = {id(m) for m in visual.modules()} if visual is not None else set()
    for module in list(model.modules()):
        if id(module) in skip:
            continue
        names = _T5 if hasattr(module, "q") or hasattr(module, "wo") else _QWEN
        children = dict(module.named_children())
        if not any(isinstance(children.get(n), nn.Linear) for n in names[0] | names[1]):
            continue
        for name, child in children.items():
            if isinstance(child, nn.Linear) and (name in names[0] or name in names[1]):
                setattr(module, name, TensorParallelLinear(child, axis, "column" if name in names[0] else "row"))
                replaced += 1
        for attr in _HEAD_COUNTS:
            if isinstance(getattr(module, attr, None), int):
                if getattr(module, attr) % axis.size:
                    raise ValueError(f"{type(module).__name__}.{attr} = {getattr(module, attr)} does not divide "
                                     f"over --tp-size {axis.size}")
                setattr(module, attr, getattr(module, attr) // axis.size)
        if isinstance(getattr(module, "inner_dim", None), int):
            module.inner_dim //= axis.size
        bias = getattr(module, "relative_attention_bias", None)
        if isinstance(bias, nn.Embedding):
            sliced = nn.Embedding(bias.num_embeddings, bias.embedding_dim // axis.size,
                                  device=bias.weight.device, dtype=bias.weight.dtype)
            sliced.weight.data.copy_(bias.weight.detach().chunk(axis.size, 1)[axis.rank])
            module.relative_attention_bias = sliced
    return replaced


def shard_text_encoders(pipeline, axis: Axis) -> None:
    """TP for the pipeline's large text encoders (``text_encoder_2`` of FLUX, ``text_encoder`` of Wan / Qwen)."""
    for name in ("text_encoder", "text_encoder_2"):
        encoder = pipeline.components.get(name)
        if encoder is None or type(encoder).__name__.startswith("CLIP"):
            continue  # CLIP-L (FLUX's pooled text) is small: it stays whole
        shard_encoder(encoder, axis)
