"""Server parts without a server: the job store's restart recovery, the queue bound, mask compositing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffgen.engine.request import GenerationRequest
from diffgen.engine.scheduler import JobError, NotReadyError, QueueFullError, Scheduler
from diffgen.entrypoints.http.jobs import JobStore, video_object
from diffgen.entrypoints.http.openai_routes import composite_with_mask


def _record(video_id: str) -> dict:
    return {"id": video_id, "created_at": 1, "model": "m", "prompt": "p", "seconds": "4", "size": "32x32"}


def _id(i: int) -> str:
    return f"video_{i:032x}"


def test_restart_marks_unfinished_jobs_failed_and_keeps_finished_ones(tmp_path):
    store = JobStore(tmp_path)
    for i in range(4):
        store.create(_record(_id(i)))
    store.mark_running(_id(1))
    store.set_progress(_id(1), 40)
    store.video_path(_id(2)).write_bytes(b"mp4")
    assert store.finish(_id(2), "completed", file=f"{_id(2)}.mp4")
    assert store.finish(_id(3), "failed", error={"code": "generation_error", "message": "boom"})
    (store.videos_dir / f"{_id(1)}.part.mp4").write_bytes(b"half")
    store.close()

    reopened = JobStore(tmp_path)  # what a restarted server does first
    assert reopened.recover() == 2
    for i in (0, 1):
        video = video_object(reopened.get(_id(i)))
        assert video["status"] == "failed" and video["error"]["code"] == "server_restarted"
        assert "restarted" in video["error"]["message"] and video["completed_at"] is not None
    completed = video_object(reopened.get(_id(2)))
    assert completed["status"] == "completed" and completed["progress"] == 100
    assert reopened.video_path(_id(2)).read_bytes() == b"mp4"
    assert video_object(reopened.get(_id(3)))["error"]["message"] == "boom"
    assert not list(reopened.videos_dir.glob("*.part.mp4"))
    # A finished job cannot be finished again (a late worker message after a restart changes nothing).
    assert not reopened.finish(_id(2), "failed", error={"code": "x", "message": "y"})


def test_list_pages_in_both_orders_and_delete(tmp_path):
    store = JobStore(tmp_path)
    ids = [_id(i) for i in range(5)]
    for video_id in ids:
        store.create(_record(video_id))
    page, more = store.list(None, 2, "asc")
    assert [r["id"] for r in page] == ids[:2] and more
    page, more = store.list(ids[1], 2, "asc")
    assert [r["id"] for r in page] == ids[2:4] and more
    page, more = store.list(ids[3], 2, "asc")
    assert [r["id"] for r in page] == ids[4:] and not more
    page, more = store.list(None, 10, "desc")
    assert [r["id"] for r in page] == ids[::-1] and not more
    assert store.delete(ids[0])["id"] == ids[0] and store.get(ids[0]) is None and store.delete(ids[0]) is None
    with pytest.raises(KeyError):
        store.list(ids[0], 2, "asc")


class _BusyWorker:
    """Stands in for a worker process that has the model loaded and is running a batch."""

    ready, gone, batch_id, batch, load_error = True, False, "busy", {}, None


def test_queue_bound_refuses_with_a_retry_hint():
    scheduler = Scheduler({"model_path": "unused"}, max_queue=3)
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
    scheduler = Scheduler({"model_path": "unused"}, max_batch_size=2)
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
