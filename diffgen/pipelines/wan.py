"""Wan 2.1 / 2.2 video pipelines: text-to-video, image-to-video and Wan2.2's two-expert and TI2V models.

| model_index ``_class_name`` | checkpoints                                                                 |
|-----------------------------|-----------------------------------------------------------------------------|
| WanPipeline                 | Wan2.1 T2V 1.3B/14B; Wan2.2 T2V A14B (transformer_2); TI2V-5B (+ image)     |
| WanImageToVideoPipeline     | Wan2.1 I2V 14B 480P/720P (CLIP image tokens); Wan2.2 I2V A14B               |

Like diffusers: latents and the scheduler run in float32, the DiT in the model dtype; CFG runs the
DiT twice (cond, uncond). Wan2.2 A14B switches from ``transformer`` (high noise) to
``transformer_2`` (low noise) at ``boundary_ratio * num_train_timesteps``, each with its own
guidance scale. TI2V-5B (``expand_timesteps``) gives every latent token its own timestep, so an
input image can be pinned as the clean first latent frame (timestep 0).
"""

from __future__ import annotations

import html
import re
from typing import Any

import torch
from PIL import Image

from diffgen.configs import wan as presets
from diffgen.engine.spec import ModelSpec
from diffgen.models.dits.wan import WanTransformer
from diffgen.models.encoders.t5 import UMT5Encoder
from diffgen.models.vaes.wan import WanDecodingVAE, channels_last_conv3d, use_native_decoder
from diffgen.pipelines.base import ComposedPipeline, PipelineState, register_pipeline
from diffgen.pipelines.guidance import GuidanceStep, cfg
from diffgen.pipelines.latents import image_to_tensor, vae_latent_stats, vae_tiling_wanted
from diffgen.pipelines.stages import draw_noise

#: Decoded frames larger than this (pixels per frame) are decoded in overlapping spatial tiles.
VAE_TILING_MIN_PIXELS = 1280 * 720


