"""HunyuanVideo-1.5 text-to-video and image-to-video (see :mod:`diffgen.configs.hunyuan_video15` for the checkpoints).

Text: Qwen2.5-VL's text tower reads the prompt inside the reference's chat template (system message
+ user prompt); the hidden states of its third-from-last layer, without the template's first 108
tokens, are the DiT's text tokens. The quoted parts of the prompt ("glyph" text, e.g. a sign's words)
are read by a ByT5 encoder; a prompt without quotes gives none. Classifier-free guidance runs through
the guidance seam with the empty prompt as the negative one (as diffusers' guider does); its scale
comes from the checkpoint's ``guider`` config. Like diffusers: the scheduler's flow sigmas 1 -> 1/N,
shifted by the scheduler config's ``shift``.

Image-to-video: the image, resized and centre-cropped to the output size, is VAE-encoded into the
first frame of the condition latent (with a mask channel) that the DiT reads beside the noisy latent,
and SigLIP's tokens of it join the text tokens. The step-distilled checkpoint (MeanFlow) also embeds
the timestep the step ends at.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from PIL import Image

from diffgen.configs import hunyuan_video15 as presets
from diffgen.engine.spec import ModelSpec, aspect_bucket_size
from diffgen.models.dits.hunyuan_video15 import HunyuanVideo15Transformer
from diffgen.pipelines.base import ComposedPipeline, PipelineState, register_pipeline
from diffgen.pipelines.flow_match import load_flow_match_scheduler
from diffgen.pipelines.guidance import GuidanceStep, cfg
from diffgen.pipelines.hunyuan_video import drop_shared_padding
from diffgen.pipelines.latents import decode_videos_one_by_one, image_to_tensor, vae_tiling_wanted
from diffgen.pipelines.stages import draw_noise

#: Decode in tiles whenever a frame is larger than one tile (256 px): untiled, a 720p 121-frame decode
#: needs far more memory than the DiT.
VAE_TILING_MIN_PIXELS = 0
_QUOTED = re.compile(r"\"(.*?)\"|“(.*?)”")


def glyph_text(prompt: str) -> str | None:
    """The quoted parts of a prompt as ByT5 reads them (``Text "a". Text "b". ``), or None without quotes."""
    quoted = [plain or curly for plain, curly in _QUOTED.findall(prompt)]
    if len(quoted) > 1:
        quoted = list(dict.fromkeys(quoted))
    return ". ".join(f'Text "{text}"' for text in quoted) + ". " if quoted else None


def resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale ``image`` (Lanczos) to cover width x height, keeping its aspect ratio, then centre-crop."""
    image = image.convert("RGB")
    if width / height > image.width / image.height:
        scaled = (width, image.height * width // image.width)
    else:
        scaled = (image.width * height // image.height, height)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image.resize(scaled, resample=Image.LANCZOS),
                 box=(width // 2 - scaled[0] // 2, height // 2 - scaled[1] // 2))
    return canvas


def guidance_scale(checkpoint) -> float:
    """The checkpoint's default guidance scale: its guider config's (1.0 without one, as diffusers)."""
    return float(checkpoint.config("guider").get("guidance_scale", 1.0))


def model_defaults(checkpoint, task: str):
    """Defaults from the checkpoint's files: size bucket of its target size, guider scale, distillation."""
    transformer = checkpoint.config("transformer")
    target = transformer.get("target_size", 640)
    width, height = aspect_bucket_size(*presets.DEFAULT_ASPECT, target, presets.SIZE_MULTIPLE)
    distilled = bool(transformer.get("use_meanflow"))
    name = f"HunyuanVideo-1.5-{height}p-{task}" + ("-step-distilled" if distilled else "")
    guidance = guidance_scale(checkpoint)
    steps = presets.STEP_DISTILLED_STEPS if distilled else 50
    return presets.defaults(name, width, height, guidance, steps), target


@register_pipeline
class HunyuanVideo15Pipeline(ComposedPipeline):
    pipeline_class_names = ("HunyuanVideo15Pipeline",)
    required_components = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                           "transformer")
    native_models = {"HunyuanVideo15Transformer3DModel": HunyuanVideo15Transformer}
    component_loaders = {"FlowMatchEulerDiscreteScheduler": load_flow_match_scheduler}
    output_kind = "video"
    guidance_branches = 2

    @classmethod
    def describe(cls, checkpoint) -> ModelSpec:
        defaults, _ = model_defaults(checkpoint, "T2V")
        return ModelSpec(defaults, "video", "T2V")

    @classmethod
    def default_guidance_branches(cls, checkpoint) -> int:
        """One branch where the guider's scale is 1.0 (the distilled checkpoints): CFG is off by default."""
        return 1 if math.isclose(guidance_scale(checkpoint), 1.0) else 2

    @property
    def vae_scale_spatial(self) -> int:
        return self.vae.config.spatial_compression_ratio

    @property
    def vae_scale_temporal(self) -> int:
        return self.vae.config.temporal_compression_ratio

    # -- text ----------------------------------------------------------------------------------
    def _encode_prompt(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        crop = presets.PROMPT_TEMPLATE_CROP
        chats = [[{"role": "system", "content": presets.SYSTEM_MESSAGE}, {"role": "user", "content": p or " "}]
                 for p in prompts]
        tokens = self.tokenizer.apply_chat_template(
            chats, add_generation_prompt=True, tokenize=True, return_dict=True, padding="max_length",
            max_length=max_length + crop, truncation=True, return_tensors="pt")
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask,
                                   output_hidden_states=True).hidden_states[presets.TEXT_HIDDEN_LAYER]
        return drop_shared_padding(hidden[:, crop:], mask[:, crop:])

    def _encode_glyphs(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ByT5 states (B, 256, d) and mask of each prompt's quoted text; zeros (masked) without quotes."""
        length, encoder = presets.GLYPH_MAX_LENGTH, self.text_encoder_2
        embeds = torch.zeros(len(prompts), length, encoder.config.d_model, dtype=encoder.dtype, device=self.device)
        mask = torch.zeros(len(prompts), length, dtype=torch.int64, device=self.device)
        for i, prompt in enumerate(prompts):
            text = glyph_text(prompt)
            if text is None:
                continue
            tokens = self.tokenizer_2(text, padding="max_length", max_length=length, truncation=True,
                                      add_special_tokens=True, return_tensors="pt").to(self.device)
            embeds[i] = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.float())[0][0]
            mask[i] = tokens.attention_mask[0]
        return embeds, mask

    def _encode(self, prompts: list[str], max_length: int, repeat: int) -> dict[str, torch.Tensor]:
        embeds, mask = self._encode_prompt(prompts, max_length)
        glyphs, glyph_mask = self._encode_glyphs(prompts)
        per_output = lambda t: t.to(self.dtype).repeat_interleave(repeat, dim=0)  # noqa: E731
        return {"encoder_hidden_states": per_output(embeds), "encoder_attention_mask": per_output(mask),
                "encoder_hidden_states_2": per_output(glyphs), "encoder_attention_mask_2": per_output(glyph_mask)}

    def cfg_enabled(self, state: PipelineState) -> bool:
        return not math.isclose(state.request.guidance_scale, 1.0)

    def encode_text(self, state: PipelineState) -> None:
        r = state.request
        state.cond = self._encode(r.prompt, r.max_sequence_length, r.num_outputs_per_prompt)
        if self.cfg_enabled(state):
            negative = r.negative_prompt or [""] * len(r.prompt)
            state.uncond = self._encode(negative, r.max_sequence_length, r.num_outputs_per_prompt)

    # -- latents and timesteps -----------------------------------------------------------------
    def latent_shape(self, state: PipelineState) -> tuple[int, ...]:
        r = state.request
        return (r.batch_size, self.vae.config.latent_channels, (r.num_frames - 1) // self.vae_scale_temporal + 1,
                r.height // self.vae_scale_spatial, r.width // self.vae_scale_spatial)

    def prepare_latents(self, state: PipelineState) -> None:
        """Noise, and the condition the DiT reads beside it: no conditioned frame (zeros, mask 0)."""
        shape = self.latent_shape(state)
        state.latents = draw_noise(shape, state.noise_generator(), torch.float32, self.device)
        batch, channels, frames, height, width = shape
        state.extras["condition"] = torch.zeros(batch, channels + 1, frames, height, width, dtype=self.dtype,
                                                device=self.device)

    def prepare_timesteps(self, state: PipelineState) -> None:
        steps = state.request.num_inference_steps
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=self.device)
        scheduler.set_begin_index(0)
        state.scheduler, state.timesteps = scheduler, scheduler.timesteps

    # -- denoising -----------------------------------------------------------------------------
    def guidance(self, state: PipelineState, latents: torch.Tensor, t: torch.Tensor, step: int) -> GuidanceStep:
        x = torch.cat([latents.to(self.dtype), state.extras["condition"]], dim=1)
        batch = x.shape[0]
        inputs = {"hidden_states": x, "timestep": t.expand(batch).to(self.dtype),
                  "image_embeds": state.extras.get("image_embeds")}
        if self.transformer.config.use_meanflow:  # the step ends at the next timestep (0 after the last)
            end = state.timesteps[step + 1] if step + 1 < len(state.timesteps) else t.new_zeros(())
            inputs["timestep_r"] = end.expand(batch).to(self.dtype)
        branches = [{**inputs, **kwargs} for kwargs in (state.cond, state.uncond) if kwargs is not None]
        # prompts keep their own lengths (drop_shared_padding): padded again with masked tokens to share a forward
        return GuidanceStep(self.transformer, branches, cfg(state.request.guidance_scale),
                            text_padding={"encoder_hidden_states": "encoder_attention_mask"})

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, state: PipelineState) -> None:
        r = state.request
        tiling = vae_tiling_wanted(r.height, r.width, VAE_TILING_MIN_PIXELS)
        state.pixels = decode_videos_one_by_one(self.vae, state.latents, tiling)


@register_pipeline
class HunyuanVideo15ImageToVideoPipeline(HunyuanVideo15Pipeline):
    pipeline_class_names = ("HunyuanVideo15ImageToVideoPipeline",)
    required_components = (*HunyuanVideo15Pipeline.required_components, "image_encoder", "feature_extractor")

    @classmethod
    def describe(cls, checkpoint) -> ModelSpec:
        defaults, target = model_defaults(checkpoint, "I2V")
        # the output takes the size bucket of the image's aspect unless a size is asked
        return ModelSpec(defaults, "video", "I2V", min_images=1, max_images=1, size_from_image="first",
                         size_rule="buckets", bucket_target=target)

    def encode_images(self, state: PipelineState) -> None:
        """SigLIP tokens of the image as the DiT's image tokens; the image (resized, cropped) kept for its latent."""
        r = state.request
        image = resize_and_crop(r.images[0], r.width, r.height)
        pixels = self.feature_extractor.preprocess(images=image, do_resize=True, return_tensors="pt",
                                                   do_convert_rgb=True)
        pixels = pixels.to(self.device, next(self.image_encoder.parameters()).dtype)
        tokens = self.image_encoder(**pixels).last_hidden_state
        state.extras["image_embeds"] = tokens.to(self.dtype).repeat(r.batch_size, 1, 1)
        state.extras["image"] = image

    def prepare_latents(self, state: PipelineState) -> None:
        """The condition's first frame is the image's latent (its mode), with mask 1 there."""
        super().prepare_latents(state)
        pixels = image_to_tensor(state.extras["image"]).to(self.device, self.vae.dtype).unsqueeze(2)
        image = self.vae.encode(pixels).latent_dist.mode() * self.vae.config.scaling_factor
        condition = state.extras["condition"]
        channels = image.shape[1]
        condition[:, :channels, :1] = image.to(condition.dtype)
        condition[:, channels:, :1] = 1.0
