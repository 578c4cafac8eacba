"""HunyuanVideo: parity with diffusers on tiny checkpoints (DiT and pipeline), CLI output, bad input.

The reference pipelines load from the same saved tiny folder; their weights are copied once after
loading (aligned storage, see tests/test_wan.py). The tiny tokenizer spells the prompt template one
character per token, so ``max_sequence_length`` 600 keeps the prompt itself after the template.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffgen.engine.engine import Engine
from diffgen.entrypoints.cli import main
from diffgen.errors import InvalidRequestError

PROMPT = "A curious raccoon"
TOL = 1e-4
TEXT_TOKENS = 600


@pytest.fixture(scope="module")
def input_image() -> Image.Image:
    return Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 56, 3), dtype=np.uint8))


def reference(path: str, pipeline_class: str = "HunyuanVideoPipeline"):
    import diffusers

    pipe = getattr(diffusers, pipeline_class).from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                tensor.data = tensor.data.clone()
    return pipe


# float32: the same arithmetic. bfloat16: the token refiner and embedders round exactly as the reference;
# the joint attention differs by ~1 ulp, since the shared layer orders the sequence [text, image] where
# HunyuanVideo's reference orders [image, text], so the softmax sums its keys in another order (after four
# blocks <= 0.008 on outputs of magnitude ~2). That noise hides the q/k-norm rounding choice here (changing
# it moves the mean difference from 0.0007 to 0.0009 only): the bound guards against gross bf16 errors.
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)], ids=["fp32", "bf16"])
def test_dit_forward_matches_diffusers(tmp_path, dtype, tolerance):
    """Padded text (different lengths per sample), patch 2, guidance embedding, RoPE axes 4/6/6 (as 16/56/56)."""
    from diffusers import HunyuanVideoTransformer3DModel

    from diffgen.loader.weights import load_native_model
    from diffgen.models.dits.hunyuan_video import HunyuanVideoTransformer
    from diffgen.testing.randomize import randomize_constant_parameters

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))
    randomize_constant_parameters(model).save_pretrained(tmp_path)
    ref = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path, torch_dtype=dtype).eval()
    ours = load_native_model(HunyuanVideoTransformer, tmp_path, dtype, "cpu")
    for tensor in [*ref.parameters(), *ref.buffers()]:
        tensor.data = tensor.data.clone()
    x, text, pooled = (torch.randn(shape, dtype=dtype) for shape in ((2, 4, 3, 8, 6), (2, 10, 16), (2, 8)))
    mask = torch.ones(2, 10)
    mask[0, 6:] = 0
    timestep, guidance = torch.tensor([999.0, 400.0]), torch.tensor([6000.0, 3000.0])
    with torch.no_grad():
        for text_mask in (mask, torch.ones(2, 10)):  # padded text; none (attention without a mask)
            expected = ref(x, timestep, text, text_mask, pooled, guidance, return_dict=False)[0]
            got = ours(x, timestep, text, text_mask, pooled, guidance)
            assert got.dtype == dtype
            assert (got.float() - expected.float()).abs().max().item() <= tolerance


def test_t2v_matches_diffusers_non_square_two_outputs(tiny_checkpoint):
    path = tiny_checkpoint("hunyuan")
    ref = reference(path)
    kwargs = dict(height=48, width=80, num_frames=9, num_inference_steps=3, guidance_scale=6.0,
                  max_sequence_length=TEXT_TOKENS)
    call = dict(kwargs, prompt=PROMPT, num_videos_per_prompt=2)
    frames = ref(**call, generator=torch.Generator("cpu").manual_seed(3), output_type="np").frames
    latents = ref(**call, generator=torch.Generator("cpu").manual_seed(3), output_type="latent").frames
    engine = Engine.from_pretrained(path, device="cpu", dtype="float32")
    result = engine.generate(PROMPT, seed=3, num_outputs_per_prompt=2, return_tensors=True, **kwargs)
    assert result.latents.shape == latents.shape == (2, 4, 3, 6, 10)
    assert (result.latents - latents).abs().max().item() <= TOL
    assert result.pixels.shape == frames.shape == (2, 9, 48, 80, 3)
    assert np.abs(result.pixels.numpy() - frames).max() <= TOL
    assert not np.array_equal(result.frames[0], result.frames[1])


def test_true_cfg_with_negative_prompt_matches_diffusers(tiny_checkpoint):
    path = tiny_checkpoint("hunyuan")
    kwargs = dict(height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=3.0, true_cfg_scale=4.0,
                  negative_prompt="blurry", max_sequence_length=TEXT_TOKENS)
    latents = reference(path)(prompt=PROMPT, **kwargs, generator=torch.Generator("cpu").manual_seed(1),
                              output_type="latent").frames
    result = Engine.from_pretrained(path, device="cpu", dtype="float32").generate(
        PROMPT, seed=1, return_tensors=True, **kwargs)
    assert (result.latents - latents).abs().max().item() <= TOL


def test_i2v_matches_diffusers(tiny_checkpoint, input_image):
    """Token replace: Llava reads prompt + image, the image latent is the clean first frame."""
    path = tiny_checkpoint("hunyuan-i2v")
    ref = reference(path, "HunyuanVideoImageToVideoPipeline")
    kwargs = dict(height=48, width=80, num_frames=9, num_inference_steps=3, guidance_scale=6.0, max_sequence_length=700)
    call = dict(kwargs, image=input_image, prompt=PROMPT)
    frames = ref(**call, generator=torch.Generator("cpu").manual_seed(0), output_type="np").frames
    latents = ref(**call, generator=torch.Generator("cpu").manual_seed(0), output_type="latent").frames
    engine = Engine.from_pretrained(path, device="cpu", dtype="float32")
    result = engine.generate(PROMPT, images=[input_image], seed=0, return_tensors=True, **kwargs)
    assert result.latents.shape == latents.shape == (1, 4, 3, 6, 10)
    assert (result.latents - latents).abs().max().item() <= TOL
    assert np.abs(result.pixels.numpy() - frames).max() <= TOL


def test_i2v_two_outputs(tiny_checkpoint, input_image):
    """diffusers' I2V pipeline cannot make several videos per prompt (its image latents keep batch 1)."""
    engine = Engine.from_pretrained(tiny_checkpoint("hunyuan-i2v"), device="cpu", dtype="float32")
    result = engine.generate(PROMPT, images=[input_image], seed=0, num_outputs_per_prompt=2, height=32, width=48,
                             num_frames=5, num_inference_steps=2, max_sequence_length=700, return_tensors=True)
    assert result.latents.shape[0] == 2 and len(result.frames) == 2
    assert torch.equal(result.latents[0, :, 0], result.latents[1, :, 0])  # the same image as first frame
    assert not np.array_equal(result.frames[0], result.frames[1])


