"""Parallel modes on the CPU: N gloo processes give the single-process output (float32, <= 1e-5).

One spawned set of 4 processes runs every case (process start-up dominates on 2 cores); a
2-degree case fills the other two ranks with a second replica (--dp-size 2), which must agree too.
Sizes are chosen so that the token counts (15, 45, ...) divide by neither 2 nor 4: padding is exercised.
Every case also decodes through the parallel VAE path (Wan, Qwen-Image); at these sizes the latent is too
small to split, which test_split_vae_decode_equals_the_whole_decode covers with larger latents.
TP cases check the text encoder really was sharded (a parity pass with an unsharded encoder proves nothing).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffgen.parallel.config import ModelFacts, ParallelConfig, ParallelConfigError, make_plan

WORLD = 4
TOLERANCE = 1e-5
IMAGE_REQUEST = dict(prompt="a red fox in the snow", height=48, width=80, num_inference_steps=2, seed=7,
                     max_sequence_length=16)
VIDEO_REQUEST = dict(prompt="a red fox in the snow", negative_prompt="blurry", height=48, width=80, num_frames=9,
                     num_inference_steps=2, seed=7, max_sequence_length=16, guidance_scale=4.0)

HUNYUAN_REQUEST = dict(prompt="a red fox in the snow", height=48, width=80, num_frames=9, num_inference_steps=2,
                       seed=7, guidance_scale=6.0)

ULYSSES_2 = {"ulysses_degree": 2, "ring_degree": 1, "enable_cfg_parallel": False, "dp_size": 2}
RING_2 = {"ulysses_degree": 1, "ring_degree": 2, "enable_cfg_parallel": False, "dp_size": 2}
USP_2x2 = {"ulysses_degree": 2, "ring_degree": 2, "enable_cfg_parallel": False}
CFG_2 = {"ulysses_degree": 1, "ring_degree": 1, "enable_cfg_parallel": True, "dp_size": 2}
CFG_ULYSSES = {"ulysses_degree": 2, "enable_cfg_parallel": True}
CFG_RING = {"ring_degree": 2, "ulysses_degree": 1, "enable_cfg_parallel": True}
TP_2 = {"tp_size": 2, "ulysses_degree": 2, "ring_degree": 1, "enable_cfg_parallel": False, "dp_size": 2}
TP_2_RING = {"tp_size": 2, "ulysses_degree": 1, "ring_degree": 2, "enable_cfg_parallel": False, "dp_size": 2}


def _input_image() -> Image.Image:
    rng = np.random.RandomState(0)
    return Image.fromarray(rng.randint(0, 255, (48, 80, 3), dtype=np.uint8))


def _cases(paths: dict[str, str]) -> list[dict]:
    qwen = {**IMAGE_REQUEST, "negative_prompt": "blurry", "true_cfg_scale": 4.0}
    i2v = {**VIDEO_REQUEST, "images": [_input_image()]}
    matrix = [
        ("flux", IMAGE_REQUEST, {"ulysses-2": ULYSSES_2, "ring-2": RING_2, "usp-2x2": USP_2x2,
                                 "tp-2-t5-x-ulysses-2": TP_2}),
        # FLUX splits its text over the group too: 13 text tokens divide by neither 2 nor 4 (USP: the last rank
        # holds 1 text token and 3 of padding)
        ("flux", {**IMAGE_REQUEST, "max_sequence_length": 13}, {"ulysses-2-text-13": ULYSSES_2,
                                                                "usp-2x2-text-13": USP_2x2}),
        # 3 heads: Ulysses 2 is refused (see test_bad_combinations), so Ring and CFG here
        ("qwen-image", qwen, {"ring-2": RING_2, "cfg-2": CFG_2, "cfg-x-ring-2": CFG_RING,
                              "tp-2-qwen-vl-x-ring-2": TP_2_RING}),
        # edit: condition-image tokens after the output's, modulated at t=0 (zero_cond_t), split like the rest
        ("qwen-image-edit-2511", {**qwen, "images": [_input_image()]}, {"cfg-x-ring-2": CFG_RING}),
        ("wan-t2v", VIDEO_REQUEST, {"ulysses-2": ULYSSES_2, "ring-2": RING_2, "usp-2x2": USP_2x2, "cfg-2": CFG_2,
                                    "cfg-x-ulysses-2": CFG_ULYSSES, "tp-2-umt5-x-ulysses-2": TP_2}),
        ("wan-i2v", i2v, {"usp-2x2": USP_2x2, "cfg-x-ulysses-2": CFG_ULYSSES}),
        ("wan22-a14b", {**VIDEO_REQUEST, "guidance_scale_2": 2.0},
         {"usp-2x2": USP_2x2, "cfg-x-ulysses-2": CFG_ULYSSES}),
        ("wan22-ti2v", {**VIDEO_REQUEST, "height": 64, "width": 96, "images": [_input_image()]},
         {"ulysses-2": ULYSSES_2}),
        # joint attention over [text, video] like FLUX, the text (Qwen2.5-VL + glyph tokens) masked per prompt
        ("hunyuan15", {**VIDEO_REQUEST, "prompt": 'a sign that says "fox"', "max_sequence_length": None},
         {"usp-2x2": USP_2x2, "cfg-x-ulysses-2": CFG_ULYSSES}),
        # HunyuanVideo (v1): 45 video tokens, text replicated; I2V's first-frame tokens (15) span ranks 0 and 1 of 4
        ("hunyuan", HUNYUAN_REQUEST, {"ulysses-2": ULYSSES_2, "ring-2": RING_2}),
        ("hunyuan-i2v", {**HUNYUAN_REQUEST, "images": [_input_image()]}, {"usp-2x2": USP_2x2}),
    ]
    return [{"name": f"{family}/{mode}", "model": paths[family], "request": request, "parallel": parallel}
            for family, request, modes in matrix for mode, parallel in modes.items()]


CASE_NAMES = [case["name"] for case in _cases({family: "" for family in (
    "flux", "qwen-image", "qwen-image-edit-2511", "wan-t2v", "wan-i2v", "wan22-a14b", "wan22-ti2v", "hunyuan15",
    "hunyuan", "hunyuan-i2v")})]


@pytest.fixture(scope="module")
def parity_results(tiny_checkpoint, tmp_path_factory):
    from diffgen.testing.parallel import run_parity_cases, spawn

    families = {name.split("/")[0] for name in CASE_NAMES}
    paths = {family: tiny_checkpoint(family) for family in families}
    out = tmp_path_factory.mktemp("parallel") / "results.json"
    spawn(WORLD, run_parity_cases, _cases(paths), str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASE_NAMES)
def test_parallel_output_equals_single_process(parity_results, case):
    entry = parity_results[case]
    assert "error" not in entry, entry.get("error")
    assert entry["latents"] <= TOLERANCE and entry["pixels"] <= TOLERANCE, entry
    assert (entry["tp_linears"] > 0) == ("tp-2" in case), entry


# -- planning: no processes needed ---------------------------------------------------------------------

WAN = ModelFacts("Wan2.1-T2V-14B", heads=40, guidance_branches=2)
FLUX = ModelFacts("FLUX.1-dev", heads=24, guidance_branches=1)
NO_LAYOUT = ModelFacts("NoLayout", heads=24, guidance_branches=1, sequence_parallel=False)  # a DiT without shard_tokens


@pytest.mark.parametrize("model,config,expected", [
    (WAN, ParallelConfig(num_gpus=2), dict(cfg_degree=2, ulysses_degree=1, ring_degree=1)),
    (WAN, ParallelConfig(num_gpus=8), dict(cfg_degree=2, ulysses_degree=4, ring_degree=1)),
    (WAN, ParallelConfig(num_gpus=32), dict(cfg_degree=2, ulysses_degree=8, ring_degree=2)),
    (FLUX, ParallelConfig(num_gpus=2), dict(cfg_degree=1, ulysses_degree=2, ring_degree=1)),
    (FLUX, ParallelConfig(num_gpus=16), dict(cfg_degree=1, ulysses_degree=8, ring_degree=2)),
    (FLUX, ParallelConfig(num_gpus=4, dp_size=2), dict(cfg_degree=1, ulysses_degree=2, dp_size=2)),
    (WAN, ParallelConfig(num_gpus=4, ulysses_degree=4), dict(cfg_degree=1, ulysses_degree=4, ring_degree=1)),
    (WAN, ParallelConfig(num_gpus=4, ring_degree=2), dict(cfg_degree=2, ulysses_degree=1, ring_degree=2)),
    (WAN, ParallelConfig(num_gpus=2, tp_size=2), dict(cfg_degree=2, tp_size=2)),
    (NO_LAYOUT, ParallelConfig(num_gpus=2, dp_size=2), dict(dp_size=2, ulysses_degree=1, ring_degree=1)),
])
def test_automatic_and_partial_plans(model, config, expected):
    plan = make_plan(config, model)
    assert {key: getattr(plan, key) for key in expected} == expected
    assert plan.dp_size * plan.cfg_degree * plan.ulysses_degree * plan.ring_degree == config.num_gpus


@pytest.mark.parametrize("model,config,message", [
    (WAN, ParallelConfig(num_gpus=4, ulysses_degree=2, ring_degree=1, enable_cfg_parallel=False),
     "--num-gpus 4: the degrees do not multiply"),
    (WAN, ParallelConfig(num_gpus=2, ulysses_degree=2, enable_cfg_parallel=True), "--num-gpus 2"),
    (WAN, ParallelConfig(num_gpus=3, ulysses_degree=3), "--ulysses-degree 3 does not divide Wan2.1-T2V-14B's 40"),
    (FLUX, ParallelConfig(num_gpus=2, enable_cfg_parallel=True), "--enable-cfg-parallel: FLUX.1-dev runs one"),
    (FLUX, ParallelConfig(num_gpus=3, dp_size=2), "--dp-size 2 does not divide --num-gpus 3"),
    (FLUX, ParallelConfig(num_gpus=2, tp_size=4), "--tp-size 4 does not divide"),
    (FLUX, ParallelConfig(num_gpus=0), "--num-gpus: 0 is not a positive integer"),
    (NO_LAYOUT, ParallelConfig(num_gpus=2), "--num-gpus 2: NoLayout does not support sequence parallelism yet"),
    (NO_LAYOUT, ParallelConfig(num_gpus=2, ring_degree=2), "--ring-degree: NoLayout does not support"),
])
def test_bad_combinations_fail_with_one_clear_error(model, config, message):
    with pytest.raises(ParallelConfigError, match=message.replace("(", r"\(")):
        make_plan(config, model)


def test_ulysses_on_a_checkpoint_reads_its_head_count(tiny_checkpoint):
    from diffgen.parallel.runtime import plan_for_model

    with pytest.raises(ParallelConfigError, match="--ulysses-degree 2 does not divide .* 3 attention heads"):
        plan_for_model(ParallelConfig(num_gpus=2, ulysses_degree=2), tiny_checkpoint("qwen-image"))
    plan = plan_for_model(ParallelConfig(num_gpus=2), tiny_checkpoint("qwen-image"))
    assert (plan.cfg_degree, plan.ulysses_degree, plan.ring_degree) == (2, 1, 1)


def test_distilled_checkpoint_plans_one_guidance_branch(tiny_checkpoint):
    """The distilled HunyuanVideo-1.5 (guider scale 1.0) runs one branch: --num-gpus 2 alone is Ulysses, not CFG-2,
    and --enable-cfg-parallel is refused before loading; the same pipeline class with CFG plans CFG-2."""
    from diffgen.engine.engine import Engine
    from diffgen.parallel.runtime import plan_for_model

    distilled, with_cfg = tiny_checkpoint("hunyuan15-i2v-distilled"), tiny_checkpoint("hunyuan15-i2v")
    plan = plan_for_model(ParallelConfig(num_gpus=2), distilled)
    assert (plan.cfg_degree, plan.ulysses_degree * plan.ring_degree) == (1, 2)
    plan = plan_for_model(ParallelConfig(num_gpus=2), with_cfg)
    assert (plan.cfg_degree, plan.ulysses_degree * plan.ring_degree) == (2, 1)
    with pytest.raises(ParallelConfigError, match="--enable-cfg-parallel: ckpt runs one guidance branch"):
        Engine.from_pretrained(distilled, device="cpu", num_gpus=2, enable_cfg_parallel=True)


def test_split_vae_decode_equals_the_whole_decode(tiny_checkpoint, tmp_path):
    """2 gloo processes split the latent rows or columns (pieces of uneven size) of Wan2.1's, Wan2.2's and
    Qwen-Image's VAE, through diffusers' decoder and diffgen's; each up block keeps only the halo it needs."""
    from diffgen.testing.parallel import run_vae_cases, spawn

    folders = {family: f"{tiny_checkpoint(family)}/vae" for family in ("wan-t2v", "wan22-ti2v", "qwen-image")}
    out = tmp_path / "vae.json"
    spawn(2, run_vae_cases, folders, str(out))
    for family, entry in json.loads(out.read_text()).items():
        assert entry["halos"][0] > entry["halos"][-1] > 1, (family, entry)  # the halo shrinks along the up path
        assert entry["default axis"] <= TOLERANCE, (family, entry)
        for decoder in ("diffusers", "native"):
            for axis in ("rows", "columns"):
                key = f"{decoder}/{axis}"
                assert entry[key] <= TOLERANCE, (family, key, entry)
                if decoder == "native":
                    assert entry[f"{key}/uniform"] <= TOLERANCE, (family, key, entry)
                # a thin halo at the first block, one pixel short at the last: seams show, the halos are applied
                assert entry[f"{key}/first halo 1"] > 1e-3, (family, key, entry)
                assert entry[f"{key}/last short"] > 1e-3, (family, key, entry)
