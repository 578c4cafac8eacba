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
from diffgen.options import MAX_OUTPUTS, MAX_PROMPT_CHARS, MAX_SEED, check_value  # noqa: F401 (re-exported)
from diffgen.outputs import output_names, save_outputs

_CHECKED = ("height", "width", "num_inference_steps", "seed", "guidance_scale", "guidance_scale_2", "true_cfg_scale",
            "num_frames", "fps", "max_sequence_length", "cache", "cache_threshold", "preview_every")


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
    cache: str | None = None  # step cache method ("none" turns the engine's default off); None: the default
    cache_threshold: float | None = None
    loras: dict[str, float] | None = None  # LoRA name -> scale for this request (dynamic LoRA mode); None: defaults
    preview_every: int | None = None  # a latent preview every N denoising steps (progress's third argument)
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
        """What needs no model knowledge; the bounds are the options' (diffgen.options)."""
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
        check_value("num_outputs_per_prompt", self.num_outputs_per_prompt)
        for name in _CHECKED:
            value = getattr(self, name)
            if value is not None:
                check_value(name, value)
        if self.loras is not None:
            from diffgen.engine.lora import check_lora_scale

            if not isinstance(self.loras, dict) or not all(isinstance(k, str) for k in self.loras):
                raise InvalidRequestError("loras", "must map LoRA names to scales, e.g. {\"style\": 0.8}")
            for scale in self.loras.values():
                check_lora_scale(scale, "loras")

    @property
    def batch_size(self) -> int:
        return len(self.prompt) * self.num_outputs_per_prompt


#: entries of ``timings`` that count instead of measuring seconds: DiT forwards computed / reused by the step
#: cache; the most requests that shared a denoising forward with this one (itself included)
TIMING_COUNTS = ("cache_forwards_computed", "cache_forwards_reused", "batched_requests")


def stage_seconds(timings: dict[str, float]) -> dict[str, float]:
    """The entries of ``timings`` that are durations (seconds), without the step-cache counts."""
    return {k: v for k, v in timings.items() if k not in TIMING_COUNTS}


# Request fields recorded in every output's metadata, in this order (None values are left out).
METADATA_FIELDS = ("prompt", "negative_prompt", "seed", "output_index", "num_inference_steps", "guidance_scale",
                   "guidance_scale_2", "true_cfg_scale", "height", "width", "num_frames", "fps",
                   "max_sequence_length", "num_input_images", "cache", "cache_threshold", "loras", "model",
                   "software")


def generation_metadata(request: GenerationRequest, *, seed: int, model: str, output_index: int) -> dict[str, Any]:
    """The one description of how an output was made, with typed values (ints, floats, strings).

    ``request`` is the resolved request (the model's defaults filled in), so every sampling value the
    pipeline used is recorded: PNG text chunks and the JSON ``parameters`` chunk, the MP4 comment tag,
    for the CLI, the Python API and the server alike.
    """
    from diffgen import __version__

    prompt_index = output_index // request.num_outputs_per_prompt
    values: dict[str, Any] = {
        "prompt": request.prompt[prompt_index],
        "negative_prompt": request.negative_prompt[prompt_index] if request.negative_prompt else None,
        "seed": seed, "output_index": output_index,
        **{name: getattr(request, name) for name in (
            "num_inference_steps", "guidance_scale", "guidance_scale_2", "true_cfg_scale", "height", "width",
            "num_frames", "fps", "max_sequence_length", "cache", "cache_threshold")},
        "loras": dict(request.loras) if request.loras else None,
        "num_input_images": len(request.images) or None,
        "model": model, "software": f"diffgen {__version__}",
    }
    return {name: values[name] for name in METADATA_FIELDS if values[name] is not None}


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

    def metadata(self, output_index: int) -> dict[str, Any]:
        """How output ``output_index`` was made (see :func:`generation_metadata`)."""
        return generation_metadata(self.request, seed=self.seed, model=self.model, output_index=output_index)

    def file_names(self, file_name: str | None = None) -> list[str]:
        """The file stems :meth:`save` uses: ``<prompt>-seed<seed>-out<i>``, or ``file_name`` (``-out<i>``)."""
        return output_names(self.request.prompt, self.request.num_outputs_per_prompt, self.seed, file_name)

    def save(self, output_dir: str | Path = "outputs", file_name: str | None = None,
             output_format: str | None = None, overwrite: bool = False) -> list[Path]:
        """Write every output to ``output_dir`` with its metadata; returns the paths written.

        Files are named ``<prompt>-seed<seed>-out<i>.<ext>`` after each output's own prompt (``i``: its
        index in the request), or ``file_name`` (``<file_name>-out<i>`` for several outputs). An existing
        file is never replaced unless ``overwrite``: a taken generated name gets a ``-2``, ``-3``...
        suffix; a taken ``file_name`` is refused.
        """
        outputs = self.frames if self.is_video else self.images
        return save_outputs(outputs, [self.metadata(i) for i in range(len(outputs))], Path(output_dir),
                            self.file_names(file_name), output_format, "video" if self.is_video else "image",
                            fps=self.fps, overwrite=overwrite, numbered=file_name is None)
