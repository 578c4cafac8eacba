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

Text tokens are replicated by default (every rank holds the whole text and runs it through every
layer). A DiT whose text runs through the same blocks as its image tokens (FLUX: a text stream in the
double blocks, one joint sequence in the single blocks) declares ``shard_tokens(n, text_length=T)``:
its text is split over the group too (``split_text``), each rank's text chunk travels with its tokens
in the same exchange, and attention sees the whole text; only the linear and elementwise work of the
text is divided. Each rank's block is then [text chunk, token chunk]: attention's keys need no order,
so the gathered blocks are attended as they arrive.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from diffgen.parallel import state as parallel_state

_active: TokenShard | None = None


class TokenShard:
    """The image/video tokens of one DiT forward, split over the sequence-parallel group."""

    def __init__(self, length: int, axis: parallel_state.Axis | None, text_length: int = 0):
        self.length = length
        self.axis = axis
        self.degree = axis.size if axis is not None else 1
        self.chunk = math.ceil(length / self.degree)
        #: > 0: the text tokens are split too (``split_text``), ``text_chunk`` per rank, padded at the end
        self.text_length = text_length if self.degree > 1 else 0
        self.text_chunk = math.ceil(text_length / self.degree)

    @property
    def padded_length(self) -> int:
        return self.chunk * self.degree

    def valid_in(self, start: int, size: int) -> int:
        """How many real (not padding) tokens lie in positions [start, start + size)."""
        return max(0, min(size, self.length - start))

    def text_valid_in(self, start: int, size: int) -> int:
        """How many real text tokens lie in positions [start, start + size) of the padded text."""
        return max(0, min(size, self.text_length - start))

    def count_below(self, end: int) -> int:
        """How many of this rank's tokens have a global index below ``end`` (for a span at the start, e.g. a
        first frame): they are this shard's first ones."""
        start = self.axis.rank * self.chunk if self.degree > 1 else 0
        return max(0, min(self.chunk, end - start, self.length - start))

    def split(self, tensor, dim: int = 1, prefix: int = 0):
        """This rank's part of a per-token tensor (or of each tensor of a tuple, e.g. RoPE cos/sin).

        The tokens are ``tensor``'s entries ``prefix ..`` along ``dim``; the first ``prefix`` entries
        (text tokens of a joint RoPE table) are kept on every rank, or split as ``split_text`` splits the
        text when the shard splits it. A size-1 (broadcast) dim passes unchanged.
        """
        if isinstance(tensor, (tuple, list)):
            return type(tensor)(self.split(t, dim, prefix) for t in tensor)
        if self.degree == 1 or (tensor.shape[dim] == 1 and self.length != 1):
            return tensor
        if tensor.shape[dim] != prefix + self.length:
            raise ValueError(f"split: {tensor.shape[dim]} entries along dim {dim}, expected {prefix} + {self.length}")
        kept, tokens = tensor.split([prefix, self.length], dim=dim)
        part = self._chunk_of(tokens, dim, self.chunk)
        if prefix and self.text_length:
            kept = self.split_text(kept, dim)
        return torch.cat([kept, part], dim=dim) if prefix else part.contiguous()

    def split_text(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's chunk of the text tokens when the shard splits the text (else the whole text)."""
        if not self.text_length:
            return tensor
        if tensor.shape[dim] != self.text_length:
            raise ValueError(f"split_text: {tensor.shape[dim]} text tokens along dim {dim}, expected "
                             f"{self.text_length}")
        return self._chunk_of(tensor, dim, self.text_chunk).contiguous()

    def _chunk_of(self, tensor: torch.Tensor, dim: int, chunk: int) -> torch.Tensor:
        """This rank's ``chunk`` entries of ``tensor`` along ``dim``, zeros padding the end to ``chunk * degree``."""
        missing = chunk * self.degree - tensor.shape[dim]
        if missing:
            pad_shape = list(tensor.shape)
            pad_shape[dim] = missing
            tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
        return tensor.narrow(dim, self.axis.rank * chunk, chunk)

    def gather(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence back on every rank (padding dropped); ends the sharded region."""
        global _active
        if _active is self:
            _active = None
        return self._gather(tensor, dim, self.length)

    def gather_text(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole text back on every rank from each rank's text chunk (the region goes on)."""
        return self._gather(tensor, dim, self.text_length) if self.text_length else tensor

    def _gather(self, tensor: torch.Tensor, dim: int, length: int) -> torch.Tensor:
        if self.degree == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.degree)]
        dist.all_gather(parts, tensor, group=self.axis.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, length)


