"""HunyuanVideo-1.5 defaults, as the diffusers pipelines run its checkpoints.

| model_index ``_class_name``         | checkpoints (hunyuanvideo-community/...)                       |
|-------------------------------------|----------------------------------------------------------------|
| HunyuanVideo15Pipeline              | HunyuanVideo-1.5-Diffusers-480p_t2v, -720p_t2v                 |
| HunyuanVideo15ImageToVideoPipeline  | HunyuanVideo-1.5-Diffusers-480p_i2v, -480p_i2v_step_distilled  |

What the checkpoint's files say is read from them (see ``describe`` of the pipelines): the output
size from the transformer's ``target_size`` (640 -> 480p, 960 -> 720p), the guidance scale from
``guider/guider_config.json`` (6.0; 1.0 for distilled checkpoints), the flow shift from the
scheduler config (5 at 480p, 9 for 720p T2V, 7 for the step-distilled I2V). Frames must be 4k+1 (the
VAE compresses time 4x after the first frame), 121 by default; height and width multiples of 16
(VAE 16x, patch 1).
"""

from __future__ import annotations

from diffgen.configs.models import ModelDefaults

#: The reference's system prompt for Qwen2.5-VL; the first 108 tokens of the chat template (the system
#: part) are cropped from the hidden states.
SYSTEM_MESSAGE = (
    "You are a helpful assistant. Describe the video by detailing the following aspects: \
        1. The main content and theme of the video. \
        2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects. \
        3. Actions, events, behaviors temporal relationships, physical movement changes of the objects. \
        4. background environment, light, style and atmosphere. \
        5. camera angles, movements, and transitions used in the video.")
PROMPT_TEMPLATE_CROP = 108
TEXT_MAX_LENGTH = 1000  # Qwen2.5-VL tokens after the crop (padding is dropped before the DiT)
GLYPH_MAX_LENGTH = 256  # ByT5 tokens of the quoted text
#: hidden state of Qwen2.5-VL the DiT reads: the third from last (two layers skipped)
TEXT_HIDDEN_LAYER = -3
#: T2V default aspect (width:height); I2V takes the input image's
DEFAULT_ASPECT = (16, 9)
SIZE_MULTIPLE = 16


def defaults(name: str, width: int, height: int, guidance_scale: float, steps: int) -> ModelDefaults:
    """``width`` x ``height``: the size bucket of :data:`DEFAULT_ASPECT` at the checkpoint's target size."""
    return ModelDefaults(
        name=name, num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
        num_frames=121, fps=24, frame_multiple=4, resolution_multiple=SIZE_MULTIPLE,
        max_sequence_length=TEXT_MAX_LENGTH, max_sequence_length_limit=TEXT_MAX_LENGTH)


#: steps of the step-distilled I2V checkpoint (its model card: 8 or 12 steps)
STEP_DISTILLED_STEPS = 8

