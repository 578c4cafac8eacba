"""Fused paths: concatenated projections and the Triton norm+RoPE kernel equal the plain PyTorch path.

CPU: the fused projections are bit-equal (each output column is the same dot product), the norm+RoPE
dispatcher falls back to the plain ops, and the Triton kernel itself is checked in Triton's CPU
interpreter where Triton is installed. GPU: the kernel against the plain path in bf16, several shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from diffgen.layers.linear import fuse_linears, fuse_projections
from diffgen.layers.norm import RMSNorm
from diffgen.layers.rope import apply_rope, norm_and_rope, rope_tables


def test_fused_linear_equals_separate_linears():
    torch.manual_seed(0)
    linears = [torch.nn.Linear(24, n) for n in (24, 24, 40)]
    fused = fuse_linears(*linears)
    x = torch.randn(3, 7, 24)
    parts = fused(x).split([24, 24, 40], dim=-1)
    for part, linear in zip(parts, linears, strict=True):
        assert torch.equal(part, linear(x))


def test_fuse_linears_leaves_other_linear_types_alone():
    from diffgen.layers.linear import FP8Linear

    plain = torch.nn.Linear(16, 16)
    assert fuse_linears(plain, FP8Linear.from_linear(torch.nn.Linear(16, 16))) is None
    assert fuse_linears(plain, torch.nn.Linear(8, 16)) is None  # different inputs
    assert fuse_linears(plain, torch.nn.Linear(16, 16, bias=False)) is None
    assert fuse_linears(plain, None) is None


def _flux():
    from diffgen.models.dits.flux import FluxConfig, FluxTransformer

    config = FluxConfig(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                        axes_dims_rope=(4, 4, 8))
    tokens, text = 12, 5
    img_ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // 4, torch.arange(tokens) % 4], -1)
    inputs = dict(hidden_states=torch.randn(2, tokens, 64), timestep=torch.tensor([0.3, 0.9]),
                  encoder_hidden_states=torch.randn(2, text, 32), pooled_projections=torch.randn(2, 32),
                  img_ids=img_ids, txt_ids=torch.zeros(text, 3), guidance=torch.tensor([3.5, 2.0]))
    return FluxTransformer(config), inputs, 2 * 2 + 2  # double: image + text qkv; single: qkv+mlp


def _wan():
    from diffgen.models.dits.wan import WanConfig, WanTransformer

    config = WanConfig(num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=32, num_layers=2,
                       rope_max_seq_len=32)
    inputs = dict(hidden_states=torch.randn(2, 16, 3, 8, 6), timestep=torch.tensor([999.0, 300.0]),
                  encoder_hidden_states=torch.randn(2, 9, 32))
    return WanTransformer(config), inputs, 2 * 2  # self-attention qkv + cross-attention kv per block


def _qwen():
    from diffgen.models.dits.qwen_image import QwenImageConfig, QwenImageTransformer

    config = QwenImageConfig(num_layers=2, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=24,
                             axes_dims_rope=(8, 4, 4))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    inputs = dict(hidden_states=torch.randn(2, 35, 64), timestep=torch.tensor([0.7, 0.3]),
                  encoder_hidden_states=torch.randn(2, 9, 24), image_shapes=[(1, 5, 7)],
                  encoder_hidden_states_mask=mask)
    return QwenImageTransformer(config), inputs, 2 * 2


@pytest.mark.parametrize("build", [_flux, _wan, _qwen], ids=["flux", "wan", "qwen-image"])
def test_fused_projections_give_the_same_forward(build):
    torch.manual_seed(0)
    plain, inputs, expected_fusions = build()
    plain.eval()
    fused = copy.deepcopy(plain)
    names_on_disk = set(plain.state_dict())
    assert fuse_projections(fused) == expected_fusions
    assert not any(name.endswith(("to_k.weight", "proj_mlp.weight")) for name in fused.state_dict())
    assert names_on_disk == set(plain.state_dict())  # the unfused model (what loading checks) is untouched
    assert fuse_projections(fused) == 0  # a second call (e.g. a pipeline built from fused components) is a no-op
    with torch.no_grad():
        assert torch.equal(fused(**inputs), plain(**inputs))


def test_loading_fuses_projections_only_when_asked(tiny_flux, monkeypatch):
    from diffgen.loader.components import FUSE_PROJECTIONS_ENV, load_pipeline

    dit = load_pipeline(tiny_flux, device="cpu").transformer
    assert hasattr(dit.transformer_blocks[0].attn, "to_q") and not hasattr(dit.transformer_blocks[0].attn, "to_qkv")
    monkeypatch.setenv(FUSE_PROJECTIONS_ENV, "1")
    dit = load_pipeline(tiny_flux, device="cpu").transformer
    assert hasattr(dit.transformer_blocks[0].attn, "to_qkv") and hasattr(dit.single_transformer_blocks[0], "to_qkv_mlp")


CASES = [  # (batch, seq, heads, head_dim, norm_over_heads, round_before_scale, affine)
    (1, 7, 3, 16, False, False, True),
    (2, 5, 2, 8, True, False, True),  # Wan: norm across heads
    (1, 6, 2, 16, False, True, True),  # Qwen-Image: round before scale
    (1, 4, 3, 16, False, False, False),
    (1, 4, 2, 16, None, False, False),  # rotation only
]


def _plain_and_norm(x, norm_over_heads, round_before_scale, affine):
    heads, head_dim = x.shape[2:]
    if norm_over_heads is None:
        return None
    norm = RMSNorm(heads * head_dim if norm_over_heads else head_dim, 1e-6, elementwise_affine=affine,
                   round_before_scale=round_before_scale)
    if affine:
        norm.weight.data = torch.randn_like(norm.weight)
    return norm.to(x.dtype)


def _reference(x, norm, cos, sin, norm_over_heads):
    if norm is not None:
        x = norm(x.flatten(2)).unflatten(2, x.shape[2:]) if norm_over_heads else norm(x)
    return apply_rope(x, cos, sin)


@pytest.mark.parametrize("case", CASES)
def test_norm_and_rope_on_cpu_is_the_plain_path(case):
    batch, seq, heads, head_dim, over, rbs, affine = case
    torch.manual_seed(1)
    x = torch.randn(batch, seq, heads, head_dim) * 3
    cos, sin = rope_tables(torch.randn(seq, head_dim // 2))
    norm = _plain_and_norm(x, over, rbs, affine)
    got = norm_and_rope(x, norm, cos, sin, norm_over_heads=bool(over))
    assert torch.equal(got, _reference(x, norm, cos, sin, bool(over)))


_INTERPRETER_CHECK = """
import torch
from diffgen.layers.fused import rms_norm_rope
from tests.test_fused import CASES, _plain_and_norm, _reference
from diffgen.layers.rope import rope_tables
torch.manual_seed(2)
worst = 0.0
for batch, seq, heads, head_dim, over, rbs, affine in CASES:
    x = torch.randn(batch, seq, 3 * heads, head_dim)[:, :, heads:2 * heads] * 3  # a strided view, as after fused qkv
    cos, sin = rope_tables(torch.randn(seq, head_dim // 2))
    norm = _plain_and_norm(x, over, rbs, affine)
    got = rms_norm_rope(x, None if norm is None else norm.weight, None if norm is None else norm.eps, cos, sin,
                        bool(over), rbs)
    worst = max(worst, (got - _reference(x, norm, cos, sin, bool(over))).abs().max().item())
print(worst)
"""


def test_triton_norm_rope_kernel_in_the_cpu_interpreter(triton_interpreter):
    worst = triton_interpreter(_INTERPRETER_CHECK)[-1]
    assert float(worst) <= 1e-5  # float32: only the summation order differs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernel runs on CUDA only)")
@pytest.mark.parametrize("shape", [(1, 4608, 24, 128), (2, 333, 12, 128), (1, 1000, 12, 64), (1, 300, 40, 128)])
@pytest.mark.parametrize("variant", [(False, False, True), (True, False, True), (False, True, True),
                                     (None, False, False)], ids=["per-head", "across-heads", "round-first", "rope"])
def test_triton_norm_rope_matches_plain_path_on_gpu(shape, variant):
    from diffgen.layers.fused import use_fused_kernel

    over, rbs, affine = variant
    torch.manual_seed(3)
    batch, seq, heads, head_dim = shape
    x = (torch.randn(batch, seq, 3 * heads, head_dim, device="cuda") * 3).bfloat16()[:, :, heads:2 * heads]
    cos, sin = (t.cuda() for t in rope_tables(torch.randn(seq, head_dim // 2, dtype=torch.float64) * 50))
    norm = _plain_and_norm(x, over, rbs, affine)
    norm = norm.cuda() if norm is not None else None
    assert use_fused_kernel(x)
    with torch.no_grad():
        got = norm_and_rope(x, norm, cos, sin, norm_over_heads=bool(over))
        expected = _reference(x, norm, cos, sin, bool(over))
    assert got.dtype == expected.dtype and got.shape == expected.shape
    # bf16 rounding of the result; in almost all elements the two agree exactly
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=1e-2)
    assert (got != expected).float().mean().item() < 0.01


def test_channels_last_vae_weights_change_only_the_layout():
    from diffusers import AutoencoderKLWan

    from diffgen.pipelines.wan import channels_last_conv3d

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False]).eval()
    z = torch.randn(1, 4, 2, 6, 8)
    with torch.no_grad():
        expected = vae.decode(z, return_dict=False)[0]
        channels_last_conv3d(vae)
        convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]
        assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convs)
        got = vae.decode(z.contiguous(memory_format=torch.channels_last_3d), return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # float32: summation order only


# -- AdaLN norm + modulate and the gated residual ------------------------------------------------------
MODULATION_SHAPES = {"per-sample (B, D)": lambda b, s, d: (b, d), "(B, 1, D)": lambda b, s, d: (b, 1, d),
                     "per-token (B, S, D)": lambda b, s, d: (b, s, d)}


def _modulation_inputs(batch, seq, dim, kind, dtype=torch.float32, device="cpu", mod_dtype=None):
    generator = torch.Generator(device).manual_seed(seq * 7 + dim)
    x = (torch.randn(batch, seq, dim, generator=generator, device=device) * 2 + 0.5).to(dtype)
    mods = [(torch.randn(MODULATION_SHAPES[kind](batch, seq, dim), generator=generator, device=device) * 0.5)
            .to(mod_dtype or dtype) for _ in range(3)]
    return x, *mods


def _plain_modulate(norm, x, shift, scale, float32):
    from diffgen.layers.modulation import modulate

    return modulate(norm(x.float()), shift, scale).type_as(x) if float32 else modulate(norm(x), shift, scale)


def _plain_gated(x, gate, y, float32):
    gate = gate.unsqueeze(1) if gate.ndim == 2 else gate
    return (x.float() + y * gate).type_as(x) if float32 else x + gate * y


@pytest.mark.parametrize("kind", list(MODULATION_SHAPES))
@pytest.mark.parametrize("float32", [False, True])
def test_norm_modulate_and_gated_add_on_cpu_are_the_plain_path(kind, float32):
    from diffgen.layers.modulation import gated_add, norm_modulate
    from diffgen.layers.norm import FP32LayerNorm, layer_norm_no_affine

    dtype = torch.bfloat16
    x, shift, scale, gate = _modulation_inputs(2, 9, 32, kind, dtype, mod_dtype=torch.float32 if float32 else dtype)
    norm = FP32LayerNorm(32, 1e-6, elementwise_affine=False) if float32 else layer_norm_no_affine(32)
    assert torch.equal(norm_modulate(norm, x, shift, scale, float32=float32),
                       _plain_modulate(norm, x, shift, scale, float32))
    y = torch.randn_like(x)
    assert torch.equal(gated_add(x, gate, y, float32=float32), _plain_gated(x, gate, y, float32))


_MODULATION_INTERPRETER_CHECK = """
import torch
from diffgen.layers.fused import gated_add_triton, layer_norm_modulate_triton
from diffgen.layers.norm import layer_norm_no_affine
from tests.test_fused import MODULATION_SHAPES, _modulation_inputs, _plain_gated, _plain_modulate

worst = 0.0
for kind in MODULATION_SHAPES:
    for batch, seq, dim in [(2, 5, 24), (1, 3, 40)]:
        x, shift, scale, gate = _modulation_inputs(batch, seq, dim, kind)
        norm = layer_norm_no_affine(dim)
        for round_steps in (True, False):  # rounding to float32 is a no-op: both equal the float32 plain path
            got = layer_norm_modulate_triton(x, shift, scale, norm.eps, round_steps)
            worst = max(worst, (got - _plain_modulate(norm, x, shift, scale, False)).abs().max().item())
            y = torch.randn(batch, 2 * seq, dim)[:, ::2]  # a strided view, as attention outputs can be
            got = gated_add_triton(x, gate, y, round_steps)
            worst = max(worst, (got - _plain_gated(x, gate, y, False)).abs().max().item())
# bfloat16: each rounding step as the plain ops on the CPU take it (they round like CUDA's: float math, then round)
mismatch = 0.0
for kind in MODULATION_SHAPES:
    x, shift, scale, gate = _modulation_inputs(2, 64, 96, kind, torch.bfloat16)
    norm = layer_norm_no_affine(96)
    y = torch.randn_like(x)
    for got, expected in [(layer_norm_modulate_triton(x, shift, scale, norm.eps, True),
                           _plain_modulate(norm, x, shift, scale, False)),
                          (gated_add_triton(x, gate, y, True), _plain_gated(x, gate, y, False))]:
        mismatch = max(mismatch, (got != expected).float().mean().item())
print(mismatch)
print(worst)
"""


def test_modulation_kernels_in_the_cpu_interpreter(triton_interpreter):
    *_, mismatch, worst = triton_interpreter(_MODULATION_INTERPRETER_CHECK)
    assert float(worst) <= 1e-5  # float32: only the summation order differs
    assert float(mismatch) < 0.01  # bfloat16: the same roundings (an element differs where the norm's sums do)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernels run on CUDA only)")
@pytest.mark.parametrize("shape", [(1, 4608, 3072), (2, 333, 1536), (1, 77, 5120), (2, 512, 3072)])
@pytest.mark.parametrize("kind", list(MODULATION_SHAPES))
@pytest.mark.parametrize("float32", [False, True], ids=["bf16-ops", "float32-ops"])
def test_modulation_kernels_match_plain_path_on_gpu(shape, kind, float32):
    from diffgen.layers.fused import use_fused_kernel
    from diffgen.layers.modulation import gated_add, norm_modulate
    from diffgen.layers.norm import FP32LayerNorm, layer_norm_no_affine

    dtype = torch.bfloat16
    x, shift, scale, gate = _modulation_inputs(*shape, kind, dtype, "cuda", torch.float32 if float32 else dtype)
    norm = FP32LayerNorm(shape[-1], 1e-6, elementwise_affine=False) if float32 else layer_norm_no_affine(shape[-1])
    y = torch.randn(shape, device="cuda").to(dtype)
    assert use_fused_kernel(x)
    with torch.no_grad():
        for got, expected in [(norm_modulate(norm, x, shift, scale, float32=float32),
                               _plain_modulate(norm, x, shift, scale, float32)),
                              (gated_add(x, gate, y, float32=float32), _plain_gated(x, gate, y, float32))]:
            assert got.dtype == expected.dtype == dtype and got.shape == expected.shape
            torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=1e-2)
            assert (got != expected).float().mean().item() < 0.01  # bf16: almost every element bit-equal
