"""The served DiT forward from CUDA graphs (diffgen.engine.cuda_graphs).

On the CPU the graph itself is replaced by a stand-in with a graph's contract: the capture records the
forward over the static input buffers, a replay runs it again over whatever those buffers hold now and
writes into the same static output tensors. Everything around the graph (signatures, static buffers,
copying outputs out, capture on second sight, the fallbacks) is then checked exactly; the real
capture is checked on a GPU (skipped on the CPU).
"""

from __future__ import annotations

import pytest
import torch

from diffgen import Engine
from diffgen.engine import cuda_graphs
from diffgen.engine.cuda_graphs import GraphedForward, graphed_forward, install_cuda_graphs, uninstall_cuda_graphs

PROMPT = "a lighthouse at dusk"
FLUX = dict(height=32, width=32, num_inference_steps=3, max_sequence_length=16)
QWEN = dict(height=32, width=32, num_inference_steps=3, max_sequence_length=16, negative_prompt="bad")


def graph_standin(forward, device, pool):
    """A CUDA graph's contract on any device: static outputs, rewritten in place by each replay."""
    outputs = forward()

    def replay():
        fresh = forward()
        if isinstance(outputs, torch.Tensor):
            outputs.copy_(fresh)
        else:
            for static, value in zip(outputs, fresh, strict=True):
                static.copy_(value)
    return replay, outputs


@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    return {"flux": Engine.from_pretrained(tiny_checkpoint("flux"), device="cpu", dtype="float32"),
            "qwen-image": Engine.from_pretrained(tiny_checkpoint("qwen-image"), device="cpu", dtype="float32")}


@pytest.fixture
def graphed(tiny_checkpoint):
    engines = []

    def make(family: str, **options) -> tuple[Engine, GraphedForward]:
        engine = Engine.from_pretrained(tiny_checkpoint(family), device="cpu", dtype="float32", **options)
        engines.append(engine)
        return engine, install_cuda_graphs(engine.pipeline.transformer, capture=graph_standin)
    yield make
    for engine in engines:
        uninstall_cuda_graphs(engine.pipeline.transformer)


def _latents(engine: Engine, family: str, **kwargs) -> torch.Tensor:
    sampling = FLUX if family == "flux" else QWEN
    return engine.generate(PROMPT, seed=7, return_tensors=True, **{**sampling, **kwargs}).latents


def _flux_inputs(model, seed: int, batch: int = 1, tokens: int = 16, text: int = 16) -> dict:
    config = model.config
    parameter = next(model.parameters())
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(parameter.device, parameter.dtype)
    ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // 4, torch.arange(tokens) % 4], -1)
    return dict(hidden_states=rand(batch, tokens, config.in_channels), timestep=rand(batch).abs(),
                encoder_hidden_states=rand(batch, text, config.joint_attention_dim),
                pooled_projections=rand(batch, config.pooled_projection_dim),
                img_ids=ids.to(parameter.device, parameter.dtype),
                txt_ids=torch.zeros(text, 3, device=parameter.device, dtype=parameter.dtype),
                guidance=rand(batch).abs() if config.guidance_embeds else None)


@pytest.mark.parametrize("family", ["flux", "qwen-image"])
def test_replayed_requests_equal_the_plain_forward(plain, graphed, family):
    """Step 1 runs plainly, step 2 captures, every later forward replays: the latents are bit-equal to the plain
    run's (each step's new inputs reach the graph's buffers; a replay's output is copied before the next one)."""
    engine, forward = graphed(family)
    expected = _latents(plain[family], family)
    assert torch.equal(_latents(engine, family), expected)
    first = forward.replays
    assert len(forward.graphs) == 1 and first >= 1  # both CFG branches of Qwen-Image share one signature
    assert torch.equal(_latents(engine, family), expected)
    steps = FLUX["num_inference_steps"] * (2 if family == "qwen-image" else 1)
    assert forward.replays == first + steps and len(forward.graphs) == 1  # the second request replays throughout


def test_outputs_of_successive_replays_stay_apart(graphed):
    """A graph writes every replay into the same static output: the caller gets a copy, so an output kept from
    one forward does not change under the next (the stand-in, like a graph, rewrites its outputs in place)."""
    engine, forward = graphed("flux")
    model = engine.pipeline.transformer
    inputs = _flux_inputs(model, seed=0)
    with torch.inference_mode():
        forward(**inputs)
        second = forward(**inputs)  # captured
        third = forward(**_flux_inputs(model, seed=1))
        assert forward.replays == 2
        with cuda_graphs.graphs_disabled():
            assert torch.equal(second, forward(**inputs))
            assert torch.equal(third, forward(**_flux_inputs(model, seed=1)))
    assert not torch.equal(second, third)


