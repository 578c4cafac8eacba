"""Step caching (first-block, TeaCache) on tiny checkpoints of every family, float32 on CPU.

References: diffusers' own First Block Cache on its pipelines (same checkpoint, same seed), and a
hand-written version of each method made of plain forward hooks on the uncached DiT's blocks.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffgen import Engine
from diffgen.engine.step_cache import StepCacheConfig
from diffgen.errors import InvalidRequestError
from diffgen.layers.modulation import modulate

PROMPT = "a red fox in the snow"
SAMPLING = {
    "flux": dict(height=32, width=32, num_inference_steps=6, max_sequence_length=16),
    "qwen-image": dict(height=32, width=32, num_inference_steps=6, max_sequence_length=16, negative_prompt="bad"),
    "wan-t2v": dict(height=32, width=32, num_frames=5, num_inference_steps=6, max_sequence_length=16,
                    negative_prompt="bad"),
    "wan22-a14b": dict(height=32, width=32, num_frames=5, num_inference_steps=6, max_sequence_length=16,
                    negative_prompt="bad"),
    "hunyuan": dict(height=32, width=32, num_frames=5, num_inference_steps=6, max_sequence_length=16),
    "hunyuan15": dict(height=32, width=32, num_frames=5, num_inference_steps=6),
}


def _latents(engine: Engine, family: str, seed: int = 3, prompt: str = PROMPT, **kwargs):
    result = engine.generate(prompt, seed=seed, return_tensors=True, **{**SAMPLING[family], **kwargs})
    return result.latents, result.timings


@pytest.mark.parametrize("family", list(SAMPLING))
def test_threshold_zero_is_exactly_uncached(engines, family):
    engine = engines(family)
    plain, _ = _latents(engine, family)
    cached, timings = _latents(engine, family, cache="first-block", cache_threshold=0.0)
    assert torch.equal(plain, cached)
    assert timings["cache_forwards_reused"] == 0 and timings["cache_forwards_computed"] > 0


# -- diffusers' First Block Cache as the reference --------------------------------------------------


@pytest.mark.parametrize("family,threshold", [("flux", 0.5), ("wan-t2v", 0.1), ("qwen-image", 0.5)])
def test_first_block_matches_diffusers_first_block_cache(engines, tiny_checkpoint, family, threshold):
    import json

    import diffusers
    from diffusers.hooks import FirstBlockCacheConfig

    path = tiny_checkpoint(family)
    reference = getattr(diffusers, json.load(open(f"{path}/model_index.json"))["_class_name"]).from_pretrained(
        path, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    for tensor in [*reference.transformer.parameters(), *reference.transformer.buffers()]:
        tensor.data = tensor.data.clone()  # aligned like ours: see tests/test_wan.py
    reference.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    kwargs = dict(SAMPLING[family])
    if family == "qwen-image":
        kwargs["true_cfg_scale"] = 4.0
    expected = reference(PROMPT, generator=torch.Generator("cpu").manual_seed(3), output_type="latent",
                         **kwargs)[0]

    engine = engines(family)
    # diffusers protects no final step; the first forward of each branch computes in both.
    engine.pipeline.step_cache = StepCacheConfig("first-block", threshold=threshold, final_steps=0)
    try:
        ours, timings = _latents(engine, family)
    finally:
        engine.pipeline.step_cache = None
    assert timings["cache_forwards_reused"] > 0  # the comparison covers reuse
    torch.testing.assert_close(ours, expected.reshape(ours.shape), atol=1e-5, rtol=0)


# -- a hand-written reference: forward hooks on the plain model's blocks ----------------------------


class HookedResidualCache:
    """The residual-replay methods written as hooks around an uncached DiT's blocks.

    ``head``: blocks always run (1: first-block, 0: TeaCache). On a reused forward the blocks after the
    head pass their input through, and the last block returns its input (which is then the head's
    output, joined as the model joins it) plus the residual stored at the last computed forward of
    that branch.
    """

    def __init__(self, blocks, branches: int, decide, head: int, join=lambda hidden: hidden):
        self.blocks, self.branches, self.decide, self.head, self.join = blocks, branches, decide, head, join
        self.forwards, self.residual, self.start, self.reusing = 0, {}, None, False
        self.handles = [blocks[0].register_forward_pre_hook(self._begin)]
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_hook(self._after(index)))

    def _begin(self, block, args):
        step, branch = divmod(self.forwards, self.branches)
        self.forwards += 1
        self.branch = branch
        self.reusing = self.decide(step, branch, args) and branch in self.residual

    def _after(self, index):
        def hook(block, args, output):
            single = not isinstance(output, tuple)
            inputs = args[0] if single else (args[0], args[1])
            if index < self.head:
                return output
            if index == self.head:
                self._head_output = inputs  # the hidden state the remaining blocks start from
            if index == len(self.blocks) - 1:
                start = args[0] if single else args[:2]
                if self.reusing:
                    residual = self.replayed(self.branch)
                    return start + residual if single else tuple(
                        s + r for s, r in zip(start, residual, strict=True))
                self.store(self.branch, self._minus(output, self.join(self._head_output), single))
                return output
            return inputs if self.reusing else output
        return hook

    def replayed(self, branch):
        """The residual a reused forward adds to its start (the stored one)."""
        return self.residual[branch]

    def store(self, branch, residual):
        self.residual[branch] = residual

    @staticmethod
    def _minus(output, start, single):
        return output - start if single else tuple(o - s for o, s in zip(output, start, strict=True))

    def remove(self):
        for handle in self.handles:
            handle.remove()


class HookedTaylorSeer(HookedResidualCache):
    """TaylorSeer over the same hooks, written as its authors' code does it (taylor_utils: derivative_approximation,
    taylor_formula): a computed forward keeps {0: residual, i + 1: (new[i] - old[i]) / distance} for as many
    orders as the previous computed forward had, up to ``order``; a reused forward replays the sum over i of
    (1 / i!) * factor[i] * x**i, x the steps since the branch's last computed forward. Single tensors (Wan)."""

    def __init__(self, *args, order: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.order, self.factors, self.computed_at = order, {}, {}

    def _begin(self, block, args):
        self.step = self.forwards // self.branches
        super()._begin(block, args)

    def store(self, branch, residual):
        distance = self.step - self.computed_at.get(branch, 0)
        previous, factors = self.factors.get(branch, {}), {0: residual}
        for i in range(self.order):
            if previous.get(i) is None:
                break
            factors[i + 1] = (factors[i] - previous[i]) / distance
        self.factors[branch], self.computed_at[branch] = factors, self.step
        super().store(branch, residual)

    def replayed(self, branch):
        x = self.step - self.computed_at[branch]
        output = 0
        for i, factor in sorted(self.factors[branch].items()):
            output = output + (1 / math.factorial(i)) * factor * (x ** i)
        return output


def _flux_join(hidden):
    """(image, text) of a double block -> the single blocks' [text, image]; already joined stays as is."""
    if not isinstance(hidden, tuple):
        return hidden
    x, context = hidden
    return torch.cat([context, x], dim=1)


def _flat_blocks(model):
    return [b for name in ("transformer_blocks", "single_transformer_blocks", "blocks")
            for b in getattr(model, name, [])]


def test_forced_reuse_schedule_equals_hand_written_first_block(engines):
    """Wan2.1 with CFG: two branches, each replaying its own residual at the scheduled steps."""
    family, reuse = "wan-t2v", {2, 3, 5}
    engine = engines(family)
    blocks = _flat_blocks(engine.pipeline.transformer)
    # head=1: block 0 always runs; its output (block 1's input) starts the replayed residual.
    hooks = HookedResidualCache(blocks, branches=2, decide=lambda step, branch, args: step in reuse, head=1)
    try:
        expected, _ = _latents(engine, family)
    finally:
        hooks.remove()
    engine.pipeline.step_cache = StepCacheConfig("first-block", reuse_steps=frozenset(reuse))
    try:
        ours, timings = _latents(engine, family)
    finally:
        engine.pipeline.step_cache = None
    plain, _ = _latents(engine, family)
    assert timings == {**timings, "cache_forwards_reused": 6.0, "cache_forwards_computed": 6.0}
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, plain)


