"""Loading: folders, hub ids from the local cache, sharded weights, strict keys, dtypes, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffgen import Engine
from diffgen.errors import ModelLoadError
from diffgen.loader.components import load_pipeline

RUN = dict(prompt="a fox", height=32, width=32, num_inference_steps=2, seed=3, return_tensors=True)


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_transformer_loads_and_matches_single_file(tiny_flux, tmp_path):
    from diffgen.testing import write_tiny_checkpoint

    sharded = write_tiny_checkpoint("flux", tmp_path / "sharded", shard_size="50KB")
    index = sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    single = Engine.from_pretrained(tiny_flux, device="cpu").generate(**RUN).pixels
    shards = Engine.from_pretrained(str(sharded), device="cpu").generate(**RUN).pixels
    assert torch.equal(single, shards)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_checkpoint_key_mismatch_lists_the_keys(tiny_flux, tmp_path, change):
    folder = _copy(tiny_flux, tmp_path / "ckpt")
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    if change == "missing":
        del state["proj_out.weight"]
        expected = "missing keys [proj_out.weight]"
    else:
        state["extra_block.weight"] = torch.zeros(2)
        expected = "unexpected keys [extra_block.weight]"
    save_file(state, str(weights))
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(str(folder), device="cpu")
    assert expected in str(error.value)


def test_bfloat16_loading_keeps_dtypes(tiny_flux):
    engine = Engine.from_pretrained(tiny_flux, device="cpu", dtype="bfloat16")
    pipe = engine.pipeline
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        dtypes = {p.dtype for p in pipe.components[name].parameters()}
        assert dtypes == {torch.bfloat16}, (name, dtypes)
    result = engine.generate(prompt="a fox", height=32, width=32, num_inference_steps=1, seed=0, return_tensors=True)
    assert result.latents.dtype == torch.bfloat16
    assert torch.isfinite(result.pixels).all()


def _fill_hf_cache(checkpoint: str, hf_home: Path, repo_id: str) -> None:
    """Lay a checkpoint out as huggingface_hub's cache does (snapshot + refs/main)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_resolves_from_prefilled_cache_offline(tiny_flux, tmp_path):
    hf_home = tmp_path / "hf"
    _fill_hf_cache(tiny_flux, hf_home, "tiny-org/tiny-flux")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "diffgen.entrypoints.cli", "generate", "--model-path", "tiny-org/tiny-flux",
           "--prompt", "a fox", "--height", "32", "--width", "32", "--num-inference-steps", "1", "--seed", "1",
           "--output-path", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(list(out.glob("*.png"))) == 1
    # An id that is not in the cache fails clearly while offline.
    cmd[cmd.index("tiny-org/tiny-flux")] = "tiny-org/not-cached"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "not in the local Hugging Face cache" in done.stderr and "Traceback" not in done.stderr


def test_errors_for_bad_paths_classes_and_dtypes(tiny_flux, tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_pipeline(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(str(empty))
    other = _copy(tiny_flux, tmp_path / "other")
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="'StableDiffusionPipeline' is not supported; supported: .*FluxPipeline"):
        load_pipeline(str(other))
    with pytest.raises(ModelLoadError, match="--dtype 'float99' is not supported"):
        load_pipeline(tiny_flux, device="cpu", dtype="float99")


@pytest.mark.parametrize("error,message", [
    ("gated", "is gated: accept its licence"),
    ("no_index", r"is not a diffusers pipeline repository \(it has no model_index.json\)"),
    ("missing", "no such repository on the hub"),
])
def test_hub_errors_say_what_to_do(monkeypatch, error, message):
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError

    def response(code: int) -> httpx.Response:
        return httpx.Response(code, request=httpx.Request("GET", "https://hub.invalid/x"))

    raised = {"gated": GatedRepoError("gated", response=response(403)),
              "no_index": RemoteEntryNotFoundError("404", response=response(404)),
              "missing": RepositoryNotFoundError("404", response=response(404))}[error]

    def fake_download(*args, **kwargs):
        raise raised

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(ModelLoadError, match=message):
        load_pipeline("some-org/some-model", device="cpu")


@pytest.mark.parametrize("family,params", [
    ("wan-t2v", dict(height=32, width=32, num_frames=5)),
    ("qwen-image-edit", dict(height=32, width=32)),
    ("flux", dict(height=32, width=32)),
])
def test_vae_dtype_overrides_the_vae_only(tiny_checkpoint, family, params):
    from PIL import Image

    engine = Engine.from_pretrained(tiny_checkpoint(family), device="cpu", dtype="bfloat16", vae_dtype="float32")
    pipe = engine.pipeline
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    # Everything else keeps --dtype (Wan's DiT keeps its few float32 modules, as diffusers does).
    assert torch.bfloat16 in {p.dtype for p in pipe.transformer.parameters()}
    plain = Engine.from_pretrained(tiny_checkpoint(family), device="cpu", dtype="bfloat16").pipeline
    assert ({n: p.dtype for n, p in pipe.transformer.named_parameters()}
            == {n: p.dtype for n, p in plain.transformer.named_parameters()})
    if pipe.accepts_images:
        params["images"] = [Image.new("RGB", (48, 32), (200, 30, 30))]
    result = engine.generate("a fox", num_inference_steps=2, seed=0, return_tensors=True, **params)
    assert torch.isfinite(result.pixels).all()


def test_bad_vae_dtype_names_its_flag(tiny_flux):
    with pytest.raises(ModelLoadError, match="--vae-dtype 'fp99' is not supported"):
        load_pipeline(tiny_flux, device="cpu", vae_dtype="fp99")
