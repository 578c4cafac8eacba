"""Qwen-Image and Qwen-Image-Edit parity with diffusers on tiny checkpoints (float32, CPU, same seed).

Edit runs are the slow part: the reference always VAE-encodes the input at ~1024x1024 pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffgen import Engine
from diffgen.engine.request import GenerationRequest
from diffgen.entrypoints.cli import main
from diffgen.errors import InvalidRequestError

PROMPT = "A curious raccoon"
EDIT_PROMPT = "Convert 2D style to 3D style"


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (height, width, 3), dtype=np.uint8))


def _reference(pipe, seed: int, **kwargs):
    """Final packed latents and [0, 1] pixels of one diffusers call."""
    final = {}

    def keep_latents(_pipe, _step, _t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    pixels = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                  callback_on_step_end=keep_latents, callback_on_step_end_tensor_inputs=["latents"], **kwargs).images
    return final["latents"], pixels


def _assert_same(result, ref_latents, ref_pixels):
    assert result.latents.shape == ref_latents.shape
    torch.testing.assert_close(result.latents, ref_latents, atol=1e-5, rtol=0)
    assert np.abs(result.pixels.numpy() - ref_pixels).max() <= 1e-4


def _load(path, reference_cls, **kwargs):
    reference = reference_cls.from_pretrained(path, dtype=torch.float32, **kwargs)
    reference.set_progress_bar_config(disable=True)
    return reference, Engine.from_pretrained(path, device="cpu", dtype="float32")


def _processor(path):
    """transformers' Qwen2VLProcessor needs torchvision; the reference gets the same processor without video."""
    from pathlib import Path

    from diffgen.testing.tiny_qwen import image_only_processor

    return image_only_processor(Path(path) / "processor")


@pytest.fixture(scope="module")
def text_to_image(tiny_checkpoint):
    from diffusers import QwenImagePipeline

    return _load(tiny_checkpoint("qwen-image"), QwenImagePipeline)


@pytest.fixture(scope="module")
def edit(tiny_checkpoint):
    from diffusers import QwenImageEditPipeline

    path = tiny_checkpoint("qwen-image-edit")
    return _load(path, QwenImageEditPipeline, processor=_processor(path))


# -- the DiT -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_folders(tmp_path_factory):
    """zero_cond_t -> folder of a tiny randomized QwenImageTransformer2DModel (RoPE axes 4/6/6, as 16/56/56)."""
    from diffusers import QwenImageTransformer2DModel

    from diffgen.testing.randomize import randomize_constant_parameters

    folders = {}
    for zero_cond_t in (False, True):
        torch.manual_seed(0)
        model = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=3,
            joint_attention_dim=24, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t)
        folders[zero_cond_t] = tmp_path_factory.mktemp("qwen-dit") / "transformer"
        randomize_constant_parameters(model).save_pretrained(folders[zero_cond_t])
    return folders


# float32: the same arithmetic. bfloat16: the same rounding order (the q/k and text RMSNorms round the
# normalised value to bf16 before scaling, as diffusers' RMSNorm does), so equal to the last bit.
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_dit_forward_matches_diffusers(dit_folders, zero_cond_t, dtype, tolerance):
    from diffusers import QwenImageTransformer2DModel

    from diffgen.loader.weights import load_native_model
    from diffgen.models.dits.qwen_image import QwenImageTransformer

    folder = dit_folders[zero_cond_t]
    reference = QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).eval()
    for tensor in [*reference.parameters(), *reference.buffers()]:
        tensor.data = tensor.data.clone()  # aligned copies: CPU kernels round differently on unaligned data
    ours = load_native_model(QwenImageTransformer, folder, dtype, "cpu")

    torch.manual_seed(0)
    shapes = [(1, 5, 7), (1, 4, 6)]  # odd and even grids: the centred positions differ
    tokens = sum(f * h * w for f, h, w in shapes)
    x, text, t = torch.randn(2, tokens, 64, dtype=dtype), torch.randn(2, 9, 24, dtype=dtype), torch.tensor([0.7, 0.3])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        for text_mask in (None, mask):
            expected = reference(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=text_mask,
                                 timestep=t.to(dtype), img_shapes=[shapes] * 2, return_dict=False)[0]
            got = ours(x, t.to(dtype), text, shapes, text_mask)
            assert got.dtype == dtype
            assert (got.float() - expected.float()).abs().max().item() <= tolerance


