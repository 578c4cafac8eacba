"""FastWan: Wan DiTs distilled with DMD (distribution matching distillation) for 3-step sampling.

| model_index ``_class_name`` | checkpoints (FastVideo/...)                                        |
|-----------------------------|--------------------------------------------------------------------|
| WanDMDPipeline              | FastWan2.1-T2V-1.3B-Diffusers; FastWan2.2-TI2V-5B-FullAttn-Diffusers |

The folders are Wan folders (same DiT, VAE and UMT5 text encoder); what makes them FastWan is what
their ``model_index.json`` says: the ``WanDMDPipeline`` class. Only the sampler differs from Wan: at
each of the distilled timesteps (1000, 757, 522) the DiT's flow prediction gives the clean sample,
which is re-noised to the next timestep with fresh noise from the request's generator; there is no
classifier-free guidance. A ``dmd_denoising_steps`` list in model_index.json or the scheduler config
replaces the default timesteps.
"""

from __future__ import annotations

import dataclasses

import torch

from diffgen.configs import wan as presets
from diffgen.engine.spec import ModelSpec
from diffgen.pipelines.base import PipelineState, register_pipeline
from diffgen.pipelines.stages import draw_noise
from diffgen.pipelines.wan import WanPipeline


class DMDSampler:
    """Few-step DMD sampling, with the ``step`` interface of a diffusers scheduler.

    Flow matching: the noisy sample at sigma is ``x = (1 - sigma) * x0 + sigma * noise`` and the model
    predicts ``noise - x0``, so ``x0 = x - sigma * prediction``. Sigma is ``timestep / num_train_timesteps``
    (the distilled timesteps are already in the shifted schedule's units). The last step returns x0.
    """

    def __init__(self, timesteps: list[int], num_train_timesteps: int, generator: torch.Generator,
                 device: torch.device):
        self.timesteps = torch.tensor(timesteps, dtype=torch.float32, device=device)
        self.sigmas = [t / num_train_timesteps for t in timesteps] + [0.0]
        self.generator = generator
        self.step_index = 0

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
             return_dict: bool = False) -> tuple[torch.Tensor]:
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        clean = sample - sigma * model_output.to(sample.dtype)
        self.step_index += 1
        if sigma_next == 0:
            return (clean,)
        noise = draw_noise(tuple(sample.shape), self.generator, sample.dtype, sample.device)
        return ((1 - sigma_next) * clean + sigma_next * noise,)


def dmd_timesteps(settings: dict, scheduler_config) -> list[int]:
    """The distilled timesteps: a ``dmd_denoising_steps`` list of model_index.json or the scheduler config."""
    steps = settings.get("dmd_denoising_steps") or scheduler_config.get("dmd_denoising_steps")
    return [int(t) for t in (steps or presets.FASTWAN_DMD_TIMESTEPS)]


@register_pipeline
class WanDMDPipeline(WanPipeline):
    pipeline_class_names = ("WanDMDPipeline",)

    @classmethod
    def describe(cls, checkpoint) -> ModelSpec:
        wan = super().describe(checkpoint)  # T2V, or TI2V with an optional first frame
        defaults = presets.FASTWAN22_TI2V_5B if checkpoint.settings.get("expand_timesteps") else presets.FASTWAN21_T2V
        steps = tuple(dmd_timesteps(checkpoint.settings, checkpoint.config("scheduler")))
        return dataclasses.replace(wan, defaults=dataclasses.replace(defaults, num_inference_steps=len(steps)),
                                   distilled_timesteps=steps, max_guidance_scale=1.0)

    @property
    def dmd_timesteps(self) -> list[int]:
        return dmd_timesteps(self.settings, self.scheduler.config)

    def prepare_timesteps(self, state: PipelineState) -> None:
        num_train = self.scheduler.config.get("num_train_timesteps", 1000)
        sampler = DMDSampler(self.dmd_timesteps, num_train, state.noise_generator(), self.device)
        state.scheduler, state.timesteps = sampler, sampler.timesteps
        state.extras["timestep_values"] = sampler.timesteps.tolist()
