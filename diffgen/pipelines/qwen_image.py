"""Qwen-Image text-to-image, Qwen-Image-Edit and Qwen-Image-Edit-2509 (several input images).

Prompts are wrapped in a chat template, encoded by Qwen2.5-VL (with the input images through its
vision tower when editing), and the template's first tokens are dropped. Editing appends the input
images' VAE latents to the noisy latents as extra tokens; only the output tokens are denoised.
True CFG runs when a negative prompt is given and ``true_cfg_scale > 1``, rescaling the combined
prediction to the norm of the conditional one.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from diffgen.configs.qwen_image import QWEN_IMAGE, QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS
from diffgen.engine.spec import ModelSpec, area_fit_size
from diffgen.models.dits.qwen_image import QwenImageTransformer
from diffgen.models.encoders.qwen_vl import QwenVLProcessor, encode_qwen_vl_prompts
from diffgen.models.vaes.wan import WanDecodingVAE, channels_last_conv3d, use_native_decoder
from diffgen.pipelines.base import ComposedPipeline, PipelineState, register_pipeline
from diffgen.pipelines.flow_match import load_flow_match_scheduler
from diffgen.pipelines.guidance import GuidanceStep, norm_preserving_cfg
from diffgen.pipelines.latents import (
    image_to_tensor,
    pack_latents,
    set_shifted_flow_timesteps,
    unpack_latents,
    vae_latent_stats,
)
from diffgen.pipelines.stages import draw_noise

_SYSTEM_EDIT = ("Describe the key features of the input image (color, shape, size, texture, objects, background), "
                "then explain how the user's text instruction should alter or modify the image. Generate a new image "
                "that meets the user's requirements while maintaining consistency with the original input where "
                "appropriate.")
T2I_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                "<|im_start|>assistant\n")
EDIT_TEMPLATE = (f"<|im_start|>system\n{_SYSTEM_EDIT}<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n")
EDIT_PLUS_TEMPLATE = (f"<|im_start|>system\n{_SYSTEM_EDIT}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n"
                      "<|im_start|>assistant\n")
EDIT_PLUS_IMAGE_PREFIX = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
TOKENIZER_MAX_LENGTH = 1024
VAE_IMAGE_AREA = 1024 * 1024  # edit inputs are VAE-encoded at about this many pixels, keeping their aspect ratio
CONDITION_IMAGE_AREA = 384 * 384  # Edit-2509: what its vision tower sees of each input
# The Qwen2-VL image processor refuses images more elongated than this (long side / short side).
VISION_MAX_ASPECT = 200


def min_steps(checkpoint) -> int:
    # The stretch to the terminal sigma (shift_terminal) divides by (1 - last sigma), which is 0 for one step.
    return 2 if checkpoint.config("scheduler").get("shift_terminal") else 1


@register_pipeline
class QwenImagePipeline(ComposedPipeline):
    pipeline_class_names = ("QwenImagePipeline",)
    required_components = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
    #: text-to-image only decodes: its VAE (Wan2.1's network) loads without diffusers
    native_models = {"QwenImageTransformer2DModel": QwenImageTransformer, "AutoencoderKLQwenImage": WanDecodingVAE}
    component_loaders = {"FlowMatchEulerDiscreteScheduler": load_flow_match_scheduler}
    packed_latents = True
    prompt_template = T2I_TEMPLATE
    template_tokens = 34  # tokens of the template's system part, dropped from the embeddings
    truncate_prompt = True  # T2I cuts the embeddings at max_sequence_length; the edit pipelines do not
    guidance_branches = 2  # true CFG, as the model cards run it (with a negative prompt)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.device.type == "cuda":
            channels_last_conv3d(self.vae.decoder)
            channels_last_conv3d(self.vae.post_quant_conv)
        use_native_decoder(self.vae)  # its VAE is Wan2.1's network: one frame, fused norms, channels-last

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    @classmethod
    def describe(cls, checkpoint) -> ModelSpec:
        return ModelSpec(QWEN_IMAGE, "image", "T2I", min_steps=min_steps(checkpoint),
                         guidance_fields=("true_cfg_scale",))

    # -- text ----------------------------------------------------------------------------------
    def text_encoder_inputs(self, prompts: list[str], state: PipelineState) -> dict[str, torch.Tensor]:
        texts = [self.prompt_template.format(p) for p in prompts]
        tokens = self.tokenizer(texts, max_length=TOKENIZER_MAX_LENGTH + self.template_tokens, padding=True,
                                truncation=True, return_tensors="pt")
        return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}

    def _encode(self, prompts: list[str], state: PipelineState) -> dict[str, torch.Tensor | None]:
        r = state.request
        inputs = self.text_encoder_inputs(prompts, state)
        embeds, mask = encode_qwen_vl_prompts(self.text_encoder, inputs, self.template_tokens, self.device)
        embeds = embeds.to(self.text_encoder.dtype)
        if self.truncate_prompt:
            embeds, mask = embeds[:, :r.max_sequence_length], mask[:, :r.max_sequence_length]
        embeds = embeds.repeat_interleave(r.num_outputs_per_prompt, dim=0)
        mask = mask.repeat_interleave(r.num_outputs_per_prompt, dim=0)
        # An all-ones mask is dropped, as the reference does: attention then runs unmasked.
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": None if mask.all() else mask}

    def encode_text(self, state: PipelineState) -> None:
        r = state.request
        state.cond = self._encode(r.prompt, state)
        if r.negative_prompt is not None and r.true_cfg_scale > 1:
            state.uncond = self._encode(r.negative_prompt, state)

    # -- latents and timesteps -------------------------------------------------------------------
    def prepare_latents(self, state: PipelineState) -> None:
        r = state.request
        scale = self.vae_scale_factor
        grid_h, grid_w = 2 * (r.height // (scale * 2)), 2 * (r.width // (scale * 2))
        channels = self.transformer.config.in_channels // 4
        dtype = state.cond["encoder_hidden_states"].dtype
        noise = draw_noise((r.batch_size, channels, grid_h, grid_w), state.seed, dtype, self.device)
        state.latents = pack_latents(noise)
        state.extras["latent_grid"] = (grid_h, grid_w)
        # Token grids in the order the DiT sees them: the output, then any edit inputs.
        state.extras["image_shapes"] = [(1, r.height // scale // 2, r.width // scale // 2),
                                        *state.extras.get("condition_shapes", [])]

    def prepare_timesteps(self, state: PipelineState) -> None:
        scheduler = self.new_scheduler()
        set_shifted_flow_timesteps(scheduler, state.request.num_inference_steps, state.latents.shape[1], self.device)
        state.scheduler, state.timesteps = scheduler, scheduler.timesteps

    # -- denoising -------------------------------------------------------------------------------
    def guidance(self, state: PipelineState, latents: torch.Tensor, t: torch.Tensor, step: int) -> GuidanceStep:
        condition = state.extras.get("condition_latents")
        inputs = {"hidden_states": latents if condition is None else torch.cat([latents, condition], dim=1),
                  "timestep": t.expand(latents.shape[0]).to(latents.dtype) / 1000,
                  "image_shapes": state.extras["image_shapes"]}
        branches = [{**inputs, **kwargs} for kwargs in (state.cond, state.uncond) if kwargs is not None]
        output_tokens = latents.shape[1]  # the edit inputs' tokens follow; they are not denoised
        return GuidanceStep(self.transformer, branches, norm_preserving_cfg(state.request.true_cfg_scale),
                            select=lambda prediction: prediction[:, :output_tokens],
                            text_padding={"encoder_hidden_states": "encoder_hidden_states_mask"})

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, state: PipelineState) -> None:
        grid_h, grid_w = state.extras["latent_grid"]
        latents = unpack_latents(state.latents, grid_h, grid_w).unsqueeze(2).to(self.vae.dtype)  # (B, C, 1, H, W)
        mean, std = vae_latent_stats(self.vae, latents.dtype, latents.device)
        latents = latents / (1.0 / std) + mean  # the reference divides by the reciprocal; same rounding
        image = self.vae.decode(latents, return_dict=False)[0][:, :, 0]
        state.pixels = (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()


@register_pipeline
class QwenImageEditPipeline(QwenImagePipeline):
    """Edit one input image: it is seen by the text encoder's vision tower and appended as latent tokens."""

    pipeline_class_names = ("QwenImageEditPipeline",)
    required_components = ("scheduler", "vae", "text_encoder", "tokenizer", "processor", "transformer")
    # it encodes the input image: diffusers' VAE class, with its encoder
    native_models = {name: cls for name, cls in QwenImagePipeline.native_models.items() if cls is not WanDecodingVAE}
    component_loaders = {**QwenImagePipeline.component_loaders, "Qwen2VLProcessor": QwenVLProcessor.from_folder}
    prompt_template = EDIT_TEMPLATE
    template_tokens = 64
    truncate_prompt = False

    @classmethod
    def describe(cls, checkpoint) -> ModelSpec:
        # Without an explicit size the output keeps the input's aspect ratio at ~1024x1024 pixels.
        return ModelSpec(QWEN_IMAGE_EDIT, "image", "I2I", min_images=1, max_images=1, min_steps=min_steps(checkpoint),
                         guidance_fields=("true_cfg_scale",), size_from_image="first", size_rule="area_fit",
                         image_area=VAE_IMAGE_AREA, vision_area=VAE_IMAGE_AREA, max_input_aspect=VISION_MAX_ASPECT)

    def edit_inputs(self, state: PipelineState) -> tuple[list[Image.Image], list[Image.Image]]:
        """(images for the vision tower, images for the VAE), resized once per request."""
        if "vision_images" not in state.extras:
            image = state.request.images[0]
            resized = image.resize(area_fit_size(*image.size, VAE_IMAGE_AREA), resample=Image.Resampling.LANCZOS)
            state.extras["vision_images"], state.extras["vae_images"] = [resized], [resized]
        return state.extras["vision_images"], state.extras["vae_images"]

    def format_prompt(self, prompt: str, num_images: int) -> str:
        return self.prompt_template.format(prompt)

    def text_encoder_inputs(self, prompts: list[str], state: PipelineState) -> dict[str, torch.Tensor]:
        vision_images, _ = self.edit_inputs(state)
        texts = [self.format_prompt(p, len(vision_images)) for p in prompts]
        # Every prompt carries the image placeholders, so each gets the images.
        return self.processor(text=texts, images=vision_images * len(prompts))

    def encode_images(self, state: PipelineState) -> None:
        _, vae_images = self.edit_inputs(state)
        scale = self.vae_scale_factor
        dtype = state.cond["encoder_hidden_states"].dtype
        tokens, shapes = [], []
        for image in vae_images:
            pixels = image_to_tensor(image).unsqueeze(2).to(self.device, dtype)  # (1, 3, 1, H, W)
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode().to(dtype)
            mean, std = vae_latent_stats(self.vae, latents.dtype, latents.device)
            latents = ((latents - mean) / std)[:, :, 0]
            tokens.append(pack_latents(latents).expand(state.request.batch_size, -1, -1))
            shapes.append((1, image.height // scale // 2, image.width // scale // 2))
        state.extras["condition_latents"] = torch.cat(tokens, dim=1)
        state.extras["condition_shapes"] = shapes


@register_pipeline
class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Edit-2509 / 2511: several input images, each named "Picture i" in the prompt.

    The vision tower sees each input at ~384x384 pixels, the VAE at ~1024x1024; the output size
    follows the last input.
    """

    pipeline_class_names = ("QwenImageEditPlusPipeline",)
    prompt_template = EDIT_PLUS_TEMPLATE

    @classmethod
    def describe(cls, checkpoint) -> ModelSpec:
        # The output size follows the last input; the vision tower sees each input at ~384x384 pixels.
        return ModelSpec(QWEN_IMAGE_EDIT_PLUS, "image", "I2I", min_images=1, max_images=4,
                         min_steps=min_steps(checkpoint), guidance_fields=("true_cfg_scale",),
                         size_from_image="last", size_rule="area_fit", image_area=VAE_IMAGE_AREA,
                         vision_area=CONDITION_IMAGE_AREA, max_input_aspect=VISION_MAX_ASPECT)

    def edit_inputs(self, state: PipelineState) -> tuple[list[Image.Image], list[Image.Image]]:
        if "vision_images" not in state.extras:
            lanczos = Image.Resampling.LANCZOS
            images = state.request.images
            state.extras["vision_images"] = [
                image.resize(area_fit_size(*image.size, CONDITION_IMAGE_AREA), resample=lanczos) for image in images]
            state.extras["vae_images"] = [
                image.resize(area_fit_size(*image.size, VAE_IMAGE_AREA), resample=lanczos) for image in images]
        return state.extras["vision_images"], state.extras["vae_images"]

    def format_prompt(self, prompt: str, num_images: int) -> str:
        prefix = "".join(EDIT_PLUS_IMAGE_PREFIX.format(i + 1) for i in range(num_images))
        return self.prompt_template.format(prefix + prompt)
