"""The process executor: a bounded queue of jobs (the scheduler) in front of worker processes.

It lives in the serving process as two kinds of threads doing only bookkeeping (the model never
runs here): a dispatcher that hands batches of compatible waiting jobs to an idle worker, and one
receiver per worker that turns the worker's messages (diffgen.engine.messages) into job progress and
results. Several workers fit behind the same queue: the dispatcher picks any idle ready one (``diffgen
serve`` starts one; data-parallel replicas are more). A "worker" is whatever ``worker_factory`` makes:
one process today; a group of processes (one per GPU, rank 0 receiving the executor's messages and
answering for the group) fits the same :class:`WorkerHandle` interface.

Batching (step-level, continuous): jobs that may share denoising forwards (same size, frames and LoRA
scales: ``Job.batch_key``; prompts, seeds, guidance and step counts may differ) go to a worker
together, up to the capacity it reported (``--max-batch-size``, or 1 for a model or worker group that
does not batch). While a worker runs, waiting jobs of its batch's key are sent to it at once and join
its batch between two denoising steps; each leaves when its own steps are done, so a short request
never waits for a long one. Fairness: jobs are taken in arrival order, and once the oldest waiting job
has waited ``--batch-wait-cap`` seconds, no job joins a running batch any more until it has started
(the batches drain and it goes first).

Failures: a request that fails in the worker fails alone. If a worker process dies, the jobs it held
fail with a clear message and the worker is restarted (the model is loaded again); jobs still waiting
in the queue run on the new worker. Restarts are limited to ``max_restarts`` within ``restart_window``
seconds; when no worker is left alive or restartable (that limit reached, or a restarted worker fails to
load the model), the waiting jobs fail with code ``worker_died`` and new submissions are refused.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import multiprocessing as mp
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from diffgen.engine import messages as m
from diffgen.engine.executor import (
    Executor,
    ExecutorStatus,
    Job,
    JobError,
    JobListener,
    NotReadyError,
    QueueFullError,
)
from diffgen.engine.metrics import Metrics
from diffgen.engine.request import GenerationRequest, GenerationResult, stage_seconds
from diffgen.engine.worker import worker_main

logger = logging.getLogger(__name__)

#: how many times dying workers are restarted within ``restart_window`` seconds
DEFAULT_MAX_RESTARTS = 5
MAX_RESTARTS_ENV = "DIFFGEN_MAX_WORKER_RESTARTS"  # test-only override


class WorkerHandle:
    """The serving process's handle on one worker: its queues, its process(es) and the executor's
    bookkeeping (ready, the batch it runs).

    A worker is one process by default. A group of processes that serves as one worker (one process per
    GPU of a tensor/sequence-parallel group) subclasses this and overrides ``spawn``: rank 0 gets
    ``inbox`` / ``outbox`` and answers for the group; the group counts as dead when any of its processes
    is (``is_alive``), and ``kill`` ends all of them.
    """

    def __init__(self, index: int, options: dict[str, Any]):
        ctx = mp.get_context("spawn")
        self.index = index
        self.inbox = ctx.Queue()
        self.outbox = ctx.Queue()
        self.processes = self.spawn(ctx, options)
        self.ready = False
        self.gone = False  # exited or failed to load; a new handle replaces it on restart
        self.load_error: str | None = None
        self.batch: dict[str, Job] = {}  # jobs sent and not yet finished
        self.batch_id: str | None = None
        self.capacity = 1  # jobs it denoises together at most (from its Ready message)
        self.batch_key: tuple | None = None  # the key of the jobs it runs
        self.receiver: threading.Thread | None = None  # the executor's thread reading ``outbox``
        self.loras: tuple[dict[str, Any], ...] = ()  # the LoRAs it holds, as it last reported them
        self.group: dict | None = None  # a worker that is a group of ranks: its plan and rank pids, once ready

    def spawn(self, ctx: Any, options: dict[str, Any]) -> list[Any]:
        """The (not yet started) processes of this worker; the first one talks to the executor."""
        return [ctx.Process(target=worker_main, args=(self.index, options, self.inbox, self.outbox),
                            name=f"diffgen-worker-{self.index}", daemon=True)]

    def start(self) -> None:
        for process in self.processes:
            process.start()

    def is_alive(self) -> bool:
        return all(process.is_alive() for process in self.processes)

    @property
    def exitcode(self) -> int | None:
        return next((p.exitcode for p in self.processes if p.exitcode is not None), None)

    @property
    def pids(self) -> list[int | None]:
        return [process.pid for process in self.processes]

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for process in self.processes:
            process.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


WorkerFactory = Callable[[int, dict[str, Any]], WorkerHandle]


class ProcessExecutor(Executor):
    """Queue, batching, cancellation and worker supervision. Thread-safe.

    ``options``: {"model_path": ..., "engine_options": {...}}, handed to every worker.
    """

    def __init__(self, options: dict[str, Any], max_queue: int | None = None, max_batch_size: int | None = None,
                 num_workers: int = 1, max_restarts: int | None = None, restart_window: float = 600.0,
                 metrics: Metrics | None = None, worker_factory: WorkerFactory = WorkerHandle,
                 batch_wait_cap: float | None = None):
        from diffgen.options import option

        max_queue = option("max_queue").default if max_queue is None else max_queue
        max_batch_size = option("max_batch_size").default if max_batch_size is None else max_batch_size
        self.batch_wait_cap = option("batch_wait_cap").default if batch_wait_cap is None else batch_wait_cap
        if max_restarts is None:  # test-only override of the default (docs/server.md)
            max_restarts = int(os.environ.get(MAX_RESTARTS_ENV, DEFAULT_MAX_RESTARTS))
        self.options = dict(options, num_workers=num_workers, max_batch_size=max_batch_size)
        self.worker_factory = worker_factory
        self.spec = None
        self.device: str | None = None
        self.precisions: tuple[str, str] | None = None  # (DiT, VAE) of the loaded model, for model cards
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.metrics = metrics or Metrics()
        self.restarts = 0  # over the server's lifetime, for /health
        self._restart_times: deque[float] = deque()  # recent restarts, for the limit
        self._num_workers = num_workers
        self._workers: list[WorkerHandle] = []
        self._waiting: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = False
        self._started = False
        self._cancelled_by_shutdown: set[str] = set()
        self._seconds_per_job = 1.0  # running average, for the Retry-After hint
        self.lora_mode = options.get("engine_options", {}).get("lora_mode") or "merged"
        #: the LoRAs every worker must hold once a change was made (None: what the workers loaded at start);
        #: a (re)started worker is brought to it before it gets any batch
        self._loras: list[dict[str, Any]] | None = None
        self._lora_changes: dict[str, dict[int, concurrent.futures.Future]] = {}  # in flight: worker -> reply
        self._lora_lock = threading.Lock()  # one change at a time
        self._describe_metrics()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            for index in range(self._num_workers):
                self._start_worker(index)
        threading.Thread(target=self._dispatch_loop, name="scheduler-dispatch", daemon=True).start()

    def _start_worker(self, index: int) -> None:
        worker = self.worker_factory(index, self.options)
        if index < len(self._workers):
            self._workers[index] = worker
        else:
            self._workers.append(worker)
        worker.start()
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
            return [pid for w in self._workers for pid in w.pids]

    def status(self) -> ExecutorStatus:
        return ExecutorStatus(ready=self.ready, failed=self.failed, load_error=self.load_error,
                              queue_depth=self.queue_depth(), running=self.running_count(), restarts=self.restarts,
                              worker_pids=self.worker_pids(), device=self.device,
                              dit_precision=self.precisions[0] if self.precisions else None,
                              vae_precision=self.precisions[1] if self.precisions else None,
                              worker_groups=self.worker_groups())

    def worker_groups(self) -> list[dict]:
        with self._lock:
            return [dict(w.group, worker=w.index) for w in self._workers if w.group is not None]

    def wait_loaded(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not any(w.ready for w in self._workers) and not self.failed and not self._stopping:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._changed.wait(timeout=0.2 if left is None else min(0.2, left))
            return any(w.ready for w in self._workers)

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
                    worker.inbox.put(m.Cancel(job_id))
        for job in leftovers:
            self._finish(job, error=JobError("shutdown", "the server shut down before this job started"))
        grace_end = time.monotonic() + grace
        with self._lock:  # cancelled jobs stop at the next denoising step
            while any(w.batch for w in self._workers if not w.gone) and time.monotonic() < grace_end:
                self._changed.wait(timeout=0.2)
            workers = list(self._workers)
        for worker in workers:
            if worker.is_alive():
                worker.inbox.put(m.Stop())
        for worker in workers:
            worker.join(timeout=max(1.0, grace_end - time.monotonic()))
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
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
        """Queue a (resolved) request; its ``future`` gives a GenerationResult or raises JobError."""
        job = Job(id=job_id or uuid.uuid4().hex, request=request, listener=listener, _cancel=self.cancel)
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
                job.cancel_requested = True
                self._workers[job.worker].inbox.put(m.Cancel(job_id))
                return True  # the worker reports the cancellation at its next step
        self._finish(job, error=JobError("cancelled", "the job was cancelled"))
        return True

    # -- LoRAs --------------------------------------------------------------------------------
    def change_loras(self, change: Any) -> list[dict[str, Any]]:
        """Make ``change`` on every ready worker, after the batch each is running; returns the LoRAs then
        loaded. A worker that refuses it (a bad file) makes the change a failure everywhere: the workers
        that made it are set back, and the error is raised (InvalidRequestError)."""
        from diffgen.engine.lora import LoRAChange
        from diffgen.errors import DiffgenError, InvalidRequestError

        with self._lora_lock:
            change_id = uuid.uuid4().hex
            with self._lock:
                if self._stopping:
                    raise NotReadyError("the server is shutting down")
                targets = [w for w in self._workers if w.ready and not w.gone]
                if not targets:
                    raise NotReadyError(self.load_error or "the model is not loaded yet")
                before = {id(w): list(w.loras) for w in targets}
                pending = {w.index: concurrent.futures.Future() for w in targets}
                self._lora_changes[change_id] = pending
                for worker in targets:  # behind the batches already sent: made between two batches
                    worker.inbox.put(m.ChangeLoRAs(change_id, change))
            try:
                replies = {w: pending[w.index].result() for w in targets}
            finally:
                with self._lock:
                    del self._lora_changes[change_id]
            # None: the worker died meanwhile; its replacement catches up when it is ready
            answered = {w: reply for w, reply in replies.items() if reply is not None}
            refused = [reply for reply in answered.values() if reply.error is not None]
            with self._lock:
                if refused:
                    for worker, reply in answered.items():
                        if reply.error is None:  # made here, refused elsewhere: set back
                            worker.inbox.put(m.ChangeLoRAs(None, LoRAChange.sync(before[id(worker)])))
                    error = refused[0]
                    raise InvalidRequestError(error.param, error.error) if error.param else DiffgenError(error.error)
                if not answered:
                    raise NotReadyError("the workers stopped while changing LoRAs; retry once they are back")
                self._loras = list(next(iter(answered.values())).loras)
                for worker in self._workers:  # ready meanwhile (a restart), with the LoRAs of before
                    if worker.ready and not worker.gone and worker not in answered:
                        worker.inbox.put(m.ChangeLoRAs(None, LoRAChange.sync(self._loras)))
                return list(self._loras)

    def loras(self) -> list[dict[str, Any]]:
        with self._lock:
            if self._loras is not None:
                return list(self._loras)
            ready = [w for w in self._workers if w.ready and not w.gone]
            if not ready:
                raise NotReadyError(self.load_error or "the model is not loaded yet")
            return list(ready[0].loras)

    def _retry_after(self) -> int:
        workers = max(1, sum(w.ready for w in self._workers))
        return max(1, math.ceil(self._seconds_per_job * len(self._waiting) / workers))

    def _finish(self, job: Job, output: GenerationResult | None = None, error: JobError | None = None) -> None:
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
                plan = self._next_dispatch()
                while plan is None and not (self._stopping and not self._jobs):
                    self._changed.wait(timeout=0.5)  # also lets the wait cap take effect as time passes
                    plan = self._next_dispatch()
                if plan is None:
                    return
                worker, batch = plan
                batch_id = uuid.uuid4().hex
                for job in batch:
                    job.state, job.worker = "running", worker.index
                    worker.batch[job.id] = job
                worker.batch_id, worker.batch_key = batch_id, batch[0].batch_key
                worker.inbox.put(m.RunBatch(batch_id, tuple(m.QueuedRequest(job.id, job.request) for job in batch)))
                self.metrics.inc("diffgen_batches_total")
                self.metrics.inc("diffgen_batched_jobs_total", len(batch))

    def _next_dispatch(self) -> tuple[WorkerHandle, list[Job]] | None:
        """(worker, jobs) to send now, or None: an idle worker takes the oldest job and those that may share its
        forwards (with several idle replicas, its share of the waiting jobs: one GPU per job beats one batch);
        a running one, the least busy first, takes waiting jobs of its key that fit (unless the oldest waited
        too long)."""
        if not self._waiting:
            return None
        live = [w for w in self._workers if w.ready and not w.gone]
        idle = [w for w in live if not w.batch]
        if idle:
            limit = min(idle[0].capacity, self.max_batch_size)
            if len(idle) > 1:  # replicas: spread the waiting jobs over the idle ones rather than batch them on one
                limit = min(limit, math.ceil(len(self._waiting) / len(idle)))
            return idle[0], self._take_batch(limit)
        if time.monotonic() - self._waiting[0].submitted_at > self.batch_wait_cap:
            return None  # no more joining: the running batches drain and the oldest job goes next
        for worker in sorted(live, key=lambda w: len(w.batch)):  # the least busy replica first
            room = min(worker.capacity, self.max_batch_size) - len(worker.batch)
            if room <= 0:
                continue
            joining = [job for job in self._waiting if job.batch_key == worker.batch_key][:room]
            if joining:
                for job in joining:
                    self._waiting.remove(job)
                return worker, joining
        return None

    def _take_batch(self, limit: int | None = None) -> list[Job]:
        limit = self.max_batch_size if limit is None else limit
        first = self._waiting.popleft()
        batch = [first]
        for job in list(self._waiting):
            if len(batch) >= limit:
                break
            if job.batch_key == first.batch_key:
                self._waiting.remove(job)
                batch.append(job)
        return batch

    def _receive_loop(self, worker: WorkerHandle) -> None:
        while True:
            try:
                message = worker.outbox.get(timeout=0.5)
            except queue.Empty:
                if not worker.is_alive():
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
                logger.exception("scheduler: cannot handle worker message %s", type(message).__name__)

    def _handle(self, worker: WorkerHandle, message: Any) -> bool:
        """Apply one worker message; True when the worker is finished (no more messages will come)."""
        if isinstance(message, m.Ready):
            with self._lock:
                self.spec = self.spec or message.spec
                self.device = self.device or message.device
                self.precisions = self.precisions or (message.dit_precision, message.vae_precision)
                worker.loras = message.loras
                if self._loras is not None and list(message.loras) != self._loras:
                    from diffgen.engine.lora import LoRAChange

                    # a restarted worker loaded the start-up LoRAs: bring it to the current ones first
                    worker.inbox.put(m.ChangeLoRAs(None, LoRAChange.sync(self._loras)))
                if message.parallel_plan is not None:
                    worker.group = {"plan": message.parallel_plan, "rank_pids": list(message.rank_pids)}
                worker.ready, worker.capacity = True, max(1, message.batch_capacity)
                self._changed.notify_all()
            logger.info("worker %d ready: %s on %s", worker.index, message.spec.name, message.device)
            return False
        if isinstance(message, m.LoadFailed):
            logger.error("worker %d failed to load the model: %s", worker.index, message.message)
            with self._lock:
                worker.load_error = f"the model failed to load: {message.message}"
                worker.gone = True
                self._changed.notify_all()
            self._fail_waiting_without_workers()
            return True
        if isinstance(message, m.LoRAsChanged):
            with self._lock:
                worker.loras = message.loras
                reply = self._lora_changes.get(message.change_id, {}).get(worker.index)
            if reply is not None and not reply.done():
                reply.set_result(message)
            elif message.error is not None:
                logger.error("worker %d could not take the current LoRAs: %s", worker.index, message.error)
            return False
        if isinstance(message, m.BatchDone):
            with self._lock:
                if worker.batch_id == message.batch_id:
                    worker.batch_id = None
                self._changed.notify_all()
            return False
        job = worker.batch.get(message.job_id)
        if job is None:
            return False
        if isinstance(message, m.Started):
            job.started_at = time.monotonic()
            self.metrics.observe("diffgen_queue_wait_seconds", job.started_at - job.submitted_at)
            job.notify("started")
            return False
        if isinstance(message, m.Progress):
            job.step, job.total_steps = message.step, message.total
            if message.preview is not None:
                job.preview, job.preview_step = message.preview, message.step
            self.metrics.observe("diffgen_step_seconds", message.step_seconds)
            job.notify("progress")
            return False
        with self._lock:
            worker.batch.pop(job.id, None)
            self._changed.notify_all()  # room in the worker's batch
        if isinstance(message, m.Done):
            for stage, seconds in stage_seconds(message.result.timings).items():
                self.metrics.observe("diffgen_stage_seconds", seconds, stage=stage)
            if "batched_requests" in message.result.timings:
                self.metrics.observe("diffgen_batched_requests", message.result.timings["batched_requests"])
            elapsed = time.monotonic() - (job.started_at or job.submitted_at)
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed
            # The worker sent the outputs only; the request (with its input images) is the front end's.
            self._finish(job, output=dataclasses.replace(message.result, request=job.request))
        elif message.code == "cancelled" and job.id in self._cancelled_by_shutdown:
            self._finish(job, error=JobError("shutdown", "the server shut down while this job was running"))
        else:
            self._finish(job, error=JobError(message.code, message.message, message.param))
        return False

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        code = worker.exitcode
        worker.kill()  # the other processes of a group that lost one
        with self._lock:
            was_ready = worker.ready
            worker.ready, worker.gone = False, True
            for replies in self._lora_changes.values():  # a LoRA change in flight stops waiting for it
                reply = replies.get(worker.index)
                if reply is not None and not reply.done():
                    reply.set_result(None)
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
        m.describe("diffgen_batched_jobs_total", "counter", "Jobs dispatched (divide by batches: jobs sent at once)")
        m.describe("diffgen_batched_requests", "histogram",
                   "Per finished job: the most requests that shared one of its denoising forwards")
        m.gauge("diffgen_queue_depth", self.queue_depth)
        m.gauge("diffgen_running_jobs", self.running_count)
        m.gauge("diffgen_worker_ready", lambda: sum(w.ready for w in list(self._workers)))
