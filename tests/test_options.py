"""Options are defined once: the CLI flags, config keys, HTTP bounds and request checks agree."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from diffgen.engine.request import GenerationRequest
from diffgen.entrypoints.cli import build_parser, merge_config
from diffgen.entrypoints.http.schemas import ImageGenerationBody, VideoBody
from diffgen.errors import InvalidRequestError
from diffgen.options import GROUPS, engine_option_names, option, parallel_option_names


@pytest.mark.parametrize("name,field", [("num_inference_steps", "num_inference_steps"), ("seed", "seed"),
                                        ("guidance_scale", "guidance_scale"), ("true_cfg_scale", "true_cfg_scale"),
                                        ("guidance_scale_2", "guidance_scale_2"),
                                        ("max_sequence_length", "max_sequence_length"),
                                        ("num_outputs_per_prompt", "n")])
def test_http_bounds_are_the_request_bounds(name, field):
    opt = option(name)
    top = int(opt.high) if opt.type is int else opt.high
    ImageGenerationBody.model_validate({"prompt": "a", field: top}, strict=True)  # the limit itself is allowed
    with pytest.raises(ValidationError):
        ImageGenerationBody.model_validate({"prompt": "a", field: top + 1}, strict=True)
    request_field = "num_outputs_per_prompt" if field == "n" else name
    GenerationRequest.build("a", **{request_field: top})
    with pytest.raises(InvalidRequestError, match=f"{request_field}: .* out of range"):
        GenerationRequest.build("a", **{request_field: top + 1})


def test_video_route_takes_frames_fps_and_n_with_the_same_bounds():
    body = VideoBody.model_validate({"prompt": "a", "num_frames": 1025, "fps": 120, "n": 2}, strict=True)
    assert (body.num_frames, body.fps, body.n) == (1025, 120, 2)
    for field, value in (("num_frames", 1026), ("fps", 121), ("n", 11)):
        with pytest.raises(ValidationError):
            VideoBody.model_validate({"prompt": "a", field: value}, strict=True)
    with pytest.raises(ValidationError):  # frames are a video field only
        ImageGenerationBody.model_validate({"prompt": "a", "num_frames": 5}, strict=True)


def test_max_batch_size_is_defined_once():
    from diffgen.entrypoints.http import ServerConfig

    assert ServerConfig(model_path="x").max_batch_size == option("max_batch_size").default
    assert ServerConfig(model_path="x").max_queue == option("max_queue").default


def test_engine_options_are_the_from_pretrained_arguments():
    import inspect

    from diffgen.engine.engine import Engine
    from diffgen.engine.loading import load_model

    names = set(engine_option_names())
    assert {"device", "dtype", "compile", "quantize"} <= names and "model_path" not in names
    assert names == {o.name for g in GROUPS.values() if g.engine for o in g.options} - {"model_path"}
    # every engine option reaches the in-process loader and, through it, every worker process
    assert names <= set(inspect.signature(Engine.from_pretrained).parameters)
    # the parallelism group chooses the executor (how many processes); the rest reach every loader
    assert set(parallel_option_names()) <= names
    assert names - set(parallel_option_names()) <= set(inspect.signature(load_model).parameters)


def test_help_lists_choices_defaults_and_rules(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: diffgen generate --model-path PATH" in text
    assert "--dtype {auto,bfloat16," in text and "--output-format {png,jpeg," in text
    assert "4k+1" in text and "--fps FPS video frames per second (default: the model's" in text
    assert "--log-level" in text


@pytest.mark.parametrize("config,message", [
    ("max-queue: '5'\n", "config max_queue: '5' is not an integer"),
    ("max_batch_size: 0\n", "config max_batch_size: 0 is out of range"),
    ("dtype: float99\n", "config dtype: 'float99' is not allowed"),
    ("max_qeue: 5\n", "unknown option 'max_qeue' (did you mean 'max_queue'?)"),
])
def test_config_values_are_checked_like_flags(tmp_path, config, message):
    file = tmp_path / "serve.yaml"
    file.write_text(config)
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        merge_config(build_parser().parse_args(["serve", "--model-path", "m", "--config", str(file)]))


def test_integers_in_a_config_file_fill_float_options(tmp_path):
    file = tmp_path / "serve.json"
    file.write_text('{"shutdown-timeout": 2, "image_ttl": 60}')
    options = merge_config(build_parser().parse_args(["serve", "--config", str(file)]))
    assert options["shutdown_timeout"] == 2.0 and options["image_ttl"] == 60.0