def test_a_new_shape_is_captured_on_its_second_forward_and_the_count_is_bounded(graphed):
    engine, forward = graphed("flux")
    model = engine.pipeline.transformer
    forward.max_graphs = 2
    for batch in (1, 2, 3):
        for sighting in (1, 2, 3):
            with torch.inference_mode():
                forward(**_flux_inputs(model, seed=sighting, batch=batch))
            captured = batch <= 2 and sighting >= 2
            assert (len(forward.graphs) == min(batch, 2)) if captured else len(forward.graphs) == min(batch - 1, 2)
    assert forward.replays == 4  # batches 1 and 2 replayed on their 2nd and 3rd forward; batch 3 never captured


def test_forwards_that_cannot_replay_a_graph_run_plainly(graphed, monkeypatch):
    """Step caches, offload, key masks, gradients, Ring groups and DIFFGEN_CUDA_GRAPHS=0 never reach a graph."""
    engine, forward = graphed("flux")
    model = engine.pipeline.transformer
    inputs = _flux_inputs(model, seed=0)
    assert forward.signature(inputs) is None  # gradients on (the default outside the pipeline)
    with torch.no_grad():
        _check_fallbacks(forward, model, inputs, monkeypatch)
    with torch.inference_mode():
        for _ in range(3):
            forward(**inputs)
    assert forward.replays == 2


def _check_fallbacks(forward, model, inputs, monkeypatch):
    from diffgen.layers.block_loop import active_block_hook, attach_offloader
    from diffgen.parallel import state as parallel_state

    assert forward.signature(inputs) is not None
    token = active_block_hook.set(object())
    assert forward.signature(inputs) is None
    active_block_hook.reset(token)
    attach_offloader(model, object())
    assert forward.signature(inputs) is None
    attach_offloader(model, None)
    assert forward.signature({**inputs, "encoder_hidden_states_mask": torch.ones(1, 16)}) is None
    assert forward.signature({**inputs, "txt_ids": inputs["txt_ids"].bool()}) is None
    assert forward.signature({**inputs, "image_shapes": [[1, 2]]}) is not None  # lists name a graph by value
    assert forward.signature({**inputs, "extra": {"unhashable": []}}) is not None
    assert forward.signature({**inputs, "extra": bytearray(b"x")}) is None  # unhashable
    from types import SimpleNamespace

    from diffgen.parallel.config import ParallelPlan

    ring = SimpleNamespace(plan=ParallelPlan(num_gpus=2, ring_degree=2), rank=0, ring=SimpleNamespace(size=2))
    monkeypatch.setattr(parallel_state, "_current", ring)
    assert forward.signature(inputs) is None  # Ring passes keys/values point to point: not captured
    ulysses = SimpleNamespace(plan=ParallelPlan(num_gpus=2, ulysses_degree=2), rank=0, ring=SimpleNamespace(size=1))
    monkeypatch.setattr(parallel_state, "_current", ulysses)
    under_ulysses = forward.signature(inputs)
    monkeypatch.setattr(parallel_state, "_current", None)
    assert under_ulysses is not None and under_ulysses != forward.signature(inputs)  # one graph per plan
    monkeypatch.setenv("DIFFGEN_CUDA_GRAPHS", "0")
    assert forward.signature(inputs) is None
    monkeypatch.delenv("DIFFGEN_CUDA_GRAPHS")


def test_a_failed_capture_falls_back_once_and_for_good(graphed, caplog):
    engine, forward = graphed("flux")
    attempts = []

    def failing(fn, device, pool):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")
    forward.capture = failing
    model = engine.pipeline.transformer
    inputs = _flux_inputs(model, seed=0)
    with caplog.at_level("WARNING"), torch.inference_mode():
        expected = forward.forward(**inputs)
        for _ in range(4):
            assert torch.equal(forward(**inputs), expected)
    assert len(attempts) == 1 and not forward.graphs and forward.replays == 0
    assert "no CUDA graph for the DiT forward" in caplog.text and "stream is capturing" in caplog.text


def test_dropped_graphs_are_captured_again_with_a_new_pool(graphed):
    engine, forward = graphed("flux")
    pools = []
    standin = forward.capture

    def recording_pool(fn, device, pool):
        pools.append(pool)
        return standin(fn, device, pool)
    forward.capture = recording_pool
    forward.pool = object()  # stands for a CUDA pool handle (the CPU run has none)
    first = forward.pool
    model = engine.pipeline.transformer
    inputs = _flux_inputs(model, seed=0)
    with torch.inference_mode():
        expected = forward.forward(**inputs)
        for _ in range(3):
            assert torch.equal(forward(**inputs), expected)
        forward.drop_graphs()
        assert not forward.graphs and not forward.sightings and forward.pool is None
        for _ in range(3):
            assert torch.equal(forward(**inputs), expected)
    assert pools == [first, None] and len(forward.graphs) == 1, (pools, forward.graphs)
    assert forward.replays == 4  # per round: the capturing forward (served by its graph) and one replay


