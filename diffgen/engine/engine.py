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
                        attention_backend: str | None = None, compile: bool = False,
                        quantize: str | None = None, vae_dtype: str | torch.dtype | None = None) -> Engine:
        """``model_path``: a hub id (``org/name``) or a local diffusers pipeline folder.

        ``compile``: torch.compile each DiT block (slower first request per shape, faster steps).
        ``quantize``: "fp8" stores the DiT's large linears in float8 with per-channel scales (fp8
        tensor-core matmuls on Hopper/Ada; changes the numbers slightly, so no longer bit-equal to diffusers).
        ``vae_dtype``: the VAE's dtype when it should differ from ``dtype`` (Wan's model cards decode in float32).
        """
        from diffgen.engine.optimize import apply_compile, apply_quantization
        from diffgen.layers.attention import set_attention_backend
        from diffgen.loader.components import load_pipeline

        if attention_backend:
            set_attention_backend(attention_backend)
        pipeline = load_pipeline(model_path, device=device, dtype=dtype, revision=revision, vae_dtype=vae_dtype)
        if quantize:
            apply_quantization(pipeline.components, quantize)
        if compile:
            apply_compile(pipeline.components)
        return cls(pipeline)

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
        seed, num_outputs_per_prompt, num_frames, fps, images, max_sequence_length, return_tensors.
        """
        request = GenerationRequest.build(prompt, **params)
        return self.run(request, progress=progress, is_cancelled=is_cancelled)

    def run(self, request: GenerationRequest, progress: ProgressFn | None = None,
            is_cancelled=None) -> GenerationResult:
        return self.pipeline.run(self.resolve(request), progress=progress, is_cancelled=is_cancelled)
