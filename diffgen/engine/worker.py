"""The GPU worker: a process that loads one pipeline and runs the batches its scheduler sends.

The worker is started with the multiprocessing "spawn" context (a fresh interpreter: no CUDA state
or server threads inherited) and talks to the scheduler through two queues:

    inbox  (scheduler -> worker): ("run", batch_id, [(job_id, GenerationRequest), ...])
                                  ("cancel", job_id)      ("stop",)
    outbox (worker -> scheduler): ("ready", ModelInfo)    ("load_failed", message)
                                  ("started", job_id)     ("progress", job_id, step, total, step_seconds)
                                  ("done", job_id, WorkerOutput)
                                  ("failed", job_id, code, message, param)
                                  ("batch_done", batch_id)

A listener thread drains the inbox so that a cancel reaches the worker while a batch runs; the main
thread runs the pipeline and checks the cancel set between denoising steps. A failure of one request
(any exception, CUDA out of memory included) is reported for that request only; the loop goes on.

Fault injection for tests (documented in docs/server.md): when the environment variable
``DIFFGEN_FAULT_INJECT=1`` is set, a prompt containing ``[[fault:raise]]`` makes the pipeline call
raise, ``[[fault:oom]]`` raise ``torch.cuda.OutOfMemoryError``, ``[[fault:exit]]`` kill the
worker process and ``[[fault:slow]]`` add 50 ms to every denoising step (so tests can catch a job
running). Without the variable these markers are ordinary text.
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FAULT_ENV = "DIFFGEN_FAULT_INJECT"


@dataclass
class ModelInfo:
    """What the serving process needs to know about the loaded model, sent once it is loaded."""

    model_path: str
    name: str
    output_kind: str  # "image" or "video"
    accepts_images: bool
    defaults: Any  # configs.models.ModelDefaults
    spec: Any  # engine.spec.ModelSpec
    device: str
    dit_precision: str = "float32"  # the DiT's dtype, or "fp8" when quantized (for the model card)
    vae_precision: str = "float32"


@dataclass
class WorkerOutput:
    """A finished request, without tensors: PIL images or uint8 frame arrays."""

    seed: int
    images: list[Any] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    fps: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    request: Any = None  # the resolved GenerationRequest (defaults filled in, input images dropped): metadata


def worker_main(worker_id: int, options: dict[str, Any], inbox: Any, outbox: Any) -> None:
    """Entry point of a worker process: load the pipeline, then serve batches until told to stop."""
    # The serving process decides when this worker stops (graceful shutdown): a Ctrl-C or a SIGTERM
    # sent to the whole process group must not kill a job midway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("DIFFGEN_LOG_LEVEL", "WARNING"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffgen.entrypoints.cli import _quiet_libraries

    _quiet_libraries()
    try:
        engine = _load(worker_id, options)
    except BaseException as e:  # report anything: the server must say why it is not ready
        outbox.put(("load_failed", f"{type(e).__name__}: {e}"))
        return
    pipeline = engine.pipeline
    quantized = options.get("engine_options", {}).get("quantize")
    outbox.put(("ready", ModelInfo(
        model_path=pipeline.model_path, name=pipeline.defaults.name, output_kind=pipeline.output_kind,
        accepts_images=pipeline.accepts_images, defaults=pipeline.defaults, spec=pipeline.spec,
        device=str(pipeline.device), dit_precision=quantized or str(pipeline.dtype).removeprefix("torch."),
        vae_precision=str(pipeline.vae.dtype).removeprefix("torch."))))

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
            if message[0] == "cancel":
                cancelled.add(message[1])
            else:
                batches.put(message)
                if message[0] == "stop":
                    return

    threading.Thread(target=listen, name="worker-inbox", daemon=True).start()
    faults = os.environ.get(FAULT_ENV) == "1"
    while True:
        message = batches.get()
        if message[0] == "stop":
            return
        _, batch_id, items = message
        for job_id, request in items:
            _run_one(engine, job_id, request, cancelled, outbox, faults)
            cancelled.discard(job_id)
        outbox.put(("batch_done", batch_id))


def _load(worker_id: int, options: dict[str, Any]):
    from diffgen.engine.engine import Engine

    engine_options = {k: v for k, v in options.get("engine_options", {}).items() if v is not None}
    # One worker per GPU: worker i takes cuda:i when the user asked for plain "cuda".
    if engine_options.get("device") == "cuda" and options.get("num_workers", 1) > 1:
        engine_options["device"] = f"cuda:{worker_id}"
    return Engine.from_pretrained(options["model_path"], serving=True, **engine_options)


def _run_one(engine, job_id: str, request, cancelled: set[str], outbox, faults: bool) -> None:
    import torch

    from diffgen.errors import CancelledError, DiffgenError, InvalidRequestError

    if job_id in cancelled:
        outbox.put(("failed", job_id, "cancelled", "the job was cancelled", None))
        return
    outbox.put(("started", job_id))
    last = [time.perf_counter()]

    slow = faults and "[[fault:slow]]" in " ".join(request.prompt)

    def progress(step: int, total: int) -> None:
        if slow:
            time.sleep(0.05)
        now = time.perf_counter()
        outbox.put(("progress", job_id, step, total, now - last[0]))
        last[0] = now

    try:
        if faults:
            _inject_fault(request)
        result = engine.run(request, progress=progress, is_cancelled=lambda: job_id in cancelled)
        r = result.request
        output = WorkerOutput(seed=result.seed, images=result.images, frames=result.frames, fps=result.fps,
                              timings=result.timings, height=r.height, width=r.width,
                              num_inference_steps=r.num_inference_steps,
                              request=dataclasses.replace(r, images=[None] * len(r.images)))
        outbox.put(("done", job_id, output))
        return
    except CancelledError:
        outbox.put(("failed", job_id, "cancelled", "the job was cancelled", None))
    except torch.cuda.OutOfMemoryError:
        outbox.put(("failed", job_id, "out_of_memory",
                    "the GPU ran out of memory for this request; try a smaller size, fewer outputs or "
                    "fewer frames", None))
    except InvalidRequestError as e:
        outbox.put(("failed", job_id, "invalid_request", str(e), e.field))
    except DiffgenError as e:
        outbox.put(("failed", job_id, "invalid_request", str(e), None))
    except Exception as e:  # one request's failure must not take the worker down
        logger.exception("request %s failed", job_id)
        outbox.put(("failed", job_id, "generation_error", f"generation failed: {type(e).__name__}: {e}", None))
    # Reached only on failure: free what the failed request held on the GPU.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _inject_fault(request) -> None:
    import torch

    text = " ".join(request.prompt)
    if "[[fault:raise]]" in text:
        raise RuntimeError("injected fault (DIFFGEN_FAULT_INJECT)")
    if "[[fault:oom]]" in text:
        raise torch.cuda.OutOfMemoryError("injected out-of-memory (DIFFGEN_FAULT_INJECT)")
    if "[[fault:exit]]" in text:
        os._exit(17)
