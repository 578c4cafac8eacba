"""Shared layers in half precision round exactly as the reference implementations do."""

from __future__ import annotations

import pytest
import torch

from diffgen.layers.norm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_matches_both_reference_roundings(dtype):
    from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

    torch.manual_seed(0)
    x = (torch.randn(2, 64, 4, 128) * 3).to(dtype)
    weight = (torch.randn(128) * 2).to(dtype)

    torch_norm = torch.nn.RMSNorm(128, eps=1e-6).to(dtype)  # what FLUX and Wan use
    diffusers_norm = DiffusersRMSNorm(128, eps=1e-6).to(dtype)  # what Qwen-Image uses
    fused, rounded = RMSNorm(128, 1e-6).to(dtype), RMSNorm(128, 1e-6, round_before_scale=True).to(dtype)
    for module in (torch_norm, diffusers_norm, fused, rounded):
        module.weight.data.copy_(weight)

    with torch.no_grad():
        assert torch.equal(fused(x), torch_norm(x))
        assert torch.equal(rounded(x), diffusers_norm(x))
        assert not torch.equal(fused(x), rounded(x))  # the two roundings really differ here


def test_rms_norm_with_float32_weight_keeps_the_input_dtype():
    norm = RMSNorm(16)
    x = torch.randn(3, 16).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.nn.functional.rms_norm(x.float(), (16,), eps=1e-6),
                               atol=1e-2, rtol=1e-2)
