"""The decoder of the Wan-family causal video VAE (Wan2.1, Wan2.2, Qwen-Image), several latent frames per call.

diffusers' ``AutoencoderKLWan`` (and ``AutoencoderKLQwenImage``, the same network) decodes one latent
frame per call, each causal convolution carrying its last input frames to the next call in a cache:
at 81 frames 480x832 that is 21 passes of many small convolutions and copies. The function is a
causal convolution over the whole sequence, so here a chunk of several latent frames goes through
each layer at once, with the convolution's left context (its last 2 input frames, zeros at the start)
written in front of the chunk. On CUDA the activations stay channels-last and each RMS norm + SiLU
is one Triton pass that writes straight into the next convolution's input (context included).

The parameters are the VAE's own (the very tensors, under the same names): ``use_native_decoder``
makes ``vae.decode`` run this decoder; encoding and the tiled decode stay diffusers'. Pipelines that only
decode (Wan text-to-video, Qwen-Image text-to-image) load :class:`WanDecodingVAE` instead, this decoder straight
from the checkpoint, without diffusers. Equal to diffusers' decode in float32 (tests/test_wan_vae.py), within bf16
rounding in bf16.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffgen.configs.mapping import MappingConfig
from diffgen.layers.fused import bias_residual_add, channel_rms_norm, use_fused_kernel
from diffgen.models.vaes import NATIVE_VAE_ENV

#: output pixels (frames x height x width) a chunk produces at least (on the CPU: always): 4 latent frames at 480x832
CHUNK_PIXELS = 16 * 480 * 832
#: peak bytes per output pixel of a chunk, per 96 decoder channels in bf16 (measured on an H100: peak memory grows
#: 1.27 GiB per 480x832 latent frame); on CUDA a chunk may use up to MEMORY_FRACTION of the free memory
BYTES_PER_PIXEL = 850
MEMORY_FRACTION = 0.5
SUPPORTED_VAES = ("AutoencoderKLWan", "AutoencoderKLQwenImage")


class ChannelRMSNorm(nn.Module):
    """RMS norm over the channel dimension (dim 1), scaled by sqrt(dim) and a learned gamma (diffusers' WanRMS_norm)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor, silu: bool = False, out: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias``: the previous convolution's, when that convolution left it out (added to x first)."""
        return channel_rms_norm(x, self.gamma, self.scale, silu=silu, out=out, bias=bias)


class WeightCache:
    """A tensor derived from a parameter, rebuilt when the parameter (its storage or in-place version, e.g. a LoRA
    merge), its dtype or the asked memory layout changes."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    def get(self, weight: torch.Tensor, memory_format: torch.memory_format,
            build: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, weight.dtype, memory_format)
        if self._key != key:
            self._key, self._value = key, build()
        return self._value


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution, causal in time: its input brings ``context_frames`` frames of left context in front
    (see :class:`CausalFrames`); height and width are zero-padded by the convolution itself."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int | tuple[int, int, int],
                 padding: int | tuple[int, int, int] = 0):
        kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        pad = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_dim, out_dim, kernel, padding=(0, pad[1], pad[2]))
        self.context_frames = 2 * pad[0]
        self._last_tap = WeightCache()

    def last_tap(self, memory_format: torch.memory_format) -> torch.Tensor:
        """The kernel's last temporal slice (all a frame with zero context sees), dense; kept while the weight is."""
        return self._last_tap.get(self.weight, memory_format,
                                  lambda: self.weight[:, :, -1:].contiguous(memory_format=memory_format))


