"""The shared linear + tanh GELU (cuBLASLt's bias + GELU epilogue on CUDA, ``diffgen::linear_gelu`` in compiled
graphs) and the projection of a concatenation as one matmul per part (``linear_of_concat``).

CPU: both are exactly the plain ops (bit-equal), the operator passes ``opcheck``, and compiled tiny DiTs with the
families in their graphs call the op and agree with the plain forward. GPU: the epilogue and the split projection
agree with the plain bf16/fp16 path within the bounds their docstrings state.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from diffgen.layers import fused
from diffgen.layers.linear import linear_gelu, linear_gelu_op, linear_of_concat
from diffgen.testing.bounds import gelu_epilogue_bound, split_projection_bound
from tests.test_fused import _flux, _flux_on_gpu, _qwen, _wan

SHAPES = [((7, 16), 32), ((2, 9, 24), 40), ((1, 33, 64), 256)]  # (x shape, out features)


def _linear(k: int, n: int, bias: bool = True, dtype=torch.float32, device="cpu") -> torch.nn.Linear:
    torch.manual_seed(k * 1000 + n)
    linear = torch.nn.Linear(k, n, bias=bias).to(device, dtype)
    return linear.eval().requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,n", SHAPES)
def test_linear_gelu_on_cpu_is_the_plain_path_bit_for_bit(shape, n, dtype):
    linear = _linear(shape[-1], n, dtype=dtype)
    x = torch.randn(shape).to(dtype)
    for approximate in ("tanh", "none"):
        assert torch.equal(linear_gelu(linear, x, approximate), F.gelu(linear(x), approximate=approximate))
    no_bias = _linear(shape[-1], n, bias=False, dtype=dtype)
    assert torch.equal(linear_gelu(no_bias, x), F.gelu(no_bias(x), approximate="tanh"))
    assert torch.equal(linear_gelu_op(x, linear.weight, linear.bias), F.gelu(linear(x), approximate="tanh"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_gelu_op_passes_opcheck(dtype):
    """The fake implementation agrees with the real one (shape, strides, dtype), on contiguous and strided x."""
    for shape, n in SHAPES:
        linear = _linear(shape[-1], n, dtype=dtype)
        x = torch.randn(*shape[:-1], 2 * shape[-1]).to(dtype)[..., ::2]  # strided
        for args in ((x.contiguous(), linear.weight, linear.bias), (x, linear.weight, linear.bias)):
            torch.library.opcheck(torch.ops.diffgen.linear_gelu.default, args)


def test_linear_of_concat_on_cpu_is_the_plain_path_bit_for_bit():
    for dtype in (torch.float32, torch.bfloat16):
        parts = [torch.randn(2, 9, 8).to(dtype), torch.randn(2, 9, 24).to(dtype)]
        for bias in (True, False):
            linear = _linear(32, 16, bias=bias, dtype=dtype)
            assert torch.equal(linear_of_concat(linear, parts), linear(torch.cat(parts, dim=-1)))


class _RecordedCalls(torch.overrides.TorchFunctionMode):
    """Records the names of the torch functions and tensor methods called inside it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_the_split_projection_sums_the_parts_in_float32(monkeypatch):
    """The CUDA path's arithmetic (forced here on the CPU): no concatenation is built, one matmul per part of the
    input channels, the rest accumulated into the first's output (``addmm_``); in float32 the same sum up to
    summation order."""
    monkeypatch.setattr(fused, "use_fused_kernel", lambda *a, **k: True)
    parts = [torch.randn(2, 9, 8), torch.randn(2, 9, 24), torch.randn(2, 9, 5)]
    for bias in (True, False):
        linear = _linear(37, 16, bias=bias)
        expected = linear(torch.cat(parts, dim=-1))
        with _RecordedCalls() as calls:
            got = linear_of_concat(linear, parts)
        assert "cat" not in calls.names and calls.names.count("addmm_") == len(parts) - 1, calls.names
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_wrong_input_width_raises_on_every_path(monkeypatch):
    """linear_gelu needs no width check of its own: the epilogue's matmul, the operator (its fake too, while
    tracing) and the plain linear all refuse; linear_of_concat checks the parts' total width (one matmul per part
    would silently leave weight columns out) and leaves the error to the plain linear."""
    linear = _linear(16, 8)
    x = torch.randn(3, 12)
    for forced in (True, False):
        monkeypatch.setattr(fused, "use_fused_kernel", lambda *a, forced=forced, **k: forced)
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            linear_gelu(linear, x)
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            linear_of_concat(_linear(32, 8), [torch.randn(3, 8), torch.randn(3, 20)])
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        linear_gelu_op(x, linear.weight, linear.bias)
    with pytest.raises(RuntimeError, match="x has 12 features, the weight 16"), FakeTensorMode() as mode:
        linear_gelu_op(mode.from_tensor(x), mode.from_tensor(linear.weight), mode.from_tensor(linear.bias))


