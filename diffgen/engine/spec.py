"""What a front end needs to know about a model, and the one function that checks a request against it.

A :class:`ModelSpec` is published by the pipeline class for a checkpoint (``describe``), from the
checkpoint's JSON files alone: no weights are needed, so the CLI checks a request before it loads the
model and the HTTP server checks it before it queues it. :func:`resolve` is pure: the same request and
spec give the same resolved request (and resolving twice changes nothing), whichever entry point
(CLI, Python, HTTP) it came from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from diffgen.configs.models import ModelDefaults
from diffgen.engine.request import GenerationRequest
from diffgen.errors import InvalidRequestError

GUIDANCE_FIELDS = ("guidance_scale", "guidance_scale_2", "true_cfg_scale")


@dataclass(frozen=True)
class ModelSpec:
    """A model's defaults and rules. ``task_type``: T2I, I2I, T2V, I2V or TI2V (SGLang's names)."""

    defaults: ModelDefaults
    output_kind: str  # "image" or "video"
    task_type: str
    min_images: int = 0  # input images a request must give ...
    max_images: int = 0  # ... and may give
    min_steps: int = 1
    #: step-distilled models: the timesteps they were distilled for (num_inference_steps must match)
    distilled_timesteps: tuple[int, ...] | None = None
    #: guidance-free distilled models refuse a guidance_scale above this (None: any)
    max_guidance_scale: float | None = None
    #: the guidance fields the model uses; a request setting guidance_scale_2 for a model that does
    #: not use it is refused (the others are accepted and unused, as in diffusers)
    guidance_fields: tuple[str, ...] = ("guidance_scale",)
    #: output size when none is asked and images are given: from which input ("first" / "last") ...
    size_from_image: str | None = None
    #: ... by which rule: "area_fit" (about ``image_area`` pixels, sides rounded to 32, as Qwen-Image-Edit)
    #: or "default_area" (the default output's area, sides floored to the size multiple, as Wan I2V)
    #: or "buckets" (the size bucket of ``bucket_target`` for the input's aspect, as HunyuanVideo-1.5 I2V)
    size_rule: str | None = None
    #: the side (pixels) whose square the "buckets" rule's sizes are about
    bucket_target: int | None = None
    #: pixels of the output sized by "area_fit"
    image_area: int | None = None
    #: pixels an input image is resized to before the vision encoder sees it (Qwen-Image-Edit)
    vision_area: int | None = None
    #: the most elongated input the vision encoder takes (long side / short side, after that resize)
    max_input_aspect: float | None = None

    @property
    def name(self) -> str:
        return self.defaults.name

    @property
    def size_multiple(self) -> int:
        return self.defaults.resolution_multiple

    @property
    def frame_multiple(self) -> int | None:
        return self.defaults.frame_multiple

    @property
    def accepts_images(self) -> bool:
        return self.max_images > 0


def area_fit_size(width: int, height: int, area: int) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels with the given aspect ratio, multiples of 32."""
    ratio = width / height
    fit_width = math.sqrt(area * ratio)
    fit_height = fit_width / ratio
    return round(fit_width / 32) * 32, round(fit_height / 32) * 32


