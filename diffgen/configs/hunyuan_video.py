"""HunyuanVideo defaults, as the diffusers pipelines and the model card run them.

Frames must be 4k+1 (the VAE compresses time 4x after the first frame); height and width multiples
of 16 (VAE 8x, patch 2x). 720x1280 and 544x960 are the trained sizes. The guidance scale is embedded
(the model is guidance-distilled); true CFG runs only with a negative prompt and true_cfg_scale > 1.
"""

from diffgen.configs.models import ModelDefaults

# The Llava-Llama-3 prompt template of the reference; its first 95 tokens (the system part) are cropped
# from the hidden states, so the DiT sees the user prompt (and the closing tokens of the template).
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
PROMPT_TEMPLATE_CROP = 95
CLIP_MAX_LENGTH = 77

HUNYUAN_VIDEO = ModelDefaults(
    name="HunyuanVideo", num_inference_steps=50, guidance_scale=6.0, true_cfg_scale=1.0, height=720, width=1280,
    num_frames=129, fps=24, frame_multiple=4, resolution_multiple=16, max_sequence_length=256,
    max_sequence_length_limit=1024)

# Image-to-video (token replace): the diffusers pipeline's defaults; the first frame is the input image.
HUNYUAN_VIDEO_I2V = ModelDefaults(
    name="HunyuanVideo-I2V", num_inference_steps=50, guidance_scale=1.0, true_cfg_scale=1.0, height=720, width=1280,
    num_frames=129, fps=24, frame_multiple=4, resolution_multiple=16, max_sequence_length=256,
    max_sequence_length_limit=1024)
#: image tokens kept: every 4th of the 576 (token replace), as the reference chooses
I2V_IMAGE_TOKEN_STRIDE = 4
