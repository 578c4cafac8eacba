"""Wan 2.1 / 2.2: parity with the diffusers pipelines on tiny checkpoints, the CLI, outputs and bad input.

The reference pipelines load from the same saved tiny folders. Their weights are copied once after
loading: safetensors leaves them at unaligned addresses, where CPU matmuls round differently in the
last bit (~1e-7); aligned like ours, diffusers and diffgen agree exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffgen.engine.engine import Engine
from diffgen.entrypoints.cli import main

PROMPT = "A curious raccoon"
NEGATIVE = "blurry, low quality"
LATENT_TOL = 1e-5
PIXEL_TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    """family -> folder of its tiny checkpoint, shared with the other test files (conftest.py)."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def input_image() -> Image.Image:
    rng = np.random.RandomState(0)
    return Image.fromarray(rng.randint(0, 255, (40, 56, 3), dtype=np.uint8))


@pytest.fixture(autouse=True)
def _reference_without_ftfy(monkeypatch):
    """diffusers' image-to-video prompt cleaning calls ftfy even when it is not installed; without ftfy
    its text-to-video pipeline (and diffgen) skip that step, so the reference is made to skip it too."""
    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v

    if not hasattr(i2v, "ftfy"):
        monkeypatch.setattr(i2v, "ftfy", type("NoFtfy", (), {"fix_text": staticmethod(lambda text: text)}),
                            raising=False)


def reference(path: str, pipeline_class: str | None = None):
    import diffusers

    name = pipeline_class or json.loads(open(f"{path}/model_index.json").read())["_class_name"]
    pipe = getattr(diffusers, name).from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                tensor.data = tensor.data.clone()  # aligned copies (see the module docstring)
    return pipe


def run_both(path: str, seed: int = 3, pipeline_class: str | None = None, image=None, vae_tiles=None,
             prompt: str | list[str] = PROMPT, engine: Engine | None = None, **kwargs):
    """(diffusers latents, diffusers frames, diffgen result) for the same request."""
    ref = reference(path, pipeline_class)
    if vae_tiles:
        ref.vae.enable_tiling(**vae_tiles)
    call = dict(kwargs, prompt=prompt, image=image) if image is not None else dict(kwargs, prompt=prompt)
    frames = ref(**call, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").frames
    latents = ref(**call, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").frames
    params = dict(kwargs)
    params["num_outputs_per_prompt"] = params.pop("num_videos_per_prompt", 1)
    if image is not None:
        params["images"] = [image]
    engine = engine or Engine.from_pretrained(path, device="cpu", dtype="float32")
    for name, value in (vae_tiles or {}).items():  # tile sizes only: diffgen itself decides to tile
        setattr(engine.pipeline.vae, name, value)
    result = engine.generate(prompt, seed=seed, return_tensors=True, **params)
    return latents, frames, result


def assert_parity(latents, frames, result) -> None:
    assert result.latents.shape == latents.shape
    assert (result.latents - latents).abs().max().item() <= LATENT_TOL
    pixels = result.pixels.numpy()
    assert pixels.shape == frames.shape
    assert np.abs(pixels - frames).max() <= PIXEL_TOL
    assert len(result.frames) == frames.shape[0] and result.frames[0].dtype == np.uint8
    assert result.frames[0].shape == frames.shape[1:]


# -- DiT -------------------------------------------------------------------------------------------
# float32: the same arithmetic. bfloat16: the same rounding order (float32 modulation and residual updates,
# torch.nn.RMSNorm-style q/k norms), so equal to the last bit, except with the Wan2.1 I2V image branch:
# diffusers concatenates CLIP and text tokens and slices them apart again in each cross-attention, and a
# CPU bf16 matmul over such a strided slice takes another kernel path that rounds differently (1 ulp on
# the K/V projections; after two layers <= 0.016 on outputs of magnitude ~4). diffgen keeps the two apart.
@pytest.mark.parametrize("dtype,image_branch,tolerance", [
    (torch.float32, False, 1e-6), (torch.float32, True, 1e-6), (torch.bfloat16, False, 0.0),
    (torch.bfloat16, True, 0.04)], ids=["fp32-t2v", "fp32-i2v", "bf16-t2v", "bf16-i2v"])
def test_dit_forward_matches_diffusers(tmp_path, dtype, image_branch, tolerance):
    """Wan2.1 T2V and I2V-shaped configs, and Wan2.2 TI2V per-token timesteps.

    head_dim 16 splits RoPE 8/4/4 over (frames, rows, cols), unequal as the real 44/42/42.
    """
    from diffusers import WanTransformer3DModel

    from diffgen.loader.weights import load_native_model
    from diffgen.models.dits.wan import WanTransformer
    from diffgen.testing.randomize import randomize_constant_parameters

    torch.manual_seed(0)
    image_config = dict(image_dim=20, added_kv_proj_dim=32) if image_branch else {}
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                                  out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                  cross_attn_norm=True, rope_max_seq_len=32, **image_config)
    randomize_constant_parameters(model).save_pretrained(tmp_path)
    ref = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=dtype).eval()
    ours = load_native_model(WanTransformer, tmp_path, dtype, "cpu")
    for tensor in [*ref.parameters(), *ref.buffers()]:
        tensor.data = tensor.data.clone()
    x = torch.randn(2, 16, 3, 8, 6, dtype=dtype)
    # diffusers assumes 512 text tokens when image tokens are present
    text = torch.randn(2, 512 if image_branch else 20, 32, dtype=dtype)
    image = torch.randn(2, 9, 20, dtype=dtype) if image_branch else None
    with torch.no_grad():
        for timestep in (torch.tensor([999, 500]), torch.rand(2, 3 * 4 * 3) * 1000):
            expected = ref(x, timestep, text, encoder_hidden_states_image=image, return_dict=False)[0]
            got = ours(x, timestep, text, image)
            assert got.dtype == dtype
            assert (got.float() - expected.float()).abs().max().item() <= tolerance