def aspect_fit_size(width: int, height: int, area: int, multiple: int) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels with the given aspect ratio, floored to ``multiple``."""
    aspect = height / width
    fit_height = round(math.sqrt(area * aspect)) // multiple * multiple
    fit_width = round(math.sqrt(area / aspect)) // multiple * multiple
    return max(fit_width, multiple), max(fit_height, multiple)


def aspect_bucket_size(width: int, height: int, target_size: int, multiple: int) -> tuple[int, int]:
    """(width, height) of HunyuanVideo-1.5's size bucket for an aspect ratio: about ``target_size``² pixels.

    The buckets are (w, h) = (i, j) * multiple with i * j <= (target_size / multiple)² and an aspect of
    at most 4:1; the chosen one has the closest aspect ratio not more elongated than asked (diffusers'
    ``HunyuanVideo15ImageProcessor.calculate_default_height_width``).
    """
    patches = round((target_size / multiple) ** 2)
    buckets, wide, high = [], patches, 1
    while wide > 0:
        if max(wide, high) / min(wide, high) <= 4.0:
            buckets.append((wide * multiple, high * multiple))
        if (high + 1) * wide <= patches:
            high += 1
        else:
            wide -= 1
    # the reference reads each bucket as (height, width) = (first, second)
    aspect = height / width
    ratios = [round(first / second, 5) for first, second in buckets]
    if aspect >= 1:
        candidates = [(abs(r - aspect), i) for i, r in enumerate(ratios) if r - aspect <= 0]
    else:
        candidates = [(abs(r - aspect), i) for i, r in enumerate(ratios) if r - aspect >= 0]
    first, second = buckets[min(candidates)[1]]
    return second, first


def resolve(request: GenerationRequest, spec: ModelSpec) -> GenerationRequest:
    """``request`` checked against ``spec`` with the model's defaults filled in (a new request).

    Raises InvalidRequestError naming the field, the value and what is allowed. Needs no weights.
    """
    request.check()
    d, name = spec.defaults, spec.name
    images = request.images
    if spec.min_images and len(images) < spec.min_images:
        what = "edits an input image" if spec.output_kind == "image" else "makes a video from an image"
        raise InvalidRequestError("image", f"{name} {what}; give {spec.min_images} (--image-path, images=[...] "
                                  "or the HTTP image upload)")
    if len(images) > spec.max_images:
        if spec.max_images == 0:
            raise InvalidRequestError("image", f"{name} does not take input images")
        raise InvalidRequestError("image", f"{name} takes at most {spec.max_images} input image(s), got {len(images)}"
                                  + (" (Qwen-Image-Edit-2509 takes several)" if spec.max_images == 1
                                     and spec.output_kind == "image" else ""))
    for index, image in enumerate(images):
        _check_input_image(index, image.size, spec)

    steps = spec.distilled_timesteps
    if steps and request.num_inference_steps not in (None, len(steps)):
        raise InvalidRequestError("num_inference_steps", f"{request.num_inference_steps} given; {name} is "
                                  f"distilled for {len(steps)} steps at timesteps {list(steps)}")
    if spec.max_guidance_scale is not None and (request.guidance_scale or 0) > spec.max_guidance_scale:
        raise InvalidRequestError("guidance_scale", f"{request.guidance_scale} given; {name} is distilled to "
                                  f"sample without classifier-free guidance (use {spec.max_guidance_scale:g} or "
                                  "leave it unset)")
    height, width = request.height, request.width
    if images and spec.size_from_image and height is None and width is None:
        reference = images[-1] if spec.size_from_image == "last" else images[0]
        if spec.size_rule == "area_fit":
            fit_w, fit_h = area_fit_size(*reference.size, spec.image_area or d.height * d.width)
            m = spec.size_multiple
            width, height = fit_w // m * m, fit_h // m * m
        elif spec.size_rule == "buckets":
            width, height = aspect_bucket_size(*reference.size, spec.bucket_target, spec.size_multiple)
        else:
            width, height = aspect_fit_size(*reference.size, d.height * d.width, spec.size_multiple)
    r = dataclasses.replace(
        request,
        height=height or d.height,
        width=width or d.width,
        num_inference_steps=request.num_inference_steps or d.num_inference_steps,
        guidance_scale=d.guidance_scale if request.guidance_scale is None else request.guidance_scale,
        true_cfg_scale=d.true_cfg_scale if request.true_cfg_scale is None else request.true_cfg_scale,
        max_sequence_length=request.max_sequence_length or d.max_sequence_length,
    )
    for field in ("height", "width"):
        if getattr(r, field) % spec.size_multiple:
            raise InvalidRequestError(
                field, f"{getattr(r, field)} is not a multiple of {spec.size_multiple} (required by {name})")
    if r.num_inference_steps < spec.min_steps:
        steps = f"{r.num_inference_steps} step" + ("s are" if r.num_inference_steps > 1 else " is")
        raise InvalidRequestError("num_inference_steps", f"{steps} not supported by {name}'s scheduler; use at "
                                  f"least {spec.min_steps}")
    if r.max_sequence_length > d.max_sequence_length_limit:
        raise InvalidRequestError("max_sequence_length",
                                  f"{r.max_sequence_length} exceeds {d.max_sequence_length_limit} for {name}")
    if spec.output_kind == "video":
        r.num_frames = r.num_frames or d.num_frames
        r.fps = r.fps or d.fps
        if d.frame_multiple and (r.num_frames - 1) % d.frame_multiple:
            raise InvalidRequestError(
                "num_frames", f"{r.num_frames} is not {d.frame_multiple}k+1 (the VAE's temporal stride); "
                f"try {((r.num_frames - 1) // d.frame_multiple) * d.frame_multiple + 1}")
    else:
        for field in ("num_frames", "fps"):
            if getattr(r, field) is not None:
                raise InvalidRequestError(field, f"{name} makes images, not videos")
    if r.negative_prompt is None and d.negative_prompt is not None:
        r.negative_prompt = [d.negative_prompt] * len(r.prompt)
    if "guidance_scale_2" in spec.guidance_fields:
        if r.guidance_scale_2 is None:
            r.guidance_scale_2 = d.guidance_scale_2 if request.guidance_scale is None else r.guidance_scale
    elif r.guidance_scale_2 is not None:
        raise InvalidRequestError("guidance_scale_2", f"{name} has one transformer; guidance_scale_2 applies only "
                                  "to two-transformer models (Wan2.2 A14B)")
    return r


def _check_input_image(index: int, size: tuple[int, int], spec: ModelSpec) -> None:
    width, height = size
    if min(width, height) < 1:
        raise InvalidRequestError("image", f"image {index + 1} is empty ({width}x{height})")
    if spec.max_input_aspect is None:
        return
    seen_w, seen_h = area_fit_size(width, height, spec.vision_area) if spec.vision_area else (width, height)
    aspect = max(seen_w, seen_h) / max(1, min(seen_w, seen_h))
    if min(seen_w, seen_h) < 1 or aspect > spec.max_input_aspect:
        shown = f"{width}x{height}" + (f", resized to {seen_w}x{seen_h} for the vision encoder,"
                                       if (seen_w, seen_h) != (width, height) else "")
        raise InvalidRequestError(
            "image", f"image {index + 1} ({shown}) has an aspect ratio of {aspect:.0f}:1; {spec.name} takes "
            f"inputs up to {spec.max_input_aspect:g}:1")
