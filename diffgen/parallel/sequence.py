"""Sequence parallelism: the token-shard helper every DiT uses, and Ulysses / Ring / USP attention.

A DiT calls :func:`shard_tokens` once after embedding: its image/video tokens are split into
``sp`` equal chunks (padded at the end when the count does not divide), one per rank of the
sequence-parallel group, and every per-token table (RoPE, per-token timesteps) is split with
``TokenShard.split`` alike. ``TokenShard.gather`` before unpatchify puts the sequence back
together. Between the two, :func:`diffgen.layers.attention.attention` sees the shard and
distributes self-attention over the group; everything else in a DiT works per token.

Attention over a shard (``sp = ring x ulysses`` ranks, chunk index ``ring_rank * ulysses + ulysses_rank``):

- Ulysses: an all-to-all turns (tokens/u, all heads) into (u consecutive chunks, heads/u); the
  replicated text tokens are cut to the same heads. After attention the inverse all-to-all.
- Ring: each rank keeps its queries and passes its keys/values around the ring; each block's
  partial output is merged with its log-sum-exp (numerically the same as one softmax).
- USP: Ulysses inside, Ring across.

Padding never needs a mask: padded tokens sit at the end of the sequence, so the keys are cut to
the valid length before the kernel (padded queries compute garbage that ``gather`` drops). This
keeps the mask-free cuDNN/flash kernels on the GPU path.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from diffgen.parallel import state as parallel_state

_active: TokenShard | None = None


class TokenShard:
    """The image/video tokens of one DiT forward, split over the sequence-parallel group."""

    def __init__(self, length: int, axis: parallel_state.Axis | None):
        self.length = length
        self.axis = axis
        self.degree = axis.size if axis is not None else 1
        self.chunk = math.ceil(length / self.degree)

    @property
    def padded_length(self) -> int:
        return self.chunk * self.degree

    def valid_in(self, start: int, size: int) -> int:
        """How many real (not padding) tokens lie in positions [start, start + size)."""
        return max(0, min(size, self.length - start))

    def count_below(self, end: int) -> int:
        """How many of this rank's tokens have a global index below ``end`` (for a span at the start, e.g. a
        first frame): they are this shard's first ones."""
        start = self.axis.rank * self.chunk if self.degree > 1 else 0
        return max(0, min(self.chunk, end - start, self.length - start))

    def split(self, tensor, dim: int = 1, prefix: int = 0):
        """This rank's part of a per-token tensor (or of each tensor of a tuple, e.g. RoPE cos/sin).

        The tokens are ``tensor``'s entries ``prefix ..`` along ``dim``; the first ``prefix`` entries
        (text tokens of a joint RoPE table) are kept on every rank. A size-1 (broadcast) dim passes unchanged.
        """
        if isinstance(tensor, (tuple, list)):
            return type(tensor)(self.split(t, dim, prefix) for t in tensor)
        if self.degree == 1 or (tensor.shape[dim] == 1 and self.length != 1):
            return tensor
        if tensor.shape[dim] != prefix + self.length:
            raise ValueError(f"split: {tensor.shape[dim]} entries along dim {dim}, expected {prefix} + {self.length}")
        kept, tokens = tensor.split([prefix, self.length], dim=dim)
        if self.padded_length != self.length:
            pad_shape = list(tokens.shape)
            pad_shape[dim] = self.padded_length - self.length
            tokens = torch.cat([tokens, tokens.new_zeros(pad_shape)], dim=dim)
        part = tokens.narrow(dim, self.axis.rank * self.chunk, self.chunk)
        return torch.cat([kept, part], dim=dim) if prefix else part.contiguous()

    def gather(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence back on every rank (padding dropped); ends the sharded region."""
        global _active
        if _active is self:
            _active = None
        if self.degree == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.degree)]
        dist.all_gather(parts, tensor, group=self.axis.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.length)


def shard_tokens(length: int) -> TokenShard:
    """Start a sharded region of ``length`` image/video tokens (a no-op shard without sequence parallelism)."""
    global _active
    state = parallel_state.current()
    if state is None or state.sp.size == 1:
        return TokenShard(length, None)
    _active = TokenShard(length, state.sp)
    return _active


def active_shard() -> TokenShard | None:
    return _active


# -- attention over a shard --------------------------------------------------------------------------


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """(size, ...) -> (size, ...): slot j goes to rank j, slot j of the result came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _ulysses_scatter_heads(tensors: tuple[torch.Tensor, ...], axis: parallel_state.Axis) -> list[torch.Tensor]:
    """Each (B, n, H, D) tokens of this rank -> (B, u*n, H/u, D): the group's tokens, this rank's heads.

    q, k and v travel in one all-to-all (one collective instead of three: at FLUX/Qwen-Image sizes
    a collective's fixed cost, not its bytes, is what Ulysses pays).
    """
    b, n, h, d = tensors[0].shape
    u, count = axis.size, len(tensors)
    send = tensors[0].new_empty(u, count, b, n, h // u, d)  # slot = destination's head group
    for index, x in enumerate(tensors):
        send[:, index].copy_(x.view(b, n, u, h // u, d).permute(2, 0, 1, 3, 4))
    received = _all_to_all(send, axis.group, u)  # slot = source's token chunk
    return list(received.permute(1, 2, 0, 3, 4, 5).reshape(count, b, u * n, h // u, d).unbind(0))


def _ulysses_gather_heads(x: torch.Tensor, axis: parallel_state.Axis,
                          replicated: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`_ulysses_scatter_heads`: (B, u*n, H/u, D) -> (B, n, H, D).

    ``replicated`` (B, T, H/u, D), this rank's heads of the replicated tokens' output, rides in the same
    all-to-all (appended to every destination's slot) and comes back whole: (B, T, H, D).
    """
    b, un, hu, d = x.shape
    u, n = axis.size, un // axis.size
    text_len = 0 if replicated is None else replicated.shape[1]
    send = x.new_empty(u, b, n + text_len, hu, d)  # slot = destination's token chunk (+ the text)
    send[:, :, :n].copy_(x.view(b, u, n, hu, d).transpose(0, 1))
    if replicated is not None:
        send[:, :, n:].copy_(replicated.unsqueeze(0).expand(u, -1, -1, -1, -1))
    received = _all_to_all(send, axis.group, u)  # slot = source's head group
    out = received[:, :, :n].permute(1, 2, 0, 3, 4).reshape(b, n, u * hu, d)
    if replicated is None:
        return out, None
    return out, received[:, :, n:].permute(1, 2, 0, 3, 4).reshape(b, text_len, u * hu, d)


def _heads_of(x: torch.Tensor, axis: parallel_state.Axis) -> torch.Tensor:
    """This Ulysses rank's heads of a replicated (B, T, H, D) tensor."""
    return x.chunk(axis.size, dim=2)[axis.rank]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    from diffgen.layers.attention import sdpa

    return sdpa(q, k, v, mask)


def _joint_sdpa(query, text_kv, kv, text_mask):
    from diffgen.layers.attention import joint_sdpa

    return joint_sdpa(query, text_kv, kv, text_mask)


def _sdpa_with_lse(q, k, v, mask):
    from diffgen.layers.attention import sdpa_with_lse

    return sdpa_with_lse(q, k, v, mask)


def sequence_parallel_attention(shard: TokenShard, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                replicated: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                                mask: torch.Tensor | None):
    """Self-attention of this rank's tokens (B, n, H, D) against the whole sequence (+ replicated text first).

    Returns this rank's output tokens, and the replicated tokens' output when ``replicated`` is given.
    ``mask``: (B, T) bool over the replicated keys, or None.
    """
    state = parallel_state.current()
    uly, ring = state.ulysses, state.ring
    text_len = replicated[0].shape[1] if replicated is not None else 0
    if uly.size > 1:
        q, k, v = _ulysses_scatter_heads((q, k, v), uly)
        if replicated is not None:
            replicated = tuple(_heads_of(t, uly) for t in replicated)
    # Tokens of this ring rank: chunks ring_rank*u .. ring_rank*u + u - 1, contiguous.
    block = q.shape[1]

    if ring.size == 1:
        valid = shard.valid_in(0, block)
        if replicated is not None:
            out = _joint_sdpa(torch.cat([replicated[0], q], 1), replicated[1:], (k[:, :valid], v[:, :valid]), mask)
        else:
            out = _sdpa(q, k[:, :valid], v[:, :valid], None)
    else:
        out = _ring_attention(shard, ring, q, k, v, replicated, mask, block)

    text_out, out = out.split([text_len, out.shape[1] - text_len], dim=1)
    if uly.size > 1:
        out, text_out = _ulysses_gather_heads(out, uly, text_out if replicated is not None else None)
    return out if replicated is None else (out, text_out)


def _ring_attention(shard, ring, q, k, v, replicated, mask, block):
    """Queries [text, own block] against the text keys and every ring rank's block, merged by log-sum-exp."""
    if replicated is not None:
        q = torch.cat([replicated[0], q], 1)
    merged_out = merged_lse = None

    def merge(out: torch.Tensor, lse: torch.Tensor):
        # out (B, L, H, D), lse (B, H, L) float32: running merge as in torch's context parallel
        nonlocal merged_out, merged_lse
        out, lse = out.float(), lse.transpose(1, 2).unsqueeze(-1)  # (B, L, H, 1)
        if merged_out is None:
            merged_out, merged_lse = out, lse
            return
        new_lse = torch.logaddexp(merged_lse, lse)
        weight_old, weight_new = torch.exp(merged_lse - new_lse), torch.exp(lse - new_lse)
        # a block with no visible key has lse -inf: weight 0 (and its NaN output must not leak through)
        merged_out = torch.nan_to_num(merged_out * weight_old) + torch.nan_to_num(out * weight_new)
        merged_lse = new_lse

    if replicated is not None:
        merge(*_sdpa_with_lse(q, replicated[1], replicated[2], mask))
    kv = torch.stack([k, v])
    for step in range(ring.size):
        source = (ring.rank - step) % ring.size
        pending = None
        if step < ring.size - 1:
            incoming = torch.empty_like(kv)
            next_rank = ring.ranks[(ring.rank + 1) % ring.size]
            prev_rank = ring.ranks[(ring.rank - 1) % ring.size]
            ops = [dist.P2POp(dist.isend, kv, next_rank, group=ring.group),
                   dist.P2POp(dist.irecv, incoming, prev_rank, group=ring.group)]
            pending = dist.batch_isend_irecv(ops)
        valid = shard.valid_in(source * block, block)
        if valid:
            merge(*_sdpa_with_lse(q, kv[0][:, :valid], kv[1][:, :valid], None))
        if pending is not None:
            for request in pending:
                request.wait()
            kv = incoming
    return merged_out.to(q.dtype)