def test_wrapped_or_observed_linears_keep_their_own_forward(monkeypatch):
    """Where the fast paths apply but the linear is not a plain, unobserved nn.Linear (a hook, an adapter), the
    module's own forward runs (its hook fires)."""
    monkeypatch.setattr(fused, "use_fused_kernel", lambda *a, **k: True)
    linear = _linear(16, 32)
    calls = []
    linear.register_forward_pre_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 16)
    assert torch.equal(linear_gelu(linear, x), F.gelu(linear(x), approximate="tanh"))
    projection = _linear(32, 8)
    projection.register_forward_hook(lambda *a: calls.append(2))
    parts = [torch.randn(3, 12), torch.randn(3, 20)]
    assert torch.equal(linear_of_concat(projection, parts), projection(torch.cat(parts, -1)))
    assert calls == [1, 1, 2, 2]


# per block kind: linear_gelu calls in its graph (FLUX double blocks: the image and text MLPs; single blocks: the MLP
# input; Wan: the FFN; Qwen-Image: the image and text MLPs)
GELU_OPS = {"flux": [2, 1], "wan": [1], "qwen-image": [2]}


def _calls(gm, name: str) -> int:
    return sum(name in str(node.target) for node in gm.graph.nodes)


@pytest.mark.parametrize("family,build", [("flux", _flux), ("wan", _wan), ("qwen-image", _qwen)],
                         ids=["flux", "wan", "qwen-image"])
def test_compiled_blocks_call_linear_gelu_and_agree_with_the_plain_forward(family, build, compiled_on_cpu):
    """With ``linear_gelu`` and ``concat_linear`` in the compiled graphs (the CPU standing in for CUDA: the op's plain
    implementation), every tanh-GELU MLP input is one ``diffgen::linear_gelu`` call and FLUX's single blocks project
    without a concatenation; the forward equals the plain one (float32: the same sums, regrouped); turning the
    families off retraces to graphs without them."""
    from diffgen.engine.optimize import compile_repeated_blocks

    torch.manual_seed(0)
    model, inputs, _ = build()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        expected = model(**inputs)
    graphs = compiled_on_cpu(triton_available=False)  # the families need no Triton
    fused.set_fused_kernels(None, graphs=("linear_gelu", "concat_linear"))
    compile_repeated_blocks(model)
    with torch.no_grad():
        got = model(**inputs)
    assert [_calls(gm, "diffgen.linear_gelu") for gm in graphs] == GELU_OPS[family]
    if family == "flux":  # the single block's projection: two matmuls into one output
        assert _calls(graphs[1], "addmm_") == 1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    fused.set_fused_kernels(True, graphs=False)
    traced = len(graphs)
    with torch.no_grad():
        got = model(**inputs)
    assert len(graphs) == traced + len(GELU_OPS[family])
    assert not any(_calls(gm, "diffgen.linear_gelu") for gm in graphs[traced:])
    if family == "flux":  # the plain single block: one concatenation more, no accumulating matmul
        single, plain_single = graphs[1], graphs[traced + 1]
        assert _calls(plain_single, "method cat") == _calls(single, "method cat") + 1
        assert _calls(plain_single, "addmm_") == 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("triton_off", ["missing", "DIFFGEN_DISABLE_TRITON"])
def test_the_cublaslt_families_need_no_triton(triton_off, monkeypatch):
    """With Triton missing or turned off, the epilogue is still chosen (eager on a CUDA tensor, a fake one here;
    compiled graphs by default), the Triton families are not; the split projection (opt-in) only where named
    (``opt_in``, ``graphs``), not by ``set_fused_kernels(True)``; ``disabled`` and ``set_fused_kernels(False)`` still
    turn them off."""
    monkeypatch.delenv("DIFFGEN_GRAPH_KERNELS", raising=False)
    monkeypatch.setattr(fused, "_triton_available", lambda: triton_off != "missing")
    if triton_off == "missing":
        monkeypatch.delenv("DIFFGEN_DISABLE_TRITON", raising=False)
    else:
        monkeypatch.setenv("DIFFGEN_DISABLE_TRITON", "1")
    try:
        fused.set_fused_kernels(None)
        assert fused._in_graphs == ("linear_gelu",)
        with FakeTensorMode():
            x = torch.empty(2, 8, device="cuda", dtype=torch.bfloat16)
            assert fused.use_fused_kernel(x, "linear_gelu") and not fused.use_fused_kernel(x, "concat_linear")
            assert not fused.use_fused_kernel(x, "norm_rope") and not fused.use_fused_kernel(x, "modulation")
            fused.set_fused_kernels(True)
            assert fused.use_fused_kernel(x, "linear_gelu") and not fused.use_fused_kernel(x, "concat_linear")
            fused.set_fused_kernels(True, disabled=("linear_gelu",), graphs=("linear_gelu", "concat_linear"),
                                    opt_in=("concat_linear",))
            assert not fused.use_fused_kernel(x, "linear_gelu") and fused.use_fused_kernel(x, "concat_linear")
            assert fused._in_graphs == ("concat_linear",)
            fused.set_fused_kernels(False, graphs=("linear_gelu", "concat_linear"), opt_in=("concat_linear",))
            assert not fused.use_fused_kernel(x, "linear_gelu") and not fused.use_fused_kernel(x, "concat_linear")
            assert fused._in_graphs == ()
    finally:
        monkeypatch.undo()
        fused.set_fused_kernels(None)


