"""The GPU worker: a process that loads one pipeline and runs the batches its executor sends.

The worker is started with the multiprocessing "spawn" context (a fresh interpreter: no CUDA state
or server threads inherited) and talks to the process executor through two queues of typed records
(diffgen.engine.messages):

    inbox  (executor -> worker): RunBatch(batch_id, jobs)   Cancel(job_id)   Stop()
                                 ChangeLoRAs(change_id, change)   (made between batches)
    outbox (worker -> executor): Ready(spec, device, loras) LoadFailed(message)
                                 Started(job_id)            Progress(job_id, step, total, step_seconds, preview)
                                 Done(job_id, GenerationResult)
                                 Failed(job_id, code, message, param)
                                 BatchDone(batch_id)        LoRAsChanged(change_id, loras, error)

A listener thread drains the inbox so that a cancel reaches the worker while a batch runs; the main
thread runs the pipeline and checks the cancel set between denoising steps. A loaded pipeline runs its
jobs through a :class:`~diffgen.engine.batching.ContinuousBatcher`: jobs sent while others run join
the running batch between two denoising steps (up to ``max_batch_size``, the capacity the worker
reports in ``Ready``) and leave when their own steps are done (short requests first: see
``StepPolicy``). ``BatchDone`` follows the last job of each ``RunBatch``. A worker group (several GPUs) runs its jobs
one after another. A failure of one request (any exception, CUDA out of memory included) is reported
for that request only; the loop goes on. The worker holds a loaded pipeline, never an Engine:
Engine -> executor -> worker -> pipeline.

Fault injection, for tests only (docs/server.md): when the worker's environment has
``DIFFGEN_FAULT_INJECT=1`` (a WARNING is logged at start-up), a prompt containing ``[[fault:raise]]``
makes the pipeline call raise, ``[[fault:oom]]`` raise ``torch.cuda.OutOfMemoryError``,
``[[fault:exit]]`` kill the worker process, ``[[fault:slow]]`` add 50 ms to every denoising step and
``[[fault:batch-oom]]`` raise ``torch.cuda.OutOfMemoryError`` from any denoising forward that request
shares with others (alone it runs normally: the batcher's one-by-one retry then succeeds).
Nothing in a request can turn it on; without the variable these markers are ordinary prompt text.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections import deque
from typing import Any

from diffgen.engine.messages import (
    BatchDone,
    Cancel,
    ChangeLoRAs,
    Done,
    Failed,
    LoadFailed,
    LoRAsChanged,
    Progress,
    Ready,
    RunBatch,
    Started,
    Stop,
)

logger = logging.getLogger(__name__)

FAULT_ENV = "DIFFGEN_FAULT_INJECT"


def faults_enabled() -> bool:
    return os.environ.get(FAULT_ENV) == "1"


def worker_main(worker_id: int, options: dict[str, Any], inbox: Any, outbox: Any) -> None:
    """Entry point of a worker process: load the pipeline, then serve batches until told to stop."""
    # The serving process decides when this worker stops (graceful shutdown): a Ctrl-C or a SIGTERM
    # sent to the whole process group must not kill a job midway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("DIFFGEN_LOG_LEVEL", "WARNING"))
    from diffgen.engine.loading import quiet_libraries

    quiet_libraries()
    try:
        pipeline = _load(worker_id, options)
    except BaseException as e:  # report anything: the server must say why it is not ready
        outbox.put(LoadFailed(f"{type(e).__name__}: {e}"))
        return
    quantized = options.get("engine_options", {}).get("quantize")
    loras = tuple(_loras(pipeline))
    group = hasattr(pipeline, "plan")
    capacity = 1 if group or not pipeline.supports_batching else options.get("max_batch_size", 1)
    if group:  # a WorkerGroup: rank 0 reported the dtypes its pipeline loaded in
        outbox.put(Ready(spec=pipeline.spec, device=pipeline.info.device,
                         dit_precision=quantized or pipeline.info.dit_precision,
                         vae_precision=pipeline.info.vae_precision, loras=loras,
                         parallel_plan=pipeline.plan.describe().split(": ", 1)[1],
                         rank_pids=tuple(process.pid for process in pipeline.processes)))
    else:
        outbox.put(Ready(spec=pipeline.spec, device=str(pipeline.device),
                         dit_precision=quantized or str(pipeline.dtype).removeprefix("torch."),
                         vae_precision=str(pipeline.vae.dtype).removeprefix("torch."), loras=loras,
                         batch_capacity=capacity))

    batches: queue.Queue = queue.Queue()
    cancelled: set[str] = set()
    parent = mp.parent_process()

    def listen() -> None:
        while True:
            try:
                message = inbox.get(timeout=1.0)
            except queue.Empty:
                if parent is not None and not parent.is_alive():  # orphaned: the server is gone
                    os._exit(0)
                continue
            if isinstance(message, Cancel):
                cancelled.add(message.job_id)
            else:
                batches.put(message)
                if isinstance(message, Stop):
                    return

    threading.Thread(target=listen, name="worker-inbox", daemon=True).start()
    faults = faults_enabled()
    if faults:
        logger.warning("%s=1: fault injection is ON in worker %d (test-only: [[fault:...]] prompts break requests)",
                       FAULT_ENV, worker_id)
    if not group:
        serve_pipeline(pipeline, capacity, batches, cancelled, outbox, faults)
        return
    while True:
        message = batches.get()
        if isinstance(message, Stop):
            return
        if isinstance(message, ChangeLoRAs):  # between batches: no request is running
            outbox.put(_change_loras(pipeline, message))
            continue
        assert isinstance(message, RunBatch)
        for queued in message.jobs:
            _run_one(pipeline, queued.job_id, queued.request, cancelled, outbox, faults)
            cancelled.discard(queued.job_id)
        outbox.put(BatchDone(message.batch_id))


def serve_pipeline(pipeline, capacity: int, batches: queue.Queue, cancelled: set[str], outbox, faults: bool,
                   policy=None, overlap: bool = False) -> None:
    """The main loop of a worker with a loaded pipeline (also run in a thread by bench/batching.py): take the
    inbox's messages (RunBatch, Stop) between denoising steps, step the batch, answer on ``outbox``.
    ``policy``: the batcher's StepPolicy (default: short requests first); ``overlap``: text encoding and
    decoding beside the denoising loop (off: on a GPU the DiT saturates it gained nothing and slowed short
    requests, docs/benchmarks.md)."""
    from diffgen.engine.batching import ContinuousBatcher

    batcher = ContinuousBatcher(pipeline, capacity, before_batched_forward=_batch_fault if faults else None,
                                policy=policy, overlap=overlap)
    try:
        _serve_loop(pipeline, batcher, batches, cancelled, outbox, faults)
    finally:
        batcher.close()


def _serve_loop(pipeline, batcher, batches: queue.Queue, cancelled: set[str], outbox, faults: bool) -> None:
    unfinished: dict[str, set[str]] = {}  # batch id -> its jobs still running or waiting
    backlog: deque = deque()  # messages taken from the inbox, in order, not yet acted on
    stopping = False

    def settled(batch_id: str, job_id: str) -> None:
        cancelled.discard(job_id)
        unfinished[batch_id].discard(job_id)
        if not unfinished[batch_id]:
            del unfinished[batch_id]
            outbox.put(BatchDone(batch_id))

    while True:
        if batcher.idle and not backlog:
            if stopping:
                return
            backlog.append(batches.get())  # nothing to do until a message comes
        while True:
            try:
                backlog.append(batches.get_nowait())
            except queue.Empty:
                break
        while backlog:
            message = backlog[0]
            if isinstance(message, ChangeLoRAs):
                if not batcher.idle:
                    break  # after the jobs sent before it, never during a request: the batch drains first
                outbox.put(_change_loras(pipeline, message))
            elif isinstance(message, Stop):
                stopping = True
            else:
                assert isinstance(message, RunBatch)
                unfinished[message.batch_id] = {queued.job_id for queued in message.jobs}
                for queued in message.jobs:
                    batcher.add(_member(queued.job_id, queued.request, cancelled, outbox, faults,
                                        lambda batch_id=message.batch_id, job_id=queued.job_id: settled(batch_id,
                                                                                                      job_id)))
            backlog.popleft()
        batcher.run_step()


def _member(job_id: str, request, cancelled: set[str], outbox, faults: bool, settled) -> Any:
    """One job as a member of the worker's batch: its messages to the executor and its cancel flag."""
    from diffgen.engine.batching import BatchMember

    progress = _ProgressReporter(job_id, request, outbox, faults)

    def start() -> None:
        outbox.put(Started(job_id))
        progress.restart()
        if faults:
            _inject_fault(request)

    def done(result) -> None:
        outbox.put(Done(job_id, _outputs_only(result)))
        settled()

    def failed(error: BaseException) -> None:
        outbox.put(_failure(job_id, error))
        settled()
        _free_memory()

    return BatchMember(job_id, request, on_done=done, on_failed=failed, progress=progress,
                       is_cancelled=lambda: job_id in cancelled, on_start=start)


