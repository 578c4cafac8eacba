"""The stages every pipeline is made of.

Each stage does the orchestration (order, timing, progress, cancellation) and calls the
pipeline's hook for the model-specific part, so a pipeline definition reads as a list of hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffgen.pipelines.base import ComposedPipeline, PipelineState


def draw_noise(shape: tuple[int, ...], seed: int | torch.Generator, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """Gaussian noise exactly as diffusers draws it with ``torch.Generator("cpu").manual_seed(seed)``.

    Given a generator instead of a seed, it draws the next noise of that generator (samplers that
    re-noise between steps draw from the request's one generator, as the references do).
    """
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


class InputValidationStage:
    name = "input_validation"

    def __call__(self, pipe: ComposedPipeline, state: PipelineState) -> None:
        from diffgen.engine.spec import resolve

        state.request = resolve(state.request, pipe.spec)  # a no-op for a request the Engine resolved
        pipe.check_features(state.request)


class TextEncodingStage:
    name = "text_encoding"

    def __call__(self, pipe: ComposedPipeline, state: PipelineState) -> None:
        pipe.encode_text(state)


class ImageEncodingStage:
    name = "image_encoding"

    def __call__(self, pipe: ComposedPipeline, state: PipelineState) -> None:
        pipe.encode_images(state)


class LatentsStage:
    name = "latents"

    def __call__(self, pipe: ComposedPipeline, state: PipelineState) -> None:
        pipe.prepare_latents(state)


class TimestepsStage:
    name = "timesteps"

    def __call__(self, pipe: ComposedPipeline, state: PipelineState) -> None:
        pipe.prepare_timesteps(state)


class DenoisingStage:
    """The sampling loop: predict, step, report progress, honour cancellation between steps."""

    name = "denoising"

    def __call__(self, pipe: ComposedPipeline, state: PipelineState) -> None:
        from diffgen.layers.block_loop import active_block_hook
        from diffgen.pipelines.preview import clean_estimate, preview_images, wants_preview

        latents = state.latents
        total = len(state.timesteps)
        step_cache = pipe.step_cache_session(state.request, total)
        token = active_block_hook.set(step_cache)  # this request's cache state, nobody else's
        try:
            for i, t in enumerate(state.timesteps):
                state.check_cancelled()
                if step_cache is not None:
                    step_cache.begin_step(i)
                noise_pred = pipe.predict_noise(state, latents, t, i)
                preview = None
                if state.progress is not None and wants_preview(state.request.preview_every, i + 1, total):
                    preview = preview_images(pipe, state, clean_estimate(latents, noise_pred, t, state.scheduler))
                latents = state.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if state.progress is not None:
                    state.progress(i + 1, total, preview)
        finally:
            active_block_hook.reset(token)
        state.latents = latents
        if step_cache is not None:
            state.timings.update(step_cache.timings())


class DecodingStage:
    name = "decoding"

    def __call__(self, pipe: ComposedPipeline, state: PipelineState) -> None:
        pipe.decode(state)