# -- pipelines ---------------------------------------------------------------------------------------
def test_t2v_matches_diffusers_non_square(checkpoints):
    assert_parity(*run_both(checkpoints("wan-t2v"), negative_prompt=NEGATIVE, height=48, width=80, num_frames=9,
                            num_inference_steps=3, guidance_scale=5.0, max_sequence_length=32))


def test_t2v_two_outputs_and_tiled_decode_match_diffusers(checkpoints, monkeypatch):
    """Several outputs per prompt (noise drawn at once) and the tiled VAE decode, with small tiles."""
    path = checkpoints("wan-t2v")
    monkeypatch.setenv("DIFFGEN_VAE_TILING", "1")
    tiles = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=16,
                 tile_sample_stride_width=16)
    latents, frames, result = run_both(path, vae_tiles=tiles, negative_prompt=NEGATIVE, height=48, width=64,
                                       num_frames=5, num_inference_steps=2, guidance_scale=4.0,
                                       max_sequence_length=16, num_videos_per_prompt=2)
    assert_parity(latents, frames, result)
    assert not np.array_equal(result.frames[0], result.frames[1])


def test_i2v_matches_diffusers(checkpoints, input_image):
    # max_sequence_length 512: diffusers' Wan attention assumes 512 text tokens when CLIP tokens are present
    assert_parity(*run_both(checkpoints("wan-i2v"), image=input_image, negative_prompt=NEGATIVE, height=48,
                            width=80, num_frames=5, num_inference_steps=3, guidance_scale=5.0,
                            max_sequence_length=512))


def test_two_prompts_with_two_outputs_each_match_diffusers(checkpoints):
    """Outputs ordered prompt-major (p0, p0, p1, p1), as diffusers orders embeddings and noise."""
    assert_parity(*run_both(checkpoints("wan-t2v"), prompt=[PROMPT, "a red kite over green hills at noon"],
                            negative_prompt=[NEGATIVE, "static"], height=32, width=32, num_frames=1,
                            num_inference_steps=2, guidance_scale=4.0, max_sequence_length=16,
                            num_videos_per_prompt=2))


# 8 steps put timesteps next to each expert boundary: wan22-a14b (flow shift 12, boundary 0.875 -> 875) runs
# ... 923, 878 | 800 ...; wan22-i2v-a14b (shift 5, boundary 0.9 -> 900) runs ... 937 | 893, 833 ...
@pytest.mark.parametrize("family,guidance", [
    ("wan22-a14b", dict(guidance_scale=5.0, guidance_scale_2=2.0)),
    ("wan22-a14b", dict(guidance_scale=4.0)),  # no guidance_scale_2: the low-noise expert uses guidance_scale
    ("wan22-a14b", dict(guidance_scale=1.0, guidance_scale_2=3.0)),  # CFG off (follows the first scale)
    ("wan22-i2v-a14b", dict(guidance_scale=5.0, guidance_scale_2=2.0)),
], ids=["t2v-two-scales", "t2v-scale-2-fallback", "t2v-cfg-off", "i2v-two-scales"])
def test_wan22_two_experts_match_diffusers(checkpoints, input_image, family, guidance):
    path = checkpoints(family)
    engine = Engine.from_pretrained(path, device="cpu", dtype="float32")
    seen: dict[str, list[float]] = {"transformer": [], "transformer_2": []}
    for name in seen:
        engine.pipeline.components[name].register_forward_pre_hook(  # the guidance seam passes keyword arguments
            lambda _module, args, kwargs, name=name: seen[name].append(float(kwargs["timestep"][0])),
            with_kwargs=True)
    image = input_image if "i2v" in family else None
    steps = 8
    assert_parity(*run_both(path, image=image, engine=engine, negative_prompt=NEGATIVE, height=32, width=48,
                            num_frames=5, num_inference_steps=steps, max_sequence_length=16, **guidance))

    boundary = json.loads(open(f"{path}/model_index.json").read())["boundary_ratio"] * 1000
    high, low = sorted(set(seen["transformer"])), sorted(set(seen["transformer_2"]))
    assert len(high) + len(low) == steps and max(low) < boundary <= min(high)
    assert min(high) - boundary < 10 or boundary - max(low) < 10  # a timestep right next to the boundary
    branches = 1 if guidance["guidance_scale"] <= 1 else 2
    assert len(seen["transformer"]) + len(seen["transformer_2"]) == branches * steps


