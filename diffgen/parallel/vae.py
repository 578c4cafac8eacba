"""Parallel VAE decode for the Wan-family causal video VAEs (Wan2.1, Wan2.2, Qwen-Image's), exact.

The ranks of a replica split the frame along its longer side (the columns of a landscape video: at
720p 160 latent columns against 90 rows). Everything before the decoder's up path (the 1x1
post-quant conv, conv_in and the mid block with its whole-frame attention) runs on the whole latent
on every rank. Every layer of the up path is local (3x3 convolutions, nearest upsampling, per-pixel
RMS norms), so each up block only needs its rank's slice plus a halo as wide as the receptive field of
the layers still to come: at each up block's input the slice is cut down to that (``stage_halos``;
Wan2.1: 13 latent columns before the first block, 7 full-resolution columns before the last), so the
expensive full-resolution stages carry a few pixels of halo, not the first stage's 13 latent columns
(x8). The kept columns equal the single-GPU decode, and an all-gather stitches them. Time is not split:
the causal cache carries every frame's features into the next.

The 2-D VAE of FLUX normalises with GroupNorm over the whole image, so no split of it is exact; it is
left alone.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffgen.parallel import state as parallel_state


def stage_halos(vae) -> list[int]:
    """Per up block of the decoder: the pixels of context on each side (at that block's input resolution)
    that the rest of the decoder reads, i.e. its receptive field from there to the output.

    Each up block runs num_res_blocks + 1 residual blocks of two 3x3 convolutions (1 pixel each), then,
    except the last, a 2x nearest upsampling and a 3x3 convolution at the doubled resolution; conv_out
    (3x3) follows the last block.
    """
    config = vae.config
    stages = len(config.dim_mult)
    convs = 2 * (config.num_res_blocks + 1)
    needed = 1  # conv_out
    halos = []
    for stage in reversed(range(stages)):
        if stage < stages - 1:  # this block upsamples: its output pixel p reads input pixel p // 2
            needed = math.ceil((needed + 1) / 2)  # + the 3x3 conv after the upsampling
        needed += convs
        halos.append(needed)
    return halos[::-1]


def supports_parallel_decode(vae) -> bool:
    """diffusers' Wan-family VAEs and diffgen's decode-only one (the same decoder network)."""
    from diffgen.models.vaes.wan import SUPPORTED_VAES, WanDecodingVAE

    return type(vae).__name__ in SUPPORTED_VAES or isinstance(vae, WanDecodingVAE)


def install_parallel_decode(vae) -> None:
    """Make ``vae.decode`` split its frames over the replica group whenever a parallel state is active."""
    if getattr(vae, "_diffgen_parallel_decode", False) or not supports_parallel_decode(vae):
        return
    whole_decode = vae.decode

    def decode(z: torch.Tensor, return_dict: bool = True):
        state = parallel_state.current()
        if state is None or state.replica.size == 1:
            return whole_decode(z, return_dict=return_dict)
        out = decode_split(vae, whole_decode, z, state.replica)
        return (out,) if not return_dict else types.SimpleNamespace(sample=out)

    vae.decode = decode
    vae._diffgen_parallel_decode = True


@dataclass(frozen=True)
class _Slice:
    """This rank's part of one spatial axis: latent pixels [start, stop), and per up block the interval
    (at that block's resolution) it computes, its part plus the halo, within the frame."""

    start: int
    stop: int
    blocks: tuple[tuple[int, int], ...]
    inputs: tuple[tuple[int, int], ...]  # what each up block receives: the frame, then the previous interval x 2

    @property
    def last_scale(self) -> int:
        """The last up block's input resolution / the latent's (each block before it doubles)."""
        return 2 ** (len(self.blocks) - 1)


def _slice(length: int, start: int, stop: int, halos: list[int]) -> _Slice:
    blocks, inputs, have = [], [], (0, length)
    for index, halo in enumerate(halos):
        scale = 2**index
        # within what the previous block computed (stage_halos nest by construction; thinner test halos may not)
        low, high = max(have[0], start * scale - halo), min(have[1], stop * scale + halo)
        inputs.append(have)
        blocks.append((low, high))
        have = (2 * low, 2 * high)
    return _Slice(start, stop, tuple(blocks), tuple(inputs))


def decode_split(vae, whole_decode, z: torch.Tensor, axis: parallel_state.Axis, dim: int | None = None,
                 halos: list[int] | None = None) -> torch.Tensor:
    """The decode of ``z`` (B, C, T, H, W), one spatial axis split over ``axis``; the whole video on every rank.

    ``dim``: -2 (rows) or -1 (columns); default the longer. ``halos``: per up block, the context kept on each
    side (default :func:`stage_halos`, the least that is exact; benchmarks and tests pass others).
    """
    dim = (-1 if z.shape[-1] > z.shape[-2] else -2) if dim is None else dim
    length = z.shape[dim]
    chunk = math.ceil(length / axis.size)
    if (axis.size - 1) * chunk >= length:  # too few pixels for every rank to hold some: no split
        return whole_decode(z, return_dict=False)[0]
    from diffgen.models.vaes.wan import decoder_of

    blocks = decoder_of(vae).up_blocks
    halos = stage_halos(vae) if halos is None else halos
    if len(halos) != len(blocks):
        raise ValueError(f"halos: {len(halos)} values for {len(blocks)} up blocks")
    part = _slice(length, axis.rank * chunk, min(length, (axis.rank + 1) * chunk), halos)
    hooks = [block.register_forward_pre_hook(_crop_hook(part, index, dim), with_kwargs=True)
             for index, block in enumerate(blocks)]
    native = getattr(vae, "native_decoder", None)
    last_low, last_high = part.blocks[-1]
    if native is not None:  # its chunks of frames may grow as this rank's share of each frame shrinks
        native.frame_share = (last_high - last_low) / (length * part.last_scale)
    try:
        out = whole_decode(z, return_dict=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
        if native is not None:
            native.frame_share = 1.0
    scale = out.shape[dim] // (last_high - last_low)  # output pixels per pixel of the last block's input
    begin = (part.start * part.last_scale - last_low) * scale
    mine = out.narrow(dim, begin, (part.stop - part.start) * part.last_scale * scale)
    full = chunk * part.last_scale * scale
    if mine.shape[dim] < full:  # the last rank's piece may be shorter: pad for the all-gather
        pad = list(mine.shape)
        pad[dim] = full - mine.shape[dim]
        mine = torch.cat([mine, mine.new_zeros(pad)], dim=dim)
    mine = mine.contiguous()
    pieces = [torch.empty_like(mine) for _ in range(axis.size)]
    dist.all_gather(pieces, mine, group=axis.group)
    return torch.cat(pieces, dim=dim).narrow(dim, 0, length * part.last_scale * scale)


def _crop_hook(part: _Slice, index: int, dim: int):
    """A forward pre-hook for up block ``index``: its input (the previous block's interval, or the whole frame
    before the first) cut down to ``part.blocks[index]``."""
    low, high = part.blocks[index]
    have_low, have_high = part.inputs[index]

    def crop(module, args, kwargs):
        x = args[0]
        if x.shape[dim] != have_high - have_low:
            raise RuntimeError(f"parallel VAE decode: up block {index} got {x.shape[dim]} pixels along dim {dim}, "
                               f"expected {have_high - have_low} (a decoder of another structure?)")
        if (low, high) == (have_low, have_high):
            return None
        layout = torch.channels_last_3d if x.ndim == 5 and x.is_contiguous(
            memory_format=torch.channels_last_3d) and not x.is_contiguous() else torch.contiguous_format
        x = x.narrow(dim, low - have_low, high - low).contiguous(memory_format=layout)
        return (x, *args[1:]), kwargs

    return crop