def test_release_cuda_graphs_leaves_the_plain_forward(graphed):
    """What a parallel rank does before destroying its process group: no graph, no GraphedForward left."""
    from diffgen.engine.optimize import release_cuda_graphs

    engine, forward = graphed("flux")
    model = engine.pipeline.transformer
    inputs = _flux_inputs(model, seed=0)
    with torch.inference_mode():
        for _ in range(3):
            model(**inputs)
        assert forward.graphs
        release_cuda_graphs(engine.pipeline.components)
        assert not forward.graphs and graphed_forward(model) is None
        assert torch.equal(model(**inputs), forward.forward(**inputs))


def test_continuous_batching_replays_a_graph_per_batch_size_it_meets_again(graphed):
    """Requests joining and leaving a running batch change the forward's batch size; each size is captured on its
    second forward and replayed after, and every request still equals itself alone (as in test_batching)."""
    from test_batching import TOLERANCE, _flux, _member

    from diffgen.engine.batching import ContinuousBatcher

    engine, forward = graphed("flux")
    requests = [_flux(6, 1, "a long request", guidance_scale=3.0),
                _flux(2, 2, "a short one that joins at step 2", guidance_scale=5.0),
                _flux(3, 3, "joins at step 3", negative_prompt="bad", true_cfg_scale=1.5)]
    with cuda_graphs.graphs_disabled():
        alone = [engine.submit(request).result() for request in requests]
    outcomes: dict[int, object] = {}
    batcher = ContinuousBatcher(engine.pipeline, max_batch_size=4)
    batcher.add(_member(requests[0], outcomes, 0))
    batcher.run_step()
    batcher.run_step()
    batcher.add(_member(requests[1], outcomes, 1))
    batcher.run_step()
    batcher.add(_member(requests[2], outcomes, 2))
    batcher.run_until_idle()
    for index, expected in enumerate(alone):
        torch.testing.assert_close(outcomes[index].latents, expected.latents, **TOLERANCE)
    # rows per forward 1, 1, 2, 4, 3, 3 (test_batching): sizes 1 and 3 come back, so they are captured and replayed
    batch_sizes = sorted({part[0]: part[1] for part in signature[1:]}["hidden_states"][0]
                         for signature in forward.graphs)
    assert batch_sizes == [1, 3] and forward.replays == 2


def test_the_compiled_server_path_installs_graphs_where_they_can_replay(tiny_checkpoint, monkeypatch):
    """load_model puts graphs in front of a compiled server's DiT (after its blocks compile), not for a one-shot
    run, an eager server or an offloaded one."""
    from diffgen.engine import optimize
    from diffgen.engine.loading import load_model

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager", **kw))
    calls = []
    monkeypatch.setattr(optimize, "apply_cuda_graphs", lambda components: calls.append(components) or 0)
    path = tiny_checkpoint("flux")
    pipeline = load_model(path, device="cpu", dtype="float32", compile=True, serving=True)
    assert len(calls) == 1 and calls[0] is pipeline.components
    assert getattr(pipeline.transformer.transformer_blocks[0], "_compiled_call_impl", None) is not None
    for options in (dict(compile=True), dict(compile=False, serving=True),
                    dict(compile=True, serving=True, offload="layerwise")):
        load_model(path, device="cpu", dtype="float32", **options)
    assert len(calls) == 1


def test_compiled_and_replayed_requests_do_not_recompile_at_a_warmed_size(plain, graphed, monkeypatch):
    """The compiled serve path: warm-up compiles and captures; later requests at that size neither recompile
    nor capture again, and equal the plain forward. Compiled with ``aot_eager`` (Dynamo's capture without
    generating C++ kernels, as test_offload does)."""
    import torch._dynamo.utils as dynamo_utils

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager", **kw))
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    engine, forward = graphed("flux", compile=True)
    engine.warm_up(sizes=[(FLUX["height"], FLUX["width"])])
    graphs, compiled = len(forward.graphs), dynamo_utils.counters["stats"]["unique_graphs"]
    assert graphs == 1 and compiled > 0
    warmed = dict(max_sequence_length=None)  # the warm-up's (the model's default), part of the warmed signature
    expected = _latents(plain["flux"], "flux", **warmed)
    for _ in range(2):
        assert torch.allclose(_latents(engine, "flux", **warmed), expected, atol=1e-6, rtol=0)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == compiled and len(forward.graphs) == graphs
    assert forward.replays == 1 + 2 * FLUX["num_inference_steps"]  # warm-up's second step, then every step


