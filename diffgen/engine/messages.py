"""The records a process executor and its worker processes exchange (pickled through multiprocessing queues).

executor -> worker:  RunBatch, Cancel, Stop, ChangeLoRAs
worker -> executor:  Ready, LoadFailed, Started, Progress, Done, Failed, BatchDone, LoRAsChanged
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffgen.engine.request import GenerationRequest, GenerationResult
from diffgen.engine.spec import ModelSpec


@dataclass(frozen=True)
class QueuedRequest:
    job_id: str
    request: GenerationRequest


@dataclass(frozen=True)
class RunBatch:
    """Run these requests: they join the worker's running batch between denoising steps when they can share
    its forwards (continuous batching), else they wait in the worker's queue, in order."""

    batch_id: str
    jobs: tuple[QueuedRequest, ...]


@dataclass(frozen=True)
class Cancel:
    """Stop ``job_id`` at its next denoising step (or skip it if it has not started)."""

    job_id: str


@dataclass(frozen=True)
class Stop:
    """Finish the current batch, then exit."""


@dataclass(frozen=True)
class Ready:
    """The worker has loaded the model."""

    spec: ModelSpec
    device: str
    dit_precision: str = "float32"  # the DiT's dtype, or "fp8" when quantized (for the model card)
    vae_precision: str = "float32"
    loras: tuple[dict[str, Any], ...] = ()  # the LoRAs it loaded (--lora-path), as LoRAManager.describe rows
    parallel_plan: str | None = None  # a worker that is a group of ranks: its plan ("2 GPU(s), Ulysses 2")
    rank_pids: tuple[int, ...] = ()  # and the process ids of its ranks
    batch_capacity: int = 1  # requests the worker denoises together at most (1: it runs them one by one)


@dataclass(frozen=True)
class ChangeLoRAs:
    """Make ``change`` (an engine.lora.LoRAChange) after the batches sent before it, never during a request;
    answered by LoRAsChanged. ``change_id`` None: a catch-up of a (re)started worker, answered all the same."""

    change_id: str | None
    change: Any


@dataclass(frozen=True)
class LoRAsChanged:
    """The worker's LoRAs after a ChangeLoRAs; ``error`` (with ``param``) when it was refused: nothing changed."""

    change_id: str | None
    loras: tuple[dict[str, Any], ...]
    error: str | None = None
    param: str | None = None


@dataclass(frozen=True)
class LoadFailed:
    message: str


@dataclass(frozen=True)
class Started:
    job_id: str


@dataclass(frozen=True)
class Progress:
    job_id: str
    step: int
    total: int
    step_seconds: float
    preview: Any = None  # (B, F, h, w, 3) uint8 numpy previews when the request asked for one at this step


@dataclass(frozen=True)
class Done:
    job_id: str
    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    """``code``: cancelled, out_of_memory, invalid_request or generation_error (see JobError)."""

    job_id: str
    code: str
    message: str
    param: str | None = None


@dataclass(frozen=True)
class BatchDone:
    batch_id: str
