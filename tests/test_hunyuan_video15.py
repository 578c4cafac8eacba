"""HunyuanVideo-1.5: parity with diffusers on tiny checkpoints (DiT and pipelines), defaults, CLI output, bad input.

The reference pipelines load from the same saved tiny folder (weights copied once after loading, see
tests/test_wan.py). Two diffusers limits shape the references here, both worked around without changing
what is compared: its T2V pipeline cannot make several videos per prompt (its zero image tokens keep
batch = number of prompts, and the DiT's per-sample packing then fails), so it is given each prompt
repeated instead, which is what "N outputs per prompt" means (prompt-major, one generator over the batch);
and its VAE cannot decode a batch (the causal mask of its mid-block attention is built as (B, S, S) for
queries (B, 1, S, C)), so its latents are decoded one video at a time, as diffgen does.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from diffgen.engine.engine import Engine
from diffgen.entrypoints.cli import main
from diffgen.errors import InvalidRequestError

# One prompt with quoted (glyph) text for ByT5, one without; of different lengths, so the text mask is used.
PROMPTS = ['A neon sign that says "OPEN" and \u201cbar\u201d', "a curious raccoon"]
TOL = 1e-4


@pytest.fixture(scope="module")
def input_image() -> Image.Image:
    return Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 56, 3), dtype=np.uint8))


def reference(path: str, pipeline_class: str = "HunyuanVideo15Pipeline"):
    import diffusers

    pipe = getattr(diffusers, pipeline_class).from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                tensor.data = tensor.data.clone()
    return pipe


def reference_video(pipe, **call) -> tuple[torch.Tensor, np.ndarray]:
    """The reference's latents and its frames in [0, 1] (B, F, H, W, 3), decoded one video at a time."""
    latents = pipe(**call, output_type="latent").frames
    with torch.no_grad():
        video = torch.cat([pipe.vae.decode(sample[None] / pipe.vae.config.scaling_factor, return_dict=False)[0]
                           for sample in latents])
    return latents, (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()


# float32: the same arithmetic. bfloat16: as HunyuanVideo v1 (same blocks), the joint attention sums its
# keys in another order than the reference ([text, video] against [video, text], and the condition kinds
# concatenated rather than packed per sample), ~1 ulp per block; the bound guards against gross bf16 errors.
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)], ids=["fp32", "bf16"])
def test_dit_forward_matches_diffusers(tmp_path, dtype, tolerance):
    """Padded text and glyph tokens (different per sample), image tokens or none, MeanFlow's second timestep."""
    from diffusers import HunyuanVideo15Transformer3DModel

    from diffgen.loader.weights import load_native_model
    from diffgen.models.dits.hunyuan_video15 import HunyuanVideo15Transformer
    from diffgen.testing.randomize import randomize_constant_parameters

    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=2, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=32, image_embed_dim=12,
        rope_axes_dim=(4, 6, 6), target_size=16, task_type="i2v", use_meanflow=True)
    randomize_constant_parameters(model).save_pretrained(tmp_path)
    ref = HunyuanVideo15Transformer3DModel.from_pretrained(tmp_path, torch_dtype=dtype).eval()
    ours = load_native_model(HunyuanVideo15Transformer, tmp_path, dtype, "cpu")
    for tensor in [*ref.parameters(), *ref.buffers()]:
        tensor.data = tensor.data.clone()
    x = torch.randn(2, 9, 3, 4, 6, dtype=dtype)  # 3 frames of 4 x 6 latent pixels
    text, glyphs, image = (torch.randn(shape, dtype=dtype) for shape in ((2, 10, 16), (2, 7, 32), (2, 5, 12)))
    text_mask, glyph_mask = torch.ones(2, 10), torch.zeros(2, 7)
    text_mask[0, 6:] = 0
    glyph_mask[1, :5] = 1
    timestep, timestep_r = torch.tensor([999.0, 400.0], dtype=dtype), torch.tensor([700.0, 100.0], dtype=dtype)
    with torch.no_grad():
        for image_embeds in (None, image):
            for end in (None, timestep_r):
                expected = ref(x, timestep, text, text_mask, timestep_r=end, encoder_hidden_states_2=glyphs,
                               encoder_attention_mask_2=glyph_mask, return_dict=False,
                               image_embeds=torch.zeros_like(image) if image_embeds is None else image_embeds)[0]
                got = ours(x, timestep, text, text_mask, glyphs, glyph_mask, image_embeds, timestep_r=end)
                assert got.dtype == dtype
                assert (got.float() - expected.float()).abs().max().item() <= tolerance


