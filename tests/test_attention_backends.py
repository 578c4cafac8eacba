"""Which kernel :func:`diffgen.layers.attention.sdpa` calls under each backend, and FlashAttention-4 on the GPU.

The routing is checked on the CPU with fake CUDA tensors (FakeTensorMode: shapes, dtypes and devices without a GPU);
FlashAttention-4 itself (the ``flash-attn-4`` package, diffgen's ``fa4`` extra) runs only on a CUDA GPU where it is
installed: against float32 attention, as close as cuDNN's kernel is, eager, compiled and replayed from a CUDA graph.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from diffgen.errors import DiffgenError
from diffgen.layers import attention
from diffgen.layers.attention import FA4_MIN_KEYS, fa4_attention_op, sdpa, set_attention_backend
from diffgen.testing.bounds import float32_attention


@pytest.fixture
def backend():
    yield set_attention_backend
    set_attention_backend("auto")


def _qkv(mode: FakeTensorMode, keys: int, dtype=torch.bfloat16, head_dim: int = 128, queries: int = 64):
    with mode:
        q = torch.empty(1, queries, 2, head_dim, device="cuda", dtype=dtype)
        k, v = (torch.empty(1, keys, 2, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    return q, k, v


@pytest.mark.skipif(attention.fa4_installed(), reason="flash-attn-4 is installed here: the error cannot be seen")
def test_fa4_without_its_package_is_refused_before_anything_runs(backend):
    with pytest.raises(DiffgenError, match=r"'fa4' needs the flash-attn-4 package.*pip install -e '\.\[fa4\]'"):
        backend("fa4")
    assert attention.get_attention_backend() == "auto"
    with pytest.raises(DiffgenError, match="'fast' is not one of auto, fa4, cudnn"):
        backend("fast")


def test_auto_calls_fa4_for_long_16_bit_unmasked_attention_only(backend, monkeypatch):
    """Under "auto" inside compiled blocks (FA4 ready on this GPU): FA4 from FA4_MIN_KEYS keys on, in bf16/fp16,
    without a mask or gradients, head dims a multiple of 8 up to 256; everything else, and every other backend but
    "fa4", SDPA."""
    monkeypatch.setattr(attention, "_fa4_ready", lambda backend, device_index: True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    mode = FakeTensorMode()
    use = attention._use_fa4
    with torch.inference_mode():
        long, short = _qkv(mode, FA4_MIN_KEYS), _qkv(mode, FA4_MIN_KEYS - 1)
        assert use(*long, None) and use(*_qkv(mode, FA4_MIN_KEYS, torch.float16), None)
        assert not use(*short, None)
        assert not use(*_qkv(mode, FA4_MIN_KEYS, torch.float32), None)
        assert not use(*_qkv(mode, FA4_MIN_KEYS, head_dim=12), None)
        assert not use(*_qkv(mode, FA4_MIN_KEYS, head_dim=264), None)
        with mode:
            mask = torch.ones(1, FA4_MIN_KEYS, dtype=torch.bool, device="cuda")
        assert not use(*long, mask)
        with mode:
            fewer_kv_heads = torch.empty(1, FA4_MIN_KEYS, 1, 128, device="cuda", dtype=torch.bfloat16)
        assert not use(long[0], fewer_kv_heads, fewer_kv_heads, None)  # SDPA refuses it; FA4 would group queries
        assert use(*long, None, causal=False) and not use(*long, None, causal=True)  # 64 queries, 16384 keys
        cpu = tuple(torch.empty(1, FA4_MIN_KEYS, 2, 128, dtype=torch.bfloat16) for _ in range(3))
        assert not use(*cpu, None)
        for name in ("cudnn", "flash", "efficient", "math"):
            backend(name)
            assert not use(*long, None)
        monkeypatch.setattr(attention, "fa4_installed", lambda: True)
        backend("fa4")  # wherever it applies, however short
        assert use(*short, None) and not use(*_qkv(mode, 8, torch.float32), None)
    backend("auto")
    with torch.enable_grad():
        assert not use(*long, None)  # the op has no backward
    monkeypatch.setattr(attention, "_fa4_ready", lambda backend, device_index: False)  # not importable, not Hopper
    with torch.inference_mode():
        assert not use(*long, None)


def test_sdpa_hands_fa4_calls_to_the_op_with_scale_and_causality(monkeypatch):
    """Where FA4 applies, :func:`sdpa` calls the op with the (B, S, H, D) tensors as they are (no transposes), its
    scale and causal flag, and returns its result."""
    calls = []
    monkeypatch.setattr(attention, "_use_fa4", lambda q, k, v, mask, causal: True)
    monkeypatch.setattr(attention, "fa4_attention_op", lambda *args: calls.append(args) or args[0] * 2)
    q, k, v = (torch.randn(1, 5, 2, 8) for _ in range(3))
    assert torch.equal(sdpa(q, k, v, scale=0.5, causal=True), q * 2)
    assert calls == [(q, k, v, 0.5, True)]
    sdpa(q, k, v, library_kernels=True)  # text encoders: PyTorch's own choice, never FA4
    assert len(calls) == 1


def test_a_trace_reads_the_decision_made_before_it_and_never_imports(monkeypatch):
    """Inside a trace an undecided GPU means no FA4 (nothing imported there); ``prepare_compiled_attention`` decides
    outside it, once per backend and GPU, and a trace then reads that decision."""
    imports = []
    monkeypatch.setattr(attention, "_fa4_ready_by", {})
    monkeypatch.setattr(attention, "_fa4_function", lambda: imports.append(1) or (lambda *a, **k: None))
    monkeypatch.setattr(attention, "fa4_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert attention._fa4_ready("auto", 0) is False and imports == [] and attention._fa4_ready_by == {}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    attention.prepare_compiled_attention(torch.device("cuda:0"))
    assert attention._fa4_ready_by == {("auto", 0): True} and imports == [1]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert attention._fa4_ready("auto", 0) is True and imports == [1]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert attention._fa4_ready("auto", 1) is False and attention._fa4_ready("fa4", 1) is False  # Ampere: none


def test_dynamo_traces_the_decision_without_a_break(monkeypatch):
    """Traced by Dynamo (full graph, no compiler needed): undecided -> no FA4 and no import; decided -> the decision,
    retraced when it changes (the dict is guarded)."""
    def fail():
        raise AssertionError("imported inside a trace")
    monkeypatch.setattr(attention, "_fa4_ready_by", {})
    monkeypatch.setattr(attention, "_fa4_function", fail)

    def step(x):
        return x + 1 if attention._fa4_ready("auto", 0) else x - 1
    traced = torch.compile(step, fullgraph=True, backend="eager")
    x = torch.zeros(3)
    assert traced(x).tolist() == [-1, -1, -1]
    attention._fa4_ready_by[("auto", 0)] = True
    assert traced(x).tolist() == [1, 1, 1]


def test_the_fa4_op_has_the_output_shape_of_its_values():
    with FakeTensorMode():
        q, k = (torch.empty(2, 7, 3, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        v = torch.empty(2, 7, 3, 32, device="cuda", dtype=torch.bfloat16)
        out = fa4_attention_op(q, k, v, None, False)
    assert out.shape == (2, 7, 3, 32) and out.dtype == torch.bfloat16 and out.device.type == "cuda"


def test_auto_uses_fa4_in_compiled_blocks_only(backend, monkeypatch):
    """Eager (a one-shot ``generate``) "auto" stays on cuDNN: FA4's import and first compilation cost more than they
    save there; inside compiled blocks (serve's default, ``--compile``) it may call FA4. The import starts in a
    background thread where FA4 may run (CUDA, the package there; "auto" only when compiling), never for the CPU."""
    monkeypatch.setattr(attention, "_fa4_ready", lambda backend, device_index: True)
    monkeypatch.setattr(attention, "fa4_installed", lambda: True)
    monkeypatch.setattr(attention, "_fa4_resolved", [])
    started = []
    monkeypatch.setattr(attention, "threading", SimpleNamespace(  # this module's view only, not the process's
        Thread=lambda *a, **k: started.append(k["name"]) or SimpleNamespace(start=lambda: None)))
    long = _qkv(FakeTensorMode(), FA4_MIN_KEYS)
    with torch.inference_mode():
        assert not attention._use_fa4(*long, None)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert attention._use_fa4(*long, None)
    attention.prefetch_attention_kernels("cpu", compiled=True)
    attention.prefetch_attention_kernels(torch.device("cuda"), compiled=False)
    assert started == []
    attention.prefetch_attention_kernels(torch.device("cuda"), compiled=True)
    assert started == ["diffgen-fa4-import"]
    backend("fa4")
    attention.prefetch_attention_kernels("cuda", compiled=False)
    assert started == ["diffgen-fa4-import"] * 2


# Not importing it here (~11 s): the compiled test below is then the first to need it, as a server is when its
# background import has not finished.
needs_fa4 = pytest.mark.skipif(
    not (torch.cuda.is_available() and attention.fa4_installed() and torch.cuda.get_device_capability()[0] == 9),
    reason="needs a Hopper GPU with flash-attn-4 installed (pip install -e '.[fa4]')")


@pytest.mark.gpu
@needs_fa4
def test_fa4_compiled_and_graphed_equals_eager_on_gpu(backend):
    """Under "auto", a compiled function over :func:`sdpa` (full graph: the op, no break; decided before tracing by
    ``prepare_compiled_attention``, as compiled blocks are) and the CUDA-graph replay of the "fa4" backend's eager
    call give FA4's eager result bit for bit; undecided, a trace falls back to cuDNN rather than import in it."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, FA4_MIN_KEYS + 7, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.inference_mode():
        eager_cudnn = sdpa(q, k, v)  # eager "auto": cuDNN's kernel
        if not attention._fa4_ready_by:  # the first GPU test of the file: nothing decided yet
            undecided = torch.compile(lambda *t: sdpa(*t), fullgraph=True)(q, k, v)
            assert torch.equal(undecided, eager_cudnn)
        attention.prepare_compiled_attention(q.device)
        compiled = torch.compile(lambda *t: sdpa(*t), fullgraph=True)(q, k, v)
        eager = fa4_attention_op(q, k, v, None, False)
        assert torch.equal(compiled, eager)
        assert not torch.equal(eager_cudnn, eager)
        backend("fa4")
        graph, static = torch.cuda.CUDAGraph(), [t.clone() for t in (q, k, v)]
        with torch.cuda.graph(graph):
            replayed = sdpa(*static)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, eager)


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape,scale,causal", [
    ((1, 4608, 3, 128), None, False),  # FLUX's sequence
    ((2, 333, 2, 64), 0.2, False),  # odd length, another head dim and scale
    ((1, 1000, 2, 128), None, True),
])
def test_fa4_is_as_close_to_float32_as_cudnn_on_gpu(shape, scale, causal, dtype):
    """FA4's relative error against float32 attention is within 10% of cuDNN's (SDPA's on the causal case), and
    "auto" at these lengths (below FA4_MIN_KEYS) stays on cuDNN bit for bit."""
    torch.manual_seed(shape[1])
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3))
    with torch.inference_mode():
        exact = float32_attention(q, k, v, scale, causal)
        fa4 = fa4_attention_op(q, k, v, scale, causal)
        with torch.nn.attention.sdpa_kernel(attention._SDPA_ORDER["cudnn"], set_priority=True):
            library = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=scale,
                                                     is_causal=causal).transpose(1, 2)
        assert torch.equal(sdpa(q, k, v, scale=scale, causal=causal), library)
    err_fa4 = ((fa4.float() - exact).norm() / exact.norm()).item()
    err_library = ((library.float() - exact).norm() / exact.norm()).item()
    assert err_fa4 <= 1.1 * err_library, (err_fa4, err_library)
