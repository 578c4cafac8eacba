"""Engine: the Python API over a loaded pipeline."""

from __future__ import annotations

import logging
from typing import Any

import torch

from diffgen.engine.request import GenerationRequest, GenerationResult
from diffgen.engine.spec import ModelSpec, resolve
from diffgen.pipelines.base import ComposedPipeline, ProgressFn

logger = logging.getLogger(__name__)


class Engine:
    """Load a diffusers-format checkpoint once; generate many times.

    >>> engine = Engine.from_pretrained("black-forest-labs/FLUX.1-dev", device="cuda", dtype="bfloat16")
    >>> result = engine.generate(prompt="a raccoon", seed=0)
    >>> result.images[0].save("raccoon.png")
    """

    def __init__(self, pipeline: ComposedPipeline):
        self.pipeline = pipeline

    @classmethod
    def from_pretrained(cls, model_path: str, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, revision: str | None = None,
                        attention_backend: str | None = None, compile: bool | None = None,
                        quantize: str | None = None, vae_dtype: str | torch.dtype | None = None,
                        cache: str | None = None, cache_threshold: float | None = None,
                        offload: str | None = None, lora_path: list[str] | None = None,
                        lora_mode: str | None = None, serving: bool = False) -> Engine:
        """``model_path``: a hub id (``org/name``) or a local diffusers pipeline folder.

        ``compile``: torch.compile each DiT block (slower first request per shape, faster steps).
        None (the default) decides by use: compiled on CUDA when ``serving``, eager otherwise.
        ``serving``: the engine will answer many requests: with compilation on, it warms up at the
        model's default size before returning, so no request waits for the compiler.
        ``quantize``: "fp8" stores the DiT's large linears in float8 with per-channel scales (fp8
        tensor-core matmuls on Hopper/Ada; changes the numbers slightly, so no longer bit-equal to diffusers).
        ``vae_dtype``: the VAE's dtype when it should differ from ``dtype`` (Wan's model cards decode in float32).
        ``cache`` / ``cache_threshold``: the step cache of every request that does not choose its own
        ("first-block" or "teacache"; threshold None: the method's published default for the model).
        ``offload``: "model" keeps components on the CPU until they run; "layerwise" also streams the DiT's
        blocks from CPU memory a few at a time (for GPUs smaller than the model).
        ``lora_path``: LoRA files to load, each ``path`` or ``path:scale``; ``lora_mode``: "merged" (default:
        added into the weights) or "dynamic" (applied in the forward; requests may pick their own LoRAs).
        """
        from diffgen.engine.optimize import apply_compile, apply_quantization, resolve_compile
        from diffgen.layers.attention import set_attention_backend
        from diffgen.loader.components import load_pipeline

        if attention_backend:
            set_attention_backend(attention_backend)
        if offload not in (None, "none"):
            from diffgen.engine.offload import OFFLOAD_MODES
            from diffgen.errors import DiffgenError
            from diffgen.loader.components import parse_device, parse_dtype

            if offload not in OFFLOAD_MODES:
                raise DiffgenError(f"--offload {offload!r} is not supported; choose one of {', '.join(OFFLOAD_MODES)}")
            # Load into CPU memory (in the dtype the GPU would get); components move when they run.
            device = parse_device(device)
            dtype = parse_dtype(dtype, device)
            vae_dtype = parse_dtype(vae_dtype, device, flag="--vae-dtype") if vae_dtype else None
            pipeline = load_pipeline(model_path, device="cpu", dtype=dtype, revision=revision, vae_dtype=vae_dtype)
            pipeline.device = device
        else:
            pipeline = load_pipeline(model_path, device=device, dtype=dtype, revision=revision, vae_dtype=vae_dtype)
        if quantize:
            apply_quantization(pipeline.components, quantize)
        if offload not in (None, "none"):
            from diffgen.engine.offload import apply_offload

            pipeline.offloaders = apply_offload(pipeline, offload)
        # Offloaded models move between devices as they run: compile them only when asked.
        compiled = resolve_compile(compile, pipeline.device, serving and offload in (None, "none"))
        if compiled:
            apply_compile(pipeline.components)
        engine = cls(pipeline)
        engine.set_step_cache(cache, cache_threshold)
        if lora_mode is not None or lora_path:
            from diffgen.engine.lora import LoRAManager, parse_lora_spec

            pipeline.loras = LoRAManager(pipeline, lora_mode or "merged")
            for spec in lora_path or []:
                path, scale = parse_lora_spec(spec)
                engine.load_lora(path, scale=scale)
        if compiled and serving:
            engine.warm_up()  # compile now (or load from the disk cache), not in the first request
        return engine

    # -- LoRA ------------------------------------------------------------------------------------
    def load_lora(self, path: str, name: str | None = None, scale: float = 1.0,
                  component: str = "transformer") -> str:
        """Load a LoRA safetensors file into the DiT (``component="transformer_2"``: Wan2.2's low-noise
        expert); returns its name (default: the file's stem). A bad file changes nothing."""
        from diffgen.engine.lora import LoRAManager

        if self.pipeline.loras is None:
            self.pipeline.loras = LoRAManager(self.pipeline)
        return self.pipeline.loras.load(path, name, scale, component)

    def set_lora_scales(self, scales: dict[str, float]) -> None:
        """New scales for loaded LoRAs, by name (merged: the weights are recomputed from the originals)."""
        self._lora_manager().set_scales(scales)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (all without a name); the last one out restores the exact original weights."""
        self._lora_manager().unload(name)

    @property
    def loras(self) -> list[dict[str, Any]]:
        """The loaded LoRAs: name, path, scale, component, number of layers."""
        return [] if self.pipeline.loras is None else self.pipeline.loras.describe()

    def _lora_manager(self):
        from diffgen.errors import InvalidRequestError

        if self.pipeline.loras is None or not self.pipeline.loras.adapters:
            raise InvalidRequestError("name", "no LoRA is loaded")
        return self.pipeline.loras

    def set_step_cache(self, method: str | None, threshold: float | None = None) -> None:
        """The default step cache of later requests (None or "none": off); checked against the model now."""
        from diffgen.engine.step_cache import StepCacheConfig, check_cache_options

        check_cache_options(method, threshold)
        config = None if method in (None, "none") else StepCacheConfig(method, threshold)
        if config is not None:  # reject what this model cannot use (teacache without coefficients) at once
            pipeline = self.pipeline
            from diffgen.engine.step_cache import resolve_step_cache

            resolve_step_cache(config, None, None, pipeline.defaults.name, pipeline.transformer.config.inner_dim)
        self.pipeline.step_cache = config

    def warm_up(self, sizes: list[tuple[int, int]] | None = None) -> None:
        """Run a short request at each (height, width), by default the model's own size.

        With compiled blocks this is where the compilation happens (or is loaded from the disk cache).
        Models that need input images get plain grey ones; distilled models their own step count.
        """
        from PIL import Image

        spec = self.spec
        steps = len(spec.distilled_timesteps) if spec.distilled_timesteps else max(2, spec.min_steps)
        for height, width in sizes or [(spec.defaults.height, spec.defaults.width)]:
            images = [Image.new("RGB", (width, height), (128, 128, 128))] * spec.min_images or None
            self.generate("warm-up", height=height, width=width, num_inference_steps=steps, seed=0, images=images)

    @property
    def spec(self) -> ModelSpec:
        return self.pipeline.spec

    @property
    def defaults(self):
        return self.spec.defaults

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` checked against the model's spec, with its defaults filled in."""
        return resolve(request, self.spec)

    @property
    def model_path(self) -> str:
        return self.pipeline.model_path

    def generate(self, prompt: str | list[str], *, progress: ProgressFn | None = None,
                 is_cancelled=None, **params: Any) -> GenerationResult:
        """Generate for one prompt or a list of prompts.

        ``params``: negative_prompt, height, width, num_inference_steps, guidance_scale, true_cfg_scale,
        seed, num_outputs_per_prompt, num_frames, fps, images, max_sequence_length, return_tensors,
        cache ("none", "first-block", "teacache"), cache_threshold, loras ({name: scale}, dynamic LoRA mode).
        """
        request = GenerationRequest.build(prompt, **params)
        return self.run(request, progress=progress, is_cancelled=is_cancelled)

    def run(self, request: GenerationRequest, progress: ProgressFn | None = None,
            is_cancelled=None) -> GenerationResult:
        return self.pipeline.run(self.resolve(request), progress=progress, is_cancelled=is_cancelled)
