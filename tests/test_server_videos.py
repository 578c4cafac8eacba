"""Video jobs over HTTP with the official openai client: create, poll, download, list, delete (cancel),
and what survives a restart of the server."""

from __future__ import annotations

import base64
import io
import warnings

import httpx
import openai
import pytest
from PIL import Image
from server_utils import ServerProcess, sse_events, wait_until

from diffgen.testing import TINY_FAMILIES

pytestmark = [
    pytest.mark.skipif("wan-t2v" not in TINY_FAMILIES, reason="needs the tiny Wan T2V checkpoint (wan-t2v)"),
    pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning"),
]
SMALL = {"num_frames": 5, "num_inference_steps": 2, "seed": 3}
# 200 steps of >= 50 ms each (the worker's test-only slow marker): >= 10 s of denoising, so the job
# is surely still running when it is deleted or when the 1 s shutdown grace runs out.
LONG = {"num_inference_steps": 200, "seed": 4, "prompt": "a slow boat [[fault:slow]]"}


@pytest.fixture(scope="module")
def wan(tiny_checkpoint):
    return tiny_checkpoint("wan-t2v")


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-videos") / "out"


@pytest.fixture(scope="module")
def server(wan, output_dir):
    process = ServerProcess(wan, output_dir, "--shutdown-timeout", "1", env={"DIFFGEN_FAULT_INJECT": "1"}).start()
    yield process
    process.stop()


def _create(client, prompt: str = "a boat on a lake", **extra):
    return client.videos.create(prompt=prompt, size="32x32", extra_body={**SMALL, **extra})


def _wait(client, video_id: str, statuses=("completed", "failed"), timeout: float = 120.0):
    return wait_until(lambda: (v := client.videos.retrieve(video_id)).status in statuses and v,
                      timeout=timeout, what=f"video {video_id} in {statuses}")


def _mp4_frames(data: bytes) -> int:
    import imageio.v3 as iio

    return len(iio.imread(io.BytesIO(data), extension=".mp4", plugin="pyav")) if _has_pyav() else \
        _ffmpeg_frames(data)


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _ffmpeg_frames(data: bytes) -> int:
    import tempfile

    import imageio_ffmpeg

    with tempfile.NamedTemporaryFile(suffix=".mp4") as file:
        file.write(data)
        file.flush()
        reader = imageio_ffmpeg.read_frames(file.name)
        meta = next(reader)
        frames = sum(1 for _ in reader)
    assert tuple(meta["size"]) == (32, 32)
    return frames


def test_create_poll_download(server):
    client = server.client()
    raw = client.videos.with_raw_response.create(prompt="a boat on a lake", size="32x32", extra_body=SMALL)
    video = raw.parse()
    assert raw.headers["x-request-id"] == video.id and video.id.startswith("video_")
    assert video.object == "video" and video.status in ("queued", "in_progress") and video.size == "32x32"
    assert video.prompt == "a boat on a lake" and video.model == server.model_path
    seen = []
    done = wait_until(lambda: (seen.append(v := client.videos.retrieve(video.id)) or v.status == "completed") and v,
                      timeout=120, what="completed video")
    assert done.progress == 100 and done.completed_at is not None and done.error is None
    progress = [v.progress for v in seen]
    assert progress == sorted(progress)  # never goes backwards
    content = client.videos.download_content(video.id).content
    assert content[4:8] == b"ftyp" and _mp4_frames(content) == 5


def test_seconds_become_frames(server):
    client = server.client()
    video = client.videos.create(prompt="waves", size="32x32", seconds="1",
                                 extra_body={"fps": 4, "num_inference_steps": 1})
    assert video.seconds == "1"
    assert _wait(client, video.id).status == "completed"
    assert _mp4_frames(client.videos.download_content(video.id).content) == 5  # 1 s x 4 fps -> 4k+1 = 5


def test_list_pages(server):
    client = server.client()
    ids = [_create(client).id for _ in range(2)]
    for video_id in ids:
        _wait(client, video_id)
    newest = client.videos.list(limit=1)
    assert newest.data[0].id == ids[-1] and newest.has_more
    raw = httpx.get(f"{server.url}/v1/videos", params={"limit": 2, "order": "asc"}).json()
    assert raw["object"] == "list" and raw["first_id"] == raw["data"][0]["id"]
    every = [v.id for v in client.videos.list(order="asc", limit=1)]  # auto-paginates through `after`
    assert every[-2:] == ids and len(every) == len(set(every))


