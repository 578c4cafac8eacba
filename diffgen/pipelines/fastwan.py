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

import torch

from diffgen.configs import wan as presets
from diffgen.configs.models import ModelDefaults
from diffgen.engine.request import GenerationRequest
from diffgen.errors import InvalidRequestError
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


@register_pipeline
class WanDMDPipeline(WanPipeline):
    pipeline_class_names = ("WanDMDPipeline",)

    def select_defaults(self) -> ModelDefaults:
        return presets.FASTWAN22_TI2V_5B if self.expand_timesteps else presets.FASTWAN21_T2V

    @property
    def dmd_timesteps(self) -> list[int]:
        steps = self.settings.get("dmd_denoising_steps") or self.scheduler.config.get("dmd_denoising_steps")
        return [int(t) for t in (steps or presets.FASTWAN_DMD_TIMESTEPS)]

    def resolve_request(self, request: GenerationRequest) -> GenerationRequest:
        steps, name = self.dmd_timesteps, self.defaults.name
        if request.num_inference_steps not in (None, len(steps)):
            raise InvalidRequestError("num_inference_steps", f"{request.num_inference_steps} given; {name} is "
                                      f"distilled for {len(steps)} steps at timesteps {steps}")
        if request.guidance_scale is not None and request.guidance_scale > 1:
            raise InvalidRequestError("guidance_scale", f"{request.guidance_scale} given; {name} is distilled to "
                                      "sample without classifier-free guidance (use 1 or leave it unset)")
        return super().resolve_request(request)

    def prepare_timesteps(self, state: PipelineState) -> None:
        num_train = self.scheduler.config.get("num_train_timesteps", 1000)
        sampler = DMDSampler(self.dmd_timesteps, num_train, state.noise_generator(), self.device)
        state.scheduler, state.timesteps = sampler, sampler.timesteps
        state.extras["timestep_values"] = sampler.timesteps.tolist()
