"""Executors: where an Engine's requests run. One interface, two kinds.

- :class:`InProcessExecutor` runs a loaded pipeline in the calling thread (CLI and Python API).
- :class:`~diffgen.engine.scheduler.ProcessExecutor` keeps a bounded queue in front of worker
  processes that hold the model (``diffgen serve``).

Both take ``submit(request, listener=None, job_id=None) -> Job``; a :class:`Job` reports progress
(``step`` / ``total_steps`` and the listener's "started" / "progress" events), is cancelled with
``cancel()`` (between denoising steps once running) and gives its :class:`GenerationResult` with
``result()``. The request handed to ``submit`` is already resolved (the Engine does it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diffgen.engine.request import GenerationRequest, GenerationResult
from diffgen.engine.spec import ModelSpec

if TYPE_CHECKING:
    from diffgen.engine.lora import LoRAChange
    from diffgen.pipelines.base import ComposedPipeline


class JobError(Exception):
    """A job of a process executor did not produce a result. ``code``: cancelled, out_of_memory,
    invalid_request, generation_error, worker_died, shutdown."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


class QueueFullError(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class NotReadyError(Exception):
    """No worker has the model loaded (still loading, restarting, failed or shutting down)."""


JobListener = Callable[[str, "Job"], None]  # event name ("started" / "progress"), job


@dataclass
class Job:
    """A submitted request: its progress, its outcome (``future``) and the way to cancel it."""

    id: str
    request: GenerationRequest
    listener: JobListener | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    state: str = "queued"  # queued -> running -> finished
    worker: int | None = None
    step: int = 0
    total_steps: int = 0
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    #: the latest latent preview ((B, F, h, w, 3) uint8) and the step it shows; see GenerationRequest.preview_every
    preview: Any = field(default=None, repr=False)
    preview_step: int = 0
    #: set by cancel(); an in-process job stops at its next denoising step
    cancel_requested: bool = False
    _cancel: Callable[[str], bool] | None = field(default=None, repr=False)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The outcome: a GenerationResult, or the job's error raised (JobError for worker processes)."""
        return self.future.result(timeout)

    def cancel(self) -> bool:
        """Cancel the job if it is queued or running; False when it already finished."""
        return self._cancel(self.id) if self._cancel is not None else False

    def done(self) -> bool:
        return self.future.done()

    @property
    def batch_key(self) -> tuple:
        """Requests with the same key may share denoising forwards in a worker (same size, frames, LoRA scales and
        step cache; any prompt, seed, guidance or step count). The worker's pipeline has the last word
        (``ComposedPipeline.batch_key``): what it refuses to share waits there for the batch to drain."""
        r = self.request
        return (r.height, r.width, r.num_frames, r.cache, r.cache_threshold,
                tuple(sorted(r.loras.items())) if r.loras is not None else None)

    def notify(self, event: str) -> None:
        if self.listener is not None:
            self.listener(event, self)


@dataclass
class ExecutorStatus:
    """What /health and /metrics show. ``failed``: no worker is or will be ready (load error, restart limit)."""

    ready: bool
    failed: bool = False
    load_error: str | None = None
    queue_depth: int = 0
    running: int = 0
    restarts: int = 0
    worker_pids: list[int | None] = field(default_factory=list)
    device: str | None = None
    dit_precision: str | None = None  # the DiT's dtype, or "fp8" when quantized
    vae_precision: str | None = None
    # workers that are groups of ranks (one process per GPU): {"worker": index, "plan": ..., "rank_pids": [...]}
    worker_groups: list[dict] = field(default_factory=list)


class Executor:
    """The interface every executor implements (see the module docstring)."""

    #: the served model's spec; None until it is known (a process executor learns it at start)
    spec: ModelSpec | None = None

    def start(self) -> None:
        """Start workers (if any); returns at once, the model may still be loading."""

    def submit(self, request: GenerationRequest, listener: JobListener | None = None,
               job_id: str | None = None) -> Job:
        raise NotImplementedError

    def cancel(self, job_id: str) -> bool:
        raise NotImplementedError

    def submit_many(self, requests: list[GenerationRequest], listener: JobListener | None = None) -> list[Job]:
        """Submit several (resolved) requests at once; an executor that batches runs them together."""
        return [self.submit(request, listener=listener) for request in requests]

    def status(self) -> ExecutorStatus:
        raise NotImplementedError

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the model is loaded (True) or cannot be (False)."""
        return True

    def shutdown(self, timeout: float = 30.0, grace: float = 5.0) -> None:
        """Stop accepting; let jobs finish for up to ``timeout`` seconds, then cancel the rest."""

    def close(self) -> None:
        """After ``shutdown``: release what the executor holds (queues of worker processes)."""

    #: how LoRAs are applied: "merged" or "dynamic" (the engine's lora_mode)
    lora_mode: str = "merged"

    def change_loras(self, change: LoRAChange) -> list[dict[str, Any]]:
        """Make ``change`` wherever the model is held (every worker, every rank), between requests; returns
        the loaded LoRAs after it. InvalidRequestError when it cannot be made; then nothing changed."""
        raise NotImplementedError

    def loras(self) -> list[dict[str, Any]]:
        """The loaded LoRAs, in load order (rows of ``LoRAManager.describe``)."""
        raise NotImplementedError


class ModelUse:
    """Who uses a loaded model: requests share it; a LoRA change waits until the running requests end and
    holds new ones back until it is made (a request never sees weights change under it)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._requests = 0
        self._changes_waiting = 0
        self._changing = False

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        with self._condition:
            while self._changing or self._changes_waiting:
                self._condition.wait()
            self._requests += 1
        try:
            yield
        finally:
            with self._condition:
                self._requests -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def change(self) -> Iterator[None]:
        with self._condition:
            self._changes_waiting += 1
            while self._changing or self._requests:
                self._condition.wait()
            self._changes_waiting -= 1
            self._changing = True
        try:
            yield
        finally:
            with self._condition:
                self._changing = False
                self._condition.notify_all()


class InProcessExecutor(Executor):
    """Runs a loaded pipeline in the caller's thread: ``submit`` returns a finished job.

    Errors are the pipeline's own (InvalidRequestError, CancelledError, ...), raised by ``result()``.
    Another thread may ``cancel`` a running job; it stops at the next denoising step.
    """

    def __init__(self, pipeline: ComposedPipeline):
        self.pipeline = pipeline
        self.spec = pipeline.spec
        self._running: dict[str, Job] = {}
        self._use = ModelUse()

    def submit(self, request: GenerationRequest, listener: JobListener | None = None,
               job_id: str | None = None, is_cancelled: Callable[[], bool] | None = None) -> Job:
        return run_in_caller(self._run, request, listener, job_id, is_cancelled, self.cancel, self._running)

    def _run(self, request: GenerationRequest, **kwargs: Any) -> GenerationResult:
        with self._use.request():
            return self.pipeline.run(request, **kwargs)

    @property
    def lora_mode(self) -> str:
        return self.pipeline.loras.mode if self.pipeline.loras is not None else "merged"

    def change_loras(self, change: LoRAChange) -> list[dict[str, Any]]:
        from diffgen.engine.lora import apply_lora_change

        with self._use.change():
            return apply_lora_change(self.pipeline, change)

    def loras(self) -> list[dict[str, Any]]:
        from diffgen.engine.lora import describe_loras

        return describe_loras(self.pipeline)

    def cancel(self, job_id: str) -> bool:
        job = self._running.get(job_id)
        if job is None:
            return False
        job.cancel_requested = True
        return True

    def submit_many(self, requests: list[GenerationRequest], listener: JobListener | None = None,
                    max_batch_size: int | None = None) -> list[Job]:
        """Run the requests in the caller's thread, compatible ones sharing each denoising forward (up to
        ``max_batch_size``, default all); returns their finished Jobs. One request's failure is its own."""
        from diffgen.engine.batching import BatchMember, ContinuousBatcher

        batcher = ContinuousBatcher(self.pipeline, max_batch_size or len(requests))
        jobs = []
        for request in requests:
            job = Job(id=uuid.uuid4().hex, request=request, listener=listener, _cancel=self.cancel)
            self._running[job.id] = job
            jobs.append(job)
            batcher.add(BatchMember(
                job.id, request, on_done=_settle(job, self._running),
                on_failed=_settle(job, self._running, failed=True), progress=_job_progress(job),
                is_cancelled=lambda job=job: job.cancel_requested, on_start=lambda job=job: _job_started(job)))
        batcher.run_until_idle()
        return jobs

    def status(self) -> ExecutorStatus:
        return ExecutorStatus(ready=True, running=len(self._running), device=str(self.pipeline.device))


def _job_started(job: Job) -> None:
    job.state, job.started_at = "running", time.monotonic()
    job.notify("started")


def _job_progress(job: Job) -> Callable[..., None]:
    def progress(step: int, total: int, preview=None) -> None:
        job.step, job.total_steps = step, total
        if preview is not None:
            job.preview, job.preview_step = preview, step
        job.notify("progress")
    return progress


def _settle(job: Job, running: dict[str, Job], failed: bool = False) -> Callable[[Any], None]:
    def settle(outcome: Any) -> None:
        job.state = "finished"
        running.pop(job.id, None)
        if failed:
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
    return settle


def run_in_caller(run: Callable[..., Any], request: GenerationRequest, listener: JobListener | None,
                  job_id: str | None, is_cancelled: Callable[[], bool] | None, cancel: Callable[[str], Any],
                  running: dict[str, Job]) -> Job:
    """Run ``request`` in the calling thread through ``run(request, progress=, is_cancelled=)``; returns the
    finished Job. Shared by the executors that run a request synchronously (in-process, worker group)."""
    job = Job(id=job_id or uuid.uuid4().hex, request=request, listener=listener, _cancel=cancel)
    running[job.id] = job
    _job_started(job)
    progress = _job_progress(job)

    def cancelled() -> bool:
        return job.cancel_requested or (is_cancelled is not None and is_cancelled())

    try:
        job.future.set_result(run(request, progress=progress, is_cancelled=cancelled))
    except Exception as error:
        job.future.set_exception(error)
    finally:
        job.state = "finished"
        running.pop(job.id, None)
    return job
