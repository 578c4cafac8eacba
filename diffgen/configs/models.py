"""Per-model defaults: one entry per model, read by its pipeline definition."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDefaults:
    name: str
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    resolution_multiple: int  # height and width must be multiples of this
    max_sequence_length: int  # text tokens given to the DiT
    max_sequence_length_limit: int  # the most the text encoder accepts
    true_cfg_scale: float = 1.0
    num_frames: int | None = None  # video models
    fps: int | None = None
    frame_multiple: int | None = None  # num_frames must be frame_multiple * k + 1
    negative_prompt: str | None = None  # used when the user gives none (video models)
    guidance_scale_2: float | None = None  # two-transformer models: guidance of the low-noise transformer
