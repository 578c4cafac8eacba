"""Video jobs that outlive the server process: records in the job store, MP4 files in the output store.

The job store (job_store.py: ``<output-dir>/jobs.sqlite3`` by default, or a PostgreSQL database shared
by several replicas) holds one row per video job; the output store (output_store.py: the output folder
by default, or an S3 bucket) keeps ``videos/<id>.mp4``, its content, and ``images/<id>.<ext>``, images
served by URL. MP4s are encoded in ``<output-dir>/videos`` first and stored only once whole. Every file
name is made here from a random id; nothing in a path comes from the client. On start, jobs left queued
or running by a previous process of this machine are marked failed with the reason (jobs of dead
replicas elsewhere once their lease expires), and half-written files of jobs no longer running are removed.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from diffgen.engine import Engine, GenerationRequest, Job, JobError, JobListener, Metrics
from diffgen.entrypoints.http.job_store import ACTIVE, JobStore, JobStoreUnavailable
from diffgen.entrypoints.http.output_store import OutputStore, OutputStoreUnavailable, copy_to_temp

logger = logging.getLogger(__name__)

_VIDEO_ID = re.compile(r"video_[0-9a-f]{32}")  # always fullmatch: "$" matches before a final newline
_IMAGE_ID = re.compile(r"img_[0-9a-f]{32}")
IMAGE_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def video_file(video_id: str, index: int = 0) -> str:
    return f"{video_id}.mp4" if index == 0 else f"{video_id}_{index}.mp4"


def video_key(video_id: str, index: int = 0) -> str:
    """The output store's key of output ``index`` of a job (``video_path`` is where it is encoded first)."""
    return f"videos/{video_file(video_id, index)}"


def video_object(record: dict[str, Any]) -> dict[str, Any]:
    """A job record as the OpenAI ``Video`` object."""
    return {
        "id": record["id"], "object": "video", "created_at": record["created_at"], "status": record["status"],
        "progress": record["progress"], "model": record["model"], "prompt": record["prompt"],
        "seconds": record["seconds"], "size": record["size"], "completed_at": record["completed_at"],
        "expires_at": None, "remixed_from_video_id": None,
        "error": json.loads(record["error"]) if record["error"] else None,
    }


def is_video_id(text: str) -> bool:
    return bool(_VIDEO_ID.fullmatch(text))


