"""Video jobs that outlive the server process: records in SQLite, MP4 files in the output store.

``<output-dir>/jobs.sqlite3`` holds one row per video job; the output store (output_store.py: the
output folder by default, or an S3 bucket) keeps ``videos/<id>.mp4``, its content, and
``images/<id>.<ext>``, images served by URL. MP4s are encoded in ``<output-dir>/videos`` first and
stored only once whole. Every file name is made here
from a random id; nothing in a path comes from the client. On start, jobs left queued or running by
a previous process are marked failed with the reason, and half-written files are removed.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from diffgen.engine import Engine, GenerationRequest, Job, JobError, Metrics
from diffgen.entrypoints.http.output_store import OutputStore, OutputStoreUnavailable, copy_to_temp

logger = logging.getLogger(__name__)

ACTIVE = ("queued", "in_progress")
_VIDEO_ID = re.compile(r"video_[0-9a-f]{32}")  # always fullmatch: "$" matches before a final newline
_IMAGE_ID = re.compile(r"img_[0-9a-f]{32}")
IMAGE_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seconds TEXT NOT NULL,
    size TEXT NOT NULL,
    error TEXT,
    file TEXT,
    params TEXT
)
"""


class JobStore:
    """The video job table. One connection shared under a lock: every statement is tiny."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.videos_dir = self.output_dir / "videos"
        self.videos_dir.mkdir(exist_ok=True)
        self._db = sqlite3.connect(self.output_dir / "jobs.sqlite3", check_same_thread=False,
                                   isolation_level=None)  # autocommit: each statement is durable at once
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def recover(self, reason: str = "the server restarted before this job finished") -> int:
        """Fail the jobs a previous process left queued or running; remove half-written files."""
        error = json.dumps({"code": "server_restarted", "message": reason})
        with self._lock:
            cursor = self._db.execute(
                "UPDATE videos SET status='failed', error=?, completed_at=? WHERE status IN (?, ?)",
                (error, int(time.time()), *ACTIVE))
        for part in self.videos_dir.glob("*.part.mp4"):
            part.unlink(missing_ok=True)
        return cursor.rowcount

    def create(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO videos (id, created_at, status, progress, model, prompt, seconds, size, params) "
                "VALUES (?, ?, 'queued', 0, ?, ?, ?, ?, ?)",
                (record["id"], record["created_at"], record["model"], record["prompt"], record["seconds"],
                 record["size"], json.dumps(record.get("params") or {})))

    def get(self, video_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM videos WHERE id=?", (video_id,)).fetchone()
        return dict(row) if row else None

    def mark_running(self, video_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE videos SET status='in_progress' WHERE id=? AND status='queued'", (video_id,))

    def set_progress(self, video_id: str, progress: int) -> None:
        with self._lock:
            self._db.execute("UPDATE videos SET progress=? WHERE id=? AND status IN (?, ?)",
                             (progress, video_id, *ACTIVE))

    def finish(self, video_id: str, status: str, error: dict[str, Any] | None = None,
               file: str | None = None) -> bool:
        """Record the outcome of an active job; False when the job is gone (deleted meanwhile)."""
        progress_sql = ", progress=100" if status == "completed" else ""
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE videos SET status=?, error=?, file=?, completed_at=?{progress_sql} "
                "WHERE id=? AND status IN (?, ?)",
                (status, json.dumps(error) if error else None, file, int(time.time()), video_id, *ACTIVE))
        return cursor.rowcount == 1

    def delete(self, video_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM videos WHERE id=?", (video_id,)).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM videos WHERE id=?", (video_id,))
        return dict(row) if row else None

    def list(self, after: str | None, limit: int, order: str) -> tuple[list[dict[str, Any]], bool]:
        """A page of jobs by creation order; ``after``: the id of the last job of the previous page."""
        descending = order == "desc"
        sql, args = "SELECT * FROM videos", []
        if after is not None:
            with self._lock:
                row = self._db.execute("SELECT seq FROM videos WHERE id=?", (after,)).fetchone()
            if row is None:
                raise KeyError(after)
            sql += " WHERE seq < ?" if descending else " WHERE seq > ?"
            args.append(row["seq"])
        sql += f" ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?"
        args.append(limit + 1)
        with self._lock:
            rows = [dict(r) for r in self._db.execute(sql, args).fetchall()]
        return rows[:limit], len(rows) > limit

    def video_path(self, video_id: str, index: int = 0) -> Path:
        """The MP4 of output ``index`` of a job: ``<id>.mp4``, then ``<id>_1.mp4``, ... (n > 1)."""
        return self.videos_dir / video_file(video_id, index)


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
    """Creates video jobs, follows them through the engine into the store, writes their MP4s."""

    def __init__(self, store: JobStore, outputs: OutputStore, engine: Engine | None, metrics: Metrics):
        self.store = store
        self.outputs = outputs
        self.engine = engine
        self.metrics = metrics
        # MP4 encoding (ffmpeg) runs off the engine's threads.
        self._encoders = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="mp4")
        self._progress: dict[str, int] = {}

    def create(self, request: GenerationRequest, model: str, seconds: str, size: str,
               params: dict[str, Any]) -> dict[str, Any]:
        video_id = f"video_{uuid.uuid4().hex}"
        self.store.create({"id": video_id, "created_at": int(time.time()), "model": model,
                           "prompt": request.prompt[0], "seconds": seconds, "size": size, "params": params})
        try:
            job = self.engine.submit(request, listener=self._on_event, job_id=video_id)
        except Exception:
            self.store.delete(video_id)
            raise
        job.future.add_done_callback(lambda future: self._encoders.submit(self._finalize, video_id, future))
        return self.store.get(video_id)

    def _on_event(self, kind: str, job: Job) -> None:
        if kind == "started":
            self.store.mark_running(job.id)
        elif kind == "progress" and job.total_steps:
            # 99 at most until the MP4 is written; completed means downloadable.
            percent = min(99, int(100 * job.step / job.total_steps))
            if self._progress.get(job.id) != percent:
                self._progress[job.id] = percent
                self.store.set_progress(job.id, percent)

    def _finalize(self, video_id: str, future: concurrent.futures.Future) -> None:
        from diffgen.engine import generation_metadata
        from diffgen.outputs import write_mp4

        self._progress.pop(video_id, None)
        stored: list[str] = []
        part = self.store.video_path(video_id).with_suffix(".part.mp4")
        try:
            output = future.result()
            record = self.store.get(video_id)
            for index, frames in enumerate(output.frames):  # one MP4 per output (n > 1: several)
                path = self.store.video_path(video_id, index)
                part = path.with_suffix(".part.mp4")
                metadata = None if record is None else generation_metadata(
                    output.request, seed=output.seed, model=record["model"], output_index=index)
                write_mp4(frames, part, output.fps, metadata)
                self.outputs.put(video_key(video_id, index), part, "video/mp4")
                stored.append(video_key(video_id, index))
            if not self.store.finish(video_id, "completed", file=video_file(video_id)):
                self._delete_stored(stored)  # deleted while it ran
        except JobError as e:
            self.store.finish(video_id, "failed", error={"code": e.code, "message": e.message})
        except OutputStoreUnavailable as e:
            logger.error("video %s: %s", video_id, e)
            part.unlink(missing_ok=True)
            self._delete_stored(stored)
            self.store.finish(video_id, "failed", error={"code": "output_store_unavailable", "message": str(e)})
        except Exception as e:
            logger.exception("video %s: cannot write the MP4", video_id)
            part.unlink(missing_ok=True)  # a half-written file must not wait for the next restart
            self._delete_stored(stored)
            self.store.finish(video_id, "failed", error={"code": "encoding_error",
                                                          "message": f"cannot write the MP4: {e}"})

    def delete(self, video_id: str) -> bool:
        """Cancel the job if it is queued or running, then forget it and delete its file."""
        record = self.store.delete(video_id)
        if record is None:
            return False
        if record["status"] in ACTIVE:
            self.engine.cancel(video_id)
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