def test_forced_reuse_schedule_flux_joined_streams(engines):
    """FLUX: the residual spans the double blocks and the joined single-stream blocks."""
    family, reuse = "flux", {1, 2, 4}
    engine = engines(family)
    blocks = _flat_blocks(engine.pipeline.transformer)
    hooks = HookedResidualCache(blocks, branches=1, decide=lambda step, branch, args: step in reuse, head=1,
                                join=_flux_join)
    try:
        expected, _ = _latents(engine, family)
    finally:
        hooks.remove()
    engine.pipeline.step_cache = StepCacheConfig("first-block", reuse_steps=frozenset(reuse))
    try:
        ours, timings = _latents(engine, family)
    finally:
        engine.pipeline.step_cache = None
    assert timings["cache_forwards_reused"] == 3
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("family", ["flux", "hunyuan"])
def test_teacache_equals_hand_written_teacache(engines, family):
    """TeaCache4FLUX's / 4HunyuanVideo's rule (accumulate the rescaled relative L1 change of the first block's
    modulated input; reuse while under the threshold; first and last step computed), written as hooks."""
    threshold, coefficients = {
        "flux": (0.6, (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01)),
        "hunyuan": (0.15, (7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02)),
    }[family]
    engine = engines(family)
    steps = SAMPLING[family]["num_inference_steps"]
    blocks = _flat_blocks(engine.pipeline.transformer)
    memory = {"previous": None, "accumulated": 0.0}

    def decide(step, branch, args):
        # FLUX blocks take (x, context, temb, ...), HunyuanVideo's (x, context, mask, temb, ...)
        x, temb = args[0], args[2 if family == "flux" else 3]
        shift, scale = blocks[0].norm1(temb)[:2]
        signal = modulate(blocks[0].norm1.norm(x), shift, scale)
        previous, memory["previous"] = memory["previous"], signal
        if step == 0 or step == steps - 1:
            memory["accumulated"] = 0.0
            return False
        change = ((signal - previous).abs().mean() / previous.abs().mean()).item()
        memory["accumulated"] += float(sum(c * change**p for p, c in enumerate(reversed(coefficients))))
        if memory["accumulated"] < threshold:
            return True
        memory["accumulated"] = 0.0
        return False

    hooks = HookedResidualCache(blocks, branches=1, decide=decide, head=0, join=_flux_join)
    try:
        expected, _ = _latents(engine, family)
    finally:
        hooks.remove()
    ours, timings = _latents(engine, family, cache="teacache")  # the published default threshold
    assert timings["cache_forwards_reused"] > 0
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("order", [1, 2])
def test_forced_reuse_schedule_equals_hand_written_taylorseer(engines, order):
    """Wan2.1 with CFG, reusing steps 2, 3 and 5 of 6: each branch forecasts from its own computed steps (0, 1, 4:
    unequal distances), order 2 with both derivatives once step 4 is computed."""
    family, reuse = "wan-t2v", {2, 3, 5}
    engine = engines(family)
    blocks = _flat_blocks(engine.pipeline.transformer)
    hooks = HookedTaylorSeer(blocks, branches=2, decide=lambda step, branch, args: step in reuse, head=1, order=order)
    try:
        expected, _ = _latents(engine, family)
    finally:
        hooks.remove()
    results = {}
    for method, method_order in (("taylorseer", order), ("first-block", None)):
        engine.pipeline.step_cache = StepCacheConfig(method, reuse_steps=frozenset(reuse), order=method_order)
        try:
            results[method] = _latents(engine, family)
        finally:
            engine.pipeline.step_cache = None
    ours, timings = results["taylorseer"]
    assert timings == {**timings, "cache_forwards_reused": 6.0, "cache_forwards_computed": 6.0}
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, results["first-block"][0])  # the forecast is not the plain replay