class VideoJobs:
    """Creates video jobs, follows them through the engine into the job store, writes their MP4s.

    An outcome the job store cannot take (the database is down) is kept here and recorded by ``on_beat``
    (the lease heartbeat) once the store is back; the job stays running in the store meanwhile."""

    def __init__(self, store: JobStore, outputs: OutputStore, engine: Engine | None, metrics: Metrics,
                 staging_dir: str | os.PathLike, listener: JobListener | None = None):
        self.store = store
        self.listener = listener  # also told of every job event (the live progress of the SSE streams)
        self.outputs = outputs
        self.engine = engine
        self.metrics = metrics
        self.videos_dir = Path(staging_dir) / "videos"  # MP4s are encoded here, then put in the output store
        self.videos_dir.mkdir(parents=True, exist_ok=True)
        # MP4 encoding (ffmpeg) runs off the engine's threads.
        self._encoders = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="mp4")
        self._progress: dict[str, int] = {}
        self._lock = threading.Lock()
        self._running: dict[str, str] = {}  # job id -> model name, until its outcome is recorded
        self._unrecorded: dict[str, tuple] = {}  # job id -> the arguments of _record the store missed

    def video_path(self, video_id: str, index: int = 0) -> Path:
        """Where the MP4 of output ``index`` of a job is encoded (``video_key``: where it is stored)."""
        return self.videos_dir / video_file(video_id, index)

    def recover(self) -> dict[str, list[str]]:
        """At start: fail the jobs a previous process of this machine left unfinished (see
        JobStore.recover) and remove the half-written MP4s of jobs that are not running."""
        failed = self.store.recover(include_expired=False)
        for part in self.videos_dir.glob("*.part.mp4"):
            record = self.store.get(part.name[:len("video_") + 32])
            if record is None or record["status"] not in ACTIVE:  # another live replica may share the folder
                part.unlink(missing_ok=True)
        return failed

    def create(self, request: GenerationRequest, model: str, seconds: str, size: str,
               params: dict[str, Any]) -> dict[str, Any]:
        video_id = f"video_{uuid.uuid4().hex}"
        record = {"id": video_id, "created_at": int(time.time()), "model": model, "prompt": request.prompt[0],
                  "seconds": seconds, "size": size, "params": params}
        self.store.create(record)  # JobStoreUnavailable: nothing was queued
        with self._lock:
            self._running[video_id] = model
        try:
            job = self.engine.submit(request, listener=self._on_event, job_id=video_id)
        except Exception:
            with self._lock:
                self._running.pop(video_id, None)
            try:
                self.store.delete(video_id)
            except JobStoreUnavailable:  # gone down meanwhile: the row must not stay queued for ever
                self._record(video_id, "failed", {"code": "not_queued", "message": "the job could not be queued"},
                             None, [])
            raise
        job.future.add_done_callback(lambda future: self._encoders.submit(self._finalize, video_id, future))
        try:
            return self.store.get(video_id) or self._queued(record)
        except JobStoreUnavailable:  # the job is queued: answer it as created
            return self._queued(record)

    @staticmethod
    def _queued(record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "status": "queued", "progress": 0, "completed_at": None, "error": None, "file": None,
                "params": json.dumps(record["params"])}

    def _on_event(self, kind: str, job: Job) -> None:
        if self.listener is not None:
            self.listener(kind, job)
        try:
            if kind == "started":
                self.store.mark_running(job.id)
            elif kind == "progress" and job.total_steps:
                # 99 at most until the MP4 is written; completed means downloadable.
                percent = min(99, int(100 * job.step / job.total_steps))
                if self._progress.get(job.id) != percent:
                    self._progress[job.id] = percent
                    self.store.set_progress(job.id, percent)
        except JobStoreUnavailable as e:  # progress is advisory; the outcome is recorded later
            logger.debug("video %s: progress not recorded: %s", job.id, e)

    def _finalize(self, video_id: str, future: concurrent.futures.Future) -> None:
        from diffgen.engine import generation_metadata
        from diffgen.outputs import write_mp4

        self._progress.pop(video_id, None)
        with self._lock:
            model = self._running.get(video_id)
        stored: list[str] = []
        part = self.video_path(video_id).with_suffix(".part.mp4")
        try:
            output = future.result()
            for index, frames in enumerate(output.frames):  # one MP4 per output (n > 1: several)
                path = self.video_path(video_id, index)
                part = path.with_suffix(".part.mp4")
                metadata = None if model is None else generation_metadata(
                    output.request, seed=output.seed, model=model, output_index=index)
                write_mp4(frames, part, output.fps, metadata)
                self.outputs.put(video_key(video_id, index), part, "video/mp4")
                stored.append(video_key(video_id, index))
            outcome = ("completed", None, video_file(video_id))
        except JobError as e:
            outcome = ("failed", {"code": e.code, "message": e.message}, None)
        except OutputStoreUnavailable as e:
            logger.error("video %s: %s", video_id, e)
            part.unlink(missing_ok=True)
            self._delete_stored(stored)
            stored = []
            outcome = ("failed", {"code": "output_store_unavailable", "message": str(e)}, None)
        except Exception as e:
            logger.exception("video %s: cannot write the MP4", video_id)
            part.unlink(missing_ok=True)  # a half-written file must not wait for the next restart
            self._delete_stored(stored)
            stored = []
            outcome = ("failed", {"code": "encoding_error", "message": f"cannot write the MP4: {e}"}, None)
        self._record(video_id, *outcome, stored)

    def _record(self, video_id: str, status: str, error: dict[str, Any] | None, file: str | None,
                stored: list[str]) -> None:
        """Write a job's outcome to the store, or keep it for ``on_beat`` while the store is down."""
        try:
            recorded = self.store.finish(video_id, status, error=error, file=file)
        except JobStoreUnavailable as e:
            logger.error("video %s is %s; recorded once the job store is back: %s", video_id, status, e)
            with self._lock:
                self._unrecorded[video_id] = (status, error, file, stored)
            return
        with self._lock:
            self._running.pop(video_id, None)
            self._unrecorded.pop(video_id, None)
        if not recorded:  # deleted while it ran, or failed by a replica that found this one dead
            logger.info("video %s ended here but was deleted or failed elsewhere meanwhile: its outputs are "
                        "not kept", video_id)
            self._delete_stored(stored)

    def on_beat(self) -> None:
        """Run by the lease heartbeat: record the outcomes the store missed; cancel the jobs running here
        that were deleted (maybe through another replica) or failed by another replica."""
        with self._lock:
            unrecorded = list(self._unrecorded.items())
        for video_id, outcome in unrecorded:
            self._record(video_id, *outcome)
        with self._lock:
            running = [video_id for video_id in self._running if video_id not in self._unrecorded]
        if running and self.engine is not None:
            for video_id in set(running) - self.store.active(running):
                with self._lock:
                    still_running = video_id in self._running and video_id not in self._unrecorded
                if still_running and self.engine.cancel(video_id):
                    logger.info("video %s was deleted or ended elsewhere: cancelled", video_id)

    def delete(self, video_id: str) -> bool:
        """Cancel the job if it is queued or running, then forget it and delete its file."""
        record = self.store.delete(video_id)
        if record is None:
            return False
        if record["status"] in ACTIVE:
            self.engine.cancel(video_id)  # running on another replica: that one cancels it on its next beat
        self._delete_stored([video_key(video_id, index)
                             for index in range(max(1, json.loads(record.get("params") or "{}").get("n", 1)))])
        return True

    def _delete_stored(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.outputs.delete(key)
            except OutputStoreUnavailable as e:  # left behind in the store; the job row is what counts
                logger.error("cannot delete %s: %s", key, e)

    def close(self) -> None:
        self._encoders.shutdown(wait=True)


class ImageFiles:
    """Images kept for ``response_format=url``, served at /v1/images/{id}/content (or at the output
    store's own URL) for ``ttl`` seconds after they are made; older ones are answered 404 and deleted
    by ``sweep``, which ``save`` runs at most once every SWEEP_INTERVAL_S seconds."""

    SWEEP_INTERVAL_S = 60.0

    def __init__(self, outputs: OutputStore, staging_dir: str | os.PathLike, ttl: float = 3600.0):
        self.outputs = outputs
        self.staging_dir = Path(staging_dir) / "images"
        self.ttl = ttl
        self._last_sweep = float("-inf")
        self._lock = threading.Lock()

    def save(self, data: bytes, output_format: str) -> tuple[str, str | None]:
        """Store an encoded image; returns its id and the store's URL for it (None: use /content)."""
        image_id = f"img_{uuid.uuid4().hex}"
        key = f"images/{image_id}.{_IMAGE_EXTENSIONS[output_format]}"
        self.outputs.put(key, copy_to_temp(data, self.staging_dir, image_id), IMAGE_MEDIA_TYPES[output_format])
        with self._lock:
            due = time.monotonic() - self._last_sweep >= min(self.SWEEP_INTERVAL_S, self.ttl)
            if due:
                self._last_sweep = time.monotonic()
        if due:
            self.sweep()
        return image_id, self.outputs.url(key)

    def find(self, image_id: str) -> tuple[str, str] | None:
        """The store key and media type of a live image."""
        if not _IMAGE_ID.fullmatch(image_id):
            return None
        for fmt, ext in _IMAGE_EXTENSIONS.items():
            key = f"images/{image_id}.{ext}"
            found = self.outputs.stat(key)
            if found is not None:
                return None if time.time() - found.modified > self.ttl else (key, IMAGE_MEDIA_TYPES[fmt])
        return None

    def sweep(self) -> int:
        """Delete the expired images; returns how many."""
        now, removed = time.time(), 0
        for key, modified in list(self.outputs.list("images/img_")):
            if now - modified > self.ttl:
                self.outputs.delete(key)
                removed += 1
        return removed