def test_ti2v_text_only_matches_diffusers(checkpoints):
    assert_parity(*run_both(checkpoints("wan22-ti2v"), negative_prompt=NEGATIVE, height=64, width=96, num_frames=9,
                            num_inference_steps=3, guidance_scale=5.0, max_sequence_length=16))


def test_ti2v_with_image_matches_diffusers_i2v(checkpoints, input_image):
    """TI2V-5B's model_index says WanPipeline; diffusers runs its image mode through WanImageToVideoPipeline."""
    assert_parity(*run_both(checkpoints("wan22-ti2v"), pipeline_class="WanImageToVideoPipeline", image=input_image,
                            negative_prompt=NEGATIVE, height=64, width=96, num_frames=5, num_inference_steps=3,
                            guidance_scale=5.0, max_sequence_length=16))


def test_default_negative_prompt_and_image_aspect(checkpoints, input_image):
    engine = Engine.from_pretrained(checkpoints("wan-i2v"), device="cpu", dtype="float32")
    result = engine.generate(PROMPT, images=[input_image], num_inference_steps=1, num_frames=1, seed=0,
                             max_sequence_length=16)
    request = result.request
    assert request.negative_prompt == [engine.defaults.negative_prompt]
    # no size asked: the image's 40x56 aspect at the default 480x832 area, multiples of 16
    assert (request.height, request.width) == (528, 736)
    assert result.frames[0].shape == (1, 528, 736, 3)


# -- CLI, outputs, errors ------------------------------------------------------------------------------
def test_cli_writes_mp4_that_decodes(checkpoints, tmp_path, capsys):
    import imageio_ffmpeg

    code = main(["generate", "--model-path", checkpoints("wan-t2v"), "--prompt", PROMPT, "--height", "32",
                 "--width", "64", "--num-frames", "13", "--fps", "8", "--num-inference-steps", "2", "--seed", "5",
                 "--output-path", str(tmp_path), "--output-file-name", "raccoon", "--save-output"])
    assert code == 0
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "raccoon.mp4"))
    meta = next(reader)
    frames = [np.frombuffer(frame, np.uint8) for frame in reader]
    assert meta["size"] == (64, 32) and meta["fps"] == 8
    assert len(frames) == 13 and frames[0].size == 32 * 64 * 3
    assert "saved" in capsys.readouterr().out


@pytest.mark.parametrize("output_format", ["gif", "webp", "png-frames"])
def test_other_video_formats(checkpoints, tmp_path, output_format):
    engine = Engine.from_pretrained(checkpoints("wan-t2v"), device="cpu", dtype="float32")
    result = engine.generate(PROMPT, height=32, width=48, num_frames=5, num_inference_steps=1, seed=0,
                             max_sequence_length=16)
    [path] = result.save(tmp_path, "clip", output_format)
    if output_format == "png-frames":
        frames = sorted(path.iterdir())
        assert len(frames) == 5 and Image.open(frames[0]).size == (48, 32)
        assert Image.open(frames[0]).text["prompt"] == PROMPT
    else:
        animation = Image.open(path)
        assert animation.n_frames == 5 and animation.size == (48, 32)


@pytest.mark.parametrize(("args", "flag"), [
    (["--num-frames", "10"], "num_frames"),
    ([], "--image-path"),
    (["--image-path", "/no/such/cat.jpg"], "--image-path"),
    (["--image-path", __file__], "--image-path"),
])
def test_bad_input_is_a_clear_error(checkpoints, capsys, args, flag):
    family = "wan-t2v" if "--num-frames" in args else "wan-i2v"
    code = main(["generate", "--model-path", checkpoints(family), "--prompt", PROMPT, "--num-inference-steps", "1",
                 *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and flag in err
    assert "Traceback" not in err


def test_guidance_scale_2_needs_two_experts(checkpoints, capsys):
    code = main(["generate", "--model-path", checkpoints("wan-t2v"), "--prompt", PROMPT, "--guidance-scale-2", "3"])
    assert code == 2 and "guidance_scale_2" in capsys.readouterr().err


def test_latent_stats_round_as_diffusers_in_bfloat16(tiny_checkpoint):
    """diffusers casts latents_std to the latents' dtype, then takes the reciprocal in that dtype."""
    import dataclasses

    import torch

    from diffgen import Engine

    pipe = Engine.from_pretrained(tiny_checkpoint("wan-t2v"), device="cpu").pipeline
    # text-to-video's VAE is diffgen's WanDecodingVAE, whose config is a frozen dataclass
    pipe.vae.config = dataclasses.replace(pipe.vae.config, latents_std=(0.5664, 2.8, 1.7, 3.1, 1.3, 2.2, 2.7, 1.9,
                                                                        2.4, 1.6, 1.6, 2.5, 2.6, 1.7, 2.7, 2.1))
    mean, inv_std = pipe._latent_stats(torch.bfloat16, torch.device("cpu"))
    expected = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1).to(torch.bfloat16)
    assert inv_std.dtype == torch.bfloat16 and torch.equal(inv_std, expected)
