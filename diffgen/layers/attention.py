"""The one attention entry point of diffgen.

Every DiT calls :func:`attention` with (batch, seq, heads, head_dim) tensors. The backend is chosen
once per process (``set_attention_backend``); on Hopper, cuDNN attention through SDPA measured
1.6-1.9x faster than SDPA's flash kernel on DiT shapes, so it is the CUDA default.
"""

from __future__ import annotations

import contextlib
import math
import weakref

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKENDS = {
    "auto": None,
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
              SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "math": [SDPBackend.MATH],
}
ATTENTION_BACKENDS = tuple(_BACKENDS)
_backend = "auto"


def set_attention_backend(name: str) -> None:
    """Select the SDPA kernel family for all later calls ("auto" lets PyTorch choose)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


def _kernel_context(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    name = "cudnn" if _backend == "auto" else _backend
    return sdpa_kernel(_BACKENDS[name], set_priority=True)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    replicated: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
    replicated_kv: bool = False,
):
    """Scaled dot-product attention over (B, S, H, D) inputs; returns (B, S, H, D).

    ``replicated``: (q, k, v) of tokens every rank holds whole (text), placed before ``query``'s
    tokens in the sequence; the result is then (output, replicated output). Image/video tokens are
    never concatenated with text by the caller, so that inside a sequence-parallel shard (see
    :mod:`diffgen.parallel.sequence`) they can be distributed while the text stays whole (or, where
    the DiT split its text too, ``shard_tokens(text_length=...)``, this rank's text chunk).
    ``mask``: boolean key mask (B, S_kv), True = attend; with ``replicated``, (B, T) over its keys only.
    ``replicated_kv``: the keys/values are complete on every rank (cross-attention to text): each rank
    attends with its own queries, no communication.
    """
    from diffgen.parallel.sequence import active_shard, sequence_parallel_attention

    shard = active_shard()
    if shard is not None and not replicated_kv:
        return sequence_parallel_attention(shard, query, key, value, replicated, mask)
    if replicated is None:
        return sdpa(query, key, value, mask)
    text_q, text_k, text_v = replicated
    text_len = text_q.shape[1]
    out = joint_sdpa(torch.cat([text_q, query], 1), (text_k, text_v), (key, value), mask)
    return out[:, text_len:], out[:, :text_len]


def joint_sdpa(query: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor], kv: tuple[torch.Tensor, torch.Tensor],
               text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``query`` against the keys/values [text, tokens]; ``text_mask`` (B, T) bool marks the text keys to attend to.

    On CUDA a mask that only cuts padding off the end of each text row is not given to the kernel: each
    row attends to its real text keys alone (rows of equal length in one call), so the mask-free
    cuDNN/flash kernels run. Any other mask, and every mask on the CPU (exact to the reference), goes to SDPA.
    """
    (text_k, text_v), (key, value) = text_kv, kv
    lengths = None if text_mask is None or query.device.type != "cuda" else _text_lengths(text_mask)
    if text_mask is None or (lengths is not None and min(lengths) == text_k.shape[1]):
        return sdpa(query, torch.cat([text_k, key], 1), torch.cat([text_v, value], 1))
    if lengths is None:
        mask = torch.cat([text_mask, text_mask.new_ones(key.shape[0], key.shape[1])], dim=1)
        return sdpa(query, torch.cat([text_k, key], 1), torch.cat([text_v, value], 1), mask)
    return sdpa_by_text_length(query, text_kv, kv, lengths)


def sdpa_by_text_length(query: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor],
                        kv: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
    """:func:`joint_sdpa` where row b attends to its first ``lengths[b]`` text keys: mask-free calls, one per length."""
    (text_k, text_v), (key, value) = text_kv, kv
    out = query.new_empty(query.shape[:3] + value.shape[3:])
    for length in sorted(set(lengths)):
        rows = [row for row, n in enumerate(lengths) if n == length]
        pick = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows
        out[pick] = sdpa(query[pick], torch.cat([text_k[pick, :length], key[pick]], 1),
                         torch.cat([text_v[pick, :length], value[pick]], 1))
    return out


_lengths_seen: tuple[weakref.ref, int | None, list[int] | None] | None = None


def _text_lengths(text_mask: torch.Tensor) -> list[int] | None:
    """Each row's number of text keys when every row is ones then zeros (padding at the end), else None.

    Reading the mask waits for the GPU: a DiT passes the same mask to every block, so it is read once.
    """
    global _lengths_seen
    version = None if text_mask.is_inference() else text_mask._version  # inference tensors keep no version
    if _lengths_seen is not None and _lengths_seen[0]() is text_mask and _lengths_seen[1] == version:
        return _lengths_seen[2]
    mask = text_mask.bool()
    counts = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < counts[:, None]
    end_padded = (prefix == mask).all() & (counts > 0).all()
    *counts_read, end_padded_read = torch.cat([counts, end_padded[None]]).tolist()  # one wait, not three
    lengths = counts_read if end_padded_read else None
    _lengths_seen = (weakref.ref(text_mask), version, lengths)
    return lengths


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None, *,
         scale: float | None = None, causal: bool = False, library_kernels: bool = False) -> torch.Tensor:
    """SDPA over (B, S, H, D) with the selected kernel family; ``mask`` a (B, S_kv) bool key mask or an SDPA mask
    (bool, or float added to the scores: T5's position bias); ``scale`` of the scores (None: 1/sqrt(D));
    ``causal``: each query attends to the keys up to its own position (CLIP's text model);
    ``library_kernels``: PyTorch's own kernel choice, as transformers' models get it (the text encoders: the
    same kernel as the reference, whatever the DiT's backend is)."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if mask is not None and mask.dtype == torch.bool and mask.ndim == 2:
        mask = mask[:, None, None, :]
    with contextlib.nullcontext() if library_kernels else _kernel_context(q.device):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal)
    return out.transpose(1, 2)


def sdpa_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention (B, L, H, D) and its log-sum-exp (B, H, L) in float32, for merging partial results (Ring).

    On CUDA without a mask: the cuDNN kernel (then flash) through their aten ops, which return the
    log-sum-exp; otherwise an exact float32 computation (CPU tests; masked blocks are text-sized).
    """
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    length = q.shape[2]
    if q.device.type == "cuda" and mask is None:
        for kernel in _lse_kernels():
            try:
                out, lse = kernel(q, k, v)
            except (RuntimeError, NotImplementedError):
                continue
            if lse.ndim == 4:
                lse = lse.squeeze(-1)
            return out.transpose(1, 2), lse[..., :length].float()
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
    lse = scores.logsumexp(dim=-1)
    out = torch.nan_to_num(torch.softmax(scores, dim=-1)) @ v.float()
    return out.to(q.dtype).transpose(1, 2), lse


def _lse_kernels():
    aten = torch.ops.aten
    order = {"flash": ("flash", "cudnn"), "efficient": ("efficient",), "math": ()}.get(_backend, ("cudnn", "flash"))
    kernels = {
        "cudnn": lambda q, k, v: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2],
        "flash": lambda q, k, v: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2],
        "efficient": lambda q, k, v: aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2],
    }
    return [kernels[name] for name in order]
