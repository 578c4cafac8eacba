"""Files and metadata of a GenerationResult: names, no silent overwrite, one typed metadata builder.

No model runs here: results are built from small arrays, as a pipeline would return them.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffgen.engine.request import GenerationRequest, GenerationResult, generation_metadata
from diffgen.errors import DiffgenError

ROOT = Path(__file__).resolve().parents[1]


def _result(prompts: list[str], per_prompt: int = 1, seed: int = 7, video: bool = False,
            **resolved) -> GenerationResult:
    """A result as the pipeline returns it: the resolved request, one distinct picture per output."""
    request = GenerationRequest.build(prompts, num_outputs_per_prompt=per_prompt, **resolved)
    count = request.batch_size
    if video:
        frames = [np.full((5, 16, 16, 3), 40 * i, np.uint8) for i in range(count)]
        return GenerationResult(request=request, model="tiny-wan", seed=seed, frames=frames, fps=8)
    images = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(count)]
    return GenerationResult(request=request, model="tiny", seed=seed, images=images)


def test_each_file_is_named_after_its_own_prompt(tmp_path):
    result = _result(["a cat", "a dog"], per_prompt=2)
    paths = result.save(tmp_path)
    assert [p.name for p in paths] == ["a_cat-seed7-out0.png", "a_cat-seed7-out1.png",
                                       "a_dog-seed7-out2.png", "a_dog-seed7-out3.png"]
    for index, path in enumerate(paths):
        image = Image.open(path)
        assert image.text["prompt"] == ("a cat" if index < 2 else "a dog")
        assert image.text["output_index"] == str(index)
        assert image.getpixel((0, 0))[0] == 40 * index  # the file holds its own output


def test_the_same_prompt_and_seed_never_overwrite_an_earlier_file(tmp_path):
    first = _result(["a cat"]).save(tmp_path)
    second = dataclasses.replace(_result(["a cat"]), images=[Image.new("RGB", (16, 16), (0, 200, 0))]).save(tmp_path)
    assert [p.name for p in first] == ["a_cat-seed7-out0.png"]
    assert [p.name for p in second] == ["a_cat-seed7-out0-2.png"]
    assert Image.open(first[0]).getpixel((0, 0)) == (0, 0, 0)  # untouched
    # overwrite=True replaces, as asked
    replaced = dataclasses.replace(_result(["a cat"]), images=[Image.new("RGB", (16, 16), (0, 0, 99))])
    assert replaced.save(tmp_path, overwrite=True) == first
    assert Image.open(first[0]).getpixel((0, 0)) == (0, 0, 99)


def test_an_explicit_file_name_that_exists_is_refused_unless_overwrite(tmp_path):
    assert [p.name for p in _result(["a cat"]).save(tmp_path, "pic")] == ["pic.png"]
    assert [p.name for p in _result(["a cat"], per_prompt=2).save(tmp_path, "pic")] == ["pic-out0.png",
                                                                                        "pic-out1.png"]
    with pytest.raises(DiffgenError, match="pic.png already exist.*--overwrite"):
        _result(["a cat"]).save(tmp_path, "pic")
    assert _result(["a cat"]).save(tmp_path, "pic", overwrite=True) == [tmp_path / "pic.png"]


def test_video_files_are_named_and_never_overwritten(tmp_path):
    first = _result(["a boat"], video=True).save(tmp_path, output_format="png-frames")
    second = _result(["a boat"], video=True).save(tmp_path, output_format="png-frames")
    assert [p.name for p in first + second] == ["a_boat-seed7-out0", "a_boat-seed7-out0-2"]
    assert len(list(first[0].glob("frame_*.png"))) == 5
    gif = _result(["a boat"], video=True).save(tmp_path, output_format="gif")
    assert [p.name for p in gif] == ["a_boat-seed7-out0.gif"]


def test_a_format_of_the_other_kind_is_refused(tmp_path):
    with pytest.raises(DiffgenError, match="output_format: 'mp4' is a video format; this image model writes png, jpeg"):
        _result(["a cat"]).save(tmp_path, output_format="mp4")
    with pytest.raises(DiffgenError, match="output_format: 'jpeg' is an image format; this video model writes mp4"):
        _result(["a boat"], video=True).save(tmp_path, output_format="jpg")
    assert not list(tmp_path.iterdir())  # refused before any file is written


def test_metadata_is_typed_and_records_every_sampling_value(tmp_path):
    # A resolved Qwen-Image request with true CFG (what the pipeline returns in result.request).
    result = _result(["a raccoon"], negative_prompt=" ", height=48, width=80, num_inference_steps=2,
                     guidance_scale=1.0, true_cfg_scale=4.0, max_sequence_length=512, seed=7)
    (path,) = result.save(tmp_path)
    image = Image.open(path)
    parameters = json.loads(image.text["parameters"])
    assert parameters == {"prompt": "a raccoon", "negative_prompt": " ", "seed": 7, "output_index": 0,
                          "num_inference_steps": 2, "guidance_scale": 1.0, "true_cfg_scale": 4.0, "height": 48,
                          "width": 80, "max_sequence_length": 512, "model": "tiny",
                          "software": parameters["software"]}
    assert parameters["software"].startswith("diffgen ")
    assert image.text["true_cfg_scale"] == "4.0" and image.text["seed"] == "7"


def test_video_metadata_has_frames_and_fps():
    result = _result(["a boat"], video=True, num_frames=5, fps=8, guidance_scale=4.0, guidance_scale_2=3.0)
    metadata = result.metadata(0)
    assert metadata["num_frames"] == 5 and metadata["fps"] == 8 and metadata["guidance_scale_2"] == 3.0
    assert generation_metadata(result.request, seed=3, model="served", output_index=0)["model"] == "served"


def test_png_frames_are_each_frame_in_order_with_the_metadata_on_the_first(tmp_path, monkeypatch):
    """Frames encoded on several threads land under their own index, pixel for pixel, the same bytes as one thread."""
    from diffgen import outputs

    frames = np.random.default_rng(0).integers(0, 256, (7, 16, 24, 3), dtype=np.uint8)
    outputs.write_png_frames(frames, tmp_path / "threads", {"prompt": "a boat"})
    monkeypatch.setattr(outputs, "PNG_THREADS", 1)
    outputs.write_png_frames(frames, tmp_path / "one", {"prompt": "a boat"})
    written = sorted((tmp_path / "threads").iterdir())
    assert [path.name for path in written] == [f"frame_{index:05d}.png" for index in range(7)]
    for index, path in enumerate(written):
        assert np.array_equal(np.asarray(Image.open(path)), frames[index])
        assert path.read_bytes() == (tmp_path / "one" / path.name).read_bytes()
    assert json.loads(Image.open(written[0]).text["parameters"]) == {"prompt": "a boat"}
    assert "parameters" not in Image.open(written[1]).text


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_outputs_does_not_import_the_request_module():
    # One direction: request.py (the result) uses outputs.py (files); outputs.py knows nothing of requests.
    assert "diffgen.engine.request" not in _imports(ROOT / "diffgen" / "outputs.py")
    assert not any(name.startswith("diffgen.engine") for name in _imports(ROOT / "diffgen" / "outputs.py"))


def test_the_server_builds_metadata_with_the_one_builder():
    for module in ("openai_routes.py", "jobs.py"):
        source = (ROOT / "diffgen" / "entrypoints" / "http" / module).read_text()
        assert "generation_metadata(" in source, module
