"""The flow-matching Euler sampler (diffusers' ``FlowMatchEulerDiscreteScheduler``) for the configs FLUX uses.

diffusers' scheduler module imports ``diffusers.utils`` (which imports torch._dynamo) and ``scipy.stats``: ~8.5 s of
a one-shot FLUX ``generate`` on an H200. This class is the same sampler without them, for configs that use only
the fixed or resolution-dependent (``mu``) shift and, optionally, ``shift_terminal``; :func:`load_flow_match_scheduler`
loads diffusers' class for any other config (Karras / exponential / beta sigmas, stochastic sampling, inverted
sigmas, a linear time shift) or when ``DIFFGEN_NATIVE_SCHEDULER=0``. Every value is computed in diffusers' order and
dtypes (numpy float32 sigmas, then torch float32), so schedules and steps are equal to its own
(tests/test_flow_match.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffgen.configs.mapping import MappingConfig

logger = logging.getLogger(__name__)

#: set to 0 to sample with diffusers' FlowMatchEulerDiscreteScheduler instead
NATIVE_SCHEDULER_ENV = "DIFFGEN_NATIVE_SCHEDULER"
CONFIG_NAME = "scheduler_config.json"


@dataclass(frozen=True)
class FlowMatchConfig(MappingConfig):
    """scheduler_config.json; readable as attributes and as a mapping, as diffusers' config is."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None


#: config keys of diffusers' class that this one does not implement, with the value that means "off"
UNSUPPORTED_KEYS = {"invert_sigmas": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                    "use_beta_sigmas": False, "stochastic_sampling": False, "time_shift_type": "exponential"}


def unsupported_keys(config: Mapping[str, Any]) -> list[str]:
    """The keys of ``config`` that only diffusers' class implements ([] when this class is equal to it)."""
    known = {f.name for f in fields(FlowMatchConfig)}
    # "_class_name", "_diffusers_version", ...: bookkeeping, not sampler settings
    unknown = [k for k in config if k not in known and k not in UNSUPPORTED_KEYS and not k.startswith("_")]
    active = [k for k, off in UNSUPPORTED_KEYS.items() if config.get(k, off) not in (off, None)]
    return sorted(active + unknown)


class FlowMatchEulerScheduler:
    """Sigmas from 1 towards 0, shifted; ``step`` moves the sample along the predicted velocity to the next sigma.

    The interface diffgen's pipelines use of diffusers' class: ``from_config``, ``config``, ``set_timesteps``,
    ``timesteps`` / ``sigmas``, ``set_begin_index`` / ``begin_index``, ``step_index``, ``step``, ``order``; and
    ``scale_noise``, the start of an image-to-image schedule (no pipeline here uses it yet).
    """

    order = 1

    def __init__(self, config: FlowMatchConfig | None = None):
        self.config = config or FlowMatchConfig()
        train_steps = self.config.num_train_timesteps
        timesteps = torch.from_numpy(np.linspace(1, train_steps, train_steps, dtype=np.float32)[::-1].copy())
        sigmas = timesteps / train_steps
        if not self.config.use_dynamic_shifting:
            sigmas = self.config.shift * sigmas / (1 + (self.config.shift - 1) * sigmas)
        self.timesteps = sigmas * train_steps
        self.sigmas = sigmas
        self.sigma_min, self.sigma_max = self.sigmas[-1].item(), self.sigmas[0].item()
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowMatchEulerScheduler:
        """From a config mapping; ValueError naming any key only diffusers' class implements."""
        unsupported = unsupported_keys(config)
        if unsupported:
            raise ValueError(f"FlowMatchEulerScheduler does not implement {', '.join(unsupported)}; "
                             "use diffusers' FlowMatchEulerDiscreteScheduler")
        known = {f.name for f in fields(FlowMatchConfig)}
        return cls(FlowMatchConfig(**{k: v for k, v in config.items() if k in known}))

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | np.ndarray | None = None, mu: float | None = None,
                      timesteps: list[float] | None = None) -> None:
        config = self.config
        if config.use_dynamic_shifting and mu is None:
            raise ValueError("set_timesteps: mu is required when the config has use_dynamic_shifting")
        if timesteps is not None:
            raise ValueError("set_timesteps: custom timesteps are not supported; pass sigmas")
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError("set_timesteps: give num_inference_steps or sigmas")
            sigmas = np.linspace(self.sigma_max * config.num_train_timesteps,
                                 self.sigma_min * config.num_train_timesteps,
                                 num_inference_steps) / config.num_train_timesteps
        else:
            if num_inference_steps is not None and len(sigmas) != num_inference_steps:
                raise ValueError(f"set_timesteps: {len(sigmas)} sigmas for {num_inference_steps} steps")
            sigmas = np.array(sigmas).astype(np.float32)
        self.num_inference_steps = len(sigmas)
        if config.use_dynamic_shifting:  # resolution-dependent ("exponential") shift
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
        if config.shift_terminal:  # stretched so that the last sigma is shift_terminal
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        self.timesteps = sigmas * config.num_train_timesteps
        self.sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule: torch.Tensor | None = None) -> int:
        """The position of ``timestep`` in ``schedule`` (default: this schedule's timesteps); the second match if it
        repeats, as diffusers picks."""
        indices = ((self.timesteps if schedule is None else schedule) == timestep).nonzero()
        return indices[1 if len(indices) > 1 else 0].item()

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True):
        """x_{next} = x + (sigma_next - sigma) * v, computed in float32, returned in the prediction's dtype."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("step: pass one of scheduler.timesteps, not an integer index")
        if self._step_index is None:
            self._step_index = (self._begin_index if self._begin_index is not None
                                else self.index_for_timestep(timestep.to(self.timesteps.device)
                                                             if isinstance(timestep, torch.Tensor) else timestep))
        sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        prev_sample = (sample.to(torch.float32) + (sigma_next - sigma) * model_output).to(model_output.dtype)
        self._step_index += 1
        return _StepOutput(prev_sample) if return_dict else (prev_sample,)

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The forward process: sigma * noise + (1 - sigma) * sample at ``timestep`` (image-to-image starts)."""
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        if self._begin_index is None:
            schedule = self.timesteps.to(sample.device)
            indices = [self.index_for_timestep(t, schedule) for t in timestep.to(sample.device)]
        else:
            indices = [self._step_index if self._step_index is not None else self._begin_index] * timestep.shape[0]
        sigma = sigmas[indices].flatten()
        while sigma.ndim < sample.ndim:
            sigma = sigma.unsqueeze(-1)
        return sigma * noise + (1.0 - sigma) * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps


@dataclass
class _StepOutput:
    prev_sample: torch.Tensor


def load_flow_match_scheduler(folder: Path, dtype: torch.dtype | None = None, device: torch.device | None = None):
    """The checkpoint's scheduler: :class:`FlowMatchEulerScheduler` when its config is one this class implements,
    else (or with ``DIFFGEN_NATIVE_SCHEDULER=0``) diffusers' FlowMatchEulerDiscreteScheduler, with a log line."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    unsupported = unsupported_keys(config)
    if os.environ.get(NATIVE_SCHEDULER_ENV, "1") != "0" and not unsupported:
        return FlowMatchEulerScheduler.from_config(config)
    why = f"{NATIVE_SCHEDULER_ENV}=0" if not unsupported else f"its config sets {', '.join(unsupported)}"
    logger.info("diffgen: %s: %s; loading diffusers' FlowMatchEulerDiscreteScheduler", folder, why)
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(folder)
