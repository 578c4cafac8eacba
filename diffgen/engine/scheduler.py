"""The scheduler: a bounded queue of jobs in front of the worker processes (one per GPU).

It lives in the serving process as two kinds of threads doing only bookkeeping (the model never
runs here): a dispatcher that hands batches of compatible waiting jobs to an idle worker, and one
receiver per worker that turns the worker's messages into job progress and results. Several workers
fit behind the same queue: the dispatcher picks any idle ready one (today the server starts one).

Batching: jobs whose requests agree on everything but prompt and seed (same size, steps, guidance,
frames, outputs, input-image use) that wait together go to a worker as one batch of up to
``max_batch_size``. The worker runs a batch as separate pipeline calls, one request after another,
so a batched result is identical to the same request run alone; the batch is the unit of dispatch
(one round trip per batch) and the place where true tensor batching can be added later.

Failures: a request that fails in the worker fails alone. If a worker process dies, the jobs it held
fail with a clear message and the worker is restarted (the model is loaded again); jobs still waiting
in the queue run on the new worker. Restarts are limited to ``max_restarts`` within ``restart_window``
seconds; when no worker is left alive or restartable (that limit reached, or a restarted worker fails to
load the model), the waiting jobs fail with code ``worker_died`` and new submissions are refused.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import multiprocessing as mp
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diffgen.engine.metrics import Metrics
from diffgen.engine.request import GenerationRequest, stage_seconds
from diffgen.engine.worker import ModelInfo, WorkerOutput, worker_main

logger = logging.getLogger(__name__)


class JobError(Exception):
    """A job did not produce a result. ``code``: cancelled, out_of_memory, invalid_request,
    generation_error, worker_died, shutdown."""

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

    @property
    def batch_key(self) -> tuple:
        r = self.request
        return (r.height, r.width, r.num_inference_steps, r.guidance_scale, r.true_cfg_scale, r.num_frames,
                r.fps, r.max_sequence_length, r.num_outputs_per_prompt, len(r.prompt), bool(r.images),
                r.negative_prompt is not None)


class _Worker:
    """The serving process's handle on one worker process and its queues."""

    def __init__(self, index: int, options: dict[str, Any]):
        ctx = mp.get_context("spawn")
        self.index = index
        self.inbox = ctx.Queue()
        self.outbox = ctx.Queue()
        self.process = ctx.Process(target=worker_main, args=(index, options, self.inbox, self.outbox),
                                   name=f"diffgen-worker-{index}", daemon=True)
        self.ready = False
        self.gone = False  # exited or failed to load; a new _Worker replaces it on restart
        self.load_error: str | None = None
        self.batch: dict[str, Job] = {}  # jobs sent and not yet finished
        self.batch_id: str | None = None
        self.receiver: threading.Thread | None = None


