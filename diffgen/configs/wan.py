"""Wan 2.1 / 2.2 defaults, as the Wan authors and the diffusers examples run them.

Frames must be 4k+1 (the VAE compresses time 4x after the first frame). Height and width must be
multiples of 16 (VAE 8x, patch 2x); the Wan2.2 TI2V-5B VAE compresses 16x, so 32 there.
"""

from diffgen.configs.models import ModelDefaults

# The negative prompt of the Wan repository (sample_neg_prompt), used when the user gives none:
# garish colours, overexposed, static, blurry details, subtitles, ..., walking backwards.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

_COMMON = dict(resolution_multiple=16, max_sequence_length=512, max_sequence_length_limit=512, frame_multiple=4,
               negative_prompt=WAN_NEGATIVE_PROMPT)

WAN21_T2V = ModelDefaults(name="Wan2.1-T2V", num_inference_steps=50, guidance_scale=5.0, height=480, width=832,
                          num_frames=81, fps=16, **_COMMON)

WAN21_I2V_480P = ModelDefaults(name="Wan2.1-I2V-480P", num_inference_steps=50, guidance_scale=5.0, height=480,
                               width=832, num_frames=81, fps=16, **_COMMON)

WAN21_I2V_720P = ModelDefaults(name="Wan2.1-I2V-720P", num_inference_steps=50, guidance_scale=5.0, height=720,
                               width=1280, num_frames=81, fps=16, **_COMMON)

WAN22_T2V_A14B = ModelDefaults(name="Wan2.2-T2V-A14B", num_inference_steps=40, guidance_scale=4.0,
                               guidance_scale_2=3.0, height=720, width=1280, num_frames=81, fps=16, **_COMMON)

WAN22_I2V_A14B = ModelDefaults(name="Wan2.2-I2V-A14B", num_inference_steps=40, guidance_scale=3.5,
                               guidance_scale_2=3.5, height=720, width=1280, num_frames=81, fps=16, **_COMMON)

WAN22_TI2V_5B = ModelDefaults(name="Wan2.2-TI2V-5B", num_inference_steps=50, guidance_scale=5.0, height=704,
                              width=1280, num_frames=121, fps=24, **{**_COMMON, "resolution_multiple": 32})

# FastWan (FastVideo): Wan DiTs distilled with DMD to 3 steps at fixed timesteps, no CFG. The flow shift
# of their scheduler configs (8 and 5) does not enter the DMD loop: its sigmas are timestep / 1000.
FASTWAN_DMD_TIMESTEPS = (1000, 757, 522)

_FASTWAN = dict(_COMMON, negative_prompt=None, num_inference_steps=len(FASTWAN_DMD_TIMESTEPS), guidance_scale=1.0)

FASTWAN21_T2V = ModelDefaults(name="FastWan2.1-T2V-1.3B", height=448, width=832, num_frames=61, fps=16, **_FASTWAN)

FASTWAN22_TI2V_5B = ModelDefaults(name="FastWan2.2-TI2V-5B", height=704, width=1280, num_frames=121, fps=24,
                                  **{**_FASTWAN, "resolution_multiple": 32})