def test_taylorseer_order_0_is_first_block(engines):
    family = "flux"
    engine = engines(family)
    first_block, timings = _latents(engine, family, cache="first-block", cache_threshold=0.5)
    assert timings["cache_forwards_reused"] > 0
    try:
        engine.set_step_cache("taylorseer", 0.5, order=0)  # the engine's default; warm-up 1 as first-block's
        order_0, order_0_timings = _latents(engine, family)
        engine.set_step_cache("taylorseer", 0.5, order=1)
        order_1, _ = _latents(engine, family)
    finally:
        engine.set_step_cache(None)
    assert torch.equal(order_0, first_block) and order_0_timings == {**order_0_timings, **{
        k: timings[k] for k in ("cache_forwards_reused", "cache_forwards_computed")}}
    assert not torch.equal(order_1, first_block)
    plain, _ = _latents(engine, family)
    exact, timings = _latents(engine, family, cache="taylorseer", cache_threshold=0.0)
    assert torch.equal(exact, plain) and timings["cache_forwards_reused"] == 0


def test_taylorseer_never_forecasts_warm_up_or_last_steps(tiny_checkpoint):
    """Threshold 2 (reuse whenever allowed): each branch computes its warm-up forwards (default order + 1) and
    the last step; the Engine knobs reach the cache."""
    family, steps = "wan-t2v", SAMPLING["wan-t2v"]["num_inference_steps"]
    for knobs, warmup in ((dict(cache_order=2), 3), (dict(cache_order=1, cache_warmup=4), 4)):
        engine = Engine.from_pretrained(tiny_checkpoint(family), device="cpu", dtype="float32", cache="taylorseer",
                                        cache_threshold=2.0, **knobs)
        _, timings = _latents(engine, family)
        assert timings["cache_forwards_computed"] == 2 * warmup + 2  # 2 branches: warm-up steps + the last step
        assert timings["cache_forwards_reused"] == 2 * (steps - warmup - 1)


