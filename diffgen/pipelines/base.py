"""ComposedPipeline: a list of stages run over one per-request state object.

A pipeline object holds only loaded components and model defaults; everything about one request
(prompts, noise, latents, timesteps, progress, cancel flag) lives in :class:`PipelineState`.
Adding a model = a defaults entry (configs), a DiT file (models/dits) and a pipeline definition
registered here under the ``_class_name`` of its ``model_index.json``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffgen.configs.models import ModelDefaults
from diffgen.engine.request import GenerationRequest, GenerationResult
from diffgen.errors import CancelledError, InvalidRequestError, ModelLoadError

ProgressFn = Callable[[int, int], None]


@dataclass
class PipelineState:
    """Everything about one request as it flows through the stages."""

    request: GenerationRequest
    device: torch.device
    dtype: torch.dtype
    seed: int
    progress: ProgressFn | None = None
    is_cancelled: Callable[[], bool] | None = None
    # Keyword arguments of the DiT for the conditional and (with guidance) unconditional branch.
    cond: dict[str, Any] = field(default_factory=dict)
    uncond: dict[str, Any] | None = None
    scheduler: Any = None
    timesteps: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    pixels: torch.Tensor | None = None  # float [0, 1]: (N, H, W, 3) images or (N, F, H, W, 3) videos
    extras: dict[str, Any] = field(default_factory=dict)  # model-specific values between stages
    timings: dict[str, float] = field(default_factory=dict)
    _generator: torch.Generator | None = None

    def noise_generator(self) -> torch.Generator:
        """The request's CPU generator, seeded once: every noise draw of the request continues it."""
        if self._generator is None:
            self._generator = torch.Generator("cpu").manual_seed(self.seed)
        return self._generator

    def check_cancelled(self) -> None:
        if self.is_cancelled is not None and self.is_cancelled():
            raise CancelledError(f"request {self.request.request_id} was cancelled")


class PipelineStage:
    """One step of a pipeline. Stages read and write the state; they keep nothing themselves."""

    name: str = "stage"

    def __call__(self, pipe: ComposedPipeline, state: PipelineState) -> None:
        raise NotImplementedError


