"""Step-level continuous batching of requests on one loaded pipeline.

A :class:`ContinuousBatcher` keeps a FIFO of pending requests and a running batch. Between two
denoising steps it admits pending requests whose pipeline ``batch_key`` equals the running batch's
(same size, frames, LoRA scales; no step cache) up to ``max_batch_size``: each is prepared (its own
validation, text encoding, noise from its own generator, timesteps) and joins the
:class:`~diffgen.pipelines.denoiser.Denoiser`'s rows, so one DiT forward per step serves every
request, each at its own step of its own schedule. A request leaves when its own steps are done
(it is decoded at once and reported) or when it is cancelled; the others go on unchanged.

Fairness: admission is first come, first served. A pending request that cannot join the running
batch (another size, a step cache, other LoRA scales) stops admission behind it, so the batch
drains and it runs next; the process executor bounds how long a waiting job lets newer compatible
jobs join (``--batch-wait-cap``).

Faults: a request that fails while being prepared, stepped or decoded fails alone. If a forward of
several requests fails (a GPU out-of-memory error, say), that step is run again one request at a
time, and the batch goes on one by one until it drains; a request that fails alone then fails with
its own error.
"""

from __future__ import annotations

import gc
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from diffgen.errors import CancelledError
from diffgen.pipelines.denoiser import Denoiser, DenoisingRow

if TYPE_CHECKING:
    from diffgen.engine.request import GenerationRequest, GenerationResult
    from diffgen.pipelines.base import ComposedPipeline, ProgressFn, StepCallback

logger = logging.getLogger(__name__)


@dataclass
class BatchMember:
    """One request handed to the batcher and the ways to reach its caller."""

    job_id: str
    request: GenerationRequest
    on_done: Callable[[GenerationResult], None]
    on_failed: Callable[[BaseException], None]
    progress: ProgressFn | None = None
    step_callback: StepCallback | None = None
    is_cancelled: Callable[[], bool] | None = None
    on_start: Callable[[], None] | None = None
    row: DenoisingRow | None = None


class ContinuousBatcher:
    """Runs requests on ``pipe``, up to ``max_batch_size`` of them sharing each denoising forward.

    Not thread-safe: one thread calls ``add`` and ``run_step`` (a worker's main loop).
    """

    def __init__(self, pipe: ComposedPipeline, max_batch_size: int,
                 before_batched_forward: Callable[[list[Any]], None] | None = None):
        self.pipe = pipe
        self.max_batch_size = max_batch_size if pipe.supports_batching else 1
        self.denoiser = Denoiser(pipe, before_batched_forward)
        self.pending: deque[BatchMember] = deque()
        self.running: list[BatchMember] = []
        self._key: tuple | None = None
        self._one_by_one = False  # after a failed forward of several requests, until the batch drains

    @property
    def idle(self) -> bool:
        return not self.pending and not self.running

    def add(self, member: BatchMember) -> None:
        self.pending.append(member)

    def run_step(self) -> None:
        """Admit what may join, then one denoising step of every running request (finishing those done)."""
        self._admit()
        self._drop_cancelled()
        if not self.running:
            return
        members = list(self.running)
        if len(members) == 1 or self._one_by_one:
            for member in members:
                self._step([member])
        else:
            try:
                self._step(members, alone=False)
            except Exception as error:
                logger.warning("a denoising forward of %d requests failed (%s: %s); running them one by one",
                               len(members), type(error).__name__, error)
                self._one_by_one = True
                _free_memory()
                for member in members:
                    self._step([member])
        for member in [m for m in self.running if m.row is not None and m.row.done]:
            self._finish(member)
        if not self.running:
            self._key, self._one_by_one = None, False

    def run_until_idle(self) -> None:
        while not self.idle:
            self.run_step()

    # -- internals -------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.pending and len(self.running) < self.max_batch_size:
            member = self.pending[0]
            key = self._batch_key(member.request)
            if self.running and (key is None or self._key is None or key != self._key or self._one_by_one):
                return  # first come, first served: it waits for the batch to drain, and so do those behind it
            self.pending.popleft()
            if member.is_cancelled is not None and member.is_cancelled():
                self._fail(member, CancelledError(f"request {member.request.request_id} was cancelled"))
                continue
            state = self.pipe.new_state(member.request, member.progress, member.is_cancelled, member.step_callback)
            try:
                if member.on_start is not None:
                    member.on_start()
                self.pipe.prepare(state)
            except Exception as error:
                self._fail(member, error)
                continue
            member.row = self.denoiser.start(state)
            self.running.append(member)
            self._key = key

    def _batch_key(self, request: GenerationRequest) -> tuple | None:
        try:
            return self.pipe.batch_key(request)
        except Exception:  # a request the pipeline refuses runs alone and fails with its own error
            return None

    def _drop_cancelled(self) -> None:
        for member in list(self.running):
            try:
                member.row.state.check_cancelled()
            except CancelledError as error:
                self._fail(member, error)

    def _step(self, members: list[BatchMember], alone: bool = True) -> None:
        """One step of ``members``; alone, a failure is that request's."""
        try:
            with torch.inference_mode():
                errors = self.denoiser.step([member.row for member in members])
        except Exception as error:
            if not alone:
                raise
            self._fail(members[0], error)
            _free_memory()
            return
        for member, error in zip(members, errors, strict=True):
            if error is not None:
                self._fail(member, error)

    def _finish(self, member: BatchMember) -> None:
        self.running.remove(member)
        state = member.row.state
        self.denoiser.finish(member.row)
        try:
            result = self.pipe.finish(state)
        except Exception as error:
            self._fail(member, error)
            return
        member.on_done(result)

    def _fail(self, member: BatchMember, error: BaseException) -> None:
        if member in self.running:
            self.running.remove(member)
        member.on_failed(error)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