def clean_prompt(text: str) -> str:
    """The Wan reference's text normalisation: fix mojibake (with ftfy, if installed), unescape HTML, squeeze spaces."""
    try:
        import ftfy

        text = ftfy.fix_text(ftfy.fix_text(text))
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@register_pipeline
class WanPipeline(ComposedPipeline):
    pipeline_class_names = ("WanPipeline",)
    required_components = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
    optional_components = ("transformer_2",)
    #: text-to-video only decodes: its VAE loads without diffusers (WanDecodingVAE declines Wan2.2's, which TI2V-5B
    #: also encodes with)
    native_models = {"WanTransformer3DModel": WanTransformer, "UMT5EncoderModel": UMT5Encoder,
                     "AutoencoderKLWan": WanDecodingVAE}
    output_kind = "video"
    guidance_branches = 2
    #: diffusers' WanPipeline pins the scheduler's first step index; its image-to-video pipeline does not.
    pins_begin_index = True

    def __init__(self, components: dict[str, Any], model_path: str, device: torch.device, dtype: torch.dtype,
                 settings: dict[str, Any] | None = None, spec: ModelSpec | None = None):
        super().__init__(components, model_path, device, dtype, settings, spec)
        if device.type == "cuda":
            channels_last_conv3d(self.vae)
        use_native_decoder(self.vae)  # several latent frames per call; tiled decoding stays diffusers'

    # -- model facts ---------------------------------------------------------------------------
    requires_image = False

    @classmethod
    def describe(cls, checkpoint) -> ModelSpec:
        settings = checkpoint.settings
        two_experts = settings.get("boundary_ratio") is not None and checkpoint.has("transformer_2")
        if settings.get("expand_timesteps"):
            # TI2V-5B is a WanPipeline in its model_index.json yet also takes an optional first frame.
            defaults, task = presets.WAN22_TI2V_5B, "TI2V"
        elif not cls.requires_image:
            defaults, task = (presets.WAN22_T2V_A14B if two_experts else presets.WAN21_T2V), "T2V"
        elif two_experts:
            defaults, task = presets.WAN22_I2V_A14B, "I2V"
        else:
            is_720p = "720P" in checkpoint.model_path.upper()
            defaults, task = (presets.WAN21_I2V_720P if is_720p else presets.WAN21_I2V_480P), "I2V"
        guidance = ("guidance_scale", "guidance_scale_2") if two_experts else ("guidance_scale",)
        # With an input image and no size asked, the image's aspect ratio is kept at the default area.
        return ModelSpec(defaults, "video", task, min_images=int(cls.requires_image),
                         max_images=int(task in ("I2V", "TI2V")), guidance_fields=guidance,
                         size_from_image="first", size_rule="default_area")

    @property
    def expand_timesteps(self) -> bool:
        return bool(self.settings.get("expand_timesteps"))

    @property
    def boundary_ratio(self) -> float | None:
        ratio = self.settings.get("boundary_ratio")
        return None if ratio is None or self.components.get("transformer_2") is None else float(ratio)

    @property
    def vae_scale_spatial(self) -> int:
        return self.vae.config.get("scale_factor_spatial") or 8

    @property
    def vae_scale_temporal(self) -> int:
        return self.vae.config.get("scale_factor_temporal") or 4

    # -- text ----------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], max_length: int, repeat: int) -> torch.Tensor:
        tokens = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=max_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        embeds = self.text_encoder(tokens.input_ids.to(self.device), mask).last_hidden_state
        embeds = embeds.masked_fill(~mask.bool()[..., None], 0.0)  # the reference zeroes padded positions
        return embeds.to(self.dtype).repeat_interleave(repeat, dim=0)

    def encode_text(self, state: PipelineState) -> None:
        r = state.request
        state.cond = {"encoder_hidden_states": self._encode(r.prompt, r.max_sequence_length,
                                                            r.num_outputs_per_prompt)}
        # CFG follows the first guidance scale, as in diffusers (also for the low-noise stage).
        if r.guidance_scale > 1:
            state.uncond = {"encoder_hidden_states": self._encode(r.negative_prompt or [""] * len(r.prompt),
                                                                  r.max_sequence_length, r.num_outputs_per_prompt)}

    # -- image ---------------------------------------------------------------------------------
    def encode_images(self, state: PipelineState) -> None:
        """CLIP tokens of the input image for Wan2.1 I2V (Wan2.2 conditions on latents only)."""
        r = state.request
        if not r.images or self.components.get("image_encoder") is None:
            return
        if self.transformer.config.image_dim is None:
            return
        pixels = self.image_processor(images=r.images[0], return_tensors="pt").pixel_values
        hidden = self.image_encoder(pixel_values=pixels.to(self.device, self.image_encoder.dtype),
                                    output_hidden_states=True).hidden_states[-2]
        image_tokens = hidden.to(self.dtype).repeat(r.batch_size, 1, 1)
        for kwargs in (state.cond, state.uncond):
            if kwargs is not None:
                kwargs["encoder_hidden_states_image"] = image_tokens

    # -- latents -------------------------------------------------------------------------------
    def _latent_stats(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE latent mean and 1/std (1, z, 1, 1, 1), the reciprocal taken in ``dtype`` as the reference does."""
        mean, std = vae_latent_stats(self.vae, dtype, device)
        return mean, 1.0 / std

    def _encode_first_frame(self, image: Image.Image, frames: int, height: int, width: int,
                            batch: int) -> torch.Tensor:
        """Normalised VAE latents of the first frame followed by ``frames - 1`` black frames."""
        pixels = image_to_tensor(image, (height, width)).to(self.device).unsqueeze(2)
        if frames > 1:
            pixels = torch.cat([pixels, pixels.new_zeros(1, 3, frames - 1, height, width)], dim=2)
        latent = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        latent = latent.repeat(batch, 1, 1, 1, 1).to(torch.float32)
        mean, inv_std = self._latent_stats(torch.float32, latent.device)
        return (latent - mean) * inv_std

    def prepare_latents(self, state: PipelineState) -> None:
        r = state.request
        latent_frames = (r.num_frames - 1) // self.vae_scale_temporal + 1
        grid_h, grid_w = r.height // self.vae_scale_spatial, r.width // self.vae_scale_spatial
        shape = (r.batch_size, self.vae.config.z_dim, latent_frames, grid_h, grid_w)
        state.latents = draw_noise(shape, state.noise_generator(), torch.float32, self.device)
        if not r.images:
            if self.expand_timesteps:  # every token at the same timestep
                state.extras["frame_mask"] = torch.ones(1, 1, latent_frames, grid_h, grid_w, device=self.device)
            return
        if self.expand_timesteps:
            # TI2V: the first latent frame is the clean image; its tokens get timestep 0.
            state.extras["condition"] = self._encode_first_frame(r.images[0], 1, r.height, r.width, r.batch_size)
            mask = torch.ones(1, 1, latent_frames, grid_h, grid_w, device=self.device)
            mask[:, :, 0] = 0
            state.extras["frame_mask"] = mask
        else:
            # I2V: 4 mask channels (1 on the first latent frame: its 4 pixel frames are known) + image latents,
            # concatenated to the noise on the channel axis at every step.
            condition = self._encode_first_frame(r.images[0], r.num_frames, r.height, r.width, r.batch_size)
            mask = torch.zeros(r.batch_size, self.vae_scale_temporal, latent_frames, grid_h, grid_w,
                               device=condition.device)
            mask[:, :, 0] = 1
            state.extras["condition"] = torch.cat([mask, condition], dim=1)

    def prepare_timesteps(self, state: PipelineState) -> None:
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(state.request.num_inference_steps, device=self.device)
        if self.pins_begin_index:
            scheduler.set_begin_index(0)
        state.scheduler, state.timesteps = scheduler, scheduler.timesteps
        state.extras["timestep_values"] = scheduler.timesteps.tolist()  # host copies: no GPU sync per step

    # -- denoising -----------------------------------------------------------------------------
    def _stage(self, state: PipelineState, step: int) -> tuple[torch.nn.Module, float]:
        """The transformer and guidance scale for step ``step`` (Wan2.2 A14B: high- then low-noise expert)."""
        r = state.request
        if self.boundary_ratio is None:
            return self.transformer, r.guidance_scale
        boundary = self.boundary_ratio * state.scheduler.config.num_train_timesteps
        high_noise = state.extras["timestep_values"][step] >= boundary
        return (self.transformer, r.guidance_scale) if high_noise else (self.transformer_2, r.guidance_scale_2)

    def _model_input(self, state: PipelineState, latents: torch.Tensor, t: torch.Tensor):
        condition, mask = state.extras.get("condition"), state.extras.get("frame_mask")
        batch = latents.shape[0]
        if mask is not None:  # TI2V: per-token timesteps (0 on a given first frame); tokens are 2x2 patches
            if condition is not None:
                latents = (1 - mask) * condition + mask * latents
            timestep = (mask[0, 0, :, ::2, ::2] * t).flatten().unsqueeze(0).expand(batch, -1)
        else:
            if condition is not None:
                latents = torch.cat([latents, condition], dim=1)
            timestep = t.expand(batch)
        return latents.to(self.dtype), timestep

    def guidance(self, state: PipelineState, latents: torch.Tensor, t: torch.Tensor, step: int) -> GuidanceStep:
        model, scale = self._stage(state, step)
        x, timestep = self._model_input(state, latents, t)
        branches = [{"hidden_states": x, "timestep": timestep, **kwargs}
                    for kwargs in (state.cond, state.uncond) if kwargs is not None]
        return GuidanceStep(model, branches, cfg(scale))

    # -- decoding ------------------------------------------------------------------------------
    def _with_clean_first_frame(self, state: PipelineState, latents: torch.Tensor) -> torch.Tensor:
        """TI2V with an input image: the first latent frame is the image's (the sampler never changed it)."""
        if state.extras.get("condition") is not None and state.extras.get("frame_mask") is not None:
            mask = state.extras["frame_mask"]
            latents = (1 - mask) * state.extras["condition"] + mask * latents
        return latents

    def latents_to_grid(self, state: PipelineState, latents: torch.Tensor) -> torch.Tensor:
        return self._with_clean_first_frame(state, latents)

    def decode(self, state: PipelineState) -> None:
        r = state.request
        latents = state.latents = self._with_clean_first_frame(state, state.latents)
        latents = latents.to(self.device, self.vae.dtype)
        mean, inv_std = self._latent_stats(latents.dtype, latents.device)
        latents = latents / inv_std + mean
        tiled = vae_tiling_wanted(r.height, r.width, VAE_TILING_MIN_PIXELS)
        decode = self.vae.tiled_decode if tiled else self.vae.decode
        # One video at a time (VAE slicing): peak memory of one output whatever the batch.
        videos = [decode(sample, return_dict=False)[0] for sample in latents.split(1)]
        video = torch.cat(videos)  # (B, 3, F, H, W) in [-1, 1]
        state.pixels = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).float()


@register_pipeline
class WanImageToVideoPipeline(WanPipeline):
    pipeline_class_names = ("WanImageToVideoPipeline",)
    optional_components = ("transformer_2", "image_encoder", "image_processor")
    pins_begin_index = False
    requires_image = True
    # it encodes the first frame: diffusers' VAE class, with its encoder
    native_models = {name: cls for name, cls in WanPipeline.native_models.items() if cls is not WanDecodingVAE}
