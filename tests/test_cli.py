"""The diffgen command: files, metadata, config files, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from diffgen.entrypoints.cli import main
from diffgen.layers.attention import fa4_installed, get_attention_backend


def _generate(model: str, *extra: str) -> list[str]:
    return ["generate", "--model-path", model, "--num-inference-steps", "2", *extra]


def test_generate_writes_pngs_of_the_asked_size_with_metadata(tiny_flux, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(_generate(tiny_flux, "--prompt", "a red fox", "--height", "48", "--width", "80", "--seed", "9",
                          "--num-outputs-per-prompt", "2", "--save-output", "--output-path", str(out)))
    assert code == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    for i, file in enumerate(files):
        image = Image.open(file)
        assert image.size == (80, 48)
        assert image.text["prompt"] == "a red fox"
        assert image.text["seed"] == "9" and image.text["num_inference_steps"] == "2"
        assert image.text["guidance_scale"] == "3.5" and image.text["model"] == tiny_flux
        assert image.text["output_index"] == str(i)
        assert json.loads(image.text["parameters"])["guidance_scale"] == 3.5  # typed: a number, not "3.5"
    assert [file.name for file in files] == ["a_red_fox-seed9-out0.png", "a_red_fox-seed9-out1.png"]
    printed = capsys.readouterr().out
    assert "saved" in printed and "denoising" in printed and "decoding" in printed


def test_prompt_file_names_each_file_after_its_own_prompt(tiny_flux, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    out = tmp_path / "out"
    args = _generate(tiny_flux, "--prompt-file", str(prompts), "--height", "32", "--width", "32", "--seed", "3",
                     "--output-path", str(out))
    assert main([*args, "--output-format", "webp"]) == 0
    assert sorted(f.name for f in out.glob("*.webp")) == ["a_cat-seed3-out0.webp", "a_dog-seed3-out1.webp"]
    # The same command again adds files instead of replacing them.
    assert main(args) == 0 and main(args) == 0
    assert sorted(f.name for f in out.glob("*.png")) == [
        "a_cat-seed3-out0-2.png", "a_cat-seed3-out0.png", "a_dog-seed3-out1-2.png", "a_dog-seed3-out1.png"]
    assert Image.open(out / "a_dog-seed3-out1.png").text["prompt"] == "a dog"


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_config_file_values_and_flags_override(tiny_flux, tmp_path, suffix):
    config = {"model-path": tiny_flux, "prompt": "from config", "height": 32, "width": 48,
              "num_inference_steps": 1, "seed": 4, "output-path": str(tmp_path / "cfg"), "output-file-name": "pic"}
    file = tmp_path / f"config.{suffix}"
    file.write_text(json.dumps(config))  # JSON is valid YAML too
    assert main(["generate", "--config", str(file)]) == 0
    image = Image.open(tmp_path / "cfg" / "pic.png")
    assert image.size == (48, 32) and image.text["prompt"] == "from config" and image.text["seed"] == "4"
    assert main(["generate", "--config", str(file), "--width", "64", "--prompt", "from flag", "--overwrite"]) == 0
    image = Image.open(tmp_path / "cfg" / "pic.png")
    assert image.size == (64, 32) and image.text["prompt"] == "from flag"


@pytest.mark.parametrize("args,message", [
    (["--height", "65"], "height: 65 is not a multiple of 16"),
    (["--width", "100"], "width: 100 is not a multiple of 16"),
    (["--num-inference-steps", "0"], "--num-inference-steps: 0 is out of range; allowed 1..1000"),
    (["--prompt", "  "], "prompt: must be a non-empty string"),
    (["--seed", "-1"], "--seed: -1 is out of range"),
    (["--num-outputs-per-prompt", "0"], "--num-outputs-per-prompt: 0 is out of range; allowed 1..10"),
    (["--output-format", "bmp", "--save-output"], "--output-format: 'bmp' is not allowed; one of png, jpeg"),
    (["--dtype", "float99"], "--dtype: 'float99' is not allowed; one of auto, bfloat16"),
    (["--guidance-scale", "101"], "--guidance-scale: 101.0 is out of range; allowed 0..100"),
    (["--num-frames", "5"], "num_frames: FLUX.1-dev makes images, not videos"),
])
def test_bad_input_is_one_clear_line(tiny_flux, tmp_path, capsys, args, message):
    base = ["generate", "--model-path", tiny_flux, "--num-inference-steps", "1", "--height", "32", "--width", "32",
            "--output-path", str(tmp_path)]
    if "--prompt" not in args:
        base += ["--prompt", "x"]
    code = main(base + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)


@pytest.mark.skipif(fa4_installed(), reason="flash-attn-4 is installed here: nothing to refuse")
def test_fa4_without_its_package_is_one_clear_line(tiny_flux, tmp_path, capsys):
    code = main(["generate", "--model-path", tiny_flux, "--prompt", "x", "--num-inference-steps", "1", "--height",
                 "32", "--width", "32", "--output-path", str(tmp_path), "--attention-backend", "fa4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not any("Traceback" in line for line in err), err
    assert err[-1] == ("error: --attention-backend 'fa4' needs the flash-attn-4 package, which is not installed "
                       "(diffgen's fa4 extra: pip install -e '.[fa4]' in the clone)")
    assert get_attention_backend() == "auto"


def test_bad_model_paths(tiny_flux, tmp_path, capsys):
    assert main(["generate", "--model-path", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    folder = tmp_path / "unsupported"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert main(["generate", "--model-path", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "'StableDiffusionPipeline' is not supported; supported:" in err and "FluxPipeline" in err
    assert "Traceback" not in err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model would be loaded: the checks under test must come first."""
    from diffgen.engine.engine import Engine

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(Engine, "from_pretrained", refuse)