# -- text to image -------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt,kwargs", [
    (PROMPT, dict(height=64, width=64)),
    (PROMPT, dict(height=48, width=80, negative_prompt="blurry, low quality", true_cfg_scale=4.0,
                  num_images_per_prompt=2)),
    # truncation at max_sequence_length: every prompt keeps only system-template tokens, so all embed alike
    ([PROMPT, "a lighthouse at dusk over a stormy sea"],
     dict(height=32, width=48, negative_prompt=["", "blurry"], true_cfg_scale=2.5, max_sequence_length=24)),
])
def test_text_to_image_matches_diffusers(text_to_image, prompt, kwargs):
    reference, engine = text_to_image
    kwargs = dict(num_inference_steps=3, **kwargs)
    ref_latents, ref_pixels = _reference(reference, 7, prompt=prompt, **kwargs)
    outputs = kwargs.pop("num_images_per_prompt", 1)
    result = engine.generate(prompt, seed=7, num_outputs_per_prompt=outputs, return_tensors=True, **kwargs)
    _assert_same(result, ref_latents, ref_pixels)
    assert all(image.size == (kwargs["width"], kwargs["height"]) for image in result.images)


def test_prompts_of_different_lengths_with_two_outputs_each_match_diffusers(text_to_image):
    """Untruncated prompts (and negative prompts) of different lengths, two outputs each.

    The user's tokens reach the DiT, the shorter prompt is padded and masked, and outputs are ordered
    prompt-major. diffusers 0.42 pairs its prompt-major embeddings with an output-major mask when
    num_images_per_prompt > 1 (huggingface/diffusers#13581, fix in #14147), so the reference gets each
    prompt listed twice instead: the same noise (one draw of 4 latents) and correctly paired masks.
    """
    reference, engine = text_to_image
    prompts, negative = [PROMPT, "a lighthouse at dusk over a stormy sea"], ["", "blurry"]
    kwargs = dict(height=32, width=48, num_inference_steps=3, true_cfg_scale=2.5)
    twice = [text for text in prompts for _ in range(2)]
    twice_negative = [text for text in negative for _ in range(2)]
    ref_latents, ref_pixels = _reference(reference, 7, prompt=twice, negative_prompt=twice_negative, **kwargs)
    result = engine.generate(prompts, negative_prompt=negative, seed=7, num_outputs_per_prompt=2,
                             return_tensors=True, **kwargs)
    _assert_same(result, ref_latents, ref_pixels)


def test_text_to_image_rejects_input_images(text_to_image):
    _, engine = text_to_image
    with pytest.raises(InvalidRequestError, match="image: Qwen-Image does not take input images"):
        engine.generate(PROMPT, images=[_image(32, 32)], height=32, width=32, num_inference_steps=2)


def test_one_step_is_refused_clearly(text_to_image):
    # Qwen-Image's scheduler stretches sigmas to shift_terminal: one step would divide by zero (NaN picture).
    _, engine = text_to_image
    with pytest.raises(InvalidRequestError, match="num_inference_steps: 1 step is not supported"):
        engine.generate(PROMPT, height=32, width=32, num_inference_steps=1)


# -- edit ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(height=48, width=64),  # input 3:2, output 4:3
    dict(height=64, width=48, negative_prompt="blurry", true_cfg_scale=4.0),  # output 3:4
])
def test_edit_matches_diffusers(edit, kwargs):
    reference, engine = edit
    image = _image(96, 64)
    kwargs = dict(num_inference_steps=4, **kwargs)  # more than 2 steps: the shift moves the inner sigmas
    ref_latents, ref_pixels = _reference(reference, 3, image=image, prompt=EDIT_PROMPT, **kwargs)
    result = engine.generate(EDIT_PROMPT, images=[image], seed=3, return_tensors=True, **kwargs)
    _assert_same(result, ref_latents, ref_pixels)
    assert result.images[0].size == (kwargs["width"], kwargs["height"])


@pytest.mark.parametrize("size,expected", [((96, 64), (1248, 832)), ((64, 96), (832, 1248)), ((50, 50), (1024, 1024))])
def test_edit_output_size_follows_the_input_aspect_ratio(edit, size, expected):
    _, engine = edit
    request = engine.resolve(GenerationRequest.build(EDIT_PROMPT, images=[_image(*size)]))
    assert (request.width, request.height) == expected
    request = engine.resolve(
        GenerationRequest.build(EDIT_PROMPT, images=[_image(*size)], width=64, height=32))
    assert (request.width, request.height) == (64, 32)


def test_edit_needs_exactly_one_image(edit):
    _, engine = edit
    with pytest.raises(InvalidRequestError, match="image: Qwen-Image-Edit edits an input image") as error:
        engine.generate(EDIT_PROMPT, height=32, width=32, num_inference_steps=1)
    assert error.value.field == "image"
    with pytest.raises(InvalidRequestError, match="at most 1 input image"):
        engine.generate(EDIT_PROMPT, images=[_image(32, 32), _image(32, 32)], height=32, width=32)


