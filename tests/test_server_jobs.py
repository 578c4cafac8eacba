"""Server parts without a server: the queue bound, image expiry, MP4 failures, mask compositing (the job
store: test_job_store.py)."""

from __future__ import annotations

import concurrent.futures
import os
import time

import numpy as np
import pytest
from PIL import Image

from diffgen.engine import GenerationRequest, GenerationResult, JobError, NotReadyError, QueueFullError
from diffgen.engine.messages import LoadFailed
from diffgen.engine.scheduler import ProcessExecutor
from diffgen.entrypoints.http.job_store import SQLiteJobStore
from diffgen.entrypoints.http.jobs import ImageFiles, VideoJobs, video_object
from diffgen.entrypoints.http.openai_routes import composite_with_mask
from diffgen.entrypoints.http.output_store import LocalOutputStore


def _record(video_id: str) -> dict:
    return {"id": video_id, "created_at": 1, "model": "m", "prompt": "p", "seconds": "4", "size": "32x32"}


def _id(i: int) -> str:
    return f"video_{i:032x}"


class _BusyWorker:
    """Stands in for a worker process that has the model loaded and is running a batch."""

    ready, gone, batch_id, batch, load_error = True, False, "busy", {}, None


def test_queue_bound_refuses_with_a_retry_hint():
    scheduler = ProcessExecutor({"model_path": "unused"}, max_queue=3)
    with pytest.raises(NotReadyError):
        scheduler.submit(GenerationRequest.build("a"))
    scheduler._workers.append(_BusyWorker())
    jobs = [scheduler.submit(GenerationRequest.build(f"p{i}")) for i in range(3)]
    with pytest.raises(QueueFullError) as caught:
        scheduler.submit(GenerationRequest.build("one too many"))
    assert caught.value.retry_after >= 1 and scheduler.queue_depth() == 3
    # Cancelling a queued job frees its place and fails only that job.
    assert scheduler.cancel(jobs[0].id)
    with pytest.raises(JobError) as failed:
        jobs[0].future.result(timeout=1)
    assert failed.value.code == "cancelled" and not jobs[1].future.done()
    scheduler.submit(GenerationRequest.build("fits again"))


def test_batches_group_compatible_jobs_in_arrival_order():
    scheduler = ProcessExecutor({"model_path": "unused"}, max_batch_size=2)
    scheduler._workers.append(_BusyWorker())
    small = [scheduler.submit(GenerationRequest.build(f"s{i}", height=32, width=32, seed=i)) for i in range(3)]
    large = scheduler.submit(GenerationRequest.build("l", height=64, width=64))
    with scheduler._lock:
        first = scheduler._take_batch()
        second = scheduler._take_batch()
        third = scheduler._take_batch()
    assert [j.id for j in first] == [small[0].id, small[1].id]
    assert [j.id for j in second] == [small[2].id]
    assert [j.id for j in third] == [large.id]


def test_mask_compositing_keeps_the_original_outside_the_mask():
    original = Image.new("RGB", (8, 4), (10, 20, 30))
    result = Image.new("RGB", (8, 4), (200, 100, 50))
    mask = Image.new("RGBA", (8, 4), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 4, 4))  # transparent left half: the area to edit
    out = np.asarray(composite_with_mask(result, original, mask))
    assert (out[:, :4] == (200, 100, 50)).all() and (out[:, 4:] == (10, 20, 30)).all()
    # A result of another size: the original and the mask are scaled to it.
    big = np.asarray(composite_with_mask(Image.new("RGB", (16, 8), (1, 2, 3)), original, mask))
    assert big.shape == (8, 16, 3) and (big[:, :8] == (1, 2, 3)).all() and (big[:, 8:] == (10, 20, 30)).all()


def test_serve_reads_the_same_config_file_as_generate(tmp_path):
    from diffgen.entrypoints.cli import build_parser, merge_config

    config = tmp_path / "serve.yaml"
    config.write_text("model-path: some/model\ndtype: float32\nmax_queue: 5\nmax-batch-size: 2\nport: 31000\n")
    options = merge_config(build_parser().parse_args(["serve", "--config", str(config), "--port", "32000"]))
    assert options["model_path"] == "some/model" and options["dtype"] == "float32"
    assert options["max_queue"] == 5 and options["max_batch_size"] == 2 and options["port"] == 32000


class _FakeWorker:
    """Stands in for a worker process: ready and idle until the test says it died."""

    def __init__(self, exitcode: int = 17):
        self.index, self.ready, self.gone, self.batch_id, self.load_error = 0, True, False, None, None
        self.batch: dict = {}
        self.exitcode, self.pids = exitcode, [1]

    def kill(self) -> None:  # its process is already gone
        pass