def test_an_output_format_of_the_other_kind_is_refused_before_loading(tiny_flux, tmp_path, capsys, no_model_load):
    assert main(_generate(tiny_flux, "--prompt", "x", "--output-format", "mp4", "--output-path", str(tmp_path))) == 2
    assert "error: output_format: 'mp4' is a video format; this image model writes png, jpeg, webp" in \
        capsys.readouterr().err
    video_model = tmp_path / "wan"  # model_index.json alone tells the output kind: no weights are read
    video_model.mkdir()
    (video_model / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert main(_generate(str(video_model), "--prompt", "x", "--output-format", "png", "--save-output")) == 2
    assert "error: output_format: 'png' is an image format; this video model writes mp4" in capsys.readouterr().err


def test_a_taken_output_file_name_is_refused_before_loading(tiny_flux, tmp_path, capsys, no_model_load):
    (tmp_path / "pic.png").write_bytes(b"earlier work")
    assert main(_generate(tiny_flux, "--prompt", "x", "--output-path", str(tmp_path), "--output-file-name",
                          "pic")) == 2
    error = capsys.readouterr().err
    assert "pic.png already exist" in error and "--overwrite" in error
    assert (tmp_path / "pic.png").read_bytes() == b"earlier work"


@pytest.mark.parametrize("args,expected", [
    (["--steps", "4"], "unrecognized arguments: --steps 4 (--steps: did you mean --num-inference-steps?)"),
    (["--promt", "x"], "did you mean --prompt"),
    (["--height", "tall"], "argument --height: invalid int value: 'tall'"),
])
def test_flag_errors_are_one_line_with_a_hint(tiny_flux, capsys, args, expected):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model-path", tiny_flux, "--prompt", "x", *args])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines  # no usage block
    assert lines[0].startswith("diffgen generate: error: ") and expected in lines[0], lines
    assert lines[1] == "Run 'diffgen generate --help' to see all options."


def test_tiny_checkpoint_refuses_to_replace_an_existing_one(tmp_path, capsys):
    target = tmp_path / "tiny-wan"
    target.mkdir()
    (target / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    assert main(["tiny-checkpoint", "flux", str(target)]) == 2
    assert "already exists (a diffusers checkpoint); pass --overwrite" in capsys.readouterr().err
    assert json.loads((target / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["tiny-checkpoint", "flux", str(other), "--overwrite"]) == 2  # not a checkpoint: never deleted
    assert (other / "keep.txt").read_text() == "mine"
    assert main(["tiny-checkpoint", "flux", str(target), "--overwrite"]) == 0
    assert json.loads((target / "model_index.json").read_text())["_class_name"] == "FluxPipeline"


def test_the_denoising_bar_is_closed_before_decoding(tiny_flux, monkeypatch, tmp_path):
    from tqdm import tqdm

    from diffgen.pipelines.flux import FluxPipeline

    open_bars_at_decoding = []
    decode = FluxPipeline.decode

    def recording_decode(self, state):
        open_bars_at_decoding.append(len(tqdm._instances))
        return decode(self, state)

    monkeypatch.setattr(FluxPipeline, "decode", recording_decode)
    assert main(_generate(tiny_flux, "--prompt", "x", "--height", "32", "--width", "32")) == 0
    assert open_bars_at_decoding == [0]


def test_the_python_api_shows_no_loading_bars(tiny_flux, capsys):
    import transformers

    from diffgen import Engine

    transformers.utils.logging.enable_progress_bar()  # the test session quiets it; a user's session does not
    try:
        Engine.from_pretrained(tiny_flux, device="cpu")
    finally:
        transformers.utils.logging.disable_progress_bar()
    assert "Loading weights" not in capsys.readouterr().err


def test_the_license_is_an_spdx_string():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"  # a TOML table is deprecated by setuptools (PEP 639)


def test_generate_log_level(tiny_flux, tmp_path, capsys):
    import logging

    logger = logging.getLogger("diffgen")
    level = logger.level
    try:
        assert main(["generate", "--model-path", tiny_flux, "--prompt", "x", "--num-inference-steps", "1",
                     "--height", "32", "--width", "32", "--log-level", "debug"]) == 0
        assert logger.getEffectiveLevel() == logging.DEBUG
    finally:
        logger.setLevel(level)
    assert main(["generate", "--model-path", tiny_flux, "--prompt", "x", "--log-level", "loud"]) == 2
    assert "--log-level: 'loud' is not allowed; one of critical, error, warning, info, debug" in capsys.readouterr().err