# -- edit with several images (Qwen-Image-Edit-2509) ----------------------------------------------
def test_edit_plus_with_two_images_matches_diffusers(tiny_checkpoint):
    from diffusers import QwenImageEditPlusPipeline

    path = tiny_checkpoint("qwen-image-edit-2509")
    reference, engine = _load(path, QwenImageEditPlusPipeline, processor=_processor(path))
    images = [_image(64, 64, seed=1), _image(48, 96, seed=2)]
    kwargs = dict(height=32, width=48, num_inference_steps=4, negative_prompt=" ", true_cfg_scale=3.0)
    ref_latents, ref_pixels = _reference(reference, 5, image=images, prompt=EDIT_PROMPT, **kwargs)
    result = engine.generate(EDIT_PROMPT, images=images, seed=5, return_tensors=True, **kwargs)
    _assert_same(result, ref_latents, ref_pixels)


def test_edit_2511_matches_diffusers(tiny_checkpoint):
    """Qwen-Image-Edit-2511 (zero_cond_t: the input image's tokens are modulated as clean, t=0), end to end.

    One image and no CFG keep it cheap: the 2509 test covers several images and the negative branch.
    """
    from diffusers import QwenImageEditPlusPipeline

    path = tiny_checkpoint("qwen-image-edit-2511")
    reference, engine = _load(path, QwenImageEditPlusPipeline, processor=_processor(path))
    assert engine.pipeline.transformer.config.zero_cond_t
    image = _image(80, 48, seed=4)
    kwargs = dict(height=48, width=32, num_inference_steps=4)
    ref_latents, ref_pixels = _reference(reference, 9, image=[image], prompt=EDIT_PROMPT, **kwargs)
    result = engine.generate(EDIT_PROMPT, images=[image], seed=9, return_tensors=True, **kwargs)
    _assert_same(result, ref_latents, ref_pixels)


# -- command line --------------------------------------------------------------------------------
def test_cli_text_to_image_writes_the_picture(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    code = main(["generate", "--model-path", tiny_checkpoint("qwen-image"), "--prompt", PROMPT, "--width", "80",
                 "--height", "48", "--num-inference-steps", "2", "--negative-prompt", " ", "--true-cfg-scale", "4",
                 "--seed", "1", "--save-output", "--output-path", str(out)])
    assert code == 0
    (file,) = out.glob("*.png")
    image = Image.open(file)
    assert image.size == (80, 48)
    parameters = json.loads(image.text["parameters"])  # what ran: true CFG at 4.0, typed values
    assert parameters["true_cfg_scale"] == 4.0 and parameters["negative_prompt"] == " "
    assert parameters["num_inference_steps"] == 2 and parameters["seed"] == 1 and parameters["height"] == 48


def test_edit_loads_a_processor_saved_by_transformers_5(tiny_checkpoint, tmp_path):
    """transformers 5 saves a processor as one processor_config.json with the image processor nested;
    the hub repositories ship preprocessor_config.json. Both load, to the same processor."""
    import shutil

    from diffgen.models.encoders.qwen_vl import QwenVLProcessor
    from diffgen.testing.tiny_qwen import save_processor_as_transformers5

    hub_layout = Path(tiny_checkpoint("qwen-image-edit"))
    new_layout = tmp_path / "edit"
    shutil.copytree(hub_layout, new_layout)
    save_processor_as_transformers5(new_layout)
    assert sorted(p.name for p in (new_layout / "processor").iterdir()) == [
        "processor_config.json", "tokenizer.json", "tokenizer_config.json"]
    text, images = ["<|vision_start|><|image_pad|><|vision_end|>a cat"], [_image(90, 60)]
    expected = QwenVLProcessor.from_folder(hub_layout / "processor")(text, images)
    got = Engine.from_pretrained(str(new_layout), device="cpu").pipeline.processor(text, images)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_cli_edit_without_an_image_is_a_one_line_error(edit, tiny_checkpoint, capsys):
    code = main(["generate", "--model-path", tiny_checkpoint("qwen-image-edit"), "--prompt", EDIT_PROMPT,
                 "--num-inference-steps", "1"])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert "\n" not in error and error.startswith("error: image:") and "--image-path" in error


def test_cli_edit_with_a_file_that_is_not_an_image(tiny_checkpoint, tmp_path, capsys):
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    code = main(["generate", "--model-path", tiny_checkpoint("qwen-image-edit"), "--prompt", EDIT_PROMPT,
                 "--image-path", str(not_an_image)])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert "\n" not in error and error.startswith("error: --image-path:") and "not a readable image" in error