def test_graphs_are_installed_for_a_compiled_server_on_cuda_only(tiny_checkpoint):
    from diffgen.engine.optimize import apply_cuda_graphs

    engine = Engine.from_pretrained(tiny_checkpoint("flux"), device="cpu", dtype="float32")
    assert apply_cuda_graphs(engine.pipeline.components) == 0  # a CPU model has no graph to replay
    assert graphed_forward(engine.pipeline.transformer) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_is_bit_equal_to_the_forward_it_captured(tiny_checkpoint, dtype):
    """A real capture of the tiny FLUX DiT (eager with the Triton kernels, then compiled blocks): replays equal the
    plain forward bit for bit at new inputs, and a second shape gets its own graph."""
    from diffgen.engine.optimize import compile_repeated_blocks

    model = Engine.from_pretrained(tiny_checkpoint("flux"), device="cuda", dtype=dtype).pipeline.transformer
    for compiled in (False, True) if dtype == torch.bfloat16 else (False,):  # one Inductor compile keeps it short
        if compiled:
            compile_repeated_blocks(model)
        forward = install_cuda_graphs(model)
        with torch.inference_mode():
            for batch in (1, 2):
                for seed in range(4):
                    inputs = _flux_inputs(model, seed=seed, batch=batch)
                    with cuda_graphs.graphs_disabled():
                        expected = model(**inputs)
                    assert torch.equal(model(**inputs), expected)
        assert len(forward.graphs) == 2 and forward.replays == 6 and not forward.failed
        uninstall_cuda_graphs(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphs_captured_again_after_dropping_them(tiny_checkpoint):
    """drop_graphs forgets the graphs and their memory pool: the next forwards capture again (reusing the pool of
    destroyed graphs made PyTorch's allocator assert, found by bench/parallel.py on 2 x H200) and replay equal."""
    model = Engine.from_pretrained(tiny_checkpoint("flux"), device="cuda", dtype=torch.float32).pipeline.transformer
    forward = install_cuda_graphs(model)
    with torch.inference_mode():
        for _ in range(2):
            for seed in range(3):
                inputs = _flux_inputs(model, seed=seed)
                with cuda_graphs.graphs_disabled():
                    expected = model(**inputs)
                assert torch.equal(model(**inputs), expected)
            assert len(forward.graphs) == 1 and not forward.failed
            forward.drop_graphs()
    assert forward.replays == 4  # per round: the capturing forward (served by its graph) and one replay
    uninstall_cuda_graphs(model)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a served Ulysses-2 group needs 2 CUDA devices")
def test_a_served_ulysses_2_group_replays_its_graphs_on_two_gpus(tiny_checkpoint, capfd, monkeypatch):
    """The serve path on 2 GPUs: compiled blocks, Ulysses-2, each rank's forward captured with its all-to-alls at
    warm-up (both ranks agree on it) and replayed; the requests equal one GPU's eager forward (float32); on close
    every rank exits by itself (its graphs destroyed before its process group: stop() kills a rank after 10 s)."""
    monkeypatch.setenv("DIFFGEN_LOG_LEVEL", "INFO")  # the ranks log each capture
    single = Engine.from_pretrained(tiny_checkpoint("flux"), device="cuda", dtype="float32")
    expected = _latents(single, "flux", max_sequence_length=None).cpu()  # a parallel engine returns CPU tensors
    single.close()
    served = Engine.from_pretrained(tiny_checkpoint("flux"), device="cuda", dtype="float32", serving=True,
                                    compile=True, num_gpus=2, ulysses_degree=2, warmup_sizes=[(32, 32)])
    ranks = list(served.executor.processes)
    try:
        for _ in range(2):
            assert torch.allclose(_latents(served, "flux", max_sequence_length=None).cpu(), expected, atol=1e-4,
                                  rtol=0)
    finally:
        served.close()
    log = capfd.readouterr().err
    assert "no CUDA graph for the DiT forward" not in log
    assert log.count("captured a CUDA graph of the DiT forward") >= 2, log[-3000:]  # at least one per rank
    assert [rank.returncode for rank in ranks] == [0, 0]


def test_ulysses_ranks_capture_together_or_not_at_all(tmp_path):
    """2 gloo ranks under Ulysses-2 behind GraphedForward (the stand-in graph): the replayed forwards equal the
    single-process forward; when one rank's capture fails, both run without a graph (no rank replays alone)."""
    import json

    from diffgen.testing.parallel import run_graph_cases, spawn

    out = tmp_path / "graphs.json"
    spawn(2, run_graph_cases, str(out))
    results = json.loads(out.read_text())
    assert results["captured"] == {"graphs": [1, 1], "replays": [2, 2]}  # 3 forwards: captured on the 2nd
    assert results["captured_diff"] <= 1e-5
    assert results["failed_on_one"] == {"graphs": [0, 0], "replays": [0, 0]}
    assert results["failed_on_one_diff"] <= 1e-5
