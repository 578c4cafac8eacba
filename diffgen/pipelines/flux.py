"""FLUX.1 text-to-image (dev: guidance-distilled; schnell: timestep-distilled)."""

from __future__ import annotations

import torch

from diffgen.configs.flux import FLUX_DEV, FLUX_SCHNELL
from diffgen.engine.spec import ModelSpec
from diffgen.models.dits.flux import FluxTransformer
from diffgen.models.encoders.clip import CLIPTextModel
from diffgen.models.encoders.t5 import T5Encoder
from diffgen.models.encoders.tokenizers import CLIPTokenizer, T5Tokenizer
from diffgen.models.vaes.autoencoder_kl import AutoencoderKL
from diffgen.pipelines.base import ComposedPipeline, PipelineState, register_pipeline
from diffgen.pipelines.flow_match import load_flow_match_scheduler
from diffgen.pipelines.guidance import GuidanceStep, cfg
from diffgen.pipelines.latents import pack_latents, set_shifted_flow_timesteps, unpack_latents
from diffgen.pipelines.stages import draw_noise


def image_position_ids(grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
    """(grid_h * grid_w, 3) ids: axis 0 unused for images, then row and column."""
    ids = torch.zeros(grid_h, grid_w, 3)
    ids[..., 1] = torch.arange(grid_h)[:, None]
    ids[..., 2] = torch.arange(grid_w)[None, :]
    return ids.reshape(-1, 3).to(device)


@register_pipeline
class FluxPipeline(ComposedPipeline):
    pipeline_class_names = ("FluxPipeline",)
    required_components = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                           "transformer")
    # The VAE, the sampler, the text encoders and the tokenizers are diffgen's too, so that a FLUX run imports neither
    # diffusers nor transformers (whose model code imports torch._dynamo): seconds of start-up.
    native_models = {"FluxTransformer2DModel": FluxTransformer, "AutoencoderKL": AutoencoderKL,
                     "CLIPTextModel": CLIPTextModel, "T5EncoderModel": T5Encoder,
                     **{name: CLIPTokenizer for name in CLIPTokenizer.tokenizer_classes},
                     **{name: T5Tokenizer for name in T5Tokenizer.tokenizer_classes}}
    component_loaders = {"FlowMatchEulerDiscreteScheduler": load_flow_match_scheduler}
    packed_latents = True

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def describe(cls, checkpoint) -> ModelSpec:
        if checkpoint.config("transformer").get("guidance_embeds"):
            return ModelSpec(FLUX_DEV, "image", "T2I", guidance_fields=("guidance_scale", "true_cfg_scale"))
        return ModelSpec(FLUX_SCHNELL, "image", "T2I", guidance_fields=("true_cfg_scale",))

    # -- text ----------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], max_length: int, repeat: int) -> dict[str, torch.Tensor]:
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.device)).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=max_length, truncation=True,
                                  return_tensors="pt").input_ids
        embeds = self.text_encoder_2(t5_ids.to(self.device)).last_hidden_state
        embeds = embeds.to(self.text_encoder_2.dtype)
        return {
            "encoder_hidden_states": embeds.repeat_interleave(repeat, dim=0),
            "pooled_projections": pooled.to(self.text_encoder.dtype).repeat_interleave(repeat, dim=0),
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.text_encoder.dtype),
        }

    def encode_text(self, state: PipelineState) -> None:
        r = state.request
        state.cond = self._encode(r.prompt, r.max_sequence_length, r.num_outputs_per_prompt)
        # FLUX has no CFG by default; "true CFG" runs only with a negative prompt and true_cfg_scale > 1.
        if r.negative_prompt is not None and r.true_cfg_scale > 1:
            state.uncond = self._encode(r.negative_prompt, r.max_sequence_length, r.num_outputs_per_prompt)

    # -- latents and timesteps -------------------------------------------------------------------
    def prepare_latents(self, state: PipelineState) -> None:
        r = state.request
        grid_h = 2 * (r.height // (self.vae_scale_factor * 2))
        grid_w = 2 * (r.width // (self.vae_scale_factor * 2))
        channels = self.transformer.config.in_channels // 4
        dtype = state.cond["encoder_hidden_states"].dtype
        noise = draw_noise((r.batch_size, channels, grid_h, grid_w), state.seed, dtype, self.device)
        state.latents = pack_latents(noise)
        img_ids = image_position_ids(grid_h // 2, grid_w // 2, self.device).to(dtype)
        state.cond["img_ids"] = img_ids
        if state.uncond is not None:
            state.uncond["img_ids"] = img_ids
        if self.transformer.config.guidance_embeds:
            state.extras["guidance"] = torch.full((r.batch_size,), float(r.guidance_scale), device=self.device)
        state.extras["latent_grid"] = (grid_h, grid_w)

    def prepare_timesteps(self, state: PipelineState) -> None:
        scheduler = self.new_scheduler()
        set_shifted_flow_timesteps(scheduler, state.request.num_inference_steps, state.latents.shape[1], self.device)
        state.scheduler, state.timesteps = scheduler, scheduler.timesteps

    # -- denoising -------------------------------------------------------------------------------
    def guidance(self, state: PipelineState, latents: torch.Tensor, t: torch.Tensor, step: int) -> GuidanceStep:
        inputs = {"hidden_states": latents, "timestep": t.expand(latents.shape[0]).to(latents.dtype) / 1000,
                  "guidance": state.extras.get("guidance")}
        branches = [{**inputs, **kwargs} for kwargs in (state.cond, state.uncond) if kwargs is not None]
        return GuidanceStep(self.transformer, branches, cfg(state.request.true_cfg_scale),
                            shared=frozenset({"txt_ids", "img_ids"}))

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, state: PipelineState) -> None:
        grid_h, grid_w = state.extras["latent_grid"]
        latents = unpack_latents(state.latents, grid_h, grid_w)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        state.pixels = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
