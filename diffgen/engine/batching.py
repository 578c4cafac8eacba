"""Step-level continuous batching of requests on one loaded pipeline.

A :class:`ContinuousBatcher` keeps a FIFO of pending requests and a running batch. Between two
denoising steps it admits pending requests whose pipeline ``batch_key`` equals the running batch's
(same size, frames, LoRA scales; no step cache) up to ``max_batch_size``: each is prepared (its own
validation, text encoding, noise from its own generator, timesteps) and joins the
:class:`~diffgen.pipelines.denoiser.Denoiser`'s rows, so one DiT forward per step serves the
requests, each at its own step of its own schedule. A request leaves when its own steps are done
(it is decoded and reported) or when it is cancelled; the others go on unchanged.

Which running requests a forward steps is the :class:`StepPolicy`'s choice: by default a request
many times longer than the shortest running one sits the forward out, so a 4-step request arriving
among 50-step ones is stepped in forwards of its own instead of paying for a large one at each of its
steps; requests of similar lengths always share. Sitting out is bounded (``max_sit_out`` forwards in a
row), so long requests are slowed, never starved. A request's output does not depend on which forwards
it shared (each row keeps its own step index).

Overlap (``overlap=True``): preparing a request (text encoding) and finishing one (VAE decoding, the
result's images) run on a second thread, on a CUDA stream of their own, while the loop keeps stepping
the batch; a prepared request joins at the next step, a finished one is reported when its decode is
done. Pipelines with CPU offload (modules move between devices as stages run) do everything on the
loop's thread. The serve worker leaves it off: with FLUX at 512x512 on an H200 (a GPU the DiT already
saturates) it gained 0.5% throughput and made short requests slower (their encode and decode share
the GPU with the long requests' forwards); see docs/benchmarks.md.

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

import contextlib
import gc
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from diffgen.errors import CancelledError
from diffgen.pipelines.denoiser import Denoiser, DenoisingRow
from diffgen.pipelines.guidance import BatchInputs

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
    sat_out: int = 0  # forwards in a row this request was left out of


@dataclass(frozen=True)
class StepPolicy:
    """Which of the running requests the next denoising forward steps; the others sit it out, unchanged.

    A request sits out while a request of at most 1/``sit_out_ratio`` of its steps (its schedule's length) is
    running, so a short request is stepped in forwards of its own instead of paying, at each of its steps,
    for the rows of requests many times longer (on a GPU that one request already saturates, each row adds
    its whole cost to the forward); requests of similar lengths always share. A request never sits out more
    than ``max_sit_out`` forwards in a row: long requests are slowed (by about the short ones' steps), never
    starved. ``max_requests`` caps the requests of one forward (None: no cap but ``max_batch_size``),
    taking those nearest to done first. ``sit_out_ratio=None``: every running request at every step
    (:data:`EVERY_REQUEST`, the policy before this one).
    """

    sit_out_ratio: float | None = 4.0
    max_sit_out: int = 4
    max_requests: int | None = None

    def __post_init__(self) -> None:
        if self.sit_out_ratio is not None and self.sit_out_ratio < 1:
            raise ValueError(f"sit_out_ratio must be >= 1 or None, got {self.sit_out_ratio}")
        if self.max_sit_out < 0:
            raise ValueError(f"max_sit_out must be >= 0, got {self.max_sit_out}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1 or None, got {self.max_requests}")

    def choose(self, members: list[BatchMember]) -> list[BatchMember]:
        """The members the next forward steps, in the order given (one at least)."""
        def overdue(member: BatchMember) -> bool:
            return member.sat_out >= self.max_sit_out

        shortest = min(member.row.total for member in members)
        # Overdue first (the longest left out first), then nearest to done, then first come.
        order = sorted(members, key=lambda m: (not overdue(m), -m.sat_out if overdue(m) else 0,
                                               m.row.total - m.row.index))
        chosen = [m for m in order if self.sit_out_ratio is None or overdue(m)
                  or m.row.total <= self.sit_out_ratio * shortest]
        if self.max_requests is not None:
            chosen = chosen[:self.max_requests]
        keep = {id(member) for member in chosen}
        return [member for member in members if id(member) in keep]


#: every running request at every step (first come, first served; the policy before :class:`StepPolicy`)
EVERY_REQUEST = StepPolicy(sit_out_ratio=None)


class ContinuousBatcher:
    """Runs requests on ``pipe``, up to ``max_batch_size`` of them sharing each denoising forward.

    Not thread-safe: one thread calls ``add``, ``run_step`` and ``close`` (a worker's main loop); the
    members' callbacks are called on that thread.
    """

    def __init__(self, pipe: ComposedPipeline, max_batch_size: int,
                 before_batched_forward: Callable[[list[Any]], None] | None = None,
                 policy: StepPolicy | None = None, overlap: bool = False):
        self.pipe = pipe
        self.max_batch_size = max_batch_size if pipe.supports_batching else 1
        self.denoiser = Denoiser(pipe, before_batched_forward)
        self.policy = policy or StepPolicy()
        self.pending: deque[BatchMember] = deque()
        self.preparing: list[BatchMember] = []  # on the stage thread, then they join ``running``
        self.running: list[BatchMember] = []
        self.finishing: list[BatchMember] = []  # being decoded on the stage thread
        self._key: tuple | None = None
        self._one_by_one = False  # after a failed forward of several requests, until the batch drains
        self._stages = _StageThread(pipe) if overlap and not getattr(pipe, "offloaders", None) else None

    @property
    def idle(self) -> bool:
        return not (self.pending or self.preparing or self.running or self.finishing)

    def add(self, member: BatchMember) -> None:
        self.pending.append(member)

    def run_step(self) -> None:
        """Take what the stage thread has done, admit what may join, then one denoising step of the requests
        the policy chooses (finishing those done)."""
        self._collect(wait=not self.running and bool(self.preparing or self.finishing))  # nothing to step yet
        self._admit()
        self._drop_cancelled()
        if not self.running:
            return
        members = self.policy.choose(self.running) if len(self.running) > 1 else list(self.running)
        for member in self.running:
            member.sat_out = 0 if member in members else member.sat_out + 1
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
        self._end_of_batch()

    def run_until_idle(self) -> None:
        while not self.idle:
            self.run_step()

    def close(self) -> None:
        """Stop the stage thread (after the work it has)."""
        if self._stages is not None:
            self._stages.close()
            self._collect(wait=False)

    # -- internals -------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.pending and len(self.running) + len(self.preparing) < self.max_batch_size:
            member = self.pending[0]
            key = self._batch_key(member.request)
            joining = self.running or self.preparing
            if joining and (key is None or self._key is None or key != self._key or self._one_by_one):
                return  # first come, first served: it waits for the batch to drain, and so do those behind it
            self.pending.popleft()
            if member.is_cancelled is not None and member.is_cancelled():
                self._fail(member, CancelledError(f"request {member.request.request_id} was cancelled"))
                continue
            state = self.pipe.new_state(member.request, member.progress, member.is_cancelled, member.step_callback)
            self._key = key
            if self._stages is None:
                try:
                    _prepare(self.pipe, member, state)
                except Exception as error:
                    self._fail(member, error)
                    continue
                self._join(member, state)
            else:
                self.preparing.append(member)
                self._stages.submit(member, "prepared", lambda member=member, state=state: _prepare(
                    self.pipe, member, state) or state)

    def _join(self, member: BatchMember, state: Any) -> None:
        member.row = self.denoiser.start(state)
        self.running.append(member)

    def _collect(self, wait: bool) -> None:
        """Act on what the stage thread finished: prepared requests join, decoded ones are reported."""
        if self._stages is None:
            return
        for member, kind, outcome, error in self._stages.results(wait):
            if kind == "prepared":
                self.preparing.remove(member)
                if error is not None:
                    self._fail(member, error)
                else:  # (after a failed batched forward it is stepped alone, like the rest of the batch)
                    self._join(member, outcome)
            elif kind == "finished":
                self.finishing.remove(member)
                if error is not None:
                    member.on_failed(error)
                else:
                    member.on_done(outcome)
        self._end_of_batch()

    def _end_of_batch(self) -> None:
        if not self.running and not self.preparing:
            self._key, self._one_by_one = None, False
            self.denoiser.kept_inputs = BatchInputs()  # nothing of the drained batch is kept

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
        self.denoiser.mark_end(member.row)
        if self._stages is not None:
            self.finishing.append(member)
            self._stages.submit(member, "finished", lambda row=member.row: self._decode(row))
            return
        try:
            result = self._decode(member.row)
        except Exception as error:
            member.on_failed(error)
            return
        member.on_done(result)

    def _decode(self, row: DenoisingRow) -> GenerationResult:
        self.denoiser.finish(row)
        return self.pipe.finish(row.state)

    def _fail(self, member: BatchMember, error: BaseException) -> None:
        if member in self.running:
            self.running.remove(member)
            if self._stages is not None:  # its tensors may still be read by forwards in flight
                self.denoiser.mark_end(member.row)
                self._stages.submit(None, "released", lambda row=member.row: self.denoiser.wait_end(row))
        member.on_failed(error)


def _prepare(pipe: ComposedPipeline, member: BatchMember, state: Any) -> None:
    if member.on_start is not None:
        member.on_start()
    pipe.prepare(state)


@dataclass
class _StageThread:
    """A thread (and, on CUDA, a stream) that runs requests' stages before and after denoising while the loop
    steps the batch. Work is done in the order given; results are read back by the loop's thread."""

    pipe: ComposedPipeline
    _tasks: queue.Queue = field(default_factory=queue.Queue)
    _results: queue.Queue = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        device = self.pipe.device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._work, name="batch-stages", daemon=True)
        self._thread.start()

    def submit(self, member: BatchMember | None, kind: str, work: Callable[[], Any]) -> None:
        self._tasks.put((member, kind, work))

    def results(self, wait: bool) -> list[tuple[BatchMember, str, Any, BaseException | None]]:
        """What is done; with ``wait``, blocks a little (up to 10 ms) for the first one."""
        done = []
        try:
            done.append(self._results.get(timeout=0.01) if wait else self._results.get_nowait())
            while True:
                done.append(self._results.get_nowait())
        except queue.Empty:
            pass
        return [item for item in done if item[0] is not None]

    def close(self) -> None:
        self._tasks.put(None)
        self._thread.join()

    def _work(self) -> None:
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with stream, torch.inference_mode():
            while (task := self._tasks.get()) is not None:
                member, kind, work = task
                try:
                    outcome, error = work(), None
                    if self._stream is not None:
                        self._stream.synchronize()  # the loop's stream may use what this made
                except Exception as exc:  # this request's failure; the thread goes on
                    outcome, error = None, exc
                    _free_memory()
                self._results.put((member, kind, outcome, error))


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