class ComposedPipeline:
    """Base of every diffgen pipeline; subclasses define components, defaults and stages."""

    #: model_index.json ``_class_name`` values this pipeline serves.
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    #: components to load (folders of the checkpoint); optional ones may be absent or null.
    required_components: ClassVar[tuple[str, ...]] = ()
    optional_components: ClassVar[tuple[str, ...]] = ()
    #: diffusers class names of components replaced by a native diffgen model.
    native_models: ClassVar[dict[str, type[torch.nn.Module]]] = {}
    #: component class names loaded by a pipeline-specific function ``(folder, dtype, device) -> component``
    #: (e.g. a processor whose library class needs a package diffgen does not require).
    component_loaders: ClassVar[dict[str, Callable[..., Any]]] = {}
    #: "image" or "video"
    output_kind: ClassVar[str] = "image"
    #: whether the pipeline takes input images (edit / image-to-video).
    accepts_images: ClassVar[bool] = False

    def __init__(self, components: dict[str, Any], model_path: str, device: torch.device, dtype: torch.dtype,
                 settings: dict[str, Any] | None = None):
        self.components = components
        self.model_path = model_path
        self.device = device
        self.dtype = dtype
        #: non-component entries of model_index.json (e.g. Wan2.2's boundary_ratio)
        self.settings = settings or {}
        self.defaults = self.select_defaults()

    def __getattr__(self, name: str) -> Any:
        components = self.__dict__.get("components", {})
        if name in components:
            return components[name]
        raise AttributeError(name)

    # -- definition points for subclasses ------------------------------------------------------
    def select_defaults(self) -> ModelDefaults:
        raise NotImplementedError

    def stages(self) -> list[PipelineStage]:
        from diffgen.pipelines import stages as S

        image_stage = [S.ImageEncodingStage()] if self.accepts_images else []
        return [S.InputValidationStage(), S.TextEncodingStage(), *image_stage, S.LatentsStage(),
                S.TimestepsStage(), S.DenoisingStage(), S.DecodingStage()]

    def resolve_request(self, request: GenerationRequest) -> GenerationRequest:
        """Fill model defaults and check what depends on the model; returns a new request."""
        d = self.defaults
        r = dataclasses.replace(
            request,
            height=request.height or d.height,
            width=request.width or d.width,
            num_inference_steps=request.num_inference_steps or d.num_inference_steps,
            guidance_scale=d.guidance_scale if request.guidance_scale is None else request.guidance_scale,
            true_cfg_scale=d.true_cfg_scale if request.true_cfg_scale is None else request.true_cfg_scale,
            max_sequence_length=request.max_sequence_length or d.max_sequence_length,
        )
        for name in ("height", "width"):
            if getattr(r, name) % d.resolution_multiple:
                raise InvalidRequestError(
                    name, f"{getattr(r, name)} is not a multiple of {d.resolution_multiple} (required by {d.name})")
        if r.max_sequence_length > d.max_sequence_length_limit:
            raise InvalidRequestError("max_sequence_length",
                                      f"{r.max_sequence_length} exceeds {d.max_sequence_length_limit} for {d.name}")
        if r.images and not self.accepts_images:
            raise InvalidRequestError("image", f"{d.name} does not take input images")
        if self.output_kind == "video":
            r.num_frames = r.num_frames or d.num_frames
            r.fps = r.fps or d.fps
            if d.frame_multiple and (r.num_frames - 1) % d.frame_multiple:
                raise InvalidRequestError(
                    "num_frames", f"{r.num_frames} is not {d.frame_multiple}k+1 (the VAE's temporal stride); "
                    f"try {((r.num_frames - 1) // d.frame_multiple) * d.frame_multiple + 1}")
        elif r.num_frames is not None:
            raise InvalidRequestError("num_frames", f"{d.name} makes images, not videos")
        return r

    def new_scheduler(self):
        """A fresh copy of the checkpoint's scheduler: schedulers keep a step index, so one per request."""
        return type(self.scheduler).from_config(self.scheduler.config)

    # -- running -------------------------------------------------------------------------------
    def run(self, request: GenerationRequest, progress: ProgressFn | None = None,
            is_cancelled: Callable[[], bool] | None = None) -> GenerationResult:
        seed = request.seed if request.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        state = PipelineState(request=request, device=self.device, dtype=self.dtype, seed=seed,
                              progress=progress, is_cancelled=is_cancelled)
        with torch.inference_mode():
            for stage in self.stages():
                state.check_cancelled()
                start = time.perf_counter()
                stage(self, state)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                state.timings[stage.name] = state.timings.get(stage.name, 0.0) + time.perf_counter() - start
        return self.make_result(state)

    def make_result(self, state: PipelineState) -> GenerationResult:
        from diffgen.outputs import to_uint8

        request = state.request
        result = GenerationResult(request=request, model=self.model_path, seed=state.seed, timings=state.timings)
        pixels = state.pixels
        if self.output_kind == "video":
            result.frames = [to_uint8(video) for video in pixels]
            result.fps = request.fps
        else:
            from PIL import Image

            result.images = [Image.fromarray(to_uint8(image)) for image in pixels]
        if request.return_tensors:
            result.latents, result.pixels = state.latents, pixels
        return result


_REGISTRY: dict[str, type[ComposedPipeline]] = {}


def register_pipeline(cls: type[ComposedPipeline]) -> type[ComposedPipeline]:
    for name in cls.pipeline_class_names:
        _REGISTRY[name] = cls
    return cls


def supported_pipeline_classes() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def pipeline_for(class_name: str, folder: Path) -> type[ComposedPipeline]:
    _import_all()
    if class_name not in _REGISTRY:
        raise ModelLoadError(
            f"{folder}: pipeline class {class_name!r} is not supported; supported: "
            f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[class_name]


def _import_all() -> None:
    import diffgen.pipelines  # noqa: F401  (registers every pipeline)
