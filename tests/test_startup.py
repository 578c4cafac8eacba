"""Start-up of a one-shot process: the CLI checks its arguments without importing torch or the model
libraries; diffgen reads the text encoders' weights itself and they equal the library's own load; the
console script's quick exit still writes and prints everything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import diffgen.loader.components as components
from diffgen.loader.components import load_pipeline

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "diffusers")

# Each case: the CLI's arguments and the exit status they end with (help: 0, a bad flag or value: 2).
ARGUMENT_CASES = [
    (["--help"], 0),
    (["generate", "--help"], 0),
    (["serve", "--help"], 0),
    (["--version"], 0),
    (["generate", "--steps", "3"], 2),  # a misspelt flag
    (["generate", "--model-path", "x", "--prompt", "a fox", "--height", "7"], 2),  # a value out of range
    (["generate", "--model-path", "x", "--prompt", "a fox", "--guidance-scale", "abc"], 2),  # a value of a wrong type
]


def test_help_and_argument_errors_import_neither_torch_nor_model_libraries():
    probe = (
        "import json, sys\n"
        "from diffgen.entrypoints.cli import main\n"
        "results = []\n"
        f"for argv, _ in {ARGUMENT_CASES!r}:\n"
        "    try:\n"
        "        code = main(argv)\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        f"    results.append([code, [m for m in {HEAVY!r} if m in sys.modules]])\n"
        "print(json.dumps(results))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for (argv, expected), (code, imported) in zip(ARGUMENT_CASES, results, strict=True):
        assert code == expected, (argv, code)
        assert imported == [], f"diffgen {' '.join(argv)} imported {imported}"


def _library_components(pipeline) -> dict[str, torch.nn.Module]:
    return {name: model for name, model in pipeline.components.items()
            if isinstance(model, transformers.PreTrainedModel)}


def _assert_same_model(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    assert type(ours) is type(reference)
    for kind in ("named_parameters", "named_buffers"):
        mine, theirs = dict(getattr(ours, kind)()), dict(getattr(reference, kind)())
        assert mine.keys() == theirs.keys(), kind
        for key, tensor in theirs.items():
            assert mine[key].dtype == tensor.dtype, key
            assert torch.equal(mine[key], tensor), key
    assert ours.config.to_dict() == reference.config.to_dict()
    assert ours.name_or_path == reference.name_or_path


# FLUX's and Wan's text encoders are diffgen's own (tests/test_text_encoders.py); these families keep transformers'.
@pytest.mark.parametrize("family, dtype", [("hunyuan15", torch.float32), ("hunyuan15", torch.bfloat16),
                                           ("qwen-image", torch.float32), ("qwen-image", torch.bfloat16),
                                           ("wan-i2v", torch.bfloat16), ("hunyuan", torch.bfloat16)])
def test_text_encoders_read_by_diffgen_equal_the_library_load(tiny_checkpoint, monkeypatch, family, dtype):
    folder = Path(tiny_checkpoint(family))
    read, original = [], components.read_library_checkpoint

    def counting_read(path, *args):
        read.append(path.name)
        return original(path, *args)

    monkeypatch.setattr(components, "read_library_checkpoint", counting_read)
    pipeline = load_pipeline(str(folder), device="cpu", dtype=dtype)
    loaded = _library_components(pipeline)
    index = json.loads((folder / "model_index.json").read_text())
    assert loaded and sorted(read) == sorted(loaded)  # every library model went through diffgen's reader
    for name, model in loaded.items():
        cls = getattr(transformers, index[name][1])
        _assert_same_model(model, cls.from_pretrained(folder / name, dtype=dtype).eval())
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_float16_with_modules_kept_in_float32_is_left_to_the_library(tiny_checkpoint):
    # T5 keeps its "wo" projections in float32 under float16: the library's own load decides that (HunyuanVideo
    # 1.5's ByT5 encoder is transformers' T5EncoderModel).
    folder = tiny_checkpoint("hunyuan15")
    t5 = load_pipeline(folder, device="cpu", dtype=torch.float16).components["text_encoder_2"]
    reference = transformers.T5EncoderModel.from_pretrained(Path(folder) / "text_encoder_2", dtype=torch.float16)
    _assert_same_model(t5, reference.eval())
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32


def test_fast_load_off_uses_the_libraries_own_loader(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("DIFFGEN_FAST_LOAD", "0")
    monkeypatch.setattr(components, "read_library_checkpoint", None)  # called: TypeError
    folder = tiny_checkpoint("hunyuan")
    pipeline = load_pipeline(folder, device="cpu", dtype=torch.float32)
    reference = transformers.CLIPTextModel.from_pretrained(Path(folder) / "text_encoder_2", dtype=torch.float32)
    _assert_same_model(pipeline.components["text_encoder_2"], reference.eval())


def test_console_script_exits_at_once_with_its_outputs_written(tiny_flux, tmp_path):
    """`python -m diffgen.entrypoints.cli` is the console script (``entry``): it ends with os._exit after a
    generate, so everything must be saved and printed by then."""
    out = subprocess.run(
        [sys.executable, "-m", "diffgen.entrypoints.cli", "generate", "--model-path", tiny_flux, "--prompt", "a fox",
         "--height", "32", "--width", "32", "--num-inference-steps", "2", "--seed", "5", "--device", "cpu",
         "--save-output", "--output-path", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    saved = sorted(tmp_path.glob("*.png"))
    assert len(saved) == 1 and saved[0].stat().st_size > 0
    assert f"saved {saved[0]}" in out.stdout and "seed 5" in out.stdout and "total" in out.stdout
    assert "model loaded in" in out.stderr


def _load_remembering_reads(folder: str, device: str, dtype: torch.dtype, monkeypatch):
    """load_pipeline, and the data pointers of every tensor diffgen's reader handed over."""
    pointers, original = set(), components.read_library_checkpoint

    def remembering_read(path, *args):
        state = original(path, *args)
        pointers.update(tensor.data_ptr() for tensor in state.values())
        return state

    monkeypatch.setattr(components, "read_library_checkpoint", remembering_read)
    return load_pipeline(folder, device=device, dtype=dtype), pointers


def _assert_no_copy(model: torch.nn.Module, pointers: set[int]) -> None:
    for key, parameter in model.named_parameters():
        assert parameter.data_ptr() in pointers, f"{key} was copied"


def test_text_encoders_keep_the_tensors_diffgen_read(tiny_checkpoint, monkeypatch):
    """The library builds the model around the tensors diffgen read, without a copy."""
    pipeline, pointers = _load_remembering_reads(tiny_checkpoint("hunyuan"), "cpu", torch.float32, monkeypatch)
    for name in ("text_encoder", "text_encoder_2"):
        _assert_no_copy(pipeline.components[name], pointers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the weights go straight to it)")
def test_text_encoders_read_to_the_gpu_stay_there_and_equal_the_library_load(tiny_checkpoint, monkeypatch):
    # Without device_map the library took them to the CPU and back (T5-XXL on an H200: 9.1 s).
    folder = tiny_checkpoint("hunyuan")
    pipeline, pointers = _load_remembering_reads(folder, "cuda", torch.bfloat16, monkeypatch)
    for name, cls in (("text_encoder", transformers.LlamaModel), ("text_encoder_2", transformers.CLIPTextModel)):
        model = pipeline.components[name]
        assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"cuda"}
        _assert_no_copy(model, pointers)
        reference = cls.from_pretrained(Path(folder) / name, dtype=torch.bfloat16).to("cuda").eval()
        _assert_same_model(model, reference)