def test_i2v_needs_one_image(tiny_checkpoint, capsys, input_image):
    code = main(["generate", "--model-path", tiny_checkpoint("hunyuan-i2v"), "--prompt", PROMPT])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "--image-path" in err and "\n" not in err
    engine = Engine.from_pretrained(tiny_checkpoint("hunyuan-i2v"), device="cpu")
    with pytest.raises(InvalidRequestError, match="at most 1 input image"):
        engine.generate(PROMPT, images=[input_image, input_image])


def test_defaults(tiny_checkpoint):
    d = Engine.from_pretrained(tiny_checkpoint("hunyuan"), device="cpu").defaults
    assert (d.height, d.width, d.num_frames, d.num_inference_steps, d.guidance_scale) == (720, 1280, 129, 50, 6.0)


def test_tiny_checkpoint_command_and_cli_mp4(tmp_path):
    import imageio_ffmpeg

    assert main(["tiny-checkpoint", "hunyuan", str(tmp_path / "tiny")]) == 0
    code = main(["generate", "--model-path", str(tmp_path / "tiny"), "--prompt", PROMPT, "--height", "32",
                 "--width", "64", "--num-frames", "5", "--fps", "8", "--num-inference-steps", "2", "--seed", "5",
                 "--max-sequence-length", "16", "--output-path", str(tmp_path), "--output-file-name", "hy",
                 "--save-output"])
    assert code == 0
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "hy.mp4"))
    meta = next(reader)
    assert meta["size"] == (64, 32) and len(list(reader)) == 5


@pytest.mark.parametrize(("args", "field"), [
    (["--num-frames", "10"], "num_frames"),
    (["--height", "40"], "height"),
    (["--image-path", __file__], "image"),
])
def test_bad_input_is_one_line_error(tiny_checkpoint, capsys, args, field):
    code = main(["generate", "--model-path", tiny_checkpoint("hunyuan"), "--prompt", PROMPT, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and field in err and "\n" not in err
