"""diffgen's Wan-family VAE decoder (several latent frames per call) against diffusers' decode.

CPU, float32: Wan2.1, Wan2.2 (residual up blocks, 2x2 patches) and Qwen-Image VAEs, several frame
counts, chunk sizes and a batch of 2, in both memory layouts; the parameter sharing and strictness;
the Triton norm+SiLU path in Triton's CPU interpreter. GPU: the kernel against the plain path and
the decoder against diffusers in bf16.
"""

from __future__ import annotations

import pytest
import torch

from diffgen.models.vaes.wan import NATIVE_VAE_ENV, WanVAEDecoder, use_native_decoder


def _observable(vae):
    """Norm scales and biases made distinct, so a swapped or dropped one changes the video."""
    from diffgen.testing.randomize import randomize_constant_parameters

    return randomize_constant_parameters(vae, "vae").eval()


def _wan21():
    from diffgen.testing.tiny_wan import wan21_vae

    return _observable(wan21_vae())


def _wan22():
    from diffgen.testing.tiny_wan import wan22_vae

    return _observable(wan22_vae())


def _qwen():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    return _observable(AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                              temperal_downsample=[False, True, True]))


VAES = {"wan2.1": _wan21, "wan2.2": _wan22, "qwen-image": _qwen}


def _latents(vae, frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vae.config.z_dim, frames, 4, 5, generator=generator)


@pytest.mark.parametrize("family", list(VAES))
@pytest.mark.parametrize("frames", [1, 2, 5])
def test_native_decoder_equals_diffusers_decode(family, frames):
    vae = VAES[family]()
    z = _latents(vae, frames, batch=2 if frames == 2 else 1)
    native = WanVAEDecoder.from_vae(vae)
    with torch.inference_mode():
        expected = vae.decode(z, return_dict=False)[0]
        assert 0.05 < expected.abs().mean() and (expected.abs() < 1).float().mean() > 0.9  # not saturated
        for chunk in (1, 2, 3, None):  # 1 is diffusers' schedule; None: the default (all 5 at this size)
            native.chunk_frames = chunk
            got = native(z)
            assert got.shape == expected.shape
            # float32: the same sums, in another order (larger convolutions)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=0, msg=f"{family} chunk {chunk}")


@pytest.mark.parametrize("family", list(VAES))
@pytest.mark.parametrize("fold_biases, subpixel", [(True, True), (False, False), (True, False)],
                         ids=["biases folded", "diffusers' upsampling", "folded, diffusers' upsampling"])
