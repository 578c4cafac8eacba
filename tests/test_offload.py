"""Offload (--offload model / layerwise) on tiny checkpoints: same output, and the moves it says it makes.

On a CPU run the "device" is the CPU too, so the weights do not change memory; layerwise offload still
swaps each block's tensors for fresh copies when it loads the block and back to the stored copies
when it evicts it, which is what these tests observe.
"""

from __future__ import annotations

import pytest
import torch

from diffgen import Engine
from diffgen.engine.offload import LayerwiseOffloader, ModelOffloader

PROMPT = "a lighthouse at dusk"
SAMPLING = {
    "flux": dict(height=32, width=32, num_inference_steps=3, max_sequence_length=16),
    "qwen-image": dict(height=32, width=32, num_inference_steps=3, max_sequence_length=16, negative_prompt="bad"),
    "wan22-a14b": dict(height=32, width=32, num_frames=5, num_inference_steps=4, max_sequence_length=16,
                       negative_prompt="bad"),
}


def _generate(engine: Engine, family: str, **kwargs):
    return engine.generate(PROMPT, seed=7, return_tensors=True, **{**SAMPLING[family], **kwargs})


@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    return {family: Engine.from_pretrained(tiny_checkpoint(family), device="cpu", dtype="float32")
            for family in SAMPLING}


@pytest.mark.parametrize("family,mode", [("flux", "model"), ("flux", "layerwise"), ("qwen-image", "layerwise"),
                                         ("wan22-a14b", "layerwise")])
def test_offloaded_output_equals_plain(plain, tiny_checkpoint, family, mode):
    engine = Engine.from_pretrained(tiny_checkpoint(family), device="cpu", dtype="float32", offload=mode)
    expected = _generate(plain[family], family)
    result = _generate(engine, family)
    assert torch.equal(result.latents, expected.latents)
    assert torch.equal(result.pixels, expected.pixels)


def test_model_offload_moves_each_component_when_it_runs(plain, tiny_checkpoint):
    engine = Engine.from_pretrained(tiny_checkpoint("wan22-a14b"), device="cpu", dtype="float32", offload="model")
    (offloader,) = engine.pipeline.offloaders
    assert isinstance(offloader, ModelOffloader)
    result = _generate(engine, "wan22-a14b")
    assert torch.equal(result.latents, _generate(plain["wan22-a14b"], "wan22-a14b").latents)
    arrivals = [name for name, where in offloader.moves if where == "in"]
    # the text encoder (both prompts), the high-noise then the low-noise expert, the VAE
    assert arrivals == ["text_encoder", "transformer", "transformer_2", "vae"]
    departures = [name for name, where in offloader.moves if where == "out"]
    assert departures == arrivals[:-1]  # each leaves when the next one runs


def test_layerwise_streams_blocks_with_prefetch(tiny_checkpoint):
    """Each block is loaded before it runs and evicted after; only the running block and the prefetched
    one are ever resident; the non-block parts never move."""
    engine = Engine.from_pretrained(tiny_checkpoint("wan22-a14b"), device="cpu", dtype="float32",
                                    offload="layerwise")
    layerwise = [o for o in engine.pipeline.offloaders if isinstance(o, LayerwiseOffloader)]
    assert len(layerwise) == 2  # one per expert
    seen = []
    for offloader in layerwise:
        for index, block in enumerate(offloader.blocks):
            stored = [t.data_ptr() for t in offloader._storage[index]]

            def check(block, args, offloader=offloader, index=index, stored=stored):
                live = [t.data_ptr() for t in offloader._tensors(block)]
                assert all(a != b for a, b in zip(live, stored, strict=True)), "block ran from its stored copy"
                assert index in offloader.resident and len(offloader.resident) <= 1 + offloader.prefetch
                for other in set(range(len(offloader.blocks))) - set(offloader.resident):
                    others = [t.data_ptr() for t in offloader._tensors(offloader.blocks[other])]
                    assert others == [t.data_ptr() for t in offloader._storage[other]], "evicted block kept"
                seen.append((id(offloader), index))

            block.register_forward_pre_hook(check)
    _generate(engine, "wan22-a14b")
    (components,) = [o for o in engine.pipeline.offloaders if not isinstance(o, LayerwiseOffloader)]
    # the text encoder leaves when the first DiT runs; the DiTs themselves never move whole
    assert components.moves == [("text_encoder", "in"), ("text_encoder", "out"), ("vae", "in")]
    high, low = layerwise
    steps, branches = 4, 2
    assert len(seen) == steps * branches * len(high.blocks)
    # steady state per forward with two blocks and prefetch 1: block 1 arrives while 0 runs, 0 (for the
    # next forward) while 1 runs
    assert high.moves[:5] == [("load", 0), ("load", 1), ("evict", 0), ("load", 0), ("evict", 1)]
    assert high.moves[5:9] == [("load", 1), ("evict", 0), ("load", 0), ("evict", 1)]
    assert low.moves and all(kind in ("load", "evict") for kind, _ in low.moves)


def test_layerwise_with_step_cache(plain, tiny_checkpoint):
    """Skipped blocks are simply not loaded; output equals the cached run without offload."""
    family = "flux"
    engine = Engine.from_pretrained(tiny_checkpoint(family), device="cpu", dtype="float32", offload="layerwise")
    options = dict(cache="first-block", cache_threshold=2.0, num_inference_steps=5)
    expected = _generate(plain[family], family, **options)
    result = _generate(engine, family, **options)
    assert result.timings["cache_forwards_reused"] > 0
    assert torch.equal(result.latents, expected.latents)


def test_bad_offload_mode_is_refused(tiny_checkpoint):
    from diffgen.errors import DiffgenError

    with pytest.raises(DiffgenError, match="--offload 'disk' is not supported; choose one of none, model, layerwise"):
        Engine.from_pretrained(tiny_checkpoint("flux"), device="cpu", dtype="float32", offload="disk")


def test_compiled_blocks_with_layerwise_offload_read_the_streamed_weights(plain, tiny_checkpoint, tmp_path,
                                                                          monkeypatch):
    """--compile --offload layerwise: the blocks are compiled once and read whatever weights the offloader
    swapped in (no stale copy captured, no recompilation per streamed block), merged LoRAs included.

    Compiled with the ``aot_eager`` backend: the same graph capture (Dynamo, parameters lifted to graph inputs)
    as the default Inductor, without generating C++ kernels (minutes on a CI box); Inductor itself was run once
    by hand on this model: equal within 2.4e-7, no recompilation on the second request."""
    import torch._dynamo.utils as dynamo_utils
    from test_lora import write_lora

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager", **kw))
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    engine = Engine.from_pretrained(tiny_checkpoint("flux"), device="cpu", dtype="float32", offload="layerwise",
                                    compile=True)
    blocks = engine.pipeline.offloaders[-1].blocks
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in blocks)
    expected = _generate(plain["flux"], "flux")
    assert torch.equal(_generate(engine, "flux").latents, expected.latents)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    assert graphs > 0 and engine.pipeline.offloaders[-1].moves  # compiled, and the blocks streamed
    assert torch.equal(_generate(engine, "flux").latents, expected.latents)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs  # the swaps did not recompile anything

    lora = write_lora(tmp_path / "style.safetensors", plain["flux"], "flux-peft", seed=3)
    engine.load_lora(lora)
    plain["flux"].load_lora(lora)
    try:
        with_lora = _generate(plain["flux"], "flux").latents
    finally:
        plain["flux"].unload_lora()
    assert not torch.equal(with_lora, expected.latents)
    assert torch.equal(_generate(engine, "flux").latents, with_lora)
