"""ComposedPipeline: a list of stages run over one per-request state object.

A pipeline object holds only loaded components and model defaults; everything about one request
(prompts, noise, latents, timesteps, progress, cancel flag) lives in :class:`PipelineState`.
Adding a model = a defaults entry (configs), a DiT file (models/dits) and a pipeline definition
registered here under the ``_class_name`` of its ``model_index.json``, whose ``describe`` publishes
the model's :class:`~diffgen.engine.spec.ModelSpec` from the checkpoint's JSON files.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from diffgen.configs.models import ModelDefaults
from diffgen.engine.request import GenerationRequest, GenerationResult
from diffgen.engine.spec import ModelSpec
from diffgen.errors import CancelledError, InvalidRequestError, ModelLoadError
from diffgen.loader.resolve import CheckpointInfo

if TYPE_CHECKING:
    from diffgen.engine.lora import LoRAManager
    from diffgen.engine.step_cache import StepCacheConfig, StepCacheSession

#: ``progress(step, total, preview)`` after every denoising step; ``preview``: None, or (B, F, h, w, 3) uint8
#: thumbnails when the request's ``preview_every`` asks for one at this step (diffgen.pipelines.preview)
ProgressFn = Callable[[int, int, np.ndarray | None], None]
#: (step, total, the request's latents after that step), for each denoising step of one request
StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class PipelineState:
    """Everything about one request as it flows through the stages."""

    request: GenerationRequest
    device: torch.device
    dtype: torch.dtype
    seed: int
    progress: ProgressFn | None = None
    is_cancelled: Callable[[], bool] | None = None
    step_callback: StepCallback | None = None
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

    def report_step(self, step: int, total: int, preview: np.ndarray | None = None) -> None:
        """After denoising step ``step`` of ``total``: this request's progress (with its preview, if one was made
        at this step) and step callbacks."""
        if self.progress is not None:
            self.progress(step, total, preview)
        if self.step_callback is not None:
            self.step_callback(step, total, self.latents)


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
    #: diffusers / transformers class names of components replaced by a native diffgen model (or tokenizer: a class
    #: with ``from_folder`` and ``unsupported_folder``).
    native_models: ClassVar[dict[str, type]] = {}
    #: component class names loaded by a pipeline-specific function ``(folder, dtype, device) -> component``
    #: (e.g. a processor whose library class needs a package diffgen does not require).
    component_loaders: ClassVar[dict[str, Callable[..., Any]]] = {}
    #: "image" or "video"
    output_kind: ClassVar[str] = "image"
    #: the step cache of requests that do not choose one (Engine ``cache=``); None: off
    step_cache: StepCacheConfig | None = None
    #: LoRAs loaded into the DiT (Engine.load_lora); None: none ever loaded
    loras: LoRAManager | None = None
    #: guidance branches the model runs by default: 2 with classifier-free guidance (cond, uncond), else 1.
    #: Read before loading, to plan CFG parallelism.
    guidance_branches: ClassVar[int] = 1
    #: whether the DiT declares its token layout (shards its tokens with diffgen.parallel.sequence.shard_tokens)
    sequence_parallel: ClassVar[bool] = True
    #: latents are 2x2 patches as tokens (B, h/2 * w/2, 4C) with the grid in ``state.extras["latent_grid"]``
    #: (FLUX, Qwen-Image); else the VAE's own (B, C, F, h, w)
    packed_latents: ClassVar[bool] = False
    #: whether several requests may share denoising forwards (rows of one batch, see diffgen.pipelines.denoiser):
    #: the pipeline's ``guidance`` gives branches whose rows are independent. False: its requests run one by one.
    supports_batching: ClassVar[bool] = True

    def __init__(self, components: dict[str, Any], model_path: str, device: torch.device, dtype: torch.dtype,
                 settings: dict[str, Any] | None = None, spec: ModelSpec | None = None):
        self.components = components
        self.model_path = model_path
        self.device = device
        self.dtype = dtype
        #: non-component entries of model_index.json (e.g. Wan2.2's boundary_ratio)
        self.settings = settings or {}
        #: the loader passes the spec it read from the checkpoint's files; built pipelines derive it
        self.spec = spec or self.describe(CheckpointInfo.from_components(model_path, components, self.settings))

    def __getattr__(self, name: str) -> Any:
        components = self.__dict__.get("components", {})
        if name in components:
            return components[name]
        raise AttributeError(name)

    @property
    def defaults(self) -> ModelDefaults:
        return self.spec.defaults

    @property
    def accepts_images(self) -> bool:
        return self.spec.accepts_images

    # -- definition points for subclasses ------------------------------------------------------
    @classmethod
    def describe(cls, checkpoint: CheckpointInfo) -> ModelSpec:
        """The model's spec, from the checkpoint's JSON files only (the front end has no weights)."""
        raise NotImplementedError

    @classmethod
    def default_guidance_branches(cls, checkpoint: CheckpointInfo) -> int:
        """The guidance branches this checkpoint runs at its default settings (the CFG-parallel plan reads it):
        ``guidance_branches`` unless a pipeline reads otherwise from the checkpoint's files."""
        return cls.guidance_branches

    def stages(self) -> list[PipelineStage]:
        from diffgen.pipelines import stages as S

        image_stage = [S.ImageEncodingStage()] if self.accepts_images else []
        return [S.InputValidationStage(), S.TextEncodingStage(), *image_stage, S.LatentsStage(),
                S.TimestepsStage(), S.DenoisingStage(), S.DecodingStage()]

    def check_features(self, request: GenerationRequest) -> None:
        """What depends on the loaded weights rather than the spec: the request's step cache (TeaCache needs
        coefficients for this model) and its LoRAs (loaded ones, dynamic mode)."""
        self.resolve_step_cache(request)
        if request.loras is not None and self.loras is None:
            raise InvalidRequestError("loras", "no LoRA is loaded")
        if self.loras is not None:
            self.loras.check_request(request.loras)

    def resolve_step_cache(self, request: GenerationRequest) -> StepCacheConfig | None:
        from diffgen.engine.step_cache import resolve_step_cache

        return resolve_step_cache(self.step_cache, request.cache, request.cache_threshold, self.defaults.name,
                                  self.transformer.config.inner_dim)

    def step_cache_session(self, request: GenerationRequest, total_steps: int) -> StepCacheSession | None:
        from diffgen.engine.step_cache import StepCacheSession

        config = self.resolve_step_cache(request)
        return None if config is None else StepCacheSession(config, total_steps)

    def guidance(self, state: PipelineState, latents: torch.Tensor, t: torch.Tensor, step: int):
        """What step ``step`` evaluates: a :class:`diffgen.pipelines.guidance.GuidanceStep` (branches + combine)."""
        raise NotImplementedError

    def predict_noise(self, state: PipelineState, latents: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        """The prediction the sampler steps with: the guidance branches run (see ``run_branches``) and combined."""
        from diffgen.pipelines.guidance import run_branches

        guidance = self.guidance(state, latents, t, step)
        return guidance.combine(run_branches(guidance))

    def latents_to_grid(self, state: PipelineState, latents: torch.Tensor) -> torch.Tensor:
        """The sampling latents as the VAE's grid (B, C, F, h, w), in the DiT's units (for previews)."""
        if self.packed_latents:
            from diffgen.pipelines.latents import unpack_latents

            return unpack_latents(latents, *state.extras["latent_grid"]).unsqueeze(2)
        return latents

    def grid_to_latents(self, state: PipelineState, grid: torch.Tensor) -> torch.Tensor:
        """Inverse of ``latents_to_grid`` for one latent frame; sets what ``decode`` reads from ``state``."""
        if self.packed_latents:
            from diffgen.pipelines.latents import pack_latents

            state.extras["latent_grid"] = tuple(grid.shape[-2:])
            return pack_latents(grid[:, :, 0])
        return grid

    def new_scheduler(self):
        """A fresh copy of the checkpoint's scheduler: schedulers keep a step index, so one per request."""
        return type(self.scheduler).from_config(self.scheduler.config)

    def batch_key(self, request: GenerationRequest) -> tuple | None:
        """Requests with equal keys may share denoising forwards (at any step of their own schedules); None:
        this request runs alone. Different LoRA scales or a step cache (whose decisions are per request) never
        share a forward; prompts, seeds, guidance, negative prompts and step counts may differ."""
        if not self.supports_batching or self.resolve_step_cache(request) is not None:
            return None
        loras = tuple(sorted(request.loras.items())) if request.loras else None
        return (request.height, request.width, request.num_frames, loras)

    def lora_context(self, request: GenerationRequest) -> contextlib.AbstractContextManager:
        """The request's LoRA scales active (dynamic mode) while its stages and forwards run."""
        return self.loras.activated(request.loras) if self.loras is not None else contextlib.nullcontext()

    # -- running -------------------------------------------------------------------------------
    def run(self, request: GenerationRequest, progress: ProgressFn | None = None,
            is_cancelled: Callable[[], bool] | None = None,
            step_callback: StepCallback | None = None) -> GenerationResult:
        state = self.new_state(request, progress, is_cancelled, step_callback)
        self.run_stages(state, self.stages())
        return self.make_result(state)

    def new_state(self, request: GenerationRequest, progress: ProgressFn | None = None,
                  is_cancelled: Callable[[], bool] | None = None,
                  step_callback: StepCallback | None = None) -> PipelineState:
        seed = request.seed if request.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        return PipelineState(request=request, device=self.device, dtype=self.dtype, seed=seed, progress=progress,
                             is_cancelled=is_cancelled, step_callback=step_callback)

    def prepare(self, state: PipelineState) -> None:
        """The stages before denoising (validation, encoding, latents, timesteps): the request is ready to join
        a :class:`~diffgen.pipelines.denoiser.Denoiser`."""
        stages = self.stages()
        self.run_stages(state, stages[:self._denoising_index(stages)])

    def finish(self, state: PipelineState) -> GenerationResult:
        """The stages after denoising (decoding) and the result."""
        stages = self.stages()
        self.run_stages(state, stages[self._denoising_index(stages) + 1:])
        return self.make_result(state)

    def run_stages(self, state: PipelineState, stages: list[PipelineStage]) -> None:
        with torch.inference_mode(), self.lora_context(state.request):
            for stage in stages:
                state.check_cancelled()
                start = time.perf_counter()
                stage(self, state)
                if self.device.type == "cuda":  # this thread's stream: a batch's stage thread runs beside the DiT
                    torch.cuda.current_stream(self.device).synchronize()
                if stage.name != "denoising":  # the Denoiser times its rows itself
                    state.timings[stage.name] = state.timings.get(stage.name, 0.0) + time.perf_counter() - start

    @staticmethod
    def _denoising_index(stages: list[PipelineStage]) -> int:
        from diffgen.pipelines.stages import DenoisingStage

        return next(i for i, stage in enumerate(stages) if isinstance(stage, DenoisingStage))

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
