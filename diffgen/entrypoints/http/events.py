"""Live progress over Server-Sent Events: image streams (``stream=true``) and ``GET /v1/videos/{id}/events``.

The engine's job listener feeds a :class:`ProgressBoard` (one snapshot per running job of this server:
step, total, timings, the latest latent preview); each SSE stream subscribes to its job and turns every
snapshot into events, so no step or preview is skipped. Event bodies follow the OpenAI image streaming
events where those exist (``image_generation.partial_image`` / ``image_generation.completed``, and
``image_edit.*`` for edits) with diffgen's progress fields added (``step``, ``total_steps``, ``elapsed_s``,
``eta_s``); the progress events between them (``*.progress``) and the video events are diffgen's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

STORE_POLL_S = 0.5  # how often a video stream reads the job store (status, progress of other replicas)
HEARTBEAT_S = 10.0  # an SSE comment after this long without events keeps proxies from closing the stream
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass(frozen=True)
class JobProgress:
    """One job's progress as this server saw it (times from time.monotonic)."""

    step: int = 0
    total_steps: int = 0
    started_at: float | None = None
    first_step_at: float | None = None
    step_at: float | None = None
    preview: np.ndarray | None = None  # (B, F, h, w, 3) uint8
    preview_step: int = 0

    def timing(self, now: float | None = None) -> dict[str, Any]:
        """step, total_steps, elapsed_s (since the job started running) and eta_s (the denoising steps left
        at the pace of the steps so far; None before it can be told)."""
        now = time.monotonic() if now is None else now
        elapsed = None if self.started_at is None else round(now - self.started_at, 3)
        eta = None
        if self.step and self.step_at is not None and self.total_steps:
            if self.step > 1 and self.first_step_at is not None:
                per_step = (self.step_at - self.first_step_at) / (self.step - 1)
            else:
                per_step = self.step_at - (self.started_at or self.step_at)  # includes text encoding: a bound
            eta = round(per_step * (self.total_steps - self.step), 3)
        return {"step": self.step, "total_steps": self.total_steps, "elapsed_s": elapsed, "eta_s": eta}


class ProgressBoard:
    """The latest :class:`JobProgress` of the jobs this server follows (an entry goes when its job ends), and
    the streams that subscribed to a job: each gets every snapshot in order on its asyncio queue."""

    def __init__(self) -> None:
        self._jobs: dict[str, JobProgress] = {}
        self._subscribers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]] = {}
        self._lock = threading.Lock()

    def on_event(self, kind: str, job: Any) -> None:
        """A job listener (executor.JobListener) for "started" and "progress" events; runs in the engine's thread."""
        now = time.monotonic()
        with self._lock:
            known = self._jobs.get(job.id)
            if known is None:
                known = JobProgress()
                job.future.add_done_callback(lambda _: self.forget(job.id))
            if kind == "started":
                known = replace(known, started_at=now)
            elif kind == "progress":
                known = replace(known, step=job.step, total_steps=job.total_steps, step_at=now,
                                first_step_at=known.first_step_at if known.first_step_at is not None else now)
                if job.preview is not None and job.preview_step == job.step:
                    known = replace(known, preview=job.preview, preview_step=job.step)
            if not job.future.done():
                self._jobs[job.id] = known
            subscribers = list(self._subscribers.get(job.id, ()))
        for loop, queue in subscribers:
            with contextlib.suppress(RuntimeError):  # that stream's loop has closed
                loop.call_soon_threadsafe(queue.put_nowait, known)

    def get(self, job_id: str) -> JobProgress | None:
        with self._lock:
            return self._jobs.get(job_id)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def subscribe(self, job_id: str) -> asyncio.Queue:
        """A queue of the job's snapshots from now on (call from the event loop; ``unsubscribe`` when done)."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._subscribers.setdefault(job_id, []).append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        with self._lock:
            left = [entry for entry in self._subscribers.get(job_id, ()) if entry[1] is not queue]
            if left:
                self._subscribers[job_id] = left
            else:
                self._subscribers.pop(job_id, None)


async def next_snapshot(queue: asyncio.Queue, timeout: float, *others: asyncio.Future) -> JobProgress | None:
    """The queue's next snapshot, or None after ``timeout`` seconds or once one of ``others`` is done."""
    if not queue.empty():
        return queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, *others}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    return None


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event; ``data`` carries its type too (the OpenAI clients read the type from it)."""
    return f"event: {event}\ndata: {json.dumps({'type': event, **data}, separators=(',', ':'))}\n\n".encode()


HEARTBEAT = b": keep-alive\n\n"


def encode_preview(image: np.ndarray, output_format: str = "png") -> bytes:
    """One (h, w, 3) uint8 preview as an image file."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format={"jpeg": "JPEG", "webp": "WEBP"}.get(output_format, "PNG"))
    return buffer.getvalue()