def test_t2v_matches_diffusers_two_prompts_two_outputs_non_square(tiny_checkpoint):
    """CFG (the guider's 6.0, empty negative prompt), 48x80, 9 frames, 2 prompts x 2 outputs."""
    path = tiny_checkpoint("hunyuan15")
    kwargs = dict(height=48, width=80, num_frames=9, num_inference_steps=2)
    latents, frames = reference_video(reference(path), prompt=[p for p in PROMPTS for _ in range(2)], **kwargs,
                                      generator=torch.Generator("cpu").manual_seed(3))
    result = Engine.from_pretrained(path, device="cpu", dtype="float32").generate(
        PROMPTS, seed=3, num_outputs_per_prompt=2, return_tensors=True, **kwargs)
    assert result.latents.shape == latents.shape == (4, 4, 3, 3, 5)
    assert (result.latents - latents).abs().max().item() <= TOL
    assert result.pixels.shape == frames.shape == (4, 9, 48, 80, 3)
    assert np.abs(result.pixels.numpy() - frames).max() <= TOL
    assert not np.array_equal(result.frames[0], result.frames[1])


def test_t2v_guidance_scale_and_negative_prompt_match_diffusers(tiny_checkpoint):
    from diffusers import ClassifierFreeGuidance

    path = tiny_checkpoint("hunyuan15")
    ref = reference(path)
    ref.guider = ClassifierFreeGuidance(guidance_scale=3.5)
    kwargs = dict(height=32, width=32, num_frames=5, num_inference_steps=2)
    latents = ref(prompt=PROMPTS[1], negative_prompt="blurry", **kwargs, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(1)).frames
    result = Engine.from_pretrained(path, device="cpu", dtype="float32").generate(
        PROMPTS[1], negative_prompt="blurry", guidance_scale=3.5, seed=1, return_tensors=True, **kwargs)
    assert (result.latents - latents).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["hunyuan15-i2v", "hunyuan15-i2v-distilled"])
def test_i2v_matches_diffusers_two_outputs(tiny_checkpoint, input_image, family):
    """The output takes the size bucket of the image's aspect (56x40 -> 64x48 here), as diffusers chooses;
    the step-distilled checkpoint embeds each step's end timestep and runs without CFG."""
    path = tiny_checkpoint(family)
    kwargs = dict(num_frames=9, num_inference_steps=3)
    latents, frames = reference_video(reference(path, "HunyuanVideo15ImageToVideoPipeline"), image=input_image,
                                      prompt=PROMPTS[0], num_videos_per_prompt=2, **kwargs,
                                      generator=torch.Generator("cpu").manual_seed(0))
    result = Engine.from_pretrained(path, device="cpu", dtype="float32").generate(
        PROMPTS[0], images=[input_image], seed=0, num_outputs_per_prompt=2, return_tensors=True, **kwargs)
    assert (result.request.width, result.request.height) == (64, 48)
    assert result.latents.shape == latents.shape == (2, 4, 3, 3, 4)
    assert (result.latents - latents).abs().max().item() <= TOL
    assert np.abs(result.pixels.numpy() - frames).max() <= TOL
    assert not np.array_equal(result.frames[0], result.frames[1])


def test_glyph_text_is_what_diffusers_extracts():
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    from diffgen.pipelines.hunyuan_video15 import glyph_text

    for prompt in (*PROMPTS, 'say "a" then "b" then "a" again', 'one "x"', 'empty "" quotes', ""):
        assert glyph_text(prompt) == extract_glyph_texts(prompt)


