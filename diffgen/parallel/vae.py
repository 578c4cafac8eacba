"""Parallel VAE decode for the Wan-family causal video VAEs (Wan2.1, Wan2.2, Qwen-Image's), exact.

The ranks of a replica split the latent rows. Everything before the decoder's up path (the 1x1
post-quant conv, conv_in and the mid block with its whole-frame attention) runs on the whole latent
on every rank; from the first up block on, each rank keeps its rows plus a halo of ``decoder_halo``
rows on each side. Every layer of the up path is local (3x3 convolutions, nearest upsampling,
per-pixel RMS norms), so the halo absorbs the edge effects completely when it is at least the up
path's receptive field: the kept rows equal the single-GPU decode, and an all-gather stitches them.
Time is not split: the causal cache carries every frame's features into the next.

The 2-D VAE of FLUX normalises with GroupNorm over the whole image, so no split of it is exact; it is
left alone.
"""

from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist

from diffgen.parallel import state as parallel_state


def decoder_halo(vae) -> int:
    """Latent rows of context the decoder's up path needs on each side (its receptive field, rounded up, + 1)."""
    config = vae.config
    stages = len(config.dim_mult)
    rows = 0.0
    for stage in range(stages):
        rows += 2 * (config.num_res_blocks + 1) / 2**stage  # two 3x3 convs per residual block
        if stage < stages - 1:
            rows += 1 / 2 ** (stage + 1)  # the upsampler's 3x3 conv, at the doubled resolution
    rows += 1 / 2 ** (stages - 1)  # conv_out
    return math.ceil(rows) + 1


def supports_parallel_decode(vae) -> bool:
    return type(vae).__name__ in ("AutoencoderKLWan", "AutoencoderKLQwenImage")


def install_parallel_decode(vae) -> None:
    """Make ``vae.decode`` split its rows over the replica group whenever a parallel state is active."""
    if getattr(vae, "_diffgen_parallel_decode", False) or not supports_parallel_decode(vae):
        return
    whole_decode = vae.decode

    def decode(z: torch.Tensor, return_dict: bool = True):
        state = parallel_state.current()
        if state is None or state.replica.size == 1:
            return whole_decode(z, return_dict=return_dict)
        out = decode_rows(vae, whole_decode, z, state.replica)
        return (out,) if not return_dict else types.SimpleNamespace(sample=out)

    vae.decode = decode
    vae._diffgen_parallel_decode = True


def decode_rows(vae, whole_decode, z: torch.Tensor, axis: parallel_state.Axis, halo: int | None = None):
    """The decode of ``z`` (B, C, T, H, W), its H latent rows split over ``axis``; the whole output on every rank."""
    rows = z.shape[-2]
    chunk = math.ceil(rows / axis.size)
    if (axis.size - 1) * chunk >= rows:  # too few rows for every rank to hold some: no split
        return whole_decode(z, return_dict=False)[0]
    halo = decoder_halo(vae) if halo is None else halo
    start, stop = axis.rank * chunk, min(rows, (axis.rank + 1) * chunk)
    low, high = max(0, start - halo), min(rows, stop + halo)

    def crop(module, args, kwargs):
        return (args[0][..., low:high, :], *args[1:]), kwargs

    from diffgen.models.vaes.wan import decoder_of

    handle = decoder_of(vae).up_blocks[0].register_forward_pre_hook(crop, with_kwargs=True)
    try:
        out = whole_decode(z, return_dict=False)[0]
    finally:
        handle.remove()
    scale = out.shape[-2] // (high - low)
    mine = out[..., (start - low) * scale:(stop - low) * scale, :]
    if mine.shape[-2] < chunk * scale:  # the last rank's piece may be shorter: pad for the all-gather
        pad = list(mine.shape)
        pad[-2] = chunk * scale - mine.shape[-2]
        mine = torch.cat([mine, mine.new_zeros(pad)], dim=-2)
    mine = mine.contiguous()
    pieces = [torch.empty_like(mine) for _ in range(axis.size)]
    dist.all_gather(pieces, mine, group=axis.group)
    return torch.cat(pieces, dim=-2)[..., :rows * scale, :]