def test_decoder_variants_equal_diffusers_decode(family, fold_biases, subpixel):
    """The default on the CPU is biases in the convolutions and sub-pixel upsampling (the test above); the CUDA
    default folds the biases into the next pass (here through the plain fallbacks), and benchmarks run
    diffusers' upsampling for comparison: every combination decodes the same video."""
    vae = VAES[family]()
    z = _latents(vae, 5, batch=2, seed=2)
    native = WanVAEDecoder.from_vae(vae)
    native.fold_biases, native.subpixel_upsample = fold_biases, subpixel
    with torch.inference_mode():
        expected = vae.decode(z, return_dict=False)[0]
        for chunk in (1, 3):
            native.chunk_frames = chunk
            torch.testing.assert_close(native(z), expected, atol=2e-5, rtol=0, msg=f"{family} chunk {chunk}")


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsampled_conv_equals_conv_of_the_upsampled_input(channels_last):
    """The sub-pixel form of nearest 2x upsampling + 3x3 conv, odd sizes, all four phases and every border:
    float64, so only the summation order differs."""
    from diffgen.models.vaes.wan import Upsample2x, UpsampledConv2d

    torch.manual_seed(0)
    conv = UpsampledConv2d(5, 3).double()
    x = torch.randn(2, 5, 7, 4, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(Upsample2x()(x), conv.weight, conv.bias, padding=1)
        got = conv(x)
        assert got.shape == (2, 3, 14, 8) and got.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
        conv.weight[0, 0, 2, 1] += 1.0  # a changed weight is seen (the phase kernels are cached per weight version)
        expected = torch.nn.functional.conv2d(Upsample2x()(x), conv.weight, conv.bias, padding=1)
        torch.testing.assert_close(conv(x), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("family", list(VAES))
def test_channels_last_activations_give_the_same_video(family):
    vae = VAES[family]()
    z = _latents(vae, 4, seed=1)
    native = WanVAEDecoder.from_vae(vae, chunk_frames=2)
    with torch.inference_mode():
        expected = vae.decode(z, return_dict=False)[0]
        native.channels_last = True  # the CUDA layout, here on the CPU
        got = native(z)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


def test_chunk_size_follows_the_pixel_budget():
    from diffgen.models.vaes.wan import CHUNK_PIXELS

    native = WanVAEDecoder.from_vae(_wan21())
    z_480p = torch.zeros(1, 16, 21, 60, 104)
    assert native.frames_per_chunk(z_480p) == CHUNK_PIXELS // (4 * 480 * 832) >= 1
    assert native.frames_per_chunk(torch.zeros(1, 16, 21, 600, 1000)) == 1  # never less than one frame


def test_decoder_shares_the_vae_parameters_strictly():
    vae = _wan21()
    native = WanVAEDecoder.from_vae(vae)
    theirs = dict(vae.named_parameters())
    for name, param in native.named_parameters():
        assert param is theirs[name]  # the very objects: .to() / offload of the VAE moves them for both
    vae.to(torch.float64)
    assert native.decoder.conv_in.weight.dtype == torch.float64
    z = _latents(vae, 2).double()
    with torch.inference_mode():
        # float64 throughout, except diffusers' upsampling, which runs in float32
        torch.testing.assert_close(native(z), vae.decode(z, return_dict=False)[0], atol=1e-6, rtol=0)

    del vae.decoder.up_blocks[0].resnets[0].norm1.gamma  # a structure that does not fit is named, not guessed
    with pytest.raises(ValueError, match=r"missing \['decoder\.up_blocks\.0\.resnets\.0\.norm1\.gamma'\]"):
        WanVAEDecoder.from_vae(vae)


def test_use_native_decoder_switches_decode_and_leaves_the_vae_alone(monkeypatch):
    from diffusers import AutoencoderKL

    vae = _wan21()
    names = set(vae.state_dict())
    z = _latents(vae, 3)
    with torch.inference_mode():
        expected = vae.decode(z, return_dict=False)[0]
        native = use_native_decoder(vae)
        assert native is not None and vae.decode == native.decode
        assert use_native_decoder(vae) is native  # once
        torch.testing.assert_close(vae.decode(z, return_dict=False)[0], expected, atol=2e-5, rtol=0)
        torch.testing.assert_close(vae.decode(z).sample, expected, atol=2e-5, rtol=0)
    assert set(vae.state_dict()) == names  # not a submodule: saving, LoRA and offload see the same VAE

    monkeypatch.setenv(NATIVE_VAE_ENV, "0")
    assert use_native_decoder(_wan21()) is None
    monkeypatch.delenv(NATIVE_VAE_ENV)
    flux_vae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, norm_num_groups=8, latent_channels=4)
    assert use_native_decoder(flux_vae) is None  # GroupNorm 2-D VAE: another network


def test_pipelines_decode_through_the_native_decoder(tiny_checkpoint):
    from diffgen.loader.components import load_pipeline

    for family in ("wan-t2v", "qwen-image"):
        pipeline = load_pipeline(tiny_checkpoint(family), device="cpu")
        assert pipeline.vae.decode == pipeline.vae.native_decoder.decode, family


def test_text_to_video_loads_a_decoding_vae_without_diffusers(tiny_checkpoint):
    """Wan text-to-video loads WanDecodingVAE (decoder tensors only, strictly): its decode and tiled decode equal
    diffusers' AutoencoderKLWan from the same folder, and diffusers' VAE module is never imported for it."""
    import subprocess
    import sys

    from diffusers import AutoencoderKLWan

    from diffgen.loader.components import load_pipeline
    from diffgen.models.vaes.wan import WanDecodingVAE

    folder = tiny_checkpoint("wan-t2v")
    vae = load_pipeline(folder, device="cpu").vae
    assert isinstance(vae, WanDecodingVAE) and not any(name.startswith("encoder.") for name in vae.state_dict())
    reference = AutoencoderKLWan.from_pretrained(f"{folder}/vae").eval()
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    tiles = dict(tile_sample_min_height=24, tile_sample_min_width=24, tile_sample_stride_height=16,
                 tile_sample_stride_width=16)  # 32x48 pixels: 2 x 3 overlapping tiles, blended
    with torch.inference_mode():
        whole = reference.decode(z, return_dict=False)[0]
        torch.testing.assert_close(vae.decode(z, return_dict=False)[0], whole, atol=2e-5, rtol=0)
        reference.enable_tiling(**tiles)
        for name, value in tiles.items():
            setattr(vae, name, value)
        tiled = vae.tiled_decode(z).sample
        assert torch.equal(tiled, reference.tiled_decode(z).sample)
        assert not torch.equal(tiled, whole)  # the tiles and their blending did run
    with pytest.raises(NotImplementedError, match="DIFFGEN_NATIVE_VAE=0"):
        vae.encode(torch.zeros(1, 3, 1, 32, 48))
    check = ("import sys; from diffgen.loader.components import load_pipeline; "
             f"p = load_pipeline({folder!r}, device='cpu'); "
             "print(type(p.vae).__name__, 'diffusers.models.autoencoders.autoencoder_kl_wan' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["WanDecodingVAE", "False"], out.stderr[-2000:]


@pytest.mark.parametrize("family", ["wan-i2v", "wan22-ti2v"])
def test_pipelines_that_encode_keep_diffusers_vae(tiny_checkpoint, family):
    """Image-to-video encodes its first frame; TI2V-5B's VAE is Wan2.2's (declined): diffusers' class for both."""
    from diffgen.loader.components import load_pipeline

    assert type(load_pipeline(tiny_checkpoint(family), device="cpu").vae).__name__ == "AutoencoderKLWan"


def test_decoding_vae_gets_the_split_decode_of_several_gpus(tiny_checkpoint):
    """--num-gpus N splits each frame's decode over the ranks (diffgen/parallel/vae.py): the decode-only VAE too."""
    from diffgen.loader.components import load_pipeline
    from diffgen.parallel.vae import install_parallel_decode

    vae = load_pipeline(tiny_checkpoint("wan-t2v"), device="cpu").vae
    own = vae.decode
    install_parallel_decode(vae)
    assert vae.decode != own and vae._diffgen_parallel_decode


def test_decoding_vae_switch_and_strictness(tiny_checkpoint, tmp_path, monkeypatch):
    """DIFFGEN_NATIVE_VAE=0 loads diffusers' class; a checkpoint missing a decoder tensor is refused by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    from diffgen.errors import ModelLoadError
    from diffgen.loader.components import load_pipeline

    folder = tiny_checkpoint("wan-t2v")
    monkeypatch.setenv(NATIVE_VAE_ENV, "0")
    assert type(load_pipeline(folder, device="cpu").vae).__name__ == "AutoencoderKLWan"
    monkeypatch.delenv(NATIVE_VAE_ENV)
    broken = tmp_path / "ckpt"
    shutil.copytree(folder, broken)
    [weights] = (broken / "vae").glob("*.safetensors")
    state = load_file(weights)
    del state["decoder.conv_out.bias"]
    save_file(state, weights)
    with pytest.raises(ModelLoadError, match="decoder.conv_out.bias"):
        load_pipeline(str(broken), device="cpu")


_INTERPRETER_CHECK = """
import torch
import diffgen.models.vaes.wan as wan
from diffgen.layers.fused import bias_residual_add_triton, channel_rms_norm_plain, channel_rms_norm_triton
from tests.test_wan_vae import VAES, _latents

torch.manual_seed(0)
worst = 0.0
for shape, silu in [((1, 96, 3, 5, 7), True), ((2, 40, 4, 3, 5), False), ((2, 24, 6, 6), False)]:
    layout = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    x = (torch.randn(shape) * 3).contiguous(memory_format=layout)
    gamma = torch.randn(shape[1], *([1] * (len(shape) - 2)))
    expected = channel_rms_norm_plain(x, gamma, shape[1] ** 0.5, silu)
    worst = max(worst, (channel_rms_norm_triton(x, gamma, shape[1] ** 0.5, silu) - expected).abs().max().item())
    worst = max(worst, (channel_rms_norm_triton(x.contiguous(), gamma, shape[1] ** 0.5, silu)
                        - expected).abs().max().item())
    if len(shape) == 5:  # into the frames after a 2-frame context, as the decoder writes a convolution's input
        buffer = torch.full((shape[0], shape[1], shape[2] + 2, *shape[3:]), float("nan"))
        buffer = buffer.contiguous(memory_format=layout)
        channel_rms_norm_triton(x, gamma, shape[1] ** 0.5, silu, out=buffer[:, :, 2:])
        assert buffer[:, :, :2].isnan().all()
        worst = max(worst, (buffer[:, :, 2:] - expected).abs().max().item())
for shape in [(1, 96, 3, 5, 7), (2, 40, 4, 3, 5), (2, 24, 6, 6)]:  # the biases folded into the next pass
    layout = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    x = (torch.randn(shape) * 3).contiguous(memory_format=layout)
    gamma, bias = torch.randn(shape[1], *([1] * (len(shape) - 2))), torch.randn(shape[1])
    residual = torch.randn(shape).contiguous(memory_format=layout)
    expected = channel_rms_norm_plain(x, gamma, shape[1] ** 0.5, True, bias)
    got = channel_rms_norm_triton(x, gamma, shape[1] ** 0.5, True, bias=bias)
    worst = max(worst, (got - expected).abs().max().item())
    expected = x + bias.view(-1, *([1] * (len(shape) - 2))) + residual
    for r in (residual, residual.contiguous()):  # the residual in either layout
        worst = max(worst, (bias_residual_add_triton(x.clone(), bias, r) - expected).abs().max().item())
wan.channel_rms_norm = channel_rms_norm_triton  # the whole decoder through the kernels
wan.bias_residual_add = bias_residual_add_triton
for family, build in VAES.items():
    vae = build()
    z = _latents(vae, 4)
    native = wan.WanVAEDecoder.from_vae(vae, chunk_frames=3)
    native.channels_last = True
    for fold in (False, True):
        native.fold_biases = fold
        with torch.inference_mode():
            worst = max(worst, (native(z) - vae.decode(z, return_dict=False)[0]).abs().max().item())
print(worst)
"""


def test_triton_channel_norm_in_the_cpu_interpreter(triton_interpreter):
    worst = triton_interpreter(_INTERPRETER_CHECK, timeout=600)[-1]
    assert float(worst) <= 2e-5  # float32: only the summation order differs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernel runs on CUDA only)")
@pytest.mark.parametrize("shape", [(1, 96, 16, 60, 104), (2, 384, 3, 30, 52), (1, 1024, 2, 8, 8), (3, 384, 20, 26)])
@pytest.mark.parametrize("silu", [True, False])
def test_triton_channel_norm_matches_plain_path_on_gpu(shape, silu):
    from diffgen.layers.fused import channel_rms_norm, channel_rms_norm_plain, use_fused_kernel

    torch.manual_seed(0)
    layout = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    x = (torch.randn(shape, device="cuda") * 3).bfloat16().contiguous(memory_format=layout)
    gamma = torch.randn(shape[1], *([1] * (len(shape) - 2)), device="cuda").bfloat16()
    assert use_fused_kernel(x)
    x[:, :, 0] = 0  # all-zero rows: F.normalize's eps, no NaN
    got = channel_rms_norm(x, gamma, shape[1] ** 0.5, silu)
    expected = channel_rms_norm_plain(x, gamma, shape[1] ** 0.5, silu)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=1e-2)
    assert (got != expected).float().mean().item() < 0.01  # bf16: almost every element bit-equal


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernels run on CUDA only)")
@pytest.mark.parametrize("shape", [(1, 96, 16, 60, 104), (2, 384, 3, 30, 52), (3, 192, 20, 26)])
def test_folded_bias_kernels_equal_the_separate_adds_on_gpu(shape):
    """The bias of a convolution added in the norm kernel / in the residual add rounds as PyTorch's own bias add
    (then the norm, then the residual add) rounds: bit-equal in bf16, up to the norm's summation order."""
    from diffgen.layers.fused import bias_residual_add, channel_rms_norm, channel_rms_norm_plain

    torch.manual_seed(0)
    layout = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    x = (torch.randn(shape, device="cuda") * 3).bfloat16().contiguous(memory_format=layout)
    residual = torch.randn(shape, device="cuda").bfloat16().contiguous(memory_format=layout)
    gamma = torch.randn(shape[1], *([1] * (len(shape) - 2)), device="cuda").bfloat16()
    bias = torch.randn(shape[1], device="cuda").bfloat16()
    per_channel = bias.view(-1, *([1] * (len(shape) - 2)))
    got = channel_rms_norm(x, gamma, shape[1] ** 0.5, True, bias=bias)
    expected = channel_rms_norm_plain(x + per_channel, gamma, shape[1] ** 0.5, True)
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=1e-2)
    assert (got != expected).float().mean().item() < 0.01
    got = bias_residual_add(x.clone(), bias, residual)
    assert torch.equal(got, (x + per_channel) + residual)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", list(VAES))
def test_native_decoder_matches_diffusers_in_bf16_on_gpu(family):
    from diffgen.models.vaes.wan import channels_last_conv3d

    vae = VAES[family]().cuda().bfloat16()
    z = _latents(vae, 5).cuda().bfloat16()
    with torch.inference_mode():
        reference = vae.float().decode(z.float(), return_dict=False)[0]  # float32: the truth both approximate
        vae.bfloat16()
        theirs = vae.decode(z, return_dict=False)[0].float()
        channels_last_conv3d(vae)
        native = WanVAEDecoder.from_vae(vae, chunk_frames=2)
        ours = native(z).float()  # biases folded, sub-pixel upsampling
        native.fold_biases, native.subpixel_upsample = False, False
        before = native(z).float()
    error = lambda out: ((out - reference).norm() / reference.norm()).item()  # noqa: E731
    assert error(ours) <= max(2 * error(theirs), 1e-2), (error(ours), error(theirs))
    assert error(before) <= max(2 * error(theirs), 1e-2), (error(before), error(theirs))
