"""The Denoiser: the shared sampling loop, over one request or several at once.

Each request is a :class:`DenoisingRow`: its own latents, timesteps, scheduler (sampler state), step
cache and position in its schedule. :meth:`Denoiser.step` advances every given row by one of its own
steps. One row runs exactly as the pipeline's ``predict_noise`` says (the single-request path, equal
to the references); several rows ask the pipeline for their guidance branches and run them through
:func:`~diffgen.pipelines.guidance.run_batched`, one forward per step for all of them, each request
at its own timestep. Rows may join and leave between steps (step-level continuous batching: see
``diffgen.engine.batching``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from diffgen.layers.block_loop import active_block_hook
from diffgen.pipelines.guidance import BatchInputs, run_batched

if TYPE_CHECKING:
    from diffgen.engine.step_cache import StepCacheSession
    from diffgen.pipelines.base import ComposedPipeline, PipelineState


@dataclass
class DenoisingRow:
    """One request in the denoising loop."""

    state: PipelineState
    step_cache: StepCacheSession | None = None
    index: int = 0  # the next step of this request's schedule
    batched: int = 1  # the most requests that shared one of its forwards
    started: float = field(default_factory=time.perf_counter)
    end: torch.cuda.Event | None = None  # recorded after its last step (CUDA): what decoding waits for

    @property
    def total(self) -> int:
        return len(self.state.timesteps)

    @property
    def done(self) -> bool:
        return self.index >= self.total


class Denoiser:
    """Advances rows of one pipeline by one step each. Holds no state between calls but the pipeline and the
    batched inputs it may reuse at the next step."""

    def __init__(self, pipe: ComposedPipeline,
                 before_batched_forward: Callable[[list[PipelineState]], None] | None = None):
        self.pipe = pipe
        #: called with the rows' states before a forward of several rows (fault injection in tests)
        self.before_batched_forward = before_batched_forward
        #: the rows' unchanging inputs (texts, masks, ids) as the last batched forward concatenated them
        self.kept_inputs = BatchInputs()

    def start(self, state: PipelineState) -> DenoisingRow:
        """A row for a prepared request (latents and timesteps set)."""
        return DenoisingRow(state, self.pipe.step_cache_session(state.request, len(state.timesteps)))

    def step(self, rows: list[DenoisingRow]) -> list[BaseException | None]:
        """One step of each row (each at its own index). A failing forward raises with every row untouched
        (the caller may run them again one by one); a row whose sampler step fails gets its error back."""
        if len(rows) == 1:
            predictions = [self._predict_alone(rows[0])]
        else:
            predictions = self._predict_together(rows)
        for row in rows:
            row.batched = max(row.batched, len(rows))
        errors: list[BaseException | None] = []
        for row, prediction in zip(rows, predictions, strict=True):
            try:
                self._advance(row, prediction)
                errors.append(None)
            except Exception as error:  # this row's sampler; the others go on
                errors.append(error)
        return errors

    def mark_end(self, row: DenoisingRow) -> None:
        """After the row's last step (or when it leaves early), on the thread that stepped it: on CUDA, an event
        that :meth:`wait_end` waits for on another thread or stream."""
        if row.state.device.type == "cuda":
            row.end = torch.cuda.Event()
            row.end.record()

    def wait_end(self, row: DenoisingRow) -> None:
        """Until the row's steps are done on the GPU (the host waits, so any stream's later work comes after)."""
        if row.end is not None:
            row.end.synchronize()

    def finish(self, row: DenoisingRow) -> None:
        """Record the row's denoising time and cache counters in its request's timings (after :meth:`mark_end`;
        may run on another thread)."""
        state = row.state
        if row.end is None:
            self.mark_end(row)
        self.wait_end(row)
        state.timings["denoising"] = state.timings.get("denoising", 0.0) + time.perf_counter() - row.started
        state.timings["batched_requests"] = float(row.batched)
        if row.step_cache is not None:
            state.timings.update(row.step_cache.timings())

    # -- internals -------------------------------------------------------------------------------
    def _predict_alone(self, row: DenoisingRow) -> torch.Tensor:
        state = row.state
        token = active_block_hook.set(row.step_cache)  # this request's cache state, nobody else's
        try:
            if row.step_cache is not None:
                row.step_cache.begin_step(row.index)
            with self.pipe.lora_context(state.request):
                return self.pipe.predict_noise(state, state.latents, state.timesteps[row.index], row.index)
        finally:
            active_block_hook.reset(token)

    def _predict_together(self, rows: list[DenoisingRow]) -> list[torch.Tensor]:
        if any(row.step_cache is not None for row in rows):
            raise ValueError("requests with a step cache run alone (their cache decisions are per request)")
        if self.before_batched_forward is not None:
            self.before_batched_forward([row.state for row in rows])
        with self.pipe.lora_context(rows[0].state.request), _no_block_hook():
            steps = [self.pipe.guidance(row.state, row.state.latents, row.state.timesteps[row.index], row.index)
                     for row in rows]
            predictions = run_batched(steps, self.kept_inputs)
            self.kept_inputs.next_step()
        return [step.combine(branches) for step, branches in zip(steps, predictions, strict=True)]

    def _advance(self, row: DenoisingRow, prediction: torch.Tensor) -> None:
        from diffgen.pipelines.preview import clean_estimate, preview_images, wants_preview

        state = row.state
        t = state.timesteps[row.index]
        preview = None
        if state.progress is not None and wants_preview(state.request.preview_every, row.index + 1, row.total):
            preview = preview_images(self.pipe, state, clean_estimate(state.latents, prediction, t, state.scheduler))
        state.latents = state.scheduler.step(prediction, t, state.latents, return_dict=False)[0]
        row.index += 1
        state.report_step(row.index, row.total, preview)


@contextlib.contextmanager
def _no_block_hook() -> Iterator[None]:
    token = active_block_hook.set(None)
    try:
        yield
    finally:
        active_block_hook.reset(token)
