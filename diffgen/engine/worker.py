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
thread runs the pipeline and checks the cancel set between denoising steps. A failure of one request
(any exception, CUDA out of memory included) is reported for that request only; the loop goes on.
The worker holds a loaded pipeline, never an Engine: Engine -> executor -> worker -> pipeline.

Fault injection, for tests only (docs/server.md): when the worker's environment has
``DIFFGEN_FAULT_INJECT=1`` (a WARNING is logged at start-up), a prompt containing ``[[fault:raise]]``
makes the pipeline call raise, ``[[fault:oom]]`` raise ``torch.cuda.OutOfMemoryError``,
``[[fault:exit]]`` kill the worker process and ``[[fault:slow]]`` add 50 ms to every denoising step.
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
    if hasattr(pipeline, "plan"):  # a WorkerGroup: rank 0 reported the dtypes its pipeline loaded in
        outbox.put(Ready(spec=pipeline.spec, device=pipeline.info.device,
                         dit_precision=quantized or pipeline.info.dit_precision,
                         vae_precision=pipeline.info.vae_precision, loras=loras,
                         parallel_plan=pipeline.plan.describe().split(": ", 1)[1],
                         rank_pids=tuple(process.pid for process in pipeline.processes)))
    else:
        outbox.put(Ready(spec=pipeline.spec, device=str(pipeline.device),
                         dit_precision=quantized or str(pipeline.dtype).removeprefix("torch."),
                         vae_precision=str(pipeline.vae.dtype).removeprefix("torch."), loras=loras))

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
    import torch

    from diffgen.errors import CancelledError, DiffgenError, InvalidRequestError

    if job_id in cancelled:
        outbox.put(Failed(job_id, "cancelled", "the job was cancelled"))
        return
    outbox.put(Started(job_id))
    last = [time.perf_counter()]

    slow = faults and "[[fault:slow]]" in " ".join(request.prompt)

    def progress(step: int, total: int, preview=None) -> None:
        if slow:
            time.sleep(0.05)
        now = time.perf_counter()
        outbox.put(Progress(job_id, step, total, now - last[0], preview))
        last[0] = now

    try:
        if faults:
            _inject_fault(request)
        result = pipeline.run(request, progress=progress, is_cancelled=lambda: job_id in cancelled)
        # The input images stay with the front end (it sent them); only the outputs travel back.
        result = dataclasses.replace(result, request=dataclasses.replace(result.request, images=[]))
        outbox.put(Done(job_id, result))
        return
    except CancelledError:
        outbox.put(Failed(job_id, "cancelled", "the job was cancelled"))
    except torch.cuda.OutOfMemoryError:
        outbox.put(Failed(job_id, "out_of_memory", "the GPU ran out of memory for this request; try a smaller "
                          "size, fewer outputs or fewer frames"))
    except InvalidRequestError as e:
        outbox.put(Failed(job_id, "invalid_request", str(e), e.field))
    except DiffgenError as e:
        outbox.put(Failed(job_id, "invalid_request", str(e)))
    except Exception as e:  # one request's failure must not take the worker down
        logger.exception("request %s failed", job_id)
        outbox.put(Failed(job_id, "generation_error", f"generation failed: {type(e).__name__}: {e}"))
    # Reached only on failure: free what the failed request held on the GPU.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _inject_fault(request) -> None:
    import torch

    text = " ".join(request.prompt)
    if "[[fault:raise]]" in text:
        raise RuntimeError(f"injected fault ({FAULT_ENV})")
    if "[[fault:oom]]" in text:
        raise torch.cuda.OutOfMemoryError(f"injected out-of-memory ({FAULT_ENV})")
    if "[[fault:exit]]" in text:
        os._exit(17)
