"""FLUX.1 parity with diffusers' FluxPipeline on tiny checkpoints (float32, CPU, same seed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffgen import Engine

PROMPT = "A painting of a squirrel eating a burger"


@pytest.fixture(scope="module")
def pipelines(tiny_flux, tiny_flux_schnell):
    from diffusers import FluxPipeline

    out = {}
    for variant, path in (("dev", tiny_flux), ("schnell", tiny_flux_schnell)):
        reference = FluxPipeline.from_pretrained(path, dtype=torch.float32)
        reference.set_progress_bar_config(disable=True)
        out[variant] = (reference, Engine.from_pretrained(path, device="cpu", dtype="float32"))
    return out


def _reference(pipe, seed: int, **kwargs):
    latents = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **kwargs).images
    pixels = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images
    return latents, pixels


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("height,width,outputs", [(64, 64, 1), (48, 80, 2)])
def test_flux_matches_diffusers(pipelines, variant, height, width, outputs):
    reference, engine = pipelines[variant]
    kwargs = dict(height=height, width=width, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=32)
    ref_latents, ref_pixels = _reference(reference, 11, prompt=PROMPT, num_images_per_prompt=outputs, **kwargs)
    result = engine.generate(PROMPT, seed=11, num_outputs_per_prompt=outputs, return_tensors=True, **kwargs)

    assert result.latents.shape == ref_latents.shape
    torch.testing.assert_close(result.latents, ref_latents, atol=1e-5, rtol=0)
    assert np.abs(result.pixels.numpy() - ref_pixels).max() <= 1e-4
    assert len(result.images) == outputs
    assert all(image.size == (width, height) for image in result.images)


def test_flux_true_cfg_and_several_prompts_match_diffusers(pipelines):
    """Two prompts with two outputs each: outputs (and their embeddings) are ordered prompt-major."""
    reference, engine = pipelines["dev"]
    prompts = [PROMPT, "a red cube on a table"]
    kwargs = dict(height=32, width=48, num_inference_steps=2, guidance_scale=2.0, max_sequence_length=24,
                  true_cfg_scale=3.0)
    negative = ["blurry", "low quality"]
    ref_latents, ref_pixels = _reference(reference, 5, prompt=prompts, negative_prompt=negative,
                                         num_images_per_prompt=2, **kwargs)
    result = engine.generate(prompts, negative_prompt=negative, seed=5, num_outputs_per_prompt=2,
                             return_tensors=True, **kwargs)
    torch.testing.assert_close(result.latents, ref_latents, atol=1e-5, rtol=0)
    assert np.abs(result.pixels.numpy() - ref_pixels).max() <= 1e-4


def test_seed_changes_output_and_repeats_exactly(pipelines):
    _, engine = pipelines["schnell"]
    kwargs = dict(height=32, width=32, num_inference_steps=2, return_tensors=True)
    a, b, c = (engine.generate(PROMPT, seed=s, **kwargs).pixels for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def _aligned(module: torch.nn.Module) -> torch.nn.Module:
    """Fresh copies of safetensors' memory-mapped tensors: CPU kernels round differently on unaligned data."""
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = tensor.data.clone()
    return module


# float32: the same arithmetic (the attention kernel may sum in another order: 1e-5). bfloat16: the same
# rounding order too (torch.nn.RMSNorm-style q/k norms, contiguous output projections), equal to the last bit.
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)], ids=["fp32", "bf16"])
def test_native_dit_matches_diffusers_transformer(tiny_flux, dtype, tolerance):
    from pathlib import Path

    from diffusers import FluxTransformer2DModel

    from diffgen.loader.weights import load_native_model
    from diffgen.models.dits.flux import FluxTransformer

    folder = f"{tiny_flux}/transformer"
    reference = _aligned(FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).eval())
    native = load_native_model(FluxTransformer, Path(folder), dtype, "cpu")
    torch.manual_seed(0)
    tokens, text = 24, 7
    inputs = dict(hidden_states=torch.randn(2, tokens, 64), encoder_hidden_states=torch.randn(2, text, 32),
                  pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.3, 0.9]),
                  guidance=torch.tensor([3.5, 1.0]))
    inputs = {name: value.to(dtype) for name, value in inputs.items()}
    img_ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // 6, torch.arange(tokens) % 6], -1).float()
    txt_ids = torch.zeros(text, 3)
    with torch.no_grad():
        expected = reference(**inputs, img_ids=img_ids, txt_ids=txt_ids).sample
        got = native(**inputs, img_ids=img_ids, txt_ids=txt_ids)
    assert got.dtype == dtype
    assert (got.float() - expected.float()).abs().max().item() <= tolerance