def test_defaults_from_the_checkpoint_files(tiny_checkpoint):
    """Size bucket of target_size, guidance from the guider, steps: the real configs and the tiny one."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import HunyuanVideo15Pipeline

    from diffgen.configs.hunyuan_video15 import SYSTEM_MESSAGE
    from diffgen.loader.resolve import CheckpointInfo
    from diffgen.pipelines.hunyuan_video15 import HunyuanVideo15ImageToVideoPipeline
    from diffgen.pipelines.hunyuan_video15 import HunyuanVideo15Pipeline as Ours

    def spec(cls, target: int, guidance: float, meanflow: bool = False):
        configs = {"transformer": {"target_size": target, "use_meanflow": meanflow},
                   "guider": {"guidance_scale": guidance}}
        index = {name: ["diffusers", "X"] for name in configs}
        return cls.describe(CheckpointInfo("repo", index, configs.get))

    def summary(s):
        d = s.defaults
        return d.width, d.height, d.num_frames, d.num_inference_steps, d.guidance_scale, d.frame_multiple

    assert summary(spec(Ours, 640, 6.0)) == (848, 480, 121, 50, 6.0, 4)  # -480p_t2v
    assert summary(spec(Ours, 960, 6.0)) == (1280, 720, 121, 50, 6.0, 4)  # -720p_t2v
    distilled = spec(HunyuanVideo15ImageToVideoPipeline, 640, 1.0, meanflow=True)  # -480p_i2v_step_distilled
    assert summary(distilled) == (848, 480, 121, 8, 1.0, 4)
    assert distilled.name == "HunyuanVideo-1.5-480p-I2V-step-distilled"
    tiny = Engine.from_pretrained(tiny_checkpoint("hunyuan15"), device="cpu").defaults
    assert (tiny.width, tiny.height, tiny.num_frames, tiny.guidance_scale) == (80, 48, 121, 6.0)
    reference_message = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"]
    assert SYSTEM_MESSAGE == reference_message.default


def test_tiny_checkpoint_command_and_cli_mp4(tmp_path):
    import imageio_ffmpeg

    assert main(["tiny-checkpoint", "hunyuan15", str(tmp_path / "tiny")]) == 0
    code = main(["generate", "--model-path", str(tmp_path / "tiny"), "--prompt", PROMPTS[1], "--height", "32",
                 "--width", "64", "--num-frames", "5", "--fps", "8", "--num-inference-steps", "2", "--seed", "5",
                 "--output-path", str(tmp_path), "--output-file-name", "hy15", "--save-output"])
    assert code == 0
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "hy15.mp4"))
    meta = next(reader)
    assert meta["size"] == (64, 32) and len(list(reader)) == 5


@pytest.mark.parametrize(("family", "args", "field"), [
    ("hunyuan15", ["--num-frames", "10"], "num_frames"),
    ("hunyuan15", ["--height", "40"], "height"),
    ("hunyuan15", ["--image-path", __file__], "image"),
    ("hunyuan15-i2v", [], "--image-path"),
])
def test_bad_input_is_one_line_error(tiny_checkpoint, capsys, family, args, field):
    code = main(["generate", "--model-path", tiny_checkpoint(family), "--prompt", PROMPTS[1], *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and field in err and "\n" not in err


def test_i2v_takes_one_image_and_an_asked_size(tiny_checkpoint, input_image):
    """An asked size overrides the bucket: the image is scaled to cover it and centre-cropped."""
    engine = Engine.from_pretrained(tiny_checkpoint("hunyuan15-i2v"), device="cpu")
    with pytest.raises(InvalidRequestError, match="at most 1 input image"):
        engine.generate(PROMPTS[1], images=[input_image, input_image])
    result = engine.generate(PROMPTS[1], images=[input_image], height=32, width=64, num_frames=5,
                             num_inference_steps=1, seed=0, return_tensors=True)
    assert result.pixels.shape == (1, 5, 32, 64, 3)


def test_resize_and_crop_is_what_diffusers_does(input_image):
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    from diffgen.pipelines.hunyuan_video15 import resize_and_crop

    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=16, do_resize=False)
    for width, height in ((64, 48), (48, 64), (96, 32)):
        expected = processor.resize(input_image, height=height, width=width, resize_mode="crop")
        assert np.array_equal(np.asarray(resize_and_crop(input_image, width, height)), np.asarray(expected))
