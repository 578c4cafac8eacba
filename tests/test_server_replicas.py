"""Two `diffgen serve` replicas sharing one job store (a real PostgreSQL) and one output store (a real
SeaweedFS), all started once for the module: a job created on one replica is polled, downloaded and
deleted on the other; a live replica's running job is never taken by the other, a paused replica's job
is failed once its lease expires, a killed replica's job at once; a restarted replica serves the old jobs;
a database that goes down is answered 503 and both recover when it is back; an unreachable --job-store
stops serve at start."""

from __future__ import annotations

import importlib.util
import os
import signal

import httpx
import pytest
from server_utils import ServerProcess, free_port, metric, wait_until
from services import BUCKET, S3_CREDENTIALS, SeaweedS3, postgres_server, require, unique_name

from diffgen.testing import TINY_FAMILIES

pytestmark = [
    pytest.mark.skipif("wan-t2v" not in TINY_FAMILIES, reason="needs the tiny Wan T2V checkpoint (wan-t2v)"),
    pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning"),
]
SMALL = {"num_frames": 5, "num_inference_steps": 2, "seed": 3}
LEASE = "5"  # seconds; short, so that the tests see leases expire (or not) within seconds


def _slow(steps: int) -> dict:
    """A job of at least ``steps`` x 50 ms (the worker's test-only slow marker; the prompt needs it)."""
    return {"num_frames": 5, "num_inference_steps": steps, "seed": 4}


class Replicas:
    """Replicas A and B over one PostgreSQL database and one bucket prefix."""

    def __init__(self, wan: str, root, job_store: str, s3: SeaweedS3):
        self.wan, self.root, self.job_store = wan, root, job_store
        self.options = ("--job-store", job_store, "--job-lease", LEASE, "--output-store", f"s3://{BUCKET}/replicas")
        self.env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3.endpoint, "DIFFGEN_FAULT_INJECT": "1"}
        self.a = self.b = None

    def replica(self, name: str) -> ServerProcess:
        return ServerProcess(self.wan, self.root / name, *self.options, env=self.env)

    def start(self) -> Replicas:
        self.a, self.b = self.replica("a").launch(), self.replica("b").launch()  # both load at once
        self.a.wait_ready()
        self.b.wait_ready()
        return self

    def restart_a(self) -> None:
        self.a = self.replica("a").start()

    def stop(self) -> None:
        for server in (self.a, self.b):
            if server is not None and server.process.poll() is None:
                os.kill(server.process.pid, signal.SIGCONT)
                assert server.stop(), server.log()


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    require(importlib.util.find_spec("boto3"), "the S3 output store needs boto3 (pip install -e '.[test]')")
    store = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield store
    store.stop()


@pytest.fixture(scope="module")
def replicas(tiny_checkpoint, postgres, s3, tmp_path_factory):
    servers = Replicas(tiny_checkpoint("wan-t2v"), tmp_path_factory.mktemp("replicas"),
                       postgres.create_database(unique_name("replicas")), s3)
    try:
        yield servers.start()
    finally:
        servers.stop()


def _finished(client, video_id: str, timeout: float = 180.0):
    return wait_until(lambda: (v := client.videos.retrieve(video_id)).status in ("completed", "failed") and v,
                      timeout=timeout, what=f"video {video_id} finished")


def _running(client, video_id: str) -> None:
    wait_until(lambda: client.videos.retrieve(video_id).status == "in_progress", timeout=120, what="running")


def _create(client, prompt: str, extra: dict):
    return client.videos.create(prompt=prompt, size="32x32", extra_body=extra)


def test_a_job_created_on_one_replica_is_polled_downloaded_and_deleted_on_the_other(replicas, s3):
    a, b = replicas.a, replicas.b
    on_a, on_b = a.client(max_retries=0), b.client(max_retries=0)
    assert a.info()["replica_id"] != b.info()["replica_id"]
    assert b.info()["job_store"] == replicas.job_store.replace("unused-password", "***")

    video = _create(on_a, "a boat", SMALL)
    done = _finished(on_b, video.id)
    assert done.status == "completed", done.error
    mp4 = on_b.videos.download_content(video.id).content
    assert mp4 == s3.get(f"replicas/videos/{video.id}.mp4") and mp4[4:8] == b"ftyp"
    assert on_a.videos.download_content(video.id).content == mp4
    assert video.id in {v.id for v in on_b.videos.list()}

    # A job running on A over more than a lease: B reports its progress and never fails it.
    slow = _create(on_a, "a slow boat [[fault:slow]]", _slow(100))
    seen = wait_until(lambda: (v := on_b.videos.retrieve(slow.id)).progress > 0 and v, timeout=120,
                      what="progress of A's job seen on B")
    assert seen.status == "in_progress"
    assert _finished(on_b, slow.id).status == "completed"

    # Deleted through B while it runs on A: A cancels it at its next heartbeat.
    cancelled = metric(a.url, 'diffgen_jobs_total{status="cancelled"}')
    doomed = _create(on_a, "a doomed boat [[fault:slow]]", _slow(100))
    _running(on_b, doomed.id)
    on_b.videos.delete(doomed.id)
    wait_until(lambda: metric(a.url, 'diffgen_jobs_total{status="cancelled"}') == cancelled + 1, timeout=60,
               what="A cancelled the job deleted through B")
    assert httpx.get(f"{a.url}/v1/videos/{doomed.id}").status_code == 404
    on_b.videos.delete(video.id)
    assert s3.keys(f"replicas/videos/{video.id}") == []


