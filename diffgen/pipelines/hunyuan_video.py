"""HunyuanVideo (v1) text-to-video and image-to-video.

| model_index ``_class_name``      | checkpoints                              |
|----------------------------------|------------------------------------------|
| HunyuanVideoPipeline             | hunyuanvideo-community/HunyuanVideo      |
| HunyuanVideoImageToVideoPipeline | hunyuanvideo-community/HunyuanVideo-I2V  |

Text: the Llava-Llama-3 text tower (``LlamaModel``) reads the prompt inside the reference's chat
template; the hidden states of its third-last layer, without the template's first 95 tokens, are
the DiT's text tokens (with their mask). CLIP-L's pooled output of the bare prompt conditions the
modulation. The model is guidance-distilled: ``guidance_scale`` is embedded, one DiT call per step;
true CFG (two calls) runs only with a negative prompt and ``true_cfg_scale > 1``, as in diffusers.
Like diffusers: latents and the scheduler in float32, the DiT in the model dtype.

Image-to-video ("token replace" DiT): Llava-Llama-3 reads the prompt together with the image (see
:mod:`diffgen.models.encoders.llava_llama`); the image's VAE latent is the first latent frame, kept
clean through sampling (its tokens are modulated as timestep 0 inside the DiT).
"""

from __future__ import annotations

import numpy as np
import torch

from diffgen.configs import hunyuan_video as presets
from diffgen.engine.spec import ModelSpec
from diffgen.errors import ModelLoadError
from diffgen.models.dits.hunyuan_video import HunyuanVideoTransformer
from diffgen.models.encoders.llava_llama import encode_llava_prompt
from diffgen.pipelines.base import ComposedPipeline, PipelineState, register_pipeline
from diffgen.pipelines.flow_match import load_flow_match_scheduler
from diffgen.pipelines.guidance import GuidanceStep, cfg
from diffgen.pipelines.latents import decode_videos_one_by_one, image_to_tensor, vae_tiling_wanted
from diffgen.pipelines.stages import draw_noise

#: The reference scripts always decode in tiles (256-px tiles, 64-px overlap): an untiled 720p decode
#: of 129 frames does not fit one GPU. The VAE tiles only frames larger than one tile.
VAE_TILING_MIN_PIXELS = 0


def drop_shared_padding(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Text tokens without the padding all prompts of the batch end with.

    Padded tokens are masked keys, so dropping them changes no video token; with none left the DiT
    attends without a mask. Kept as is when the padding is not at the end (a left-padding tokenizer).
    """
    valid = int(mask.sum(dim=1).max())
    if bool(mask[:, valid:].any()):
        return embeds, mask
    return embeds[:, :valid], mask[:, :valid]


@register_pipeline
class HunyuanVideoPipeline(ComposedPipeline):
    pipeline_class_names = ("HunyuanVideoPipeline",)
    required_components = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                           "transformer")
    native_models = {"HunyuanVideoTransformer3DModel": HunyuanVideoTransformer}
    component_loaders = {"FlowMatchEulerDiscreteScheduler": load_flow_match_scheduler}
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
        embeds, mask = drop_shared_padding(hidden.to(self.text_encoder.dtype)[:, crop:], mask[:, crop:])
        pooled = self._encode_clip(prompts)
        return {
            "encoder_hidden_states": embeds.to(self.dtype).repeat_interleave(repeat, dim=0),
            "encoder_attention_mask": mask.to(self.dtype).repeat_interleave(repeat, dim=0),
            "pooled_projections": pooled.to(self.dtype).repeat_interleave(repeat, dim=0),
        }

    def _encode_clip(self, prompts: list[str]) -> torch.Tensor:
        clip_ids = self.tokenizer_2(prompts, padding="max_length", max_length=presets.CLIP_MAX_LENGTH,
                                    truncation=True, return_tensors="pt").input_ids
        return self.text_encoder_2(clip_ids.to(self.device), output_hidden_states=False).pooler_output

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
        if self.transformer.config.guidance_embeds:
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
    def guidance(self, state: PipelineState, latents: torch.Tensor, t: torch.Tensor, step: int) -> GuidanceStep:
        inputs = {"hidden_states": latents.to(self.dtype), "timestep": t.expand(latents.shape[0]).to(latents.dtype),
                  "guidance": state.extras.get("guidance")}
        branches = [{**inputs, **kwargs} for kwargs in (state.cond, state.uncond) if kwargs is not None]
        # prompts keep their own lengths (drop_shared_padding): padded again with masked tokens to share a forward
        return GuidanceStep(self.transformer, branches, cfg(state.request.true_cfg_scale),
                            text_padding={"encoder_hidden_states": "encoder_attention_mask"})

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, state: PipelineState) -> None:
        r = state.request
        tiling = vae_tiling_wanted(r.height, r.width, VAE_TILING_MIN_PIXELS)
        state.pixels = decode_videos_one_by_one(self.vae, state.latents, tiling)


@register_pipeline
class HunyuanVideoImageToVideoPipeline(HunyuanVideoPipeline):
    pipeline_class_names = ("HunyuanVideoImageToVideoPipeline",)
    required_components = (*HunyuanVideoPipeline.required_components, "image_processor")

    @classmethod
    def describe(cls, checkpoint) -> ModelSpec:
        condition = checkpoint.config("transformer").get("image_condition_type")
        if condition != "token_replace":
            raise ModelLoadError(f"{checkpoint.model_path}: HunyuanVideo-I2V with image_condition_type {condition!r} "
                                 "is not supported (only 'token_replace': hunyuanvideo-community/HunyuanVideo-I2V)")
        # true CFG is not offered yet: a negative prompt is accepted and unused
        return ModelSpec(presets.HUNYUAN_VIDEO_I2V, "video", "I2V", min_images=1, max_images=1)

    def encode_text(self, state: PipelineState) -> None:
        r = state.request
        embeds, mask = encode_llava_prompt(self.text_encoder, self.tokenizer, self.image_processor, r.prompt,
                                           r.images[0], r.max_sequence_length, presets.I2V_IMAGE_TOKEN_STRIDE)
        embeds, mask = drop_shared_padding(embeds, mask)
        pooled = self._encode_clip(r.prompt)
        repeat = r.num_outputs_per_prompt
        state.cond = {
            "encoder_hidden_states": embeds.to(self.dtype).repeat_interleave(repeat, dim=0),
            "encoder_attention_mask": mask.to(self.dtype).repeat_interleave(repeat, dim=0),
            "pooled_projections": pooled.to(self.dtype).repeat_interleave(repeat, dim=0),
        }

    def encode_images(self, state: PipelineState) -> None:
        """Nothing more: the image was read with the prompt (encode_text) and is encoded with the latents."""

    def prepare_latents(self, state: PipelineState) -> None:
        """Noise slightly pulled towards the image latent (t = 0.999); the first frame is the image latent itself."""
        super().prepare_latents(state)
        r = state.request
        pixels = image_to_tensor(r.images[0], (r.height, r.width)).to(self.device, self.vae.dtype).unsqueeze(2)
        image = self.vae.encode(pixels).latent_dist.mode().to(torch.float32) * self.vae.config.scaling_factor
        t = torch.tensor([0.999], device=self.device)
        latents = state.latents * t + image * (1 - t)
        latents[:, :, :1] = image
        state.latents = latents

    supports_batching = False  # its first latent frame is pinned after the guidance combine (predict_noise below)

    def predict_noise(self, state: PipelineState, latents: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        pred = super().predict_noise(state, latents, t, step)
        pred[:, :, :1] = 0  # the first frame stays the clean image: a zero step
        return pred