class CausalFrames:
    """Each causal convolution's left context, carried from one chunk of frames to the next (zeros before the first),
    and how this decode runs its layers."""

    def __init__(self, memory_format: torch.memory_format, fold_biases: bool = False, subpixel: bool = True):
        self.memory_format = memory_format
        #: leave a convolution's bias out where the next pass over its output can add it (the norm kernel, the
        #: residual add, the frame-doubling copy): PyTorch adds a cuDNN convolution's bias in a pass of its own
        self.fold_biases = fold_biases
        #: the 2x upsampling and its 3x3 convolution as one sub-pixel convolution (:class:`UpsampledConv2d`)
        self.subpixel = subpixel
        self.saved: dict[CausalConv3d, torch.Tensor] = {}
        #: False for the last chunk: no later chunk reads the context (one image: none is ever kept)
        self.keep = True

    def conv(self, conv: CausalConv3d, x: torch.Tensor, norm: ChannelRMSNorm | None = None,
             norm_bias: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
        """``conv`` over x's frames (after ``norm`` + SiLU when given, ``norm_bias`` added before the norm), its left
        context in front; without the convolution's bias when ``bias`` is False (the caller adds it)."""
        n = conv.context_frames
        conv_bias = conv.bias if bias else None
        if n == 0:
            return F.conv3d(norm(x, silu=True, bias=norm_bias) if norm is not None else x, conv.weight, conv_bias,
                            padding=conv.padding)
        batch, channels, frames, height, width = x.shape
        left = self.saved.get(conv)
        if left is None and frames == 1:
            # The first frame's context is zeros: only the kernel's last temporal tap sees data.
            single = norm(x, silu=True, bias=norm_bias) if norm is not None else x
            if self.keep:
                self.saved[conv] = torch.cat([single.new_zeros(batch, channels, n - 1, height, width), single], dim=2)
            return F.conv3d(single, conv.last_tap(self.memory_format), conv_bias, padding=conv.padding)
        # One buffer holds the context and the (normalised) frames, so no concatenation copies the chunk.
        buffer = torch.empty(batch, channels, n + frames, height, width, dtype=x.dtype, device=x.device,
                             memory_format=self.memory_format)
        if left is None:
            buffer[:, :, :n].zero_()
        else:
            buffer[:, :, :n].copy_(left[:, :, -n:])
        if norm is not None:
            norm(x, silu=True, out=buffer[:, :, n:], bias=norm_bias)
        else:
            buffer[:, :, n:].copy_(x)
        if self.keep:
            self.saved[conv] = buffer[:, :, -n:].clone()
        return F.conv3d(buffer, conv.weight, conv_bias, padding=conv.padding)


class Upsample2x(nn.Module):
    """Nearest-exact 2x upsampling of (N, C, H, W) (exact in any dtype, so no float32 detour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


#: which of the 3x3 kernel's rows (or columns) fall on input row i - 1 + t (t = 0, 1) for output row 2i + phase
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],   # phase 0: rows 2i-1 (input i-1), 2i and 2i+1 (i)
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # phase 1: rows 2i, 2i+1 (input i), 2i+2 (i+1)


class UpsampledConv2d(nn.Conv2d):
    """A 3x3 convolution (zero padding 1) that runs on the 2x nearest upsampling of its input.

    Each output pixel (2i + a, 2j + b) sees a 3x3 window of the upsampled image, which covers only 2x2 input
    pixels; so the four phases (a, b) are four 2x2 convolutions of the input itself, their kernels sums of the
    3x3 kernel's taps (:meth:`phase_weight`). As one convolution (4 x out channels, padding 1, output one pixel
    larger each way) then one interleaving copy that also adds the bias: 16 instead of 36 multiply-adds per input
    pixel and channel pair, and no upsampled tensor (4x the input) written and read back. Same sums in another
    order (float32: equal to diffusers' upsample + conv within rounding).
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim, 3, padding=1)
        self._phase_weight = WeightCache()

    def phase_weight(self, memory_format: torch.memory_format) -> torch.Tensor:
        """(4 x out, in, 2, 2): phase (a, b)'s 2x2 kernel in output channels [(2a + b) out, (2a + b + 1) out)."""
        def build() -> torch.Tensor:
            exact = torch.promote_types(self.weight.dtype, torch.float32)  # the tap sums rounded once, at the end
            taps = _PHASE_TAPS.to(self.weight.device, exact)
            with torch.no_grad():  # a cache: no autograd graph kept (the decoder runs for inference only)
                weight = torch.einsum("apk,oikl,bql->aboipq", taps, self.weight.to(exact), taps)
            weight = weight.reshape(4 * self.out_channels, self.in_channels, 2, 2).to(self.weight.dtype)
            return weight.contiguous(memory_format=memory_format)

        return self._phase_weight.get(self.weight, memory_format, build)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), not upsampled -> (N, out, 2H, 2W). Inference only (under no_grad / inference_mode)."""
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.contiguous_format
        phases = F.conv2d(x, self.phase_weight(layout), None, padding=1)  # (N, 4 out, H + 1, W + 1)
        batch, _, height, width = x.shape
        out_dim = self.out_channels
        out = torch.empty(batch, out_dim, 2 * height, 2 * width, dtype=x.dtype, device=x.device, memory_format=layout)
        # output (n, c, 2i + a, 2j + b) = phases (n, (2a + b) out + c, i + a, j + b): one strided view of phases
        sn, sc, sh, sw = phases.stride()
        interleaved = phases.as_strided((batch, out_dim, height, 2, width, 2),
                                        (sn, sc, sh, 2 * out_dim * sc + sh, sw, out_dim * sc + sw),
                                        phases.storage_offset())
        torch.add(interleaved, self.bias.view(1, out_dim, 1, 1, 1, 1),
                  out=out.view(batch, out_dim, height, 2, width, 2))
        return out


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = ChannelRMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, frames: CausalFrames) -> torch.Tensor:
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        if not frames.fold_biases:
            x = frames.conv(self.conv1, x, self.norm1)
            x = frames.conv(self.conv2, x, self.norm2)
            return x.add_(shortcut)
        # conv1's bias goes into norm2's pass, conv2's into the residual add
        x = frames.conv(self.conv1, x, self.norm1, bias=False)
        x = frames.conv(self.conv2, x, self.norm2, norm_bias=self.conv1.bias, bias=False)
        return bias_residual_add(x, self.conv2.bias, shortcut)


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = x.shape
        h = x.transpose(1, 2).reshape(batch * frames, channels, height, width)
        qkv = self.to_qkv(self.norm(h))
        qkv = qkv.flatten(2).transpose(1, 2).unsqueeze(1)  # (B*F, 1, H*W, 3C)
        q, k, v = qkv.chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B*F, H*W, C)
        h = self.proj(h.transpose(1, 2).unflatten(2, (height, width)))
        return h.unflatten(0, (batch, frames)).transpose(1, 2) + x


class Resample(nn.Module):
    """2x spatial upsampling (+ a conv); ``upsample3d`` also doubles the frames (all but the first) with a causal
    time convolution whose 2C output channels are the two new frames."""

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        # a list, not a Sequential (its names are the checkpoint's): the conv may upsample by itself (subpixel)
        self.resample = nn.ModuleList([Upsample2x(), UpsampledConv2d(dim, out_dim or dim // 2)])
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, frames: CausalFrames, first_chunk: bool) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self.double_frames(x, frames, first_chunk)
        batch, _, time = x.shape[:3]
        x = x.transpose(1, 2).flatten(0, 1)  # per frame; a view when channels-last
        upsample, conv = self.resample
        x = conv(x) if frames.subpixel else nn.Conv2d.forward(conv, upsample(x))
        return x.unflatten(0, (batch, time)).transpose(1, 2)

    def double_frames(self, x: torch.Tensor, frames: CausalFrames, first_chunk: bool) -> torch.Tensor:
        head = x[:, :, :1] if first_chunk else None  # the video's first frame is not doubled
        rest = x[:, :, 1:] if first_chunk else x
        batch, channels, time, height, width = rest.shape
        out = torch.empty(batch, channels, (head is not None) + 2 * time, height, width, dtype=x.dtype,
                          device=x.device, memory_format=frames.memory_format)
        if head is not None:
            out[:, :, :1].copy_(head)
        if time:
            # (B, 2C, T, H, W): frame 2t from the first C channels; the bias added in the copy when folded
            doubled = frames.conv(self.time_conv, rest, bias=not frames.fold_biases)
            target = out[:, :, out.shape[2] - 2 * time:].unflatten(2, (time, 2))
            source = doubled.unflatten(1, (2, channels)).permute(0, 2, 3, 1, 4, 5)
            if frames.fold_biases:
                torch.add(source, self.time_conv.bias.view(2, channels).t().reshape(1, channels, 1, 2, 1, 1),
                          out=target)
            else:
                target.copy_(source)
        return out


def duplicate_up(x: torch.Tensor, out_channels: int, factor_t: int, factor_s: int, first_chunk: bool) -> torch.Tensor:
    """Wan2.2's parameter-free shortcut: channels rearranged into a factor_t x factor_s x factor_s upsampling."""
    batch, channels, time, height, width = x.shape
    repeats = out_channels * factor_t * factor_s * factor_s // channels
    x = x.repeat_interleave(repeats, dim=1).view(batch, out_channels, factor_t, factor_s, factor_s, time, height, width)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(batch, out_channels, time * factor_t, height * factor_s,
                                                   width * factor_s)
    return x[:, :, factor_t - 1:] if first_chunk else x


