"""Load a model for running: the pipeline plus the load-time options (attention backend, quantization,
compilation). Used by the in-process executor and by every worker process alike."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

logger = logging.getLogger(__name__)


def load_model(model_path: str, device: Any = None, dtype: Any = None, revision: str | None = None,
               attention_backend: str | None = None, compile: bool | None = None, quantize: str | None = None,
               vae_dtype: Any = None, cache: str | None = None, cache_threshold: float | None = None,
               cache_warmup: int | None = None, cache_order: int | None = None, offload: str | None = None,
               lora_path: list[str] | None = None, lora_mode: str | None = None,
               serving: bool = False, warmup_sizes: str | list[tuple[int, int]] | None = None):
    """A loaded :class:`~diffgen.pipelines.base.ComposedPipeline` with the options of ``Engine.from_pretrained``.

    ``compile`` None decides by use: compiled on CUDA when ``serving`` (then warmed up at the model's
    default size, or at each of ``warmup_sizes``, before returning, so no request waits for the
    compiler), eager otherwise.
    """
    from diffgen.engine.optimize import (
        apply_compile,
        apply_cuda_graphs,
        apply_quantization,
        check_compile_options,
        resolve_compile,
    )
    from diffgen.layers.attention import prefetch_attention_kernels, set_attention_backend
    from diffgen.loader.components import load_pipeline, parse_device

    check_compile_options(compile, lora_mode)
    sizes = parse_warmup_sizes(warmup_sizes)  # a bad value fails before anything loads

    if attention_backend:
        set_attention_backend(attention_backend)
    device, offloaded = parse_device(device), offload not in (None, "none")
    # Offloaded models move between devices as they run: compile them only when asked.
    compiled = resolve_compile(compile, device, serving and not offloaded, lora_mode)
    prefetch_attention_kernels(device, compiled)  # FlashAttention-4's import overlaps the loading
    if offloaded:
        from diffgen.engine.offload import OFFLOAD_MODES
        from diffgen.errors import DiffgenError
        from diffgen.loader.components import parse_dtype

        if offload not in OFFLOAD_MODES:
            raise DiffgenError(f"--offload {offload!r} is not supported; choose one of {', '.join(OFFLOAD_MODES)}")
        # Load into CPU memory (in the dtype the GPU would get); components move when they run.
        dtype = parse_dtype(dtype, device)
        vae_dtype = parse_dtype(vae_dtype, device, flag="--vae-dtype") if vae_dtype else None
        pipeline = load_pipeline(model_path, device="cpu", dtype=dtype, revision=revision, vae_dtype=vae_dtype)
        pipeline.device = device
    else:
        pipeline = load_pipeline(model_path, device=device, dtype=dtype, revision=revision, vae_dtype=vae_dtype)
    if quantize:
        apply_quantization(pipeline.components, quantize)
    if offloaded:
        from diffgen.engine.offload import apply_offload

        pipeline.offloaders = apply_offload(pipeline, offload)
    if compiled:
        apply_compile(pipeline.components)
        if serving and not offloaded:
            apply_cuda_graphs(pipeline.components)  # captured on each signature's second forward (warm-up)
    set_step_cache(pipeline, cache, cache_threshold, cache_warmup, cache_order)
    if lora_mode is not None or lora_path:
        from diffgen.engine.lora import LoRAManager, parse_lora_spec

        pipeline.loras = LoRAManager(pipeline, lora_mode or "merged")
        for spec in lora_path or []:
            path, scale, component = parse_lora_spec(spec)
            load_lora(pipeline, path, scale=scale, component=component)
    if compiled and serving:
        warm_up(pipeline, sizes)  # compile now (or load from the disk cache), not in the first request
    elif sizes:
        logger.warning("diffgen: --warmup-sizes has no effect: the DiT is not compiled (it warms up compiled serving)")
    return pipeline


def parse_warmup_sizes(value: str | list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
    """"1024x1024,1344x768" (WIDTHxHEIGHT, as the HTTP ``size`` field) -> [(height, width), ...]; None stays None."""
    from diffgen.errors import DiffgenError
    from diffgen.options import MAX_SIDE

    if value is None or isinstance(value, list):
        return value
    sizes = []
    for text in value.split(","):
        match = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", text.strip())
        if not match:
            raise DiffgenError(f"--warmup-sizes: {text.strip()!r} is not of the form WIDTHxHEIGHT (e.g. 1024x1024); "
                               "several sizes are separated by commas")
        width, height = int(match.group(1)), int(match.group(2))
        if not (16 <= width <= MAX_SIDE and 16 <= height <= MAX_SIDE):
            raise DiffgenError(f"--warmup-sizes: {text.strip()!r}: each side must be between 16 and {MAX_SIDE} pixels")
        sizes.append((height, width))
    return sizes


def warm_up(pipeline, sizes: list[tuple[int, int]] | None = None, run: Any = None) -> None:
    """Run a short request at each (height, width), by default the model's own size.

    With compiled blocks this is where the compilation happens (or is loaded from the disk cache).
    Models that need input images get plain grey ones; distilled models their own step count.
    ``run(request)``: how to run it (default: the pipeline itself, after resolve).
    """
    from PIL import Image

    from diffgen.engine.request import GenerationRequest
    from diffgen.engine.spec import resolve

    spec = pipeline.spec
    steps = len(spec.distilled_timesteps) if spec.distilled_timesteps else max(2, spec.min_steps)
    for height, width in sizes or [(spec.defaults.height, spec.defaults.width)]:
        images = [Image.new("RGB", (width, height), (128, 128, 128))] * spec.min_images or None
        request = GenerationRequest.build("warm-up", height=height, width=width, num_inference_steps=steps, seed=0,
                                          images=images)
        run(request) if run is not None else pipeline.run(resolve(request, spec))


def set_step_cache(pipeline, method: str | None, threshold: float | None = None, warmup_steps: int | None = None,
                   order: int | None = None) -> None:
    """The default step cache of the pipeline's later requests (None or "none": off); checked against the model."""
    from diffgen.engine.step_cache import StepCacheConfig, check_cache_options, resolve_step_cache

    check_cache_options(method, threshold, warmup_steps, order)
    config = None if method in (None, "none") else StepCacheConfig(method, threshold, warmup_steps=warmup_steps,
                                                                   order=order)
    if config is not None:  # reject what this model cannot use (teacache without coefficients) at once
        resolve_step_cache(config, None, None, pipeline.defaults.name, pipeline.transformer.config.inner_dim)
    pipeline.step_cache = config


def load_lora(pipeline, path: str, name: str | None = None, scale: float = 1.0, component: str = "transformer") -> str:
    """Load a LoRA file into the pipeline's DiT; returns its name."""
    from diffgen.engine.lora import LoRAManager

    if pipeline.loras is None:
        pipeline.loras = LoRAManager(pipeline)
    return pipeline.loras.load(path, name, scale, component)


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' info logs and progress bars (diffgen reports its own progress).

    Imports neither library: one not imported yet reads its verbosity from the environment when it is
    (so that `diffgen generate --help` and argument errors stay fast); one already imported is told now.
    Their loading progress bars are switched off around each component load (components.py).
    """
    import sys

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers"):
        if name in sys.modules:
            library_logging = sys.modules[name].utils.logging
            library_logging.set_verbosity_error()
            library_logging.disable_progress_bar()
