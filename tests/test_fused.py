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


def _flux_on_gpu():
    """The tiny FLUX of :func:`_flux` in bf16 on CUDA, for inference, and its inputs there."""
    model, inputs, _ = _flux()
    model = model.to("cuda", torch.bfloat16).eval().requires_grad_(False)
    return model, {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


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
    (2, 9, 6, 24, False, False, True),  # a head_dim that is no power of two, heads in two tiles of 2 per token
    (1, 6, 3, 12, True, True, True),  # across 3 heads (padded to 4) with rounding before the scale
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
from diffgen.layers import fused
from tests.test_fused import CASES, _plain_and_norm, _reference
from diffgen.layers.rope import rope_tables
torch.manual_seed(2)
worst = 0.0
for tile in (fused.NORM_ROPE_TILE, 16):  # one program per few tokens, or one token per program (tails, many tiles)
    fused.NORM_ROPE_TILE = tile
    for batch, seq, heads, head_dim, over, rbs, affine in CASES:
        x = torch.randn(batch, seq, 3 * heads, head_dim)[:, :, heads:2 * heads] * 3  # a view, as after fused qkv
        cos, sin = rope_tables(torch.randn(seq, head_dim // 2))
        cos = cos + torch.randn_like(cos) * 0.1  # pairs with their own cos/sin: each channel reads its own entry
        norm = _plain_and_norm(x, over, rbs, affine)
        got = fused.rms_norm_rope(x, None if norm is None else norm.weight, None if norm is None else norm.eps, cos,
                                  sin, bool(over), rbs)
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


# -- the norm + RoPE kernel inside compiled graphs (the custom op diffgen::rms_norm_rope) ----------------------
def _op_args(x, norm, cos, sin, over):
    weight = None if norm is None else norm.weight
    return (x, weight, None if norm is None else norm.eps, cos, sin, bool(over),
            bool(norm is not None and norm.round_before_scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_norm_rope_op_is_the_plain_path_on_cpu(case, dtype):
    """The operator's fake (meta) implementation agrees with its real one (shape, strides, dtype; opcheck also
    runs it through Dynamo/AOT dispatch), and off CUDA it computes exactly what norm_and_rope's plain path does."""
    from diffgen.layers.fused import rms_norm_rope_op

    batch, seq, heads, head_dim, over, rbs, affine = case
    torch.manual_seed(1)
    x = (torch.randn(batch, seq, 3 * heads, head_dim) * 3).to(dtype)[:, :, heads:2 * heads]  # strided, as after qkv
    cos, sin = rope_tables(torch.randn(seq, head_dim // 2))
    norm = _plain_and_norm(x, over, rbs, affine)
    with torch.no_grad():
        args = _op_args(x, norm, cos, sin, over)
        torch.library.opcheck(torch.ops.diffgen.rms_norm_rope.default, args)
        got = rms_norm_rope_op(*args)
        assert got.is_contiguous() and torch.equal(got, _reference(x, norm, cos, sin, bool(over)))


# the graph families of each model's ops (Wan normalises q/k across heads)
NORM_FAMILY = {"flux": "norm_rope", "wan": "norm_rope_across_heads", "qwen-image": "norm_rope"}
# per block kind: calls of each op in its graph (FLUX double blocks: q and k of both streams, two AdaLN norms and two
# gated residuals per stream; single blocks: one of each; Wan: self-attention q/k, its norm1/norm3 and two residuals)
BLOCK_OPS = {"flux": [dict(rms_norm_rope=4, layer_norm_modulate=4, gated_add=4),
                      dict(rms_norm_rope=2, layer_norm_modulate=1, gated_add=1)],
             "wan": [dict(rms_norm_rope=2, layer_norm_modulate=2, gated_add=2)],
             "qwen-image": [dict(rms_norm_rope=4, layer_norm_modulate=4, gated_add=4)]}


def _op_calls(gm) -> dict:
    targets = [str(node.target) for node in gm.graph.nodes]
    return {op: n for op in ("rms_norm_rope", "layer_norm_modulate", "gated_add")
            if (n := sum(f"diffgen.{op}" in t for t in targets))}


@pytest.mark.parametrize("families", [("norm_rope", "norm_rope_across_heads"),
                                      ("norm_rope", "norm_rope_across_heads", "modulation"), True],
                         ids=["norm-rope", "all", "default"])
@pytest.mark.parametrize("family,build", [("flux", _flux), ("wan", _wan), ("qwen-image", _qwen)],
                         ids=["flux", "wan", "qwen-image"])
def test_compiled_blocks_call_the_custom_ops_and_agree_with_the_plain_forward(family, build, families,
                                                                             compiled_on_cpu):
    """compile_repeated_blocks puts the custom ops of the chosen families into the blocks' graphs (blocks of a kind
    share one) where compiled graphs take the kernels (here the CPU with Triton assumed: the ops' plain
    implementations; by default the q/k norm + RoPE ops); the forward equals the plain one, and turning
    the graph kernels off retraces to graphs without them (Dynamo guards on the setting)."""
    from diffgen.engine.optimize import compile_repeated_blocks
    from diffgen.layers import fused

    torch.manual_seed(0)
    model, inputs, _ = build()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        expected = model(**inputs)
    graphs = compiled_on_cpu(triton_available=True)
    fused.set_fused_kernels(None, graphs=families)
    compile_repeated_blocks(model)
    families = fused.GRAPH_KERNELS if families is True else families
    assert fused._in_graphs == families
    with torch.no_grad():
        got = model(**inputs)
    ops = {"rms_norm_rope"} if NORM_FAMILY[family] in families else set()
    ops |= {"layer_norm_modulate", "gated_add"} if "modulation" in families else set()
    assert [_op_calls(gm) for gm in graphs] == [{op: n for op, n in counts.items() if op in ops}
                                               for counts in BLOCK_OPS[family]]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)  # float32: the same ops, regrouped
    fused.set_fused_kernels(True, graphs=False)
    assert fused._in_graphs == ()
    traced = len(graphs)
    with torch.no_grad():
        got = model(**inputs)
    if any(_op_calls(gm) for gm in graphs[:traced]):  # else the graphs stay the same: no retrace needed
        assert len(graphs) == traced + len(BLOCK_OPS[family])
    assert not any(_op_calls(gm) for gm in graphs[traced:])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_graph_kernel_settings_come_from_the_environment_and_are_checked(monkeypatch):
    from diffgen.layers import fused

    monkeypatch.setattr(fused, "_triton_available", lambda: True)
    monkeypatch.delenv("DIFFGEN_DISABLE_TRITON", raising=False)
    try:
        for value, expected in [("", fused.GRAPH_KERNELS), ("1", fused.GRAPH_KERNELS), ("0", ()),
                                ("norm_rope, modulation", ("norm_rope", "modulation"))]:
            monkeypatch.setenv("DIFFGEN_GRAPH_KERNELS", value)
            assert fused.prepare_graph_kernels() == expected, value
        fused.set_fused_kernels(None, disabled=("norm_rope",))  # left out of eager, left out of graphs
        assert fused._in_graphs == ("modulation",)
        fused.set_fused_kernels(False)
        assert fused._in_graphs == ()
        monkeypatch.setenv("DIFFGEN_GRAPH_KERNELS", "norm_rope,fast")
        with pytest.raises(ValueError, match="DIFFGEN_GRAPH_KERNELS: no custom op for \\['fast'\\]"):
            fused.prepare_graph_kernels()
        with pytest.raises(ValueError, match="graphs: no custom op for \\['channel_norm'\\]"):
            fused.set_fused_kernels(None, graphs=("channel_norm",))
    finally:
        monkeypatch.undo()
        fused.set_fused_kernels(None)  # the real Triton check again


_OP_INTERPRETER_CHECK = """
import torch
from diffgen.layers.fused import rms_norm_rope
from tests.test_fused import CASES, _op_args, _plain_and_norm
from diffgen.layers.rope import rope_tables
torch.library.register_kernel("diffgen::rms_norm_rope", "cpu", rms_norm_rope)  # the CUDA implementation, on CPU
torch.manual_seed(4)
for batch, seq, heads, head_dim, over, rbs, affine in CASES:
    x = torch.randn(batch, seq, 3 * heads, head_dim)[:, :, heads:2 * heads]
    cos, sin = rope_tables(torch.randn(seq, head_dim // 2))
    with torch.no_grad():
        torch.library.opcheck(torch.ops.diffgen.rms_norm_rope.default,
                              _op_args(x, _plain_and_norm(x, over, rbs, affine), cos, sin, over))
from diffgen.layers.fused import gated_add_triton, layer_norm_modulate_triton
from tests.test_fused import MODULATION_SHAPES, _modulation_inputs
torch.library.register_kernel("diffgen::layer_norm_modulate", "cpu", layer_norm_modulate_triton)
torch.library.register_kernel("diffgen::gated_add", "cpu", gated_add_triton)
for kind in MODULATION_SHAPES:
    for round_steps in (True, False):
        x, shift, scale, gate = _modulation_inputs(2, 5, 24, kind, torch.bfloat16)
        y = torch.randn(2, 10, 24).bfloat16()[:, ::2]
        torch.library.opcheck(torch.ops.diffgen.layer_norm_modulate.default, (x, shift, scale, 1e-6, round_steps))
        torch.library.opcheck(torch.ops.diffgen.gated_add.default, (x, gate, y, round_steps))
print("ok")
"""


def test_op_fakes_match_the_triton_kernels_in_the_cpu_interpreter(triton_interpreter):
    assert triton_interpreter(_OP_INTERPRETER_CHECK)[-1] == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernel runs on CUDA only)")
def test_compiled_graphs_call_the_triton_kernel_on_gpu(monkeypatch):
    """Inductor calls the op (the same kernel as eager: bit-equal), and a tiny compiled FLUX with the ops in its graphs
    agrees with its compiled forward on Inductor's own kernels within bf16 rounding."""
    from diffgen.engine.optimize import compile_repeated_blocks
    from diffgen.layers import fused

    torch.manual_seed(5)
    x = (torch.randn(2, 333, 36, 128, device="cuda") * 3).bfloat16()[:, :, 12:24]
    cos, sin = (t.cuda() for t in rope_tables(torch.randn(333, 64, dtype=torch.float64) * 50))
    norm = _plain_and_norm(x, False, True, True).cuda()
    args = _op_args(x, norm, cos, sin, False)
    with torch.no_grad():
        torch.library.opcheck(torch.ops.diffgen.rms_norm_rope.default, args)
        assert torch.equal(torch.compile(lambda *a: fused.rms_norm_rope_op(*a))(*args), fused.rms_norm_rope(*args))
    calls = []
    launcher = fused.rms_norm_rope
    monkeypatch.setattr(fused, "rms_norm_rope", lambda *a: calls.append(1) or launcher(*a))
    model, inputs = _flux_on_gpu()
    outputs = {}
    try:
        compile_repeated_blocks(model)
        for graphs in (("norm_rope",), ("norm_rope", "modulation"), ()):
            fused.set_fused_kernels(None, graphs=graphs)
            calls.clear()
            with torch.inference_mode():
                outputs[graphs] = model(**inputs)
            assert bool(calls) == bool(graphs)  # the op's CUDA kernel ran inside the compiled blocks, or never
    finally:
        fused.set_fused_kernels(None)
    inductor = outputs[()].float()
    for graphs in (("norm_rope",), ("norm_rope", "modulation")):
        assert ((outputs[graphs].float() - inductor).norm() / inductor.norm()).item() < 1e-2


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


@pytest.mark.parametrize("kind", list(MODULATION_SHAPES))
@pytest.mark.parametrize("round_steps", [True, False])
def test_modulation_ops_are_the_plain_path_on_cpu(kind, round_steps):
    """The modulation ops' fake implementations agree with their real ones (opcheck), and off CUDA they compute what
    norm_modulate / gated_add's plain paths do (round_steps False: the float32 reference, cast back)."""
    from diffgen.layers.fused import gated_add_op, layer_norm_modulate_op
    from diffgen.layers.norm import FP32LayerNorm, layer_norm_no_affine

    dtype = torch.bfloat16
    mod_dtype = dtype if round_steps else torch.float32
    x, shift, scale, gate = _modulation_inputs(2, 9, 32, kind, dtype, mod_dtype=mod_dtype)
    y = torch.randn(2, 18, 32).to(dtype)[:, ::2]  # strided, as attention outputs can be
    norm = layer_norm_no_affine(32) if round_steps else FP32LayerNorm(32, 1e-6, elementwise_affine=False)
    for op, args, expected in [
            (layer_norm_modulate_op, (x, shift, scale, norm.eps, round_steps),
             _plain_modulate(norm, x, shift, scale, not round_steps)),
            (gated_add_op, (x, gate, y, round_steps), _plain_gated(x, gate, y, not round_steps))]:
        torch.library.opcheck(op._opoverload, args)
        got = op(*args)
        assert got.is_contiguous() and torch.equal(got, expected)
