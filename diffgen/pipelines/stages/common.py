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
    """The sampling loop of one request: predict, step, report progress, honour cancellation between steps.
    (Several requests at once: diffgen.engine.batching drives the same Denoiser with more rows.)"""

    name = "denoising"

    def __call__(self, pipe: ComposedPipeline, state: PipelineState) -> None:
        from diffgen.pipelines.denoiser import Denoiser

        denoiser = Denoiser(pipe)
        row = denoiser.start(state)
        while not row.done:
            state.check_cancelled()
            error = denoiser.step([row])[0]
            if error is not None:
                raise error
        denoiser.finish(row)


class DecodingStage:
    name = "decoding"

    def __call__(self, pipe: ComposedPipeline, state: PipelineState) -> None:
        pipe.decode(state)
