"""--quantize fp8: which linears are replaced, bounded error, and the fp8 tensor-core path (GPU only)."""

from __future__ import annotations

import pytest
import torch

from diffgen import Engine
from diffgen.errors import DiffgenError
from diffgen.layers.linear import FP8Linear, quantize_linears_fp8

RUN = dict(prompt="a fox", height=32, width=48, num_inference_steps=2, seed=1, return_tensors=True)
HAS_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def test_fp8_replaces_block_linears_but_not_modulation(tiny_flux):
    engine = Engine.from_pretrained(tiny_flux, device="cpu", quantize="fp8")
    dit = engine.pipeline.transformer
    quantized = {name for name, m in dit.named_modules() if isinstance(m, FP8Linear)}
    assert "transformer_blocks.0.attn.to_q" in quantized and "single_transformer_blocks.0.proj_out" in quantized
    assert not any("norm" in name for name in quantized)  # AdaLN modulation stays in full precision
    assert isinstance(dit.proj_out, torch.nn.Linear) and isinstance(dit.x_embedder, torch.nn.Linear)
    assert {m.weight.dtype for m in dit.modules() if isinstance(m, FP8Linear)} == {torch.float8_e4m3fn}


def test_fp8_output_stays_close_to_full_precision(tiny_flux):
    full = Engine.from_pretrained(tiny_flux, device="cpu").generate(**RUN).pixels
    fp8 = Engine.from_pretrained(tiny_flux, device="cpu", quantize="fp8").generate(**RUN).pixels
    assert not torch.equal(full, fp8)  # the weights really changed
    assert (fp8 - full).abs().max() < 0.02


def test_unknown_quantization_is_a_clear_error(tiny_flux):
    with pytest.raises(DiffgenError, match="--quantize 'int3' is not supported; choose one of fp8"):
        Engine.from_pretrained(tiny_flux, device="cpu", quantize="int3")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9)")
def test_fp8_tensor_core_linear_matches_bf16_on_gpu():
    torch.manual_seed(0)
    for tokens, dim_in, dim_out in ((4096, 3072, 3072), (77, 3072, 12288), (1, 64, 32)):
        linear = torch.nn.Linear(dim_in, dim_out, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(2, tokens, dim_in, device="cuda", dtype=torch.bfloat16)
        expected = linear(x)
        module = FP8Linear.from_linear(linear)
        out = module(x)
        assert out.dtype == torch.bfloat16 and out.shape == expected.shape
        rel = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
        assert rel < 0.05, (tokens, dim_in, dim_out, rel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flux_runs_on_gpu_in_bf16_compiled_and_fp8(tiny_flux):
    reference = Engine.from_pretrained(tiny_flux, device="cuda", dtype="bfloat16").generate(**RUN).pixels
    assert torch.isfinite(reference).all()
    for options in ({"compile": True}, {"quantize": "fp8"} if HAS_FP8_GPU else {"compile": True}):
        pixels = Engine.from_pretrained(tiny_flux, device="cuda", dtype="bfloat16", **options).generate(**RUN).pixels
        assert (pixels - reference).abs().max() < 0.05, options


def test_quantize_skips_models_without_block_lists():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    assert quantize_linears_fp8(model) == 0
