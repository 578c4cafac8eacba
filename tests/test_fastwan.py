"""FastWan (DMD-distilled Wan): the 3-step loop against a reference written here, recognition, CLI, bad input.

diffusers has no DMD pipeline, so the reference is the published algorithm (FastVideo's
DmdDenoisingStage) over diffusers' own Wan components loaded from the same tiny folder: noise from
one CPU generator seeded with the request's seed; at each timestep t the clean sample is
``x - (t/1000) * v``, re-noised to the next timestep with the generator's next draw.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from diffgen.engine.engine import Engine
from diffgen.entrypoints.cli import main

PROMPT = "A curious raccoon"
TIMESTEPS = (1000, 757, 522)
LATENT_TOL = 1e-5
PIXEL_TOL = 1e-4


def reference_dmd(path: str, seed: int, height: int, width: int, num_frames: int, outputs: int = 1,
                  max_sequence_length: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """(latents, frames in [0, 1]) of the DMD loop over diffusers' Wan components."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path, dtype=torch.float32)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                tensor.data = tensor.data.clone()  # aligned copies, as in tests/test_wan.py
    per_token = bool(pipe.config.expand_timesteps)
    with torch.no_grad():
        text, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, num_videos_per_prompt=outputs,
                                     max_sequence_length=max_sequence_length)
        vae = pipe.vae
        scale_t, scale_s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
        shape = (outputs, vae.config.z_dim, (num_frames - 1) // scale_t + 1, height // scale_s, width // scale_s)
        generator = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn(shape, generator=generator)
        sigmas = [t / 1000 for t in TIMESTEPS] + [0.0]
        tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
        for i, t in enumerate(TIMESTEPS):
            timestep = torch.full((outputs, tokens) if per_token else (outputs,), float(t))
            velocity = pipe.transformer(x, timestep, text, return_dict=False)[0]
            clean = x - sigmas[i] * velocity
            x = clean if sigmas[i + 1] == 0 else (
                (1 - sigmas[i + 1]) * clean + sigmas[i + 1] * torch.randn(shape, generator=generator))
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        video = vae.decode(x / inv_std + mean, return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")
    return x, frames


def assert_parity(latents, frames, result) -> None:
    assert result.latents.shape == latents.shape
    assert (result.latents - latents).abs().max().item() <= LATENT_TOL
    assert result.pixels.shape == frames.shape
    assert np.abs(result.pixels.numpy() - frames).max() <= PIXEL_TOL


def test_fastwan21_dmd_matches_reference_two_outputs(tiny_checkpoint):
    path = tiny_checkpoint("fastwan-t2v")
    engine = Engine.from_pretrained(path, device="cpu", dtype="float32")
    assert type(engine.pipeline).__name__ == "WanDMDPipeline"
    calls = []
    engine.pipeline.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["timestep"].clone()), with_kwargs=True)
    result = engine.generate(PROMPT, seed=7, height=48, width=80, num_frames=9, num_outputs_per_prompt=2,
                             max_sequence_length=16, return_tensors=True)
    assert [c.tolist() for c in calls] == [[float(t)] * 2 for t in TIMESTEPS]  # one DiT call per step, no CFG
    assert result.request.num_inference_steps == 3
    assert_parity(*reference_dmd(path, seed=7, height=48, width=80, num_frames=9, outputs=2), result)
    assert not np.array_equal(result.frames[0], result.frames[1])


def test_fastwan22_ti2v_dmd_matches_reference(tiny_checkpoint):
    """TI2V-5B geometry (48-channel VAE, 16x): every token gets the step's timestep."""
    path = tiny_checkpoint("fastwan22-ti2v")
    engine = Engine.from_pretrained(path, device="cpu", dtype="float32")
    result = engine.generate(PROMPT, seed=2, height=64, width=96, num_frames=5, max_sequence_length=16,
                             return_tensors=True)
    assert_parity(*reference_dmd(path, seed=2, height=64, width=96, num_frames=5), result)


def test_recognised_by_model_index_not_by_path(tiny_checkpoint, tmp_path):
    fast = shutil.copytree(tiny_checkpoint("fastwan-t2v"), tmp_path / "Wan2.1-T2V-1.3B-Diffusers")
    plain = shutil.copytree(tiny_checkpoint("wan-t2v"), tmp_path / "FastWan2.1-T2V-1.3B-Diffusers")
    assert type(Engine.from_pretrained(str(fast), device="cpu").pipeline).__name__ == "WanDMDPipeline"
    assert type(Engine.from_pretrained(str(plain), device="cpu").pipeline).__name__ == "WanPipeline"
    # a dmd_denoising_steps list in the scheduler config replaces the default timesteps
    config_file = fast / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, dmd_denoising_steps=[1000, 500])))
    engine = Engine.from_pretrained(str(fast), device="cpu")
    assert engine.pipeline.dmd_timesteps == [1000, 500]
    result = engine.generate(PROMPT, seed=0, height=32, width=32, num_frames=5, num_inference_steps=2,
                             max_sequence_length=8)
    assert result.request.num_inference_steps == 2


def test_defaults(tiny_checkpoint):
    t2v = Engine.from_pretrained(tiny_checkpoint("fastwan-t2v"), device="cpu").defaults
    assert (t2v.height, t2v.width, t2v.num_frames, t2v.num_inference_steps, t2v.guidance_scale) == (448, 832, 61, 3, 1)
    ti2v = Engine.from_pretrained(tiny_checkpoint("fastwan22-ti2v"), device="cpu").defaults
    assert (ti2v.height, ti2v.width, ti2v.num_frames, ti2v.fps) == (704, 1280, 121, 24)


def test_cli_writes_mp4_of_asked_frames_and_size(tiny_checkpoint, tmp_path):
    import imageio_ffmpeg

    code = main(["generate", "--model-path", tiny_checkpoint("fastwan-t2v"), "--prompt", PROMPT, "--height", "32",
                 "--width", "48", "--num-frames", "9", "--fps", "8", "--seed", "1", "--max-sequence-length", "8",
                 "--output-path", str(tmp_path), "--output-file-name", "fast", "--save-output"])
    assert code == 0
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "fast.mp4"))
    meta = next(reader)
    frames = list(reader)
    assert meta["size"] == (48, 32) and len(frames) == 9


@pytest.mark.parametrize(("args", "field"), [
    (["--num-inference-steps", "4"], "num_inference_steps"),
    (["--guidance-scale", "5"], "guidance_scale"),
    (["--num-frames", "10"], "num_frames"),
    (["--height", "40"], "height"),
])
def test_bad_input_is_one_line_error(tiny_checkpoint, capsys, args, field):
    code = main(["generate", "--model-path", tiny_checkpoint("fastwan-t2v"), "--prompt", PROMPT, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and field in err and "\n" not in err