def test_delete_cancels_a_running_job(server):
    client = server.client()
    video = _create(client, **LONG)
    wait_until(lambda: client.videos.retrieve(video.id).status == "in_progress", timeout=120, what="running")
    deleted = client.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id and deleted.object == "video.deleted"
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    # The worker is freed: the next job runs and completes; the cancelled one is counted.
    assert _wait(client, _create(client).id).status == "completed"
    assert 'diffgen_jobs_total{status="cancelled"} 1' in httpx.get(f"{server.url}/metrics").text


def test_images_on_a_video_model_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().images.generate(prompt="a cat", size="32x32")
    assert caught.value.body["code"] == "unsupported_model" and "/v1/videos" in caught.value.message


def test_a_request_without_seconds_or_frames_takes_the_model_defaults(server):
    # What the openai client sends by default: no seconds, no num_frames (this used to be a 500).
    response = httpx.post(f"{server.url}/v1/videos", json={"prompt": "a boat on a lake", "size": "32x32",
                                                           "num_inference_steps": 1})
    assert response.status_code == 200, response.text
    video = response.json()
    assert video["seconds"] == "5.06" and video["size"] == "32x32"  # Wan2.1: 81 frames at 16 fps
    client = server.client()
    assert _wait(client, video["id"]).status == "completed"
    assert _mp4_frames(client.videos.download_content(video["id"]).content) == 81