def test_waiting_jobs_fail_when_the_worker_dies_and_is_not_restarted():
    scheduler = ProcessExecutor({"model_path": "unused"}, max_restarts=0)
    worker = _FakeWorker()
    scheduler._workers.append(worker)
    jobs = [scheduler.submit(GenerationRequest.build(f"p{i}")) for i in range(2)]  # no dispatcher: they wait
    scheduler._on_worker_exit(worker)
    for job in jobs:
        with pytest.raises(JobError) as failed:
            job.future.result(timeout=5)  # bounded: before the fix this hung
        assert failed.value.code == "worker_died" and "not restarted" in failed.value.message
    assert scheduler.queue_depth() == 0 and scheduler.restarts == 0
    with pytest.raises(NotReadyError, match="not restarted"):  # new requests fail at once
        scheduler.submit(GenerationRequest.build("later"))


def test_waiting_jobs_fail_when_a_restarted_worker_cannot_load():
    scheduler = ProcessExecutor({"model_path": "unused"})
    worker = _FakeWorker()
    scheduler._workers.append(worker)
    job = scheduler.submit(GenerationRequest.build("p"))
    worker.ready = False  # as a restarted worker that is loading the model
    assert scheduler._handle(worker, LoadFailed("OSError: the weights are gone"))
    with pytest.raises(JobError) as failed:
        job.future.result(timeout=5)
    assert failed.value.code == "worker_died" and "the weights are gone" in failed.value.message


def test_restarts_are_limited_within_a_time_window():
    scheduler = ProcessExecutor({"model_path": "unused"}, max_restarts=2, restart_window=600)
    now = time.monotonic()
    scheduler._restart_times.extend([now - 3600, now - 1800, now - 10])  # two of them long ago
    assert scheduler._may_restart() and len(scheduler._restart_times) == 1
    scheduler._restart_times.append(now - 5)
    assert not scheduler._may_restart()  # two within the window


def test_finishing_a_job_whose_awaiter_cancelled_its_future_is_harmless():
    scheduler = ProcessExecutor({"model_path": "unused"})
    scheduler._workers.append(_FakeWorker())
    job = scheduler.submit(GenerationRequest.build("p"))
    assert job.future.cancel()  # what asyncio.wrap_future does when the awaiting task is cancelled
    assert scheduler.cancel(job.id)  # used to raise InvalidStateError
    assert scheduler.queue_depth() == 0


def test_url_images_expire_after_their_ttl(tmp_path):
    images = ImageFiles(LocalOutputStore(tmp_path), tmp_path, ttl=60)
    (old, old_url), (new, _) = images.save(b"old", "png"), images.save(b"new", "jpeg")
    assert old_url is None  # a local folder has no URL of its own: served at /v1/images/{id}/content
    old_path = tmp_path / images.find(old)[0]
    assert old_path.read_bytes() == b"old" and not list(tmp_path.glob("images/*.part"))
    an_hour_ago = time.time() - 3600
    os.utime(old_path, (an_hour_ago, an_hour_ago))
    assert images.find(old) is None  # expired: answered 404 even before a sweep
    assert images.find(new)[1] == "image/jpeg"
    assert images.sweep() == 1 and not old_path.exists() and images.find(new) is not None


def test_a_failed_mp4_write_leaves_no_part_file(tmp_path, monkeypatch):
    import diffgen.outputs
    from diffgen.engine import Metrics

    def broken_write(frames, path, fps):
        path.write_bytes(b"half an mp4")
        raise OSError("disk full")

    monkeypatch.setattr(diffgen.outputs, "write_mp4", broken_write)
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    store.create(_record(_id(1)))
    videos = VideoJobs(store, LocalOutputStore(tmp_path), engine=None, metrics=Metrics(), staging_dir=tmp_path)
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(GenerationResult(request=GenerationRequest.build("p"), model="m", seed=0, fps=16,
                                       frames=[np.zeros((1, 8, 8, 3), np.uint8)]))
    videos._finalize(_id(1), future)
    videos.close()
    assert not list(videos.videos_dir.glob("*.mp4"))
    assert video_object(store.get(_id(1)))["error"]["code"] == "encoding_error"


def test_unexpected_errors_get_the_envelope_a_request_id_and_a_count(tmp_path):
    from fastapi.testclient import TestClient

    from diffgen.entrypoints.http import ServerConfig, create_app

    app = create_app(ServerConfig(model_path="unused", output_dir=str(tmp_path)))  # no lifespan: no worker

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    client = TestClient(app)
    response = client.get("/boom")
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert response.headers["x-request-id"].startswith("req_")
    assert 'diffgen_http_requests_total{method="GET",route="/boom",status="500"} 1' in client.get("/metrics").text