class UpBlock(nn.Module):
    """Residual blocks, then an upsampler (Wan2.1, Qwen-Image: ``upsamplers.0``; Wan2.2: ``upsampler`` plus the
    ``duplicate_up`` shortcut around the whole block)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None, residual: bool,
                 temporal: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResidualBlock(in_dim if i == 0 else out_dim, out_dim)
                                     for i in range(num_res_blocks + 1))
        self.residual = residual
        self.in_dim, self.out_dim, self.temporal = in_dim, out_dim, temporal
        self.upsampler = self.upsamplers = None
        if upsample_mode is not None and residual:
            self.upsampler = Resample(out_dim, upsample_mode, out_dim=out_dim)
        elif upsample_mode is not None:
            self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)])

    def forward(self, x: torch.Tensor, frames: CausalFrames, first_chunk: bool) -> torch.Tensor:
        shortcut = x
        for resnet in self.resnets:
            x = resnet(x, frames)
        upsampler = self.upsampler or (self.upsamplers[0] if self.upsamplers is not None else None)
        if upsampler is not None:
            x = upsampler(x, frames, first_chunk)
        if self.residual and self.upsampler is not None:
            x = x + duplicate_up(shortcut, self.out_dim, 2 if self.temporal else 1, 2, first_chunk)
        return x


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])

    def forward(self, x: torch.Tensor, frames: CausalFrames) -> torch.Tensor:
        x = self.resnets[0](x, frames)
        return self.resnets[1](self.attentions[0](x), frames)


class Decoder(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: list[int], num_res_blocks: int, temporal_upsample: list[bool],
                 out_channels: int, residual: bool):
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList()
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
            if i > 0 and not residual:
                in_dim //= 2  # Wan2.1's upsamplers halve the channels
            upsamples = i != len(dim_mult) - 1
            mode = None if not upsamples else "upsample3d" if temporal_upsample[i] else "upsample2d"
            self.up_blocks.append(UpBlock(in_dim, out_dim, num_res_blocks, mode, residual,
                                          temporal=upsamples and temporal_upsample[i]))
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, frames: CausalFrames, first_chunk: bool) -> torch.Tensor:
        x = frames.conv(self.conv_in, x)
        x = self.mid_block(x, frames)
        for block in self.up_blocks:
            x = block(x, frames, first_chunk)
        return frames.conv(self.conv_out, x, self.norm_out)


class WanVAEDecoder(nn.Module):
    """``post_quant_conv`` + ``decoder`` of a Wan-family VAE, under diffusers' parameter names.

    ``chunk_frames`` latent frames go through the network per call (None: on CUDA as many as fit half the
    free memory, at least :data:`CHUNK_PIXELS` output pixels; 1 is diffusers' schedule). Larger chunks
    are faster (Wan2.1 480x832x81 on an H100: 1066 ms one frame at a time, 1011 ms four, 853 ms all 21).
    """

    def __init__(self, config: Mapping[str, Any], chunk_frames: int | None = None):
        super().__init__()
        self.config = config
        #: activations channels-last (NDHWC, cuDNN's layout for 3-D convolutions); None: on CUDA only
        self.channels_last: bool | None = None
        #: convolution biases added in the passes that follow (:class:`CausalFrames`); None: where the Triton
        #: kernels run (on the CPU the convolution adds its bias for free)
        self.fold_biases: bool | None = None
        #: upsampling + 3x3 convolution as one sub-pixel convolution (:class:`UpsampledConv2d`); False: diffusers' way
        self.subpixel_upsample = True
        z_dim = config["z_dim"]
        self.patch_size = config.get("patch_size")
        self.chunk_frames = chunk_frames
        #: the part of each output frame this process computes (a split decode, diffgen/parallel/vae.py, lowers
        #: it while it runs, so that a chunk holds as many frames as this process's memory allows)
        self.frame_share = 1.0
        self.post_quant_conv = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder(
            dim=config.get("decoder_base_dim") or config["base_dim"], z_dim=z_dim, dim_mult=list(config["dim_mult"]),
            num_res_blocks=config["num_res_blocks"], temporal_upsample=list(config["temperal_downsample"])[::-1],
            out_channels=config.get("out_channels", 3),
            residual=bool(config.get("is_residual", False)))

    @classmethod
    def from_vae(cls, vae: nn.Module, chunk_frames: int | None = None) -> WanVAEDecoder:
        """A decoder over ``vae``'s own parameter objects (moving or casting the VAE moves these too).

        Strict: every parameter of ``vae.decoder`` and ``vae.post_quant_conv`` must find its place, and back.
        """
        with torch.device("meta"):
            native = cls(vae.config, chunk_frames)
        own = dict(native.named_parameters())
        theirs = {name: p for name, p in vae.named_parameters() if name.startswith(("decoder.", "post_quant_conv."))}
        missing, unexpected = sorted(own.keys() - theirs.keys()), sorted(theirs.keys() - own.keys())
        wrong = sorted(name for name in own.keys() & theirs.keys() if own[name].shape != theirs[name].shape)
        if missing or unexpected or wrong:
            raise ValueError(f"{type(vae).__name__} does not fit the native Wan VAE decoder: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
        for name, param in theirs.items():
            module_name, _, attr = name.rpartition(".")
            native.get_submodule(module_name)._parameters[attr] = param
        return native

    def frames_per_chunk(self, z: torch.Tensor) -> int:
        if self.chunk_frames is not None:
            return self.chunk_frames
        scale = self.config.get("scale_factor_spatial") or 8
        # 4 output frames per latent frame
        frame_pixels = max(1, int(4 * z.shape[-2] * z.shape[-1] * scale * scale * self.frame_share))
        budget = CHUNK_PIXELS
        if z.is_cuda:
            free, _ = torch.cuda.mem_get_info(z.device)
            free += torch.cuda.memory_reserved(z.device) - torch.cuda.memory_allocated(z.device)
            channels = self.config.get("decoder_base_dim") or self.config["base_dim"]
            per_pixel = BYTES_PER_PIXEL * channels / 96 * z.element_size() / 2 * z.shape[0]
            if not use_fused_kernel(z, "channel_norm"):
                per_pixel *= 1.6  # the plain norms' float32 intermediates (47.1 vs 29.6 GiB measured)
            budget = max(budget, int(free * MEMORY_FRACTION / per_pixel))
        return max(1, budget // frame_pixels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, z_dim, T, h, w) -> video (B, C, 1 + 4 (T - 1), H, W) in [-1, 1]."""
        channels_last = z.is_cuda if self.channels_last is None else self.channels_last
        memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        z = z.contiguous(memory_format=memory_format)
        x = self.post_quant_conv(z)
        fold = use_fused_kernel(z, "channel_norm") if self.fold_biases is None else self.fold_biases
        frames = CausalFrames(memory_format, fold_biases=fold, subpixel=self.subpixel_upsample)
        step = self.frames_per_chunk(z)
        chunks = []
        for start in range(0, x.shape[2], step):
            frames.keep = start + step < x.shape[2]
            chunks.append(self.decoder(x[:, :, start:start + step], frames, first_chunk=start == 0))
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
        if self.patch_size:
            out = unpatchify(out, self.patch_size)
        return out.clamp_(-1.0, 1.0)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """diffusers' ``decode`` interface: ``(video,)`` or an object with ``.sample``."""
        out = self(z)
        return SimpleNamespace(sample=out) if return_dict else (out,)


@dataclass(frozen=True)
class WanVAEConfig(MappingConfig):
    """config.json of diffusers' ``AutoencoderKLWan`` (the keys the decode and the pipelines read; diffusers'
    defaults); readable as attributes (``vae.config.z_dim``) and as a mapping (``vae.config.get(...)``)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8


class WanDecodingVAE(WanVAEDecoder):
    """diffusers' ``AutoencoderKLWan`` (and ``AutoencoderKLQwenImage``, the same network) for pipelines that only
    decode (Wan text-to-video, Qwen-Image text-to-image), loaded without diffusers.

    Importing diffusers' VAE class took ~5 s of a one-shot Wan run's critical path on an H200 (after the weight
    reads had finished; docs/benchmarks.md). The checkpoint's ``decoder.*`` and ``post_quant_conv.*`` tensors load
    strictly; the encoder's (``encoder.*``, ``quant_conv.*``) are not read, as these pipelines never encode.
    ``tiled_decode`` (frames over 1280x720) imports diffusers then and runs its tiled decode over these very
    parameters. Wan2.2's VAE (``is_residual``: TI2V-5B, which also encodes images) stays diffusers'.
    """

    config_class = WanVAEConfig
    native_env = NATIVE_VAE_ENV  # 0: diffusers' class (the loader's native_class)
    #: diffusers' tiling settings: set on this module, they reach the tiled decode
    TILE_SETTINGS = ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height",
                     "tile_sample_stride_width")

    def __init__(self, config: WanVAEConfig):
        super().__init__(config)
        self._tiled: nn.Module | None = None

    @classmethod
    def unsupported(cls, config: Mapping[str, Any]) -> str | None:
        """Why this config.json is not decoded here (None: it is): the loader then loads diffusers' class."""
        if config.get("is_residual") or config.get("patch_size"):
            return "Wan2.2's VAE (is_residual / patch_size)"
        if config.get("input_channels", 3) != 3:  # Qwen-Image's name for the image channels (RGBA variants: 4)
            return f"input_channels {config['input_channels']} (3 is built here)"
        if not config.get("latents_mean") or not config.get("latents_std"):
            return "no latents_mean / latents_std in its config.json"
        return None

    @classmethod
    def checkpoint_names(cls, keys: list[str]) -> dict[str, str | None]:
        """The encoder's tensors are not read (None); the rest keep their names."""
        return {key: None for key in keys if key.startswith(("encoder.", "quant_conv."))}

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    @property
    def native_decoder(self) -> WanDecodingVAE:
        """The decoder a split decode resizes its chunks on (diffgen/parallel/vae.py): this module itself."""
        return self

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        raise NotImplementedError(
            "this VAE was loaded for decoding only (WanDecodingVAE, for text-to-video / text-to-image pipelines); "
            f"set {NATIVE_VAE_ENV}=0 to load diffusers' class, which encodes")

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True):
        """diffusers' tiled decode, on a diffusers ``AutoencoderKLWan`` that holds this module's parameters (built
        on first use; its encoder stays on the meta device, unused)."""
        if self._tiled is None:
            from diffusers import AutoencoderKLWan

            with torch.device("meta"):
                tiled = AutoencoderKLWan.from_config({key: list(value) if isinstance(value, tuple) else value
                                                      for key, value in self.config.items()})
            object.__setattr__(self, "_tiled", tiled)  # not a submodule: the state dict stays this module's
        for name, parameter in self.named_parameters():  # every call: a parameter replaced since is seen
            module_name, _, attr = name.rpartition(".")
            self._tiled.get_submodule(module_name)._parameters[attr] = parameter
        for name in self.TILE_SETTINGS:  # set on this module as on diffusers' VAE (tests set small tiles)
            if name in self.__dict__:
                setattr(self._tiled, name, self.__dict__[name])
        return self._tiled.tiled_decode(z, return_dict=return_dict)


def unpatchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C * p * p, T, H, W) -> (B, C, T, H * p, W * p), channels ordered as Wan2.2's patchify leaves them."""
    batch, channels, frames, height, width = x.shape
    x = x.view(batch, channels // patch_size**2, patch_size, patch_size, frames, height, width)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(batch, -1, frames, height * patch_size, width * patch_size)


def use_native_decoder(vae: nn.Module, chunk_frames: int | None = None) -> WanVAEDecoder | None:
    """Make ``vae.decode`` run :class:`WanVAEDecoder` over the VAE's own weights; None where it does not apply
    (another VAE class, or ``DIFFGEN_NATIVE_VAE=0``). ``vae.native_decoder`` is the decoder."""
    if type(vae).__name__ not in SUPPORTED_VAES or os.environ.get(NATIVE_VAE_ENV, "1") == "0":
        return None
    if getattr(vae, "native_decoder", None) is None:
        # plain attributes, not submodules: the VAE's state dict and .to() stay its own (the parameters are shared)
        object.__setattr__(vae, "native_decoder", WanVAEDecoder.from_vae(vae, chunk_frames))
        vae.decode = vae.native_decoder.decode
    return vae.native_decoder


def channels_last_conv3d(module: nn.Module) -> None:
    """Store every Conv3d weight channels-last (NDHWC), the layout cuDNN's 3-D convolutions run in.

    The decoder then skips the NCDHW<->NDHWC transposes around its convolutions (diffusers' decode of
    81 frames at 480x832 measured 1650 ms against 1825 ms on an H200). Only on CUDA: on CPU the plain
    layout is kept.
    """
    for conv in module.modules():
        if isinstance(conv, nn.Conv3d):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)


def decoder_of(vae: nn.Module) -> nn.Module:
    """The module whose ``up_blocks`` the decode runs: the native decoder's where installed, else diffusers'."""
    native = getattr(vae, "native_decoder", None)
    return native.decoder if native is not None else vae.decoder

