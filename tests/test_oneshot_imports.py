"""What a one-shot ``diffgen generate`` imports: each heavy module a FLUX run leaves out is seconds of start-up on
a GPU machine (issue 10: diffusers.utils 7.3 s through torch._dynamo, scipy.stats 1.2 s, diffusers' model
packages 4.6 s on an H200; transformers' model code imports torch._dynamo too). The probe runs the console
script's own path (``main(..., exit_after_generate=True)``, which ends in ``os._exit``) and reads ``sys.modules``
just before that exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
#: modules a FLUX one-shot generate must not import (a package counts with its submodules): its tokenizers are
#: diffgen's too (the ``tokenizers`` library alone), so not even transformers' package (~2.4 s on an H100)
NOT_IMPORTED_BY_FLUX = ("diffusers", "scipy", "torch._dynamo", "transformers")


def oneshot_modules(model_path: str, output: Path, extra_env: dict[str, str] | None = None,
                    device: str = "cpu") -> tuple[list[str], str]:
    """(sorted sys.modules at the console script's final os._exit, its stdout) of one tiny generate on ``device``."""
    probe = (
        "import json, os, sys\n"
        "real_exit = os._exit\n"
        "def exit_reporting_modules(code):\n"
        "    print('MODULES ' + json.dumps(sorted(sys.modules)), flush=True)\n"
        "    real_exit(code)\n"
        "os._exit = exit_reporting_modules\n"
        "from diffgen.entrypoints.cli import main\n"
        "main(sys.argv[1:], exit_after_generate=True)\n"
        "print('NO EXIT', flush=True)\n"
    )
    argv = ["generate", "--model-path", model_path, "--prompt", "a fox", "--height", "32", "--width", "32",
            "--num-inference-steps", "2", "--seed", "3", "--device", device, "--save-output",
            "--output-path", str(output)]
    env = {**os.environ, **(extra_env or {})}
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("MODULES ")]
    assert len(lines) == 1, f"the probe did not reach os._exit: {out.stdout}\n{out.stderr}"
    return json.loads(lines[0].removeprefix("MODULES ")), out.stdout


def imported(modules: list[str], package: str) -> list[str]:
    return [name for name in modules if name == package or name.startswith(package + ".")]


@pytest.mark.parametrize("family", ["flux", "flux-schnell"])
def test_flux_generate_imports_neither_diffusers_nor_scipy_nor_torch_dynamo(tiny_checkpoint, tmp_path, family):
    modules, stdout = oneshot_modules(tiny_checkpoint(family), tmp_path)
    assert len(list(tmp_path.glob("*.png"))) == 1 and "saved " in stdout  # the run did generate
    assert "diffgen.models.vaes.autoencoder_kl" in modules and "diffgen.pipelines.flow_match" in modules
    assert "diffgen.models.encoders.t5" in modules and "diffgen.models.encoders.clip" in modules
    assert "diffgen.models.encoders.tokenizers" in modules and "tokenizers" in modules
    for package in NOT_IMPORTED_BY_FLUX:
        assert imported(modules, package) == [], f"a FLUX generate imported {imported(modules, package)[:5]}"


def test_decode_only_pipelines_leave_out_diffusers_vae_module(tiny_checkpoint, tmp_path):
    """Qwen-Image text-to-image (native DiT, VAE decoder and sampler) imports no diffusers at all; Wan text-to-video
    (its UniPC scheduler is still diffusers') none of diffusers' model packages. With ``DIFFGEN_NATIVE_VAE=0`` the
    probe sees diffusers' Wan VAE module: the check can fail."""
    modules, stdout = oneshot_modules(tiny_checkpoint("qwen-image"), tmp_path / "qwen")
    assert "saved " in stdout and "diffgen.pipelines.flow_match" in modules
    assert imported(modules, "diffusers") == [], imported(modules, "diffusers")[:5]
    modules, stdout = oneshot_modules(tiny_checkpoint("wan-t2v"), tmp_path / "wan")
    assert "saved " in stdout and "diffusers.schedulers.scheduling_unipc_multistep" in modules
    assert imported(modules, "diffusers.models") == [], imported(modules, "diffusers.models")[:5]
    modules, _ = oneshot_modules(tiny_checkpoint("wan-t2v"), tmp_path / "wan-diffusers", {"DIFFGEN_NATIVE_VAE": "0"})
    assert "diffusers.models.autoencoders.autoencoder_kl_wan" in modules


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (its load path, kernels and Triton)")
def test_flux_generate_on_the_gpu_imports_neither(tiny_flux, tmp_path):
    """The CUDA path adds diffgen's parallel reader, the GPU library warm-up and the Triton kernels."""
    modules, stdout = oneshot_modules(tiny_flux, tmp_path, device="cuda")
    assert len(list(tmp_path.glob("*.png"))) == 1 and "saved " in stdout
    for package in NOT_IMPORTED_BY_FLUX:
        assert imported(modules, package) == [], f"a FLUX generate imported {imported(modules, package)[:5]}"


def test_the_probe_sees_diffusers_when_the_run_uses_it(tiny_flux, tmp_path):
    """The same probe with diffusers' VAE and scheduler asked for: the check above can fail."""
    modules, _ = oneshot_modules(tiny_flux, tmp_path, {"DIFFGEN_NATIVE_VAE": "0", "DIFFGEN_NATIVE_SCHEDULER": "0"})
    assert "diffusers.models.autoencoders.autoencoder_kl" in modules
    assert "diffusers.schedulers.scheduling_flow_match_euler_discrete" in modules


def test_the_probe_sees_transformers_when_the_tokenizers_switch_is_off(tiny_flux, tmp_path):
    """With transformers' tokenizers asked for, the probe finds the transformers package (its tokenizer code), and
    still none of its model code."""
    modules, _ = oneshot_modules(tiny_flux, tmp_path, {"DIFFGEN_NATIVE_TOKENIZERS": "0"})
    assert "transformers.models.clip.tokenization_clip" in modules
    assert "transformers.models.t5.tokenization_t5" in modules
    assert "diffgen.models.encoders.tokenizers" in modules  # the FLUX pipeline module still imports the classes
    assert imported(modules, "transformers.models.t5.modeling_t5") == [] and "torch._dynamo" not in modules


def test_the_probe_sees_transformers_model_code_when_the_run_uses_it(tiny_flux, tmp_path):
    """With transformers' text encoders asked for, the same probe finds their model code and torch._dynamo."""
    modules, _ = oneshot_modules(tiny_flux, tmp_path, {"DIFFGEN_NATIVE_TEXT_ENCODERS": "0"})
    assert "transformers.models.t5.modeling_t5" in modules and "transformers.models.clip.modeling_clip" in modules
    assert "torch._dynamo" in modules