def test_a_paused_replica_loses_its_job_when_its_lease_expires_and_a_killed_one_at_once(replicas, s3):
    a, b = replicas.a, replicas.b
    on_a, on_b = a.client(max_retries=0), b.client(max_retries=0)
    finished = _create(on_a, "a boat", SMALL)
    assert _finished(on_b, finished.id).status == "completed"

    # A is paused (alive, but silent): once its lease expires, B fails its running job.
    paused = _create(on_a, "a paused boat [[fault:slow]]", _slow(40))
    _running(on_b, paused.id)
    os.kill(a.process.pid, signal.SIGSTOP)
    try:
        lost = _finished(on_b, paused.id, timeout=60)
    finally:
        os.kill(a.process.pid, signal.SIGCONT)
    assert lost.status == "failed" and lost.error.code == "replica_lost", lost.error
    # Back, A sees at its next heartbeat that the job is no longer its own (it cancels it, or its outcome
    # comes first): either way the outcome is dropped, and A serves on.
    wait_until(lambda: f"video {paused.id} ended here but was deleted or failed elsewhere" in
               a.log_path.read_text(errors="replace"), timeout=120, what="A dropped the outcome")
    assert on_a.videos.retrieve(paused.id).status == "failed"
    assert s3.keys(f"replicas/videos/{paused.id}") == []
    again = _create(on_a, "a boat again", SMALL)
    assert _finished(on_b, again.id).status == "completed"

    # A is killed mid-job: B fails its job at once (A's process is gone); a restarted A serves the old jobs.
    killed = _create(on_a, "a killed boat [[fault:slow]]", _slow(60))
    _running(on_b, killed.id)
    a.kill()
    lost = _finished(on_b, killed.id, timeout=60)
    assert lost.status == "failed" and lost.error.code == "server_restarted", lost.error
    replicas.restart_a()
    on_a = replicas.a.client(max_retries=0)
    assert on_a.videos.download_content(finished.id).content == s3.get(f"replicas/videos/{finished.id}.mp4")
    statuses = {v.id: v.status for v in on_a.videos.list()}
    assert [statuses[v.id] for v in (finished, paused, again, killed)] == ["completed", "failed", "completed",
                                                                         "failed"]


def test_a_database_that_goes_down_is_answered_503_and_the_replicas_recover(replicas, postgres):
    a, b = replicas.a, replicas.b
    on_a, on_b = a.client(max_retries=0), b.client(max_retries=0)
    first = _create(on_a, "a boat", SMALL)
    assert _finished(on_b, first.id).status == "completed"
    mp4 = on_b.videos.download_content(first.id).content
    before = {v.id for v in on_b.videos.list(limit=100)}
    completed = metric(a.url, 'diffgen_jobs_total{status="completed"}')
    running = _create(on_a, "a slow boat [[fault:slow]]", _slow(60))  # still running when the database stops
    _running(on_a, running.id)

    postgres.stop()
    for server in (a, b):
        for method, path, body in [("GET", f"/v1/videos/{first.id}", None), ("GET", "/v1/videos", None),
                                   ("GET", f"/v1/videos/{first.id}/content", None),
                                   ("POST", "/v1/videos", {"prompt": "a storm", "size": "32x32", **SMALL}),
                                   ("DELETE", f"/v1/videos/{first.id}", None)]:
            response = httpx.request(method, f"{server.url}{path}", json=body, timeout=60)
            assert response.status_code == 503, (method, path, response.text)
            error = response.json()["error"]
            assert error["code"] == "job_store_unavailable" and error["type"] == "server_error"
            assert "cannot be reached" in error["message"] and "diffgen:***@127.0.0.1" in error["message"]
            assert response.headers["retry-after"] == "5"
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200  # the server keeps running
    # The running job ends while the database is down: A keeps its outcome.
    wait_until(lambda: metric(a.url, 'diffgen_jobs_total{status="completed"}') == completed + 1, timeout=300,
               what="the slow job ended on A")
    wait_until(lambda: f"video {running.id} is completed; recorded once the job store is back" in
               a.log_path.read_text(errors="replace"), timeout=60, what="A kept the outcome")

    postgres.start()
    assert _finished(on_b, running.id, timeout=120).status == "completed"
    assert on_b.videos.download_content(running.id).content[4:8] == b"ftyp"
    assert on_a.videos.download_content(first.id).content == mp4
    # Nothing half-written: the refused create left no job, the refused delete deleted nothing.
    assert {v.id for v in on_b.videos.list(limit=100)} == before | {running.id}
    after = _create(on_b, "after the outage", SMALL)
    assert _finished(on_a, after.id).status == "completed"


def test_an_unreachable_job_store_stops_serve_at_start(tiny_checkpoint, tmp_path):
    # (Bad URLs give the same one line: test_job_store.py.)
    server = ServerProcess(tiny_checkpoint("wan-t2v"), tmp_path / "out", "--job-store",
                           f"postgresql://user:secret@127.0.0.1:{free_port()}/db")
    with pytest.raises(RuntimeError, match="exited with 2") as caught:
        server.start()
    log = str(caught.value)
    assert "error: --job-store: the job store postgresql://user:***@127.0.0.1:" in log and "cannot be reached" in log
    assert "secret" not in log and "Traceback" not in log, log