@pytest.mark.parametrize("method", ["first-block", "taylorseer"])
def test_cache_state_never_leaks_between_requests(engines, method):
    """Wan2.2 (two experts, CFG): each request's output is the same whatever ran before it."""
    family = "wan22-a14b"
    engine = engines(family)
    options = dict(cache=method, cache_threshold=0.3)
    a1, timings = _latents(engine, family, seed=1, **options)
    b1, _ = _latents(engine, family, seed=2, prompt="a blue whale", **options)
    b2, _ = _latents(engine, family, seed=2, prompt="a blue whale", **options)
    a2, _ = _latents(engine, family, seed=1, **options)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert timings["cache_forwards_reused"] > 0


def test_wan22_experts_keep_separate_caches(engines):
    """The low-noise expert starts its own cache: its first forward per branch is computed (warm-up)."""
    family = "wan22-a14b"
    engine = engines(family)
    steps = SAMPLING[family]["num_inference_steps"]
    _, timings = _latents(engine, family, cache="first-block", cache_threshold=2.0)
    # 2 experts x 2 branches x 1 warm-up forward + the final step's 2 branches; everything else reused
    assert timings["cache_forwards_computed"] == 2 * 2 + 2
    assert timings["cache_forwards_computed"] + timings["cache_forwards_reused"] == 2 * steps


def test_engine_default_and_request_override(tiny_checkpoint):
    engine = Engine.from_pretrained(tiny_checkpoint("qwen-image"), device="cpu", dtype="float32",
                                    cache="first-block", cache_threshold=2.0)
    _, timings = _latents(engine, "qwen-image")
    assert timings["cache_forwards_reused"] > 0
    _, timings = _latents(engine, "qwen-image", cache="none")
    assert "cache_forwards_reused" not in timings


def test_bad_cache_options_are_refused(engines):
    engine = engines("qwen-image")
    with pytest.raises(InvalidRequestError, match="cache_threshold"):
        engine.generate(PROMPT, cache="first-block", cache_threshold=-1)
    with pytest.raises(InvalidRequestError, match="'second-block' is not allowed; one of none, first-block, teacache, "
                       "taylorseer"):
        engine.generate(PROMPT, cache="second-block")
    with pytest.raises(InvalidRequestError, match="no published coefficients for Qwen-Image"):
        engine.generate(PROMPT, cache="teacache", **SAMPLING["qwen-image"])
    with pytest.raises(InvalidRequestError, match="no published coefficients"):
        engine.set_step_cache("teacache")
    with pytest.raises(InvalidRequestError, match="cache_order: only --cache taylorseer extrapolates"):
        engine.set_step_cache("first-block", order=2)
    with pytest.raises(InvalidRequestError, match=r"cache_order: 5 is out of range; allowed 0\.\.4"):
        engine.set_step_cache("taylorseer", order=5)
