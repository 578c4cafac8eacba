"""What a user asks for (GenerationRequest) and what they get back (GenerationResult)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffgen.errors import InvalidRequestError

MAX_PROMPT_CHARS = 20_000
MAX_OUTPUTS = 16
MAX_SEED = 2**63 - 1


@dataclass
class GenerationRequest:
    """One call's inputs. ``None`` fields take the model's default (``configs``).

    Seeds: the noise of all outputs of a request is drawn from one CPU generator seeded with
    ``seed``, in the order prompt-major, then output-per-prompt, exactly as diffusers does with
    ``generator=torch.Generator("cpu").manual_seed(seed)``. Output 0 of a one-output request with
    seed S is diffusers' picture for seed S. Without a seed a random one is drawn and reported.
    """

    prompt: list[str]
    negative_prompt: list[str] | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None  # two-transformer models (Wan2.2 A14B): the low-noise stage
    true_cfg_scale: float | None = None
    seed: int | None = None
    num_outputs_per_prompt: int = 1
    num_frames: int | None = None
    fps: int | None = None
    images: list[Image.Image] = field(default_factory=list)
    max_sequence_length: int | None = None
    return_tensors: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def build(cls, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
              **kwargs: Any) -> GenerationRequest:
        """Normalise loose user input (a string or a list) and check what needs no model knowledge."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
        if isinstance(negative_prompt, str):
            negative = [negative_prompt] * len(prompts)
        else:
            negative = list(negative_prompt) if negative_prompt is not None else None
        images = kwargs.pop("images", None) or []
        if isinstance(images, Image.Image):
            images = [images]
        request = cls(prompt=prompts, negative_prompt=negative, images=list(images), **kwargs)
        request.check()
        return request

    def check(self) -> None:
        if not self.prompt:
            raise InvalidRequestError("prompt", "at least one prompt is required")
        for text in self.prompt:
            if not isinstance(text, str) or not text.strip():
                raise InvalidRequestError("prompt", "must be a non-empty string")
            if len(text) > MAX_PROMPT_CHARS:
                raise InvalidRequestError("prompt", f"{len(text)} characters; at most {MAX_PROMPT_CHARS} allowed")
        if self.negative_prompt is not None:
            if len(self.negative_prompt) != len(self.prompt):
                raise InvalidRequestError(
                    "negative_prompt", f"{len(self.negative_prompt)} given for {len(self.prompt)} prompts")
            for text in self.negative_prompt:
                if not isinstance(text, str) or len(text) > MAX_PROMPT_CHARS:
                    raise InvalidRequestError("negative_prompt",
                                              f"must be a string of at most {MAX_PROMPT_CHARS} characters")
        _check_int("num_outputs_per_prompt", self.num_outputs_per_prompt, 1, MAX_OUTPUTS)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 16, 8192)
        if self.num_inference_steps is not None:
            _check_int("num_inference_steps", self.num_inference_steps, 1, 1000)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        for name in ("guidance_scale", "guidance_scale_2", "true_cfg_scale"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value <= 100):
                raise InvalidRequestError(name, f"{value!r} is not a number between 0 and 100")
        if self.num_frames is not None:
            _check_int("num_frames", self.num_frames, 1, 1025)
        if self.fps is not None:
            _check_int("fps", self.fps, 1, 120)
        if self.max_sequence_length is not None:
            _check_int("max_sequence_length", self.max_sequence_length, 1, 4096)

    @property
    def batch_size(self) -> int:
        return len(self.prompt) * self.num_outputs_per_prompt


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(name, f"{value!r} is not an integer")
    if not low <= value <= high:
        raise InvalidRequestError(name, f"{value} is out of range; allowed {low}..{high}")


@dataclass
class GenerationResult:
    """Outputs of one request, in prompt-major order.

    ``images``: PIL images (image models). ``frames``: one uint8 array (frames, H, W, 3) per output
    (video models). ``latents`` / ``pixels`` (float [0, 1]) are kept when the request asked for tensors.
    """

    request: GenerationRequest
    model: str
    seed: int
    images: list[Image.Image] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    fps: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    latents: torch.Tensor | None = None
    pixels: torch.Tensor | None = None

    @property
    def is_video(self) -> bool:
        return bool(self.frames)

    def save(self, output_dir: str | Path = "outputs", file_name: str | None = None,
             output_format: str | None = None) -> list[Path]:
        """Write every output to ``output_dir``; returns the paths written."""
        from diffgen.outputs import save_result

        return save_result(self, Path(output_dir), file_name, output_format)