def shard_tokens(length: int, text_length: int = 0) -> TokenShard:
    """Start a sharded region of ``length`` image/video tokens (a no-op shard without sequence parallelism).

    ``text_length`` > 0: the DiT's ``text_length`` text tokens are split over the group too; it takes its
    chunk with ``split_text`` and passes that chunk to attention as the ``replicated`` part (a text mask,
    if any, stays whole: (B, text_length)). Worth it where the text runs through the blocks' linears
    (FLUX: 512 text tokens beside 4096 image tokens at 1024², ~11% of each block's work).
    """
    global _active
    state = parallel_state.current()
    if state is None or state.sp.size == 1:
        return TokenShard(length, None)
    _active = TokenShard(length, state.sp, text_length)
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


def _ulysses_scatter_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           replicated: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                           axis: parallel_state.Axis) -> torch.Tensor:
    """(B, n, H, D) q, k, v of this rank's tokens -> (3, B, T + u*n, H/u, D): q, k and v of [the replicated
    tokens, the group's tokens] for this rank's heads, the sequence attention reads.

    q, k and v travel in one all-to-all, and land in place beside the text: at FLUX/Qwen-Image sizes a
    collective's and an op's fixed cost, not their bytes, is what Ulysses pays (docs/benchmarks.md).
    """
    b, n, h, d = q.shape
    u, hu = axis.size, h // axis.size
    text_len = 0 if replicated is None else replicated[0].shape[1]
    send = torch.stack([t.view(b, n, u, hu, d).permute(2, 0, 1, 3, 4) for t in (q, k, v)], dim=1)
    received = _all_to_all(send, axis.group, u)  # (u: source's token chunk, 3, B, n, H/u, D)
    joint = q.new_empty(3, b, text_len + u * n, hu, d)
    joint[:, :, text_len:].view(3, b, u, n, hu, d).copy_(received.permute(1, 2, 0, 3, 4, 5))
    if replicated is not None:
        joint[:, :, :text_len].copy_(torch.stack(replicated)[:, :, :, axis.rank * hu:(axis.rank + 1) * hu])
    return joint