@pytest.mark.parametrize("body,param,message", [
    ({"size": "81x48"}, "size", "size: 81x48: width: 81 is not a multiple of 16"),
    ({"num_frames": 10}, "num_frames", "10 is not 4k+1"),
    ({"guidance_scale_2": 2.0}, "guidance_scale_2", "has one transformer"),
    ({"max_sequence_length": 4000}, "max_sequence_length", "exceeds 512"),
])
def test_a_bad_video_request_is_a_400_at_create_time_and_takes_no_slot(server, body, param, message):
    before = httpx.get(f"{server.url}/v1/videos", params={"limit": 100}).json()["data"]
    response = httpx.post(f"{server.url}/v1/videos", json={"prompt": "a cat", "size": "32x32", **SMALL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"
    after = httpx.get(f"{server.url}/v1/videos", params={"limit": 100}).json()["data"]
    assert [v["id"] for v in after] == [v["id"] for v in before]  # no job was created
    assert server.info()["queue_depth"] == 0


def test_several_outputs_per_video_request(server):
    client = server.client()
    video = _create(client, n=2)
    assert _wait(client, video.id).status == "completed"
    first = httpx.get(f"{server.url}/v1/videos/{video.id}/content").content
    second = httpx.get(f"{server.url}/v1/videos/{video.id}/content", params={"index": 1}).content
    assert _mp4_frames(first) == _mp4_frames(second) == 5 and first != second  # two noises, two videos
    beyond = httpx.get(f"{server.url}/v1/videos/{video.id}/content", params={"index": 2})
    assert beyond.status_code == 400 and beyond.json()["error"]["param"] == "index"
    client.videos.delete(video.id)
    assert not list((server.output_dir / "videos").glob(f"{video.id}*"))


# -- GET /v1/videos/{id}/events: Server-Sent Events -------------------------------------------------------
# 20 steps of >= 50 ms (the slow marker): the stream, opened right after create, sees the job run.
WATCHED = {"num_frames": 5, "num_inference_steps": 20, "seed": 5, "preview_every": 4}


def test_video_events_stream_progress_previews_then_completed(server):
    client = server.client()
    video = _create(client, prompt="a watched boat [[fault:slow]]", **WATCHED)
    with httpx.stream("GET", f"{server.url}/v1/videos/{video.id}/events", timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "video.completed" and events[-1][1]["status"] == "completed"
    assert events[-1][1]["id"] == video.id and events[-1][1]["progress"] == 100
    steps = [data["step"] for kind, data in events if kind == "video.progress" and data.get("step")]
    assert len(steps) >= 5 and steps == sorted(steps) and steps[-1] == 20, steps
    assert {data["total_steps"] for kind, data in events if kind == "video.progress" and "total_steps" in data} \
        <= {0, 20}
    previews = [data for kind, data in events if kind == "video.partial_image"]
    assert previews and {data["step"] % 4 for data in previews} == {0} and previews[-1]["step"] == 16
    image = Image.open(io.BytesIO(base64.b64decode(previews[-1]["b64_json"])))
    assert image.size == (4, 4)  # 32x32 at the VAE's 8x: the latent grid
    assert client.videos.download_content(video.id).content[4:8] == b"ftyp"
    # A finished job's stream is its final event alone.
    with httpx.stream("GET", f"{server.url}/v1/videos/{video.id}/events", timeout=30) as response:
        assert [kind for kind, _ in sse_events(response)] == ["video.completed"]


def test_leaving_a_video_event_stream_does_not_cancel_the_job(server):
    client = server.client()
    video = _create(client, prompt="an unwatched boat [[fault:slow]]", **WATCHED)
    with httpx.stream("GET", f"{server.url}/v1/videos/{video.id}/events", timeout=120) as response:
        next(sse_events(response))
    assert _wait(client, video.id).status == "completed"


def test_fault_injection_is_announced_at_start_up(server):
    # This server runs with DIFFGEN_FAULT_INJECT=1 (test-only): the worker says so loudly.
    log = server.log_path.read_text(errors="replace")  # the whole log (server.log() keeps its tail)
    assert "WARNING:diffgen.engine.worker:DIFFGEN_FAULT_INJECT=1: fault injection is ON" in log


def test_jobs_and_content_survive_a_restart(server, wan, output_dir):
    client = server.client()
    finished = _create(client)
    _wait(client, finished.id)
    before = client.videos.download_content(finished.id).content
    running = _create(client, **LONG)
    wait_until(lambda: client.videos.retrieve(running.id).status == "in_progress", timeout=120, what="running")
    assert server.stop()  # SIGTERM; --shutdown-timeout 1 cancels the long job

    again = ServerProcess(wan, output_dir).start()
    try:
        client = again.client()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            kept = client.videos.retrieve(finished.id)
            assert kept.status == "completed" and client.videos.download_content(finished.id).content == before
            failed = client.videos.retrieve(running.id)
        assert failed.status == "failed" and failed.error.code in ("shutdown", "server_restarted")
        assert "shut down" in failed.error.message or "restarted" in failed.error.message
        assert finished.id in [v.id for v in client.videos.list(limit=100)]
    finally:
        assert again.stop(), again.log()


def test_full_queue_is_a_429_and_a_worker_that_cannot_restart_fails_the_queue(wan, tmp_path):
    # --max-queue 2: two jobs may wait behind the running one. A restart limit of 0 (a test-only
    # variable) makes the first worker death final.
    process = ServerProcess(wan, tmp_path / "out", "--max-queue", "2", "--max-batch-size", "1",
                            env={"DIFFGEN_FAULT_INJECT": "1", "DIFFGEN_MAX_WORKER_RESTARTS": "0"}).start()
    try:
        client = process.client(max_retries=0)
        slow = _create(client, **LONG)
        wait_until(lambda: client.videos.retrieve(slow.id).status == "in_progress", timeout=120, what="running")
        dies = _create(client, prompt="a sinking boat [[fault:exit]]")  # waits, then kills the worker
        waits = _create(client)  # waits behind it
        refused = httpx.post(f"{process.url}/v1/videos", json={"prompt": "one too many", "size": "32x32", **SMALL})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-request-id"].startswith("req_")

        client.videos.delete(slow.id)  # frees the worker: the fatal job runs next
        assert _wait(client, dies.id).error.code == "worker_died"
        failed = _wait(client, waits.id)  # used to stay queued forever
        assert failed.status == "failed" and failed.error.code == "worker_died"
        assert "not restarted" in failed.error.message
        health = httpx.get(f"{process.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        late = httpx.post(f"{process.url}/v1/videos", json={"prompt": "too late", "size": "32x32", **SMALL})
        assert late.status_code == 503 and "not restarted" in late.json()["error"]["message"]
        assert late.headers["x-should-retry"] == "false"  # final: the openai client does not retry
        assert httpx.get(f"{process.url}/liveness").status_code == 200  # the process is up...
        probe = httpx.get(f"{process.url}/health_generate", timeout=60)  # ...but cannot generate
        assert probe.status_code == 503 and probe.json()["error"]["code"] == "model_not_ready"
    finally:
        assert process.stop(), process.log()