class Scheduler:
    """Queue, batching, cancellation and worker supervision. Thread-safe."""

    def __init__(self, options: dict[str, Any], max_queue: int = 64, max_batch_size: int = 4,
                 num_workers: int = 1, max_restarts: int = 5, restart_window: float = 600.0,
                 metrics: Metrics | None = None):
        self.options = dict(options, num_workers=num_workers)
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.metrics = metrics or Metrics()
        self.model_info: ModelInfo | None = None
        self.restarts = 0  # over the server's lifetime, for /health
        self._restart_times: deque[float] = deque()  # recent restarts, for the limit
        self._num_workers = num_workers
        self._workers: list[_Worker] = []
        self._waiting: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = False
        self._cancelled_by_shutdown: set[str] = set()
        self._seconds_per_job = 1.0  # running average, for the Retry-After hint
        self._describe_metrics()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            for index in range(self._num_workers):
                self._start_worker(index)
        threading.Thread(target=self._dispatch_loop, name="scheduler-dispatch", daemon=True).start()

    def _start_worker(self, index: int) -> None:
        worker = _Worker(index, self.options)
        if index < len(self._workers):
            self._workers[index] = worker
        else:
            self._workers.append(worker)
        worker.process.start()
        worker.receiver = threading.Thread(target=self._receive_loop, args=(worker,), name=f"scheduler-recv-{index}",
                                           daemon=True)
        worker.receiver.start()

    @property
    def ready(self) -> bool:
        with self._lock:
            return not self._stopping and any(w.ready for w in self._workers)

    @property
    def failed(self) -> bool:
        """No worker is alive, loading or being restarted, and none will be: only a server restart helps."""
        with self._lock:
            return not self._stopping and bool(self._workers) and all(w.gone for w in self._workers)

    @property
    def load_error(self) -> str | None:
        with self._lock:
            errors = [w.load_error for w in self._workers if w.load_error]
            return errors[0] if errors else None

    def worker_pids(self) -> list[int | None]:
        with self._lock:
            return [w.process.pid for w in self._workers]

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._waiting)

    def running_count(self) -> int:
        with self._lock:
            return sum(len(w.batch) for w in self._workers)

    def shutdown(self, timeout: float = 30.0, grace: float = 5.0) -> None:
        """Stop accepting; let queued and running jobs finish for up to ``timeout`` seconds, then
        cancel what is left, fail it with a clear reason and stop the workers. Cancelled jobs and the
        workers get ``grace`` seconds in all to stop before the workers are killed, so this returns
        within about ``timeout + grace`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
            while self._jobs and time.monotonic() < deadline and any(not w.gone for w in self._workers):
                self._changed.wait(timeout=0.2)
            leftovers = list(self._waiting)
            self._waiting.clear()
            for worker in self._workers:
                for job_id in worker.batch:
                    self._cancelled_by_shutdown.add(job_id)
                    worker.inbox.put(("cancel", job_id))
        for job in leftovers:
            self._finish(job, error=JobError("shutdown", "the server shut down before this job started"))
        grace_end = time.monotonic() + grace
        with self._lock:  # cancelled jobs stop at the next denoising step
            while any(w.batch for w in self._workers if not w.gone) and time.monotonic() < grace_end:
                self._changed.wait(timeout=0.2)
            workers = list(self._workers)
        for worker in workers:
            if worker.process.is_alive():
                worker.inbox.put(("stop",))
        for worker in workers:
            worker.process.join(timeout=max(1.0, grace_end - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
        with self._lock:
            remaining = [job for w in workers for job in w.batch.values()]
            for w in workers:
                w.batch.clear()
        for job in remaining:
            self._finish(job, error=JobError("shutdown", "the server shut down while this job was running"))

    def close(self) -> None:
        """After ``shutdown``: release the workers' queues now. Their semaphores are otherwise released by
        finalizers at interpreter exit, which `diffgen serve` skips (uvicorn ends it by re-raising the
        signal), and the resource tracker then warns about "leaked semaphore objects"."""
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            if worker.receiver is not None:
                worker.receiver.join(timeout=5)  # it returns once it sees the process gone
            for channel in (worker.inbox, worker.outbox):
                channel.close()
                channel.join_thread()
        workers.clear()  # the last references: the queues' semaphores are unlinked as they are collected

    # -- jobs ----------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, listener: JobListener | None = None,
               job_id: str | None = None) -> Job:
        """Queue a request; its ``future`` gives a WorkerOutput or raises JobError."""
        job = Job(id=job_id or uuid.uuid4().hex, request=request, listener=listener)
        with self._lock:
            if self._stopping:
                raise NotReadyError("the server is shutting down")
            if not any(w.ready for w in self._workers):
                raise NotReadyError(self.load_error or "the model is not loaded yet")
            if len(self._waiting) >= self.max_queue:
                self.metrics.inc("diffgen_rejected_total", reason="queue_full")
                raise QueueFullError(self._retry_after())
            self._waiting.append(job)
            self._jobs[job.id] = job
            self._changed.notify_all()
        return job

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False when it is unknown or already finished."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return False
            if job.state == "queued":
                self._waiting.remove(job)
            else:
                self._workers[job.worker].inbox.put(("cancel", job_id))
                return True  # the worker reports the cancellation at its next step
        self._finish(job, error=JobError("cancelled", "the job was cancelled"))
        return True

    def _retry_after(self) -> int:
        workers = max(1, sum(w.ready for w in self._workers))
        return max(1, math.ceil(self._seconds_per_job * len(self._waiting) / workers))

    def _finish(self, job: Job, output: WorkerOutput | None = None, error: JobError | None = None) -> None:
        with self._lock:
            if job.state == "finished":
                return
            job.state = "finished"
            self._jobs.pop(job.id, None)
            self._changed.notify_all()
        status = "completed" if error is None else error.code
        self.metrics.inc("diffgen_jobs_total", status=status)
        # The future may have been cancelled by its awaiter (asyncio.wrap_future cancels it when the
        # HTTP task is cancelled); setting it then raises InvalidStateError, and nobody wants the outcome.
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if error is None:
                job.future.set_result(output)
            else:
                job.future.set_exception(error)

    # -- threads -------------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while True:
            with self._lock:
                worker = self._idle_worker()
                while not (worker is not None and self._waiting) and not (self._stopping and not self._jobs):
                    self._changed.wait(timeout=1.0)
                    worker = self._idle_worker()
                if self._stopping and not self._jobs:
                    return
                batch = self._take_batch()
                batch_id = uuid.uuid4().hex
                for job in batch:
                    job.state, job.worker = "running", worker.index
                    worker.batch[job.id] = job
                worker.batch_id = batch_id
                worker.inbox.put(("run", batch_id, [(job.id, job.request) for job in batch]))
                self.metrics.inc("diffgen_batches_total")
                self.metrics.inc("diffgen_batched_jobs_total", len(batch))

    def _idle_worker(self) -> _Worker | None:
        for worker in self._workers:
            if worker.ready and not worker.gone and worker.batch_id is None:
                return worker
        return None

    def _take_batch(self) -> list[Job]:
        first = self._waiting.popleft()
        batch = [first]
        for job in list(self._waiting):
            if len(batch) >= self.max_batch_size:
                break
            if job.batch_key == first.batch_key:
                self._waiting.remove(job)
                batch.append(job)
        return batch

    def _receive_loop(self, worker: _Worker) -> None:
        while True:
            try:
                message = worker.outbox.get(timeout=0.5)
            except queue.Empty:
                if not worker.process.is_alive():
                    self._on_worker_exit(worker)
                    return
                continue
            except (EOFError, OSError):
                self._on_worker_exit(worker)
                return
            try:
                if self._handle(worker, message):
                    return
            except Exception:  # a bug here must not silence the worker's later messages
                logger.exception("scheduler: cannot handle worker message %r", message[:2])

    def _handle(self, worker: _Worker, message: tuple) -> bool:
        kind = message[0]
        if kind == "ready":
            with self._lock:
                self.model_info = self.model_info or message[1]
                worker.ready = True
                self._changed.notify_all()
            logger.info("worker %d ready: %s on %s", worker.index, message[1].name, message[1].device)
        elif kind == "load_failed":
            logger.error("worker %d failed to load the model: %s", worker.index, message[1])
            with self._lock:
                worker.load_error = f"the model failed to load: {message[1]}"
                worker.gone = True
                self._changed.notify_all()
            self._fail_waiting_without_workers()
            return True
        elif kind in ("started", "progress", "done", "failed"):
            job = worker.batch.get(message[1])
            if job is None:
                return False
            if kind == "started":
                job.started_at = time.monotonic()
                self.metrics.observe("diffgen_queue_wait_seconds", job.started_at - job.submitted_at)
            elif kind == "progress":
                job.step, job.total_steps = message[2], message[3]
                self.metrics.observe("diffgen_step_seconds", message[4])
            elif kind == "done":
                output: WorkerOutput = message[2]
                for stage, seconds in stage_seconds(output.timings).items():
                    self.metrics.observe("diffgen_stage_seconds", seconds, stage=stage)
                elapsed = time.monotonic() - (job.started_at or job.submitted_at)
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed
            if kind in ("started", "progress"):
                if job.listener is not None:
                    job.listener(kind, job)
                return False
            with self._lock:
                worker.batch.pop(job.id, None)
            if kind == "done":
                self._finish(job, output=message[2])
            elif message[2] == "cancelled" and job.id in self._cancelled_by_shutdown:
                self._finish(job, error=JobError("shutdown", "the server shut down while this job was running"))
            else:
                self._finish(job, error=JobError(message[2], message[3], message[4]))
        elif kind == "batch_done":
            with self._lock:
                worker.batch_id = None
                self._changed.notify_all()
        return False

    def _on_worker_exit(self, worker: _Worker) -> None:
        code = worker.process.exitcode
        with self._lock:
            was_ready = worker.ready
            worker.ready, worker.gone = False, True
            lost = list(worker.batch.values())
            worker.batch.clear()
            worker.batch_id = None
            restart = not self._stopping and worker.load_error is None and self._may_restart()
            if not restart and not self._stopping and worker.load_error is None:
                worker.load_error = (
                    f"the worker process died (exit code {code}) and was already restarted {self.max_restarts} "
                    f"time(s) within {self.restart_window:g} s; it is not restarted again (restart the server)")
            if restart:  # replaced under the lock: no moment without a live or loading worker
                self.restarts += 1
                self._restart_times.append(time.monotonic())
                self._start_worker(worker.index)
            self._changed.notify_all()
        if lost or (was_ready and not self._stopping):  # a worker told to stop is no news
            logger.error("worker %d exited (code %s) holding %d job(s)", worker.index, code, len(lost))
        then = "the server restarts it" if restart else "it is not restarted"
        for job in lost:
            self._finish(job, error=JobError(
                "worker_died", f"the worker process died (exit code {code}) while running this request; {then}"))
        if restart:
            self.metrics.inc("diffgen_worker_restarts_total")
        else:
            self._fail_waiting_without_workers()

    def _may_restart(self) -> bool:
        """Whether another restart fits in the limit: ``max_restarts`` within ``restart_window`` seconds
        (a worker that crashes in a loop gives up; one crash a day does not add up over weeks)."""
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > self.restart_window:
            self._restart_times.popleft()
        return len(self._restart_times) < self.max_restarts

    def _fail_waiting_without_workers(self) -> None:
        """With no worker alive, loading or about to be restarted, nothing will run the waiting jobs:
        fail them now instead of leaving their requests hanging. (During shutdown, shutdown does it.)"""
        with self._lock:
            if self._stopping or any(not w.gone for w in self._workers):
                return
            reason = self.load_error or "no worker process is left"
            waiting = list(self._waiting)
            self._waiting.clear()
        for job in waiting:
            self._finish(job, error=JobError("worker_died", f"no worker can run this request: {reason}"))

    def _describe_metrics(self) -> None:
        m = self.metrics
        m.describe("diffgen_queue_depth", "gauge", "Jobs waiting for a worker")
        m.describe("diffgen_running_jobs", "gauge", "Jobs sent to a worker and not finished")
        m.describe("diffgen_worker_ready", "gauge", "Workers with the model loaded")
        m.describe("diffgen_jobs_total", "counter", "Finished jobs by outcome")
        m.describe("diffgen_rejected_total", "counter", "Submissions refused before queueing")
        m.describe("diffgen_worker_restarts_total", "counter", "Worker processes restarted after dying")
        m.describe("diffgen_step_seconds", "histogram", "Seconds per denoising step")
        m.describe("diffgen_stage_seconds", "histogram", "Seconds per pipeline stage")
        m.describe("diffgen_queue_wait_seconds", "histogram", "Seconds from submission to start")
        m.describe("diffgen_batches_total", "counter", "Batches dispatched to workers")
        m.describe("diffgen_batched_jobs_total", "counter", "Jobs dispatched (divide by batches: mean batch size)")
        m.gauge("diffgen_queue_depth", self.queue_depth)
        m.gauge("diffgen_running_jobs", self.running_count)
        m.gauge("diffgen_worker_ready", lambda: sum(w.ready for w in list(self._workers)))