def _ulysses_gather_heads(out: torch.Tensor, text_len: int,
                          axis: parallel_state.Axis) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_ulysses_scatter_heads` for attention's output (B, T + u*n, H/u, D): this rank's
    tokens (B, n, H, D) and the replicated tokens' output (B, T, H, D), both in one all-to-all."""
    b, length, hu, d = out.shape
    u = axis.size
    n = (length - text_len) // u
    send = torch.cat([out[:, text_len:].unflatten(1, (u, n)).transpose(0, 1),  # slot = destination's chunk
                      out[:, :text_len].unsqueeze(0).expand(u, -1, -1, -1, -1)], dim=2)  # + the text, to all
    received = _all_to_all(send, axis.group, u)  # (u: source's head group, B, n + T, H/u, D)

    def all_heads(part: torch.Tensor) -> torch.Tensor:
        return part.permute(1, 2, 0, 3, 4).reshape(b, part.shape[2], u * hu, d)

    return all_heads(received[:, :, :n]), all_heads(received[:, :, n:])


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
    ``mask``: (B, T) bool over the replicated keys, or None. When the shard splits the text, ``replicated``
    is this rank's text chunk (and the output its chunk's), ``mask`` still covers the whole text.
    """
    state = parallel_state.current()
    uly, ring = state.ulysses, state.ring
    if replicated is not None and shard.text_length:
        return _attention_with_text_chunks(shard, uly, ring, (q, k, v), replicated, mask)
    text_len = replicated[0].shape[1] if replicated is not None else 0
    joint = None
    if uly.size > 1:  # queries, keys and values of [text, the Ulysses group's tokens], this rank's heads
        joint = _ulysses_scatter_heads(q, k, v, replicated, uly)
        q, k, v = joint.unbind(0)
        text_kv = (k[:, :text_len], v[:, :text_len]) if replicated is not None else None
        k, v = k[:, text_len:], v[:, text_len:]
    else:
        text_kv = replicated[1:] if replicated is not None else None
        q = torch.cat([replicated[0], q], 1) if replicated is not None else q
    # Tokens of this ring rank: chunks ring_rank*u .. ring_rank*u + u - 1, contiguous.
    block = k.shape[1]

    if ring.size == 1:
        keys = shard.valid_in(0, block)  # padding sits at the end of the sequence: cut, no mask needed
        if text_kv is None:
            out = _sdpa(q, k[:, :keys], v[:, :keys], None)
        elif joint is not None and mask is None:  # text and tokens already side by side
            out = _sdpa(q, joint[1, :, :text_len + keys], joint[2, :, :text_len + keys], None)
        else:
            out = _joint_sdpa(q, text_kv, (k[:, :keys], v[:, :keys]), mask)
    else:
        out = _ring_attention(shard, ring, q, k, v, text_kv, mask, block)

    if uly.size > 1:
        out, text_out = _ulysses_gather_heads(out, text_len, uly)
    else:
        text_out, out = out.split([text_len, out.shape[1] - text_len], dim=1)
    return out if replicated is None else (out, text_out)


def _ring_attention(shard, ring, q, k, v, text_kv, mask, block):
    """Queries [text, own block] against the text keys and every ring rank's block, merged by log-sum-exp."""
    merged = _LseMerge()
    if text_kv is not None:
        merged.add(*_sdpa_with_lse(q, text_kv[0], text_kv[1], mask))
    kv = torch.stack([k, v])
    for step in range(ring.size):
        source = (ring.rank - step) % ring.size
        pending, incoming = _pass_on(ring, kv) if step < ring.size - 1 else (None, None)
        valid = shard.valid_in(source * block, block)
        if valid:
            merged.add(*_sdpa_with_lse(q, kv[0][:, :valid], kv[1][:, :valid], None))
        if pending is not None:
            for request in pending:
                request.wait()
            kv = incoming
    return merged.out.to(q.dtype)


class _LseMerge:
    """Running merge of partial attention outputs by their log-sum-exp, in float32 (as torch's context parallel)."""

    def __init__(self):
        self.out = self.lse = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        """``out`` (B, L, H, D), ``lse`` (B, H, L) float32."""
        out, lse = out.float(), lse.transpose(1, 2).unsqueeze(-1)  # (B, L, H, 1)
        if self.out is None:
            self.out, self.lse = out, lse
            return
        new_lse = torch.logaddexp(self.lse, lse)
        weight_old, weight_new = torch.exp(self.lse - new_lse), torch.exp(lse - new_lse)
        # a block with no visible key has lse -inf: weight 0 (and its NaN output must not leak through)
        self.out = torch.nan_to_num(self.out * weight_old) + torch.nan_to_num(out * weight_new)
        self.lse = new_lse


def _pass_on(ring: parallel_state.Axis, kv: torch.Tensor):
    """Send ``kv`` to the next ring rank and receive the previous one's: (pending requests, incoming buffer)."""
    incoming = torch.empty_like(kv)
    next_rank = ring.ranks[(ring.rank + 1) % ring.size]
    prev_rank = ring.ranks[(ring.rank - 1) % ring.size]
    ops = [dist.P2POp(dist.isend, kv, next_rank, group=ring.group),
           dist.P2POp(dist.irecv, incoming, prev_rank, group=ring.group)]
    return dist.batch_isend_irecv(ops), incoming


# -- attention when the text is split too ---------------------------------------------------------------


def _attention_with_text_chunks(shard: TokenShard, uly: parallel_state.Axis, ring: parallel_state.Axis,
                                tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                                text: tuple[torch.Tensor, torch.Tensor, torch.Tensor], mask: torch.Tensor | None):
    """Each rank holds [text chunk, token chunk] (B, tc + n, H, D) of q, k, v: attention of those queries
    against the whole text and every token; returns (token output, text chunk output).

    Ulysses: one all-to-all carries both parts; the received blocks are attended in the order they arrive,
    [text 0, tokens 0, text 1, tokens 1, ...] (keys have no order; only padding is cut). Ring: that
    block of a ring rank travels around the ring whole.
    """
    b, n, h, d = tokens[0].shape
    text_chunk, u = text[0].shape[1], uly.size
    block = [torch.cat(pair, dim=1) for pair in zip(text, tokens, strict=True)]  # (B, tc + n, H, D) each
    if u > 1:
        send = torch.stack([t.view(b, text_chunk + n, u, h // u, d).permute(2, 0, 1, 3, 4) for t in block], dim=1)
        received = _all_to_all(send, uly.group, u)  # (u: source's chunk, 3, B, tc + n, H/u, D)
        block = received.permute(1, 2, 0, 3, 4, 5).reshape(3, b, u * (text_chunk + n), h // u, d).unbind(0)
    q, k, v = block
    if mask is not None and mask.shape[1] != shard.text_length:
        raise ValueError(f"text mask covers {mask.shape[1]} tokens, the shard's text has {shard.text_length}")
    if ring.size == 1:
        out = _attend_blocks(shard, q, k, v, 0, u, text_chunk, n, mask, with_lse=False)
    else:
        out = _ring_over_blocks(shard, ring, q, torch.stack([k, v]), u, text_chunk, n, mask)
    if u > 1:
        send = out.unflatten(1, (u, text_chunk + n)).transpose(0, 1)  # slot = the chunk's owner
        received = _all_to_all(send, uly.group, u)  # (u: source's head group, B, tc + n, H/u, D)
        out = received.permute(1, 2, 0, 3, 4).reshape(b, text_chunk + n, h, d)
    return out[:, text_chunk:], out[:, :text_chunk]


def _attend_blocks(shard: TokenShard, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_chunk: int,
                   chunks: int, text_chunk: int, chunk: int, mask: torch.Tensor | None, with_lse: bool):
    """``q`` against keys/values laid out as [text, tokens] of ``chunks`` consecutive chunks from ``first_chunk``;
    padding cut off, the text mask applied. With ``with_lse`` returns (out, lse) for a ring merge, or None when
    the block holds no real key."""
    text_runs, token_runs = [], []
    for c in range(chunks):
        start, g = c * (text_chunk + chunk), first_chunk + c
        text_runs.append((start, shard.text_valid_in(g * text_chunk, text_chunk)))
        token_runs.append((start + text_chunk, shard.valid_in(g * chunk, chunk)))
    every_key = sum(length for _, length in text_runs + token_runs) == k.shape[1]
    if not every_key or mask is not None:
        cut = lambda t, runs: torch.cat([t[:, s:s + length] for s, length in runs if length], dim=1)  # noqa: E731
        text_valid = sum(length for _, length in text_runs)
        text_mask = None if mask is None else mask[:, first_chunk * text_chunk:first_chunk * text_chunk + text_valid]
        if with_lse:
            runs = text_runs + token_runs
            if not any(length for _, length in runs):
                return None
            if text_mask is not None:
                token_valid = sum(length for _, length in token_runs)
                text_mask = torch.cat([text_mask.bool(), text_mask.new_ones(q.shape[0], token_valid, dtype=torch.bool)],
                                      dim=1)
            return _sdpa_with_lse(q, cut(k, runs), cut(v, runs), text_mask)
        if text_mask is not None and text_valid:
            return _joint_sdpa(q, (cut(k, text_runs), cut(v, text_runs)), (cut(k, token_runs), cut(v, token_runs)),
                               text_mask)
        k, v = cut(k, text_runs + token_runs), cut(v, text_runs + token_runs)
    return _sdpa_with_lse(q, k, v, None) if with_lse else _sdpa(q, k, v, None)


def _ring_over_blocks(shard, ring, q, kv, chunks, text_chunk, chunk, mask):
    """:func:`_attend_blocks` against every ring rank's block in turn (passed around the ring), merged by
    log-sum-exp."""
    merged = _LseMerge()
    for step in range(ring.size):
        source = (ring.rank - step) % ring.size
        pending, incoming = _pass_on(ring, kv) if step < ring.size - 1 else (None, None)
        part = _attend_blocks(shard, q, kv[0], kv[1], source * chunks, chunks, text_chunk, chunk, mask,
                              with_lse=True)
        if part is not None:
            merged.add(*part)
        if pending is not None:
            for request in pending:
                request.wait()
            kv = incoming
    return merged.out.to(q.dtype)