def _load(worker_id: int, options: dict[str, Any]):
    """The worker's pipeline: loaded here, or a WorkerGroup (one replica of several GPUs) that runs the same way."""
    from diffgen.engine.loading import load_model
    from diffgen.options import parallel_option_names

    model_options = {k: v for k, v in options.get("engine_options", {}).items() if v is not None}
    parallel = {k: model_options.pop(k) for k in parallel_option_names() if k in model_options}
    # --dp-size: each worker is one replica of num_gpus / dp_size GPUs (the executor checked the plan).
    gpus = (parallel.get("num_gpus") or 1) // (parallel.pop("dp_size", None) or 1)
    # One worker per replica: worker i starts at cuda:i*gpus when the user asked for plain "cuda".
    if options.get("num_workers", 1) > 1 and model_options.get("device", "auto") in ("cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            model_options["device"] = f"cuda:{worker_id * gpus}"
    if gpus > 1:
        from diffgen.parallel.config import ParallelConfig
        from diffgen.parallel.runtime import plan_for_model
        from diffgen.parallel.worker_group import WorkerGroup

        plan = plan_for_model(ParallelConfig.from_options(dict(parallel, num_gpus=gpus)), options["model_path"],
                              model_options.get("revision"))
        return WorkerGroup(options["model_path"], dict(model_options, serving=True), plan)
    return load_model(options["model_path"], serving=True, **model_options)


def _loras(pipeline) -> list[dict[str, Any]]:
    from diffgen.engine.executor import Executor
    from diffgen.engine.lora import describe_loras

    return pipeline.loras() if isinstance(pipeline, Executor) else describe_loras(pipeline)


def _change_loras(pipeline, message: ChangeLoRAs) -> LoRAsChanged:
    """Make the change on this worker's pipeline (or on every rank of its group); a refusal changes nothing."""
    from diffgen.engine.executor import Executor
    from diffgen.engine.lora import apply_lora_change
    from diffgen.errors import DiffgenError, InvalidRequestError

    try:
        if isinstance(pipeline, Executor):  # a WorkerGroup
            loras = pipeline.change_loras(message.change)
        else:
            loras = apply_lora_change(pipeline, message.change)
        return LoRAsChanged(message.change_id, tuple(loras))
    except InvalidRequestError as e:
        return LoRAsChanged(message.change_id, tuple(_loras(pipeline)), e.message, e.field)
    except DiffgenError as e:
        return LoRAsChanged(message.change_id, tuple(_loras(pipeline)), str(e))
    except Exception as e:  # the worker goes on; the caller learns why
        logger.exception("LoRA change %s failed", message.change.action)
        return LoRAsChanged(message.change_id, tuple(_loras(pipeline)), f"{type(e).__name__}: {e}")


def _run_one(pipeline, job_id: str, request, cancelled: set[str], outbox, faults: bool) -> None:
    """One job on a worker group, alone."""
    if job_id in cancelled:
        outbox.put(Failed(job_id, "cancelled", "the job was cancelled"))
        return
    outbox.put(Started(job_id))
    progress = _ProgressReporter(job_id, request, outbox, faults)
    try:
        if faults:
            _inject_fault(request)
        result = pipeline.run(request, progress=progress, is_cancelled=lambda: job_id in cancelled)
        outbox.put(Done(job_id, _outputs_only(result)))
        return
    except Exception as e:  # one request's failure must not take the worker down
        outbox.put(_failure(job_id, e))
    _free_memory()  # reached only on failure: free what the failed request held on the GPU


class _ProgressReporter:
    """A job's per-step progress callback: Progress messages with the time since the last one (and, under fault
    injection, 50 ms more per step for ``[[fault:slow]]`` prompts)."""

    def __init__(self, job_id: str, request, outbox, faults: bool) -> None:
        self.job_id, self.outbox = job_id, outbox
        self.slow = faults and "[[fault:slow]]" in " ".join(request.prompt)
        self.restart()

    def restart(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, step: int, total: int, preview=None) -> None:
        if self.slow:
            time.sleep(0.05)
        now = time.perf_counter()
        self.outbox.put(Progress(self.job_id, step, total, now - self.last, preview))
        self.last = now


def _outputs_only(result):
    """The result without the request's input images: they stay with the front end (it sent them)."""
    return dataclasses.replace(result, request=dataclasses.replace(result.request, images=[]))


def _failure(job_id: str, error: BaseException) -> Failed:
    """The Failed message for a request's error."""
    import torch

    from diffgen.errors import CancelledError, DiffgenError, InvalidRequestError

    if isinstance(error, CancelledError):
        return Failed(job_id, "cancelled", "the job was cancelled")
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return Failed(job_id, "out_of_memory", "the GPU ran out of memory for this request; try a smaller "
                      "size, fewer outputs or fewer frames")
    if isinstance(error, InvalidRequestError):
        return Failed(job_id, "invalid_request", str(error), error.field)
    if isinstance(error, DiffgenError):
        return Failed(job_id, "invalid_request", str(error))
    logger.error("request %s failed", job_id, exc_info=error)
    return Failed(job_id, "generation_error", f"generation failed: {type(error).__name__}: {error}")


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _batch_fault(states) -> None:
    import torch

    if len(states) > 1 and any("[[fault:batch-oom]]" in " ".join(state.request.prompt) for state in states):
        raise torch.cuda.OutOfMemoryError(f"injected out-of-memory of a batched forward ({FAULT_ENV})")


def _inject_fault(request) -> None:
    import torch

    text = " ".join(request.prompt)
    if "[[fault:raise]]" in text:
        raise RuntimeError(f"injected fault ({FAULT_ENV})")
    if "[[fault:oom]]" in text:
        raise torch.cuda.OutOfMemoryError(f"injected out-of-memory ({FAULT_ENV})")
    if "[[fault:exit]]" in text:
        os._exit(17)
