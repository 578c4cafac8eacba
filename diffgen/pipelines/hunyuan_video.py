"""HunyuanVideo (v1) text-to-video.

| model_index ``_class_name`` | checkpoints                          |
|-----------------------------|--------------------------------------|
| HunyuanVideoPipeline        | hunyuanvideo-community/HunyuanVideo  |

Text: the Llava-Llama-3 text tower (``LlamaModel``) reads the prompt inside the reference's chat
template; the hidden states of its third-last layer, without the template's first 95 tokens, are
the DiT's text tokens (with their mask). CLIP-L's pooled output of the bare prompt conditions the
modulation. The model is guidance-distilled: ``guidance_scale`` is embedded, one DiT call per step;
true CFG (two calls) runs only with a negative prompt and ``true_cfg_scale > 1``, as in diffusers.
Like diffusers: latents and the scheduler in float32, the DiT in the model dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from diffgen.configs import hunyuan_video as presets
from diffgen.engine.spec import ModelSpec
from diffgen.models.dits.hunyuan_video import HunyuanVideoTransformer
from diffgen.pipelines.base import ComposedPipeline, PipelineState, register_pipeline
from diffgen.pipelines.latents import vae_tiling_wanted
from diffgen.pipelines.stages import draw_noise

#: The reference scripts always decode in tiles (256-px tiles, 64-px overlap): an untiled 720p decode
#: of 129 frames does not fit one GPU. The VAE tiles only frames larger than one tile.
VAE_TILING_MIN_PIXELS = 0


@register_pipeline
class HunyuanVideoPipeline(ComposedPipeline):
    pipeline_class_names = ("HunyuanVideoPipeline",)
    required_components = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                           "transformer")
    native_models = {"HunyuanVideoTransformer3DModel": HunyuanVideoTransformer}
    output_kind = "video"

    @classmethod
    def describe(cls, checkpoint) -> ModelSpec:
        return ModelSpec(presets.HUNYUAN_VIDEO, "video", "T2V", guidance_fields=("guidance_scale", "true_cfg_scale"))

    @property
    def vae_scale_spatial(self) -> int:
        return self.vae.config.spatial_compression_ratio

    @property
    def vae_scale_temporal(self) -> int:
        return self.vae.config.temporal_compression_ratio

    # -- text ----------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], max_length: int, repeat: int) -> dict[str, torch.Tensor]:
        crop = presets.PROMPT_TEMPLATE_CROP
        tokens = self.tokenizer([presets.PROMPT_TEMPLATE.format(p) for p in prompts], max_length=max_length + crop,
                                padding="max_length", truncation=True, return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=tokens.input_ids.to(self.device), attention_mask=mask,
                                   output_hidden_states=True).hidden_states[-3]
        embeds = hidden.to(self.text_encoder.dtype)[:, crop:]
        clip_ids = self.tokenizer_2(prompts, padding="max_length", max_length=presets.CLIP_MAX_LENGTH,
                                    truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder_2(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        return {
            "encoder_hidden_states": embeds.to(self.dtype).repeat_interleave(repeat, dim=0),
            "encoder_attention_mask": mask[:, crop:].to(self.dtype).repeat_interleave(repeat, dim=0),
            "pooled_projections": pooled.to(self.dtype).repeat_interleave(repeat, dim=0),
        }

    def encode_text(self, state: PipelineState) -> None:
        r = state.request
        state.cond = self._encode(r.prompt, r.max_sequence_length, r.num_outputs_per_prompt)
        if r.negative_prompt is not None and r.true_cfg_scale > 1:
            state.uncond = self._encode(r.negative_prompt, r.max_sequence_length, r.num_outputs_per_prompt)

    # -- latents and timesteps -----------------------------------------------------------------
    def prepare_latents(self, state: PipelineState) -> None:
        r = state.request
        shape = (r.batch_size, self.transformer.config.in_channels, (r.num_frames - 1) // self.vae_scale_temporal + 1,
                 r.height // self.vae_scale_spatial, r.width // self.vae_scale_spatial)
        state.latents = draw_noise(shape, state.noise_generator(), torch.float32, self.device)
        # the reference rounds the scale to the model dtype before multiplying by 1000
        state.extras["guidance"] = torch.full((r.batch_size,), float(r.guidance_scale), dtype=self.dtype,
                                              device=self.device) * 1000.0

    def prepare_timesteps(self, state: PipelineState) -> None:
        steps = state.request.num_inference_steps
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=self.device)
        scheduler.set_begin_index(0)
        state.scheduler, state.timesteps = scheduler, scheduler.timesteps

    # -- denoising -----------------------------------------------------------------------------
    def predict_noise(self, state: PipelineState, latents: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        x, timestep = latents.to(self.dtype), t.expand(latents.shape[0]).to(latents.dtype)
        guidance = state.extras["guidance"]
        pred = self.transformer(x, timestep, guidance=guidance, **state.cond)
        if state.uncond is not None:
            neg = self.transformer(x, timestep, guidance=guidance, **state.uncond)
            pred = neg + state.request.true_cfg_scale * (pred - neg)
        return pred

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, state: PipelineState) -> None:
        r = state.request
        self.vae.use_tiling = vae_tiling_wanted(r.height, r.width, VAE_TILING_MIN_PIXELS)
        latents = state.latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        # One video at a time (VAE slicing): peak memory of one output whatever the batch.
        video = torch.cat([self.vae.decode(sample, return_dict=False)[0] for sample in latents.split(1)])
        state.pixels = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).float()
