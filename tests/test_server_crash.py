"""kill -9 of the worker, then of the whole server, while a video job runs: no completed output is lost.
Completed jobs and their MP4s survive in the output directory (SQLite job store + files) and are served
again by a new server started on the same directory; the interrupted jobs are failed with the reason."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import httpx
import pytest
from server_utils import ServerProcess, wait_until

from diffgen.testing import TINY_FAMILIES

pytestmark = [
    pytest.mark.skipif("wan-t2v" not in TINY_FAMILIES, reason="needs the tiny Wan T2V checkpoint (wan-t2v)"),
    pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning"),
]
SMALL = {"num_frames": 5, "num_inference_steps": 2}
# >= 50 ms per step (the worker's test-only slow marker) x 200 steps: surely running when the kill comes.
SLOW = {"num_inference_steps": 200}


def _create(client, prompt: str, **extra):
    return client.videos.create(prompt=prompt, size="32x32", extra_body={**SMALL, **extra})


def _finished(client, video_id: str):
    return wait_until(lambda: (v := client.videos.retrieve(video_id)).status in ("completed", "failed") and v,
                      timeout=180, what=f"video {video_id} finished")


def _running(client, video_id: str) -> None:
    wait_until(lambda: client.videos.retrieve(video_id).status == "in_progress", timeout=180, what="running")


def test_kill_9_of_the_worker_and_of_the_server_lose_no_completed_output(tiny_checkpoint, tmp_path):
    wan = tiny_checkpoint("wan-t2v")
    output_dir = tmp_path / "out"
    server = ServerProcess(wan, output_dir, env={"DIFFGEN_FAULT_INJECT": "1"}).start()
    try:
        client = server.client(max_retries=0)
        first = _create(client, "a boat", seed=1)
        assert _finished(client, first.id).status == "completed"
        first_mp4 = client.videos.download_content(first.id).content

        # kill -9 of the worker mid-job: that job fails, the worker is restarted, the rest is kept.
        doomed = _create(client, "a slow boat [[fault:slow]]", seed=2, **SLOW)
        _running(client, doomed.id)
        os.kill(server.info()["worker_pids"][0], signal.SIGKILL)
        failed = _finished(client, doomed.id)
        assert failed.status == "failed" and failed.error.code == "worker_died", failed
        server.wait_ready()
        second = _create(client, "a second boat", seed=3)
        assert _finished(client, second.id).status == "completed"
        second_mp4 = client.videos.download_content(second.id).content
        assert client.videos.download_content(first.id).content == first_mp4

        # kill -9 of the whole server mid-job: no shutdown code runs at all.
        interrupted = _create(client, "another slow boat [[fault:slow]]", seed=4, **SLOW)
        _running(client, interrupted.id)
        worker = server.info()["worker_pids"][0]
        server.kill()
        # The orphaned worker sees its parent gone and exits by itself.
        wait_until(lambda: not Path(f"/proc/{worker}").exists(), timeout=60, what="the orphaned worker exits")
    finally:
        if server.process.poll() is None:
            server.kill()

    again = ServerProcess(wan, output_dir).start()
    try:
        client = again.client(max_retries=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for video_id, mp4 in ((first.id, first_mp4), (second.id, second_mp4)):
                assert client.videos.retrieve(video_id).status == "completed"
                assert client.videos.download_content(video_id).content == mp4
            assert client.videos.retrieve(doomed.id).error.code == "worker_died"
            lost = client.videos.retrieve(interrupted.id)
            assert lost.status == "failed" and lost.error.code == "server_restarted"
            listed = {v.id for v in client.videos.list(limit=100)}
        assert {first.id, second.id, doomed.id, interrupted.id} <= listed
        assert not list((output_dir / "videos").glob("*.part.mp4"))
        # The restarted server also generates: the /health_generate probe of a video model.
        assert httpx.get(f"{again.url}/liveness").status_code == 200
        probe = httpx.get(f"{again.url}/health_generate", timeout=180)
        assert probe.status_code == 200, probe.text
        assert client.models.retrieve(wan).model_extra["task_type"] == "T2V"
    finally:
        assert again.stop(), again.log()
