"""The diffgen command: files, metadata, config files, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from diffgen.entrypoints.cli import main


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
        assert image.text["seed"] == "9" and image.text["steps"] == "2"
        assert image.text["guidance_scale"] == "3.5" and image.text["model"] == tiny_flux
        assert image.text["output_index"] == str(i)
    printed = capsys.readouterr().out
    assert "saved" in printed and "denoising" in printed and "decoding" in printed


def test_prompt_file_and_output_format(tiny_flux, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    out = tmp_path / "out"
    assert main(_generate(tiny_flux, "--prompt-file", str(prompts), "--height", "32", "--width", "32",
                          "--output-path", str(out), "--output-format", "webp")) == 0
    assert len(list(out.glob("*.webp"))) == 2


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_config_file_values_and_flags_override(tiny_flux, tmp_path, suffix):
    config = {"model-path": tiny_flux, "prompt": "from config", "height": 32, "width": 48,
              "num_inference_steps": 1, "seed": 4, "output-path": str(tmp_path / "cfg"), "output-file-name": "pic"}
    file = tmp_path / f"config.{suffix}"
    file.write_text(json.dumps(config))  # JSON is valid YAML too
    assert main(["generate", "--config", str(file)]) == 0
    image = Image.open(tmp_path / "cfg" / "pic.png")
    assert image.size == (48, 32) and image.text["prompt"] == "from config" and image.text["seed"] == "4"
    assert main(["generate", "--config", str(file), "--width", "64", "--prompt", "from flag"]) == 0
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
