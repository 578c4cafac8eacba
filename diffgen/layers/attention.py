"""The one attention entry point of diffgen.

Every DiT calls :func:`attention` with (batch, seq, heads, head_dim) tensors. The backend is chosen
once per process (``set_attention_backend``). On CUDA, "auto" runs cuDNN attention through SDPA (1.6-1.9x
faster than SDPA's own flash kernel on DiT shapes, on Hopper); inside compiled blocks (``serve``'s default,
``--compile``) on Hopper, where the ``flash-attn-4`` package is installed (diffgen's ``fa4`` extra),
FlashAttention-4 for long sequences: 1.07-1.24x faster than cuDNN from 16384 keys on an H200
(docs/benchmarks.md, "FlashAttention-4").
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import threading
import weakref

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffgen.errors import DiffgenError
from diffgen.options import ATTENTION_BACKENDS

logger = logging.getLogger(__name__)

_SDPA_ORDER = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
              SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "math": [SDPBackend.MATH],
}
assert set(_SDPA_ORDER) | {"auto", "fa4"} == set(ATTENTION_BACKENDS)
#: "auto" (in compiled blocks) calls FA4 from this many keys on: on an H200 it was 1.07-1.24x faster than cuDNN from
#: 16384 keys, within the noise at 8192-12288 and no faster at ~4500 (FLUX, Qwen-Image)
FA4_MIN_KEYS = 16384
_backend = "auto"


def set_attention_backend(name: str) -> None:
    """Select the attention kernels for all later calls (see :data:`ATTENTION_BACKENDS`)."""
    global _backend
    if name not in ATTENTION_BACKENDS:
        raise DiffgenError(f"--attention-backend {name!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "fa4" and not fa4_installed():
        raise DiffgenError("--attention-backend 'fa4' needs the flash-attn-4 package, which is not installed "
                           "(diffgen's fa4 extra: pip install -e '.[fa4]' in the clone)")
    _backend = name


def get_attention_backend() -> str:
    return _backend


def _kernel_context(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(_SDPA_ORDER.get(_backend, _SDPA_ORDER["cudnn"]), set_priority=True)


def fa4_installed() -> bool:
    """Whether FlashAttention-4's package is there (without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except Exception:  # noqa: BLE001 - finding it runs flash_attn/__init__.py: a broken FlashAttention-2 raises anything
        return False


_fa4_resolved: list = []  # [flash_attn_func or None] once the import was tried
_fa4_ready_by: dict[tuple[str, int], bool] = {}
_fa4_lock = threading.Lock()
#: GPU generations (compute capability major) FA4's kernels run on: Hopper, Blackwell; "auto" uses Hopper only, where
#: it was measured
FA4_GENERATIONS = (9, 10, 11)


def _fa4_function():
    """FlashAttention-4's ``flash_attn_func``, or None where it does not import (logged once). The first call
    imports it; a call while the prefetch thread imports waits for it."""
    if _fa4_resolved:
        return _fa4_resolved[0]
    with _fa4_lock:
        if not _fa4_resolved:
            try:
                from flash_attn.cute import flash_attn_func
            except Exception as error:  # noqa: BLE001 - any import failure means: use cuDNN
                logger.warning("diffgen: FlashAttention-4 did not import (%s); attention runs on cuDNN", error)
                flash_attn_func = None
            _fa4_resolved.append(flash_attn_func)
    return _fa4_resolved[0]


def prefetch_attention_kernels(device: torch.device | str | None, compiled: bool) -> None:
    """Decide FlashAttention-4 for ``device`` in a background thread where it may be called ("fa4"; "auto" with
    compiled blocks), so that its import (~11 s, the CuTe DSL's compiler) overlaps the weights' loading."""
    device, backend = torch.device(device or "cpu"), _backend
    if device.type == "cuda" and (backend == "fa4" or (backend == "auto" and compiled)) and fa4_installed():
        threading.Thread(target=lambda: _fa4_ready(backend, _index(device)), name="diffgen-fa4-import",
                         daemon=True).start()


