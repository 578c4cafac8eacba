"""ModelSpec and resolve: every request is checked against the model before any work, without weights."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from diffgen.engine.request import GenerationRequest
from diffgen.engine.spec import resolve
from diffgen.errors import InvalidRequestError
from diffgen.loader.components import read_model_spec


def _checkpoint(tmp_path, class_name: str, settings: dict | None = None, transformer: dict | None = None,
                scheduler: dict | None = None, extra: tuple[str, ...] = ()):
    """A pipeline folder holding only JSON files: what a front end reads to describe a model."""
    folder = tmp_path / class_name
    folder.mkdir()
    components = {"scheduler": ["diffusers", "X"], "transformer": ["diffusers", "X"], "vae": ["diffusers", "X"],
                  **{name: ["diffusers", "X"] for name in extra}}
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, **components,
                                                         **(settings or {})}))
    for name, config, file in (("transformer", transformer, "config.json"),
                               ("scheduler", scheduler, "scheduler_config.json")):
        (folder / name).mkdir()
        (folder / name / file).write_text(json.dumps(config or {}))
    return str(folder)


def _request(**kwargs) -> GenerationRequest:
    return GenerationRequest.build("a boat on a lake", **kwargs)


def test_video_defaults_fill_a_bare_request(tmp_path):
    spec = read_model_spec(_checkpoint(tmp_path, "WanPipeline"))
    assert (spec.output_kind, spec.task_type, spec.name) == ("video", "T2V", "Wan2.1-T2V")
    r = resolve(_request(), spec)
    assert (r.num_frames, r.fps, r.height, r.width, r.num_inference_steps) == (81, 16, 480, 832, 50)
    assert r.negative_prompt and r.guidance_scale == 5.0
    assert resolve(r, spec) == r  # resolving twice changes nothing


@pytest.mark.parametrize("kwargs,message", [
    ({"width": 81, "height": 48}, "width: 81 is not a multiple of 16 (required by Wan2.1-T2V)"),
    ({"num_frames": 10}, "num_frames: 10 is not 4k+1 (the VAE's temporal stride); try 9"),
    ({"guidance_scale_2": 3.0}, "guidance_scale_2: Wan2.1-T2V has one transformer"),
    ({"images": [Image.new("RGB", (8, 8))]}, "image: Wan2.1-T2V does not take input images"),
])
def test_bad_video_requests_are_refused_before_any_work(tmp_path, kwargs, message):
    spec = read_model_spec(_checkpoint(tmp_path, "WanPipeline"))
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        resolve(_request(**kwargs), spec)


def test_two_expert_and_image_to_video_specs(tmp_path):
    a14b = read_model_spec(_checkpoint(tmp_path, "WanPipeline", {"boundary_ratio": 0.875}, extra=("transformer_2",)))
    assert a14b.name == "Wan2.2-T2V-A14B" and "guidance_scale_2" in a14b.guidance_fields
    assert resolve(_request(), a14b).guidance_scale_2 == 3.0
    assert resolve(_request(guidance_scale=6.0), a14b).guidance_scale_2 == 6.0  # follows guidance_scale
    i2v = read_model_spec(_checkpoint(tmp_path, "WanImageToVideoPipeline"))
    assert (i2v.task_type, i2v.min_images, i2v.max_images) == ("I2V", 1, 1)
    with pytest.raises(InvalidRequestError, match="image: Wan2.1-I2V-480P makes a video from an image"):
        resolve(_request(), i2v)
    r = resolve(_request(images=[Image.new("RGB", (200, 100))]), i2v)
    assert (r.width, r.height) == (880, 432)  # the input's aspect ratio at the default 480x832 area


def test_ti2v_takes_an_optional_image(tmp_path):
    spec = read_model_spec(_checkpoint(tmp_path, "WanPipeline", {"expand_timesteps": True}))
    assert (spec.task_type, spec.min_images, spec.max_images, spec.size_multiple) == ("TI2V", 0, 1, 32)
    assert resolve(_request(), spec).num_frames == 121
    assert resolve(_request(images=[Image.new("RGB", (64, 64))]), spec).height % 32 == 0


@pytest.mark.parametrize("size", [(1, 300), (300, 1), (190, 1)])
def test_edit_input_too_elongated_for_the_vision_encoder_is_refused(tmp_path, size):
    spec = read_model_spec(_checkpoint(tmp_path, "QwenImageEditPipeline"))
    with pytest.raises(InvalidRequestError, match=r"image: image 1 \(\d+x\d+.*\) has an aspect ratio of \d+:1; "
                       r"Qwen-Image-Edit takes inputs up to 200:1") as caught:
        resolve(_request(images=[Image.new("RGB", size)]), spec)
    assert caught.value.field == "image"


def test_edit_image_counts_and_sizes(tmp_path):
    edit = read_model_spec(_checkpoint(tmp_path, "QwenImageEditPipeline"))
    plus = read_model_spec(_checkpoint(tmp_path, "QwenImageEditPlusPipeline"))
    image = Image.new("RGB", (96, 64))
    assert (edit.max_images, plus.max_images) == (1, 4)
    with pytest.raises(InvalidRequestError, match="Qwen-Image-Edit takes at most 1 input image"):
        resolve(_request(images=[image, image]), edit)
    with pytest.raises(InvalidRequestError, match="Qwen-Image-Edit-2509 takes at most 4 input image"):
        resolve(_request(images=[image] * 5), plus)
    r = resolve(_request(images=[Image.new("RGB", (64, 96)), image]), plus)  # size follows the last input
    assert (r.width, r.height) == (1248, 832)
    assert resolve(_request(images=[Image.new("RGB", (150, 1))]), edit).height >= 32  # 150:1 stays under 200:1


def test_qwen_min_steps_follows_the_scheduler(tmp_path):
    terminal = read_model_spec(_checkpoint(tmp_path, "QwenImagePipeline", scheduler={"shift_terminal": 0.02}))
    with pytest.raises(InvalidRequestError, match="num_inference_steps: 1 step is not supported"):
        resolve(_request(num_inference_steps=1), terminal)
    assert resolve(_request(num_inference_steps=2), terminal).num_inference_steps == 2


def test_flux_dev_and_schnell_from_the_transformer_config(tmp_path):
    dev = read_model_spec(_checkpoint(tmp_path, "FluxPipeline", transformer={"guidance_embeds": True}))
    assert dev.name == "FLUX.1-dev" and resolve(_request(), dev).guidance_scale == 3.5
    with pytest.raises(InvalidRequestError, match="num_frames: FLUX.1-dev makes images, not videos"):
        resolve(_request(num_frames=5), dev)
    with pytest.raises(InvalidRequestError, match="fps: FLUX.1-dev makes images"):
        resolve(_request(fps=8), dev)


def test_the_loaded_pipeline_publishes_the_same_spec(tiny_flux):
    from diffgen import Engine

    engine = Engine.from_pretrained(tiny_flux, device="cpu")
    assert engine.spec == read_model_spec(tiny_flux)


def test_a_missing_or_unsupported_checkpoint_fails_without_loading(tmp_path):
    from diffgen.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="not found"):
        read_model_spec(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="'StableDiffusionPipeline' is not supported"):
        read_model_spec(_checkpoint(tmp_path, "StableDiffusionPipeline"))
