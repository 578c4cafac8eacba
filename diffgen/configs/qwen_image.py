"""Qwen-Image defaults: the diffusers pipelines' own (50 steps, true CFG 4.0 when a negative prompt is given).

The model cards run true CFG with ``negative_prompt=" "``; as in diffusers, CFG runs only when a
negative prompt is given (``--negative-prompt " "``) and ``true_cfg_scale > 1``. ``guidance_scale``
is unused: no released Qwen-Image checkpoint is guidance-distilled.
"""

from diffgen.configs.models import ModelDefaults

QWEN_IMAGE = ModelDefaults(
    name="Qwen-Image", num_inference_steps=50, guidance_scale=1.0, true_cfg_scale=4.0, height=1024, width=1024,
    resolution_multiple=16, max_sequence_length=512, max_sequence_length_limit=1024)

# Edit: the output size follows the (last) input image's aspect ratio at about 1024x1024 pixels
# unless height/width are given; the prompt is not truncated (the reference ignores max_sequence_length).
QWEN_IMAGE_EDIT = ModelDefaults(
    name="Qwen-Image-Edit", num_inference_steps=50, guidance_scale=1.0, true_cfg_scale=4.0, height=1024, width=1024,
    resolution_multiple=16, max_sequence_length=1024, max_sequence_length_limit=1024)

QWEN_IMAGE_EDIT_PLUS = ModelDefaults(
    name="Qwen-Image-Edit-2509", num_inference_steps=50, guidance_scale=1.0, true_cfg_scale=4.0, height=1024,
    width=1024, resolution_multiple=16, max_sequence_length=1024, max_sequence_length_limit=1024)