def test_graph_kernel_setting_accepts_the_new_families(monkeypatch):
    monkeypatch.setattr(fused, "_triton_available", lambda: True)
    monkeypatch.delenv("DIFFGEN_DISABLE_TRITON", raising=False)
    try:
        monkeypatch.setenv("DIFFGEN_GRAPH_KERNELS", "linear_gelu,concat_linear")
        assert fused.prepare_graph_kernels() == ("linear_gelu", "concat_linear")
        fused.set_fused_kernels(None, disabled=("linear_gelu",))  # left out of eager, left out of graphs
        assert fused._in_graphs == ("concat_linear",)
    finally:
        monkeypatch.undo()
        fused.set_fused_kernels(None)


# -- GPU -------------------------------------------------------------------------------------------------------------
GPU_SHAPES = [((4096, 3072), 12288), ((1, 512, 3072), 12288), ((2, 333, 256), 1000), ((3, 1536), 8960),
              ((1, 1, 64), 128)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the cuBLASLt epilogue runs on CUDA only)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape,n", GPU_SHAPES)
def test_gelu_epilogue_agrees_with_the_plain_path_on_gpu(shape, n, dtype):
    """The epilogue rounds once (bias + GELU on the float32 accumulator), the plain path twice (the matmul's output,
    then the GELU of that rounded value): per element within ``diffgen.testing.bounds.gelu_epilogue_bound`` of each
    other (derived there). And over the whole tensor the epilogue is no farther from the float32 result than the
    plain path."""
    torch.manual_seed(shape[-1] + n)
    linear = _linear(shape[-1], n, dtype=dtype, device="cuda")
    x = torch.randn(shape, device="cuda").to(dtype)
    with torch.inference_mode():
        fused.set_fused_kernels(None)
        got = linear_gelu(linear, x)
        fused.set_fused_kernels(None, disabled=("linear_gelu",))
        plain = linear_gelu(linear, x)
        fused.set_fused_kernels(None)
        assert torch.equal(plain, F.gelu(linear(x), approximate="tanh"))
        z = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        exact = F.gelu(z, approximate="tanh")
    bound = gelu_epilogue_bound(x, linear.weight, linear.bias, z, got, plain)
    excess = (got.float() - plain.float()).abs() - bound
    assert excess.max().item() <= 0, f"max excess over the bound {excess.max().item():.3e}"
    err_epilogue = (got.float() - exact).norm() / exact.norm()
    err_plain = (plain.float() - exact).norm() / exact.norm()
    assert err_epilogue <= 1.05 * err_plain + 1e-6, (err_epilogue, err_plain)


def _split_and_single(tokens, widths, n, dtype):
    """The split projection (forced on: it is opt-in), the one matmul over the concatenation, the float32 result z,
    the first part's partial sum and the per-element bound of the split path."""
    torch.manual_seed(tokens)
    linear = _linear(sum(widths), n, dtype=dtype, device="cuda")
    parts = [torch.randn(1, tokens, w, device="cuda").to(dtype) for w in widths]
    with torch.inference_mode():
        fused.set_fused_kernels(None, opt_in=("concat_linear",))
        try:
            got = linear_of_concat(linear, parts)
        finally:
            fused.set_fused_kernels(None)
        single = linear(torch.cat(parts, dim=-1))
        z = F.linear(torch.cat(parts, dim=-1).float(), linear.weight.float(), linear.bias.float())
        partial = F.linear(parts[0].float(), linear.weight[:, :widths[0]].float(), linear.bias.float())
        bound = split_projection_bound(parts, linear.weight, linear.bias, got)
    return got, single, z, partial, bound