def prepare_compiled_attention(device: torch.device) -> None:
    """Decide (importing FlashAttention-4 if needed) whether compiled blocks on ``device`` call FA4, before they are
    traced: a trace reads the decision and cannot import (diffgen.engine.optimize.compile_repeated_blocks calls
    this; so must any other ``torch.compile`` over :func:`attention` that should use FA4)."""
    if device.type == "cuda" and _backend in ("auto", "fa4"):
        _fa4_ready(_backend, _index(device))


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _fa4_ready(backend: str, device_index: int) -> bool:
    """Whether FlashAttention-4 serves ``backend`` on this GPU: installed and importable, a generation it runs on
    ("auto": Hopper only, where it was measured). "fa4" on another GPU falls back to cuDNN with a warning. Inside a
    trace only the decision made before (:func:`prepare_compiled_attention`) is read; undecided there means no."""
    key = (backend, device_index)
    if key not in _fa4_ready_by:
        if torch.compiler.is_compiling():
            return False
        generation = torch.cuda.get_device_capability(device_index)[0]
        if backend == "fa4" and not _fits(backend, generation):
            logger.warning("diffgen: FlashAttention-4 has no kernels for compute capability %d.x (it runs on %s); "
                           "attention runs on cuDNN", generation, ", ".join(f"{g}.x" for g in FA4_GENERATIONS))
        _fa4_ready_by[key] = _fits(backend, generation) and fa4_installed() and _fa4_function() is not None
    return _fa4_ready_by[key]


def _fits(backend: str, generation: int) -> bool:
    return generation == 9 if backend == "auto" else generation in FA4_GENERATIONS


@torch.library.custom_op("diffgen::flash_attention_4", mutates_args=())
def fa4_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
                     causal: bool) -> torch.Tensor:
    """FlashAttention-4 over (B, S, H, D) inputs (an op, so that compiled graphs and CUDA graphs call it whole)."""
    flash_attn_func = _fa4_function()
    if flash_attn_func is None:
        raise RuntimeError("FlashAttention-4 (flash_attn.cute) did not import: see the warning logged before")
    with torch.cuda.device(query.device):  # FA4 launches on the current device's stream
        out = flash_attn_func(query, key, value, softmax_scale=scale, causal=causal)
    return out[0] if isinstance(out, tuple) else out


@fa4_attention_op.register_fake
def _(query, key, value, scale, causal):
    return query.new_empty(query.shape[:-1] + value.shape[-1:])


def _use_fa4(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
             causal: bool = False) -> bool:
    """Whether this call goes to FlashAttention-4 under the selected backend (its kernels take no mask, 16-bit
    inputs, head dims that are multiples of 8 up to 256; no gradients through the op). Where SDPA would refuse or
    differ, SDPA runs: unequal head counts (FA4 would group the queries), causal attention over unequal lengths
    (FA4 aligns the mask to the end, SDPA to the start)."""
    if _backend not in ("auto", "fa4") or query.device.type != "cuda" or mask is not None:
        return False
    # "auto" in compiled blocks only: where eager runs (a one-shot generate), FA4's import and each shape's first
    # compilation cost more than they saved (Wan2.1-1.3B 480p, 20 steps: 52-54 s with it, 46-49 s without, H200)
    if _backend == "auto" and (key.shape[1] < FA4_MIN_KEYS or not torch.compiler.is_compiling()):
        return False
    if not query.shape[2] == key.shape[2] == value.shape[2] or (causal and query.shape[1] != key.shape[1]):
        return False
    if query.dtype not in (torch.bfloat16, torch.float16) or not query.dtype == key.dtype == value.dtype:
        return False
    if any(t.shape[-1] % 8 or t.shape[-1] > 256 for t in (query, value)) or torch.is_grad_enabled():
        return False
    return _fa4_ready(_backend, query.device.index)  # a CUDA tensor's device always has its index


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
    if not library_kernels and _use_fa4(query, key, value, mask, causal):
        return fa4_attention_op(query, key, value, scale, causal)
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
