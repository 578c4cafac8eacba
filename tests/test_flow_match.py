"""diffgen's flow-match Euler sampler against diffusers' FlowMatchEulerDiscreteScheduler: schedules and steps equal
(bit for bit) for the configs diffgen's pipelines use; diffusers' class taken for the configs it alone implements."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffgen.pipelines.flow_match import (
    NATIVE_SCHEDULER_ENV,
    FlowMatchEulerScheduler,
    load_flow_match_scheduler,
    unsupported_keys,
)
from diffgen.pipelines.latents import set_shifted_flow_timesteps
from diffgen.testing.tiny_qwen import QWEN_IMAGE_SCHEDULER

CONFIGS = {
    # the real repositories' scheduler configs
    "flux-dev": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                     num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True),
    "flux-schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
    "qwen-image": QWEN_IMAGE_SCHEDULER,
    "hunyuan": dict(shift=7.0),
}


def pair(config: dict) -> tuple[FlowMatchEulerScheduler, FlowMatchEulerDiscreteScheduler]:
    reference = FlowMatchEulerDiscreteScheduler(**config)
    return FlowMatchEulerScheduler.from_config(reference.config), reference


def assert_same_schedule(ours, reference) -> None:
    for name in ("timesteps", "sigmas"):
        mine, theirs = getattr(ours, name), getattr(reference, name)
        assert mine.dtype == theirs.dtype and mine.device == theirs.device, name
        assert torch.equal(mine, theirs), name


def assert_same_steps(ours, reference, shape=(2, 16, 8), dtype=torch.float32) -> None:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(shape, generator=generator).to(dtype)
    mine, theirs = sample, sample
    for t in reference.timesteps:
        velocity = torch.randn(shape, generator=generator).to(dtype)
        mine = ours.step(velocity, t, mine, return_dict=False)[0]
        theirs = reference.step(velocity, t, theirs, return_dict=False)[0]
        assert mine.dtype == theirs.dtype == dtype
        assert torch.equal(mine, theirs)
        assert ours.step_index == reference.step_index
    assert ours.step_index == len(reference.timesteps)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_construction_equals_diffusers(name):
    ours, reference = pair(CONFIGS[name])
    assert_same_schedule(ours, reference)
    assert (ours.sigma_min, ours.sigma_max) == (reference.sigma_min, reference.sigma_max)
    assert ours.order == reference.order == 1 and len(ours) == len(reference)
    for key, value in reference.config.items():
        if key in ours.config:
            assert ours.config[key] == value and getattr(ours.config, key) == value


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 4, 28, 50])
@pytest.mark.parametrize("image_tokens", [16, 1024, 4096, 6144])  # 64x64 ... 1024x1024 ... past max_image_seq_len
def test_pipeline_schedules_and_steps_equal_diffusers(name, steps, image_tokens):
    """As FLUX / Qwen-Image set them: sigmas 1 -> 1/steps with mu from the image's token count."""
    if name == "qwen-image" and steps == 1:
        pytest.skip("Qwen-Image's shift_terminal divides by zero at one step (test_qwen_image covers the refusal)")
    ours, reference = pair(CONFIGS[name])
    for scheduler in (ours, reference):
        set_shifted_flow_timesteps(scheduler, steps, image_tokens, torch.device("cpu"))
    assert_same_schedule(ours, reference)
    assert ours.begin_index == reference.begin_index == 0 and ours.num_inference_steps == steps
    assert_same_steps(ours, reference)


@pytest.mark.parametrize("name", ["hunyuan", "flux-schnell"])
@pytest.mark.parametrize("steps", [3, 30])
def test_explicit_sigmas_and_step_counts_equal_diffusers(name, steps):
    """HunyuanVideo's sigmas (1 -> 0, last left out), and the plain num_inference_steps schedule (Wan-style use)."""
    ours, reference = pair(CONFIGS[name])
    sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
    for scheduler in (ours, reference):
        scheduler.set_timesteps(sigmas=sigmas, device="cpu")
        scheduler.set_begin_index(0)
    assert_same_schedule(ours, reference)
    assert_same_steps(ours, reference, dtype=torch.bfloat16)  # a bf16 prediction: computed in float32, cast back
    ours, reference = pair(CONFIGS[name])
    for scheduler in (ours, reference):
        scheduler.set_timesteps(steps)  # no begin index: the first step finds its place from the timestep
    assert_same_schedule(ours, reference)
    assert_same_steps(ours, reference)


def test_scale_noise_equals_diffusers():
    ours, reference = pair(CONFIGS["flux-dev"])
    generator = torch.Generator().manual_seed(4)
    sample, noise = torch.randn(2, 16, 8, generator=generator), torch.randn(2, 16, 8, generator=generator)
    for scheduler in (ours, reference):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=0.8)
    t = reference.timesteps[2:3].repeat(2)
    assert torch.equal(ours.scale_noise(sample, t, noise), reference.scale_noise(sample, t, noise))  # by timestep
    for scheduler in (ours, reference):
        scheduler.set_begin_index(1)
    assert torch.equal(ours.scale_noise(sample, t, noise), reference.scale_noise(sample, t, noise))  # by begin index


def test_fresh_copies_and_errors():
    ours, _ = pair(CONFIGS["flux-dev"])
    copy = type(ours).from_config(ours.config)
    assert copy.config == ours.config and copy is not ours
    with pytest.raises(ValueError, match="mu is required"):
        copy.set_timesteps(4)
    copy.set_timesteps(sigmas=[1.0, 0.5], mu=0.5)
    with pytest.raises(ValueError, match="not an integer index"):
        copy.step(torch.zeros(1), 1, torch.zeros(1))
    assert copy.config.get("use_flow_sigmas") is None  # a key the config lacks reads as None, as diffusers' does


UNSUPPORTED = [("use_karras_sigmas", True), ("use_exponential_sigmas", True), ("use_beta_sigmas", True),
               ("stochastic_sampling", True), ("invert_sigmas", True), ("time_shift_type", "linear"),
               ("some_future_option", 1)]


@pytest.mark.parametrize("key, value", UNSUPPORTED)
def test_configs_only_diffusers_implements_load_its_class(tmp_path, key, value):
    folder = tmp_path / "scheduler"
    folder.mkdir()
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1",
              **CONFIGS["flux-dev"], key: value}
    (folder / "scheduler_config.json").write_text(json.dumps(config))
    assert unsupported_keys(config) == [key]
    with pytest.raises(ValueError, match=key):
        FlowMatchEulerScheduler.from_config(config)
    if key == "use_beta_sigmas" and importlib.util.find_spec("scipy") is None:
        with pytest.raises(ImportError, match="scipy"):  # diffusers' class was taken: it needs scipy for beta sigmas
            load_flow_match_scheduler(folder)
        return
    loaded = load_flow_match_scheduler(folder)
    assert type(loaded) is FlowMatchEulerDiscreteScheduler and loaded.config[key] == value


def test_supported_config_loads_native_unless_asked_otherwise(tiny_flux, monkeypatch):
    folder = Path(tiny_flux) / "scheduler"
    assert type(load_flow_match_scheduler(folder)) is FlowMatchEulerScheduler
    monkeypatch.setenv(NATIVE_SCHEDULER_ENV, "0")
    assert type(load_flow_match_scheduler(folder)) is FlowMatchEulerDiscreteScheduler