SPLIT_CASES = [(4608, (3072, 12288), 3072), (77, (64, 200), 96)]  # FLUX's single block; one output tile
# The two findings below were measured on H200s (torch 2.11, CUDA 13.0's cuBLAS): strict there (a pass means that
# changed: look again), reported but not failed on other cards, whose cuBLAS may choose other kernels.
_ON_H200 = torch.cuda.is_available() and "H200" in torch.cuda.get_device_name()
_TINY_PAST_THE_BOUND = pytest.mark.xfail(strict=_ON_H200, reason=(
    "measured on H200s (2026-11-27, three machines): at 77 tokens (one output tile) the split result goes past its "
    "bound, 3.2e-3 in bf16 and 1.1e-5 in fp16; an extra rounding the bound does not count, in cuBLAS's accumulating "
    "matmul most likely (not proven); one reason the split projection is opt-in"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the split projection runs on CUDA only)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tokens,widths,n", [SPLIT_CASES[0], pytest.param(*SPLIT_CASES[1], marks=_TINY_PAST_THE_BOUND)],
                         ids=["flux", "tiny"])
def test_split_projection_is_within_its_bound_on_gpu(tokens, widths, n, dtype, monkeypatch):
    """One matmul per part, the rest accumulated into the first's rounded output: per element within
    ``diffgen.testing.bounds.split_projection_bound`` of the float32 z = linear(cat(parts)) (u (|partial| + |got|):
    the partial sum's rounding and the final one, plus the float32 summation-order slack; derived there). The single
    bf16/fp16 matmul is compared with z, not with the split result: cuBLAS may split K and round between the splits,
    which no bound on the split path covers. Half-precision split-K reductions off, as in the test below."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", False)
    got, _, z, _, bound = _split_and_single(tokens, widths, n, dtype)
    excess = (got.float() - z).abs() - bound
    assert excess.max().item() <= 0, f"{tokens} tokens: max excess over the bound {excess.max().item():.3e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the split projection runs on CUDA only)")
@pytest.mark.xfail(strict=_ON_H200, reason="measured on an H200 (2026-11-27): the split result is 1.46x farther "
                   "from float32 than the one matmul at FLUX's shape, where independent roundings predict 1.10x; why "
                   "is not found, so the split projection is opt-in (diffgen.layers.fused.OPT_IN)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_split_projection_is_about_as_close_to_float32_as_one_matmul_on_gpu(dtype, monkeypatch):
    """Over the whole tensor, for independent roundings, the split result's error norm is sqrt(1 + |partial|^2 /
    |got|^2) times the single matmul's (asserted with a margin of 1.25), at FLUX's single-block shape, with cuBLAS's
    half-precision split-K reductions off (they round between the splits, on either side)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", False)
    got, single, z, partial, _ = _split_and_single(*SPLIT_CASES[0], dtype)
    err_split, err_single = (got.float() - z).norm(), (single.float() - z).norm()
    expected_ratio = (1 + (partial.norm() / got.float().norm()) ** 2).sqrt()
    assert err_split <= 1.25 * expected_ratio * err_single, (err_split.item(), err_single.item(),
                                                             expected_ratio.item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the cuBLASLt epilogue runs on CUDA only)")
def test_compiled_graphs_call_the_epilogue_on_gpu():
    """Inductor calls the op (the same cuBLASLt call as eager: bit-equal), opcheck passes on CUDA, and a tiny compiled
    FLUX with the families in its graphs agrees with its compiled forward on Inductor's own kernels within bf16."""
    from diffgen.engine.optimize import compile_repeated_blocks

    linear = _linear(256, 1024, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(2, 77, 256, device="cuda").bfloat16()
    args = (x, linear.weight, linear.bias)
    with torch.inference_mode():
        torch.library.opcheck(torch.ops.diffgen.linear_gelu.default, args)
        compiled = torch.compile(lambda *a: linear_gelu_op(*a))(*args)
        assert torch.equal(compiled, torch._addmm_activation(linear.bias, x.view(-1, 256), linear.weight.t(),
                                                             use_gelu=True).view(2, 77, 1024))
    torch.manual_seed(5)
    model, inputs = _flux_on_gpu()
    outputs = {}
    try:
        compile_repeated_blocks(model)
        for graphs in (("linear_gelu", "concat_linear"), ()):
            fused.set_fused_kernels(None, graphs=graphs)
            with torch.inference_mode():
                outputs[graphs] = model(**inputs).float()
    finally:
        fused.set_fused_kernels(None)
    inductor = outputs[()]
    assert ((outputs[("linear_gelu", "concat_linear")] - inductor).norm() / inductor.norm()).item() < 1e-2
