"""Several processes behind the user's entry points: the Python API, the CLI (a WorkerGroup executor) , the
server (each worker one replica: a group of ranks) and torchrun (the launcher starts the ranks).

Each test starts real rank processes (gloo on the CPU) and compares with the single-process output.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffgen import Engine
from diffgen.entrypoints.cli import main

PROMPT = "a red fox in the snow"
REQUEST = dict(height=48, width=80, num_inference_steps=2, seed=3, max_sequence_length=16)


@pytest.fixture(scope="module")
def single_engine(tiny_flux):
    return Engine.from_pretrained(tiny_flux, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def single(single_engine):
    return single_engine.generate(PROMPT, return_tensors=True, **REQUEST)


def _close_images(got: Image.Image, expected: Image.Image) -> None:
    """uint8 images of outputs equal within 1e-5 in [0, 1]: at most one rounding step apart."""
    difference = np.abs(np.asarray(got.convert("RGB"), dtype=int) - np.asarray(expected, dtype=int))
    assert difference.max() <= 1


def test_python_api_ulysses_and_tp_equal_one_process_and_a_killed_rank_recovers(tiny_flux, single):
    from diffgen.parallel.worker_group import WorkerGroupError

    with Engine.from_pretrained(tiny_flux, device="cpu", dtype="float32", num_gpus=2, ulysses_degree=2,
                                tp_size=2) as engine:
        assert type(engine.executor).__name__ == "WorkerGroup" and len(engine.executor.processes) == 2
        result = engine.generate(PROMPT, return_tensors=True, **REQUEST)
        assert (result.pixels - single.pixels).abs().max().item() <= 1e-5
        steps, previews = [], []
        engine.generate(PROMPT, progress=lambda step, total: steps.append((step, total)), preview_every=1,
                        preview=lambda step, total, images: previews.append((step, images.shape)), **REQUEST)
        assert steps == [(1, 2), (2, 2)]
        assert previews == [(1, (1, 1, 6, 10, 3))]  # 48x80 at 8x; from rank 0, over the group's pipe

        engine.executor.processes[1].kill()  # a rank dies: its request fails, the group starts again
        with pytest.raises(WorkerGroupError, match="rank"):
            engine.generate(PROMPT, **REQUEST)
        result = engine.generate(PROMPT, return_tensors=True, **REQUEST)
        assert (result.pixels - single.pixels).abs().max().item() <= 1e-5
        assert engine.status().restarts == 1


def test_python_api_degree_without_gpus_is_one_error_before_loading(tiny_flux):
    from diffgen.parallel.config import ParallelConfigError

    with pytest.raises(ParallelConfigError, match="--num-gpus 1: the degrees do not multiply"):
        Engine.from_pretrained(tiny_flux, device="cpu", ulysses_degree=2)


def test_cli_generate_with_ring_parallel(tiny_flux, single, tmp_path, capsys):
    code = main(["generate", "--model-path", tiny_flux, "--device", "cpu", "--dtype", "float32", "--num-gpus", "2",
                 "--ring-degree", "2", "--prompt", PROMPT, "--height", "48", "--width", "80",
                 "--num-inference-steps", "2", "--seed", "3", "--max-sequence-length", "16", "--save-output",
                 "--output-path", str(tmp_path), "--output-file-name", "fox"])
    assert code == 0, capsys.readouterr().err
    _close_images(Image.open(tmp_path / "fox.png"), single.images[0])


def test_cli_bad_combination_is_one_error_before_loading(tiny_checkpoint, capsys):
    code = main(["generate", "--model-path", tiny_checkpoint("qwen-image"), "--device", "cpu", "--num-gpus", "2",
                 "--ulysses-degree", "2", "--prompt", PROMPT])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "error: --ulysses-degree 2 does not divide ckpt's 3 attention heads; allowed: 1, 3 (use --ring-degree "
        "for the rest)"]


def test_server_with_replicas_of_two_ranks(tiny_flux, single_engine, tmp_path):
    from server_utils import ServerProcess

    server = ServerProcess(tiny_flux, tmp_path / "out", "--dtype", "float32", "--num-gpus", "4", "--dp-size", "2",
                           "--ulysses-degree", "2")
    # 2 replicas x 2 ranks load one after another on a 2-core CI box: give them longer than one worker gets
    server.wait_ready = functools.partial(ServerProcess.wait_ready, server, timeout=600)
    server.start()
    try:
        client = server.client()
        from concurrent.futures import ThreadPoolExecutor

        def one(_):
            return client.images.generate(prompt=PROMPT, size="80x48", extra_body={"num_inference_steps": 2, "seed": 3})

        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(one, range(4)))
        expected = single_engine.generate(PROMPT, height=48, width=80, num_inference_steps=2, seed=3).images[0]
        for response in responses:
            _close_images(Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))), expected)
    finally:
        assert server.stop(), server.log()


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
def test_server_worker_that_is_a_group_shows_its_plan_and_cancels_a_queued_job(tiny_checkpoint, tmp_path):
    """One worker of 2 ranks (no --dtype): /server_info shows the group, its plan and its rank processes; the model
    card the dtype the ranks loaded (auto: float32 on the CPU), not the option's spelling; a job deleted while
    queued behind a running one never starts, the running one is cancelled on every rank, and the group then
    serves the next job."""
    import httpx
    from server_utils import ServerProcess, metric, wait_until

    server = ServerProcess(tiny_checkpoint("wan-t2v"), tmp_path / "out", "--num-gpus", "2", "--ulysses-degree", "2",
                           env={"DIFFGEN_FAULT_INJECT": "1"})
    server.wait_ready = functools.partial(ServerProcess.wait_ready, server, timeout=600)
    server.start()
    try:
        info = httpx.get(f"{server.url}/server_info").json()
        (group,) = info["worker_groups"]
        assert group["worker"] == 0 and group["plan"] == "2 GPU(s), Ulysses 2", info
        assert len(set(group["rank_pids"])) == 2 and not set(group["rank_pids"]) & set(info["worker_pids"]), info
        for pid in group["rank_pids"]:
            os.kill(pid, 0)  # the rank processes exist
        card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
        assert (card["dit_precision"], card["vae_precision"]) == ("float32", "float32"), card

        client = server.client()
        small = {"num_frames": 5, "num_inference_steps": 2, "seed": 3}
        running = client.videos.create(prompt="a slow boat [[fault:slow]]", size="32x32",
                                       extra_body={**small, "num_inference_steps": 200})
        wait_until(lambda: client.videos.retrieve(running.id).status == "in_progress", timeout=300, what="running")
        queued = client.videos.create(prompt="a boat on a lake", size="32x32", extra_body=small)
        assert client.videos.retrieve(queued.id).status == "queued"
        assert client.videos.delete(queued.id).deleted
        assert client.videos.delete(running.id).deleted
        after = client.videos.create(prompt="a boat on a lake", size="32x32", extra_body=small)
        assert wait_until(lambda: (v := client.videos.retrieve(after.id)).status in ("completed", "failed") and v,
                          timeout=600, what="the next job").status == "completed"
        assert metric(server.url, 'diffgen_jobs_total{status="cancelled"}') == 2
        assert metric(server.url, "diffgen_queue_wait_seconds_count") == 2  # the queued job never started
        assert httpx.get(f"{server.url}/server_info").json()["worker_restarts"] == 0
    finally:
        assert server.stop(), server.log()


def test_serve_with_a_bad_combination_exits_with_one_error_before_loading(tiny_checkpoint, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "diffgen.entrypoints.cli", "serve", "--model-path",
                          tiny_checkpoint("qwen-image"), "--device", "cpu", "--num-gpus", "2", "--ulysses-degree", "2",
                          "--port", "0", "--output-dir", str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: --ulysses-degree 2 does not divide ckpt's 3 attention heads; allowed: 1, 3 (use --ring-degree "
        "for the rest)"], run.stderr
    assert not list(tmp_path.iterdir())  # nothing started: no output folder content


def test_two_torchrun_launches_meet_on_localhost(tiny_flux, single, tmp_path):
    port = str(_free_port())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(os.path.abspath(__import__("diffgen").__file__))),
                    os.environ.get("PYTHONPATH")) if p)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1", "--master-port", port]
    command = ["-m", "diffgen.entrypoints.cli", "generate", "--model-path", tiny_flux, "--device", "cpu",
               "--dtype", "float32", "--ulysses-degree", "2", "--prompt", PROMPT, "--height", "48", "--width", "80",
               "--num-inference-steps", "2", "--seed", "3", "--max-sequence-length", "16", "--save-output",
               "--output-path", str(tmp_path), "--output-file-name", "fox"]
    nodes = [subprocess.Popen([*torchrun, "--node-rank", str(node), *command], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
    assert all(node.returncode == 0 for node in nodes), "\n".join(outputs)
    _close_images(Image.open(tmp_path / "fox.png"), single.images[0])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Replica:
    """Stands in for a ready replica worker (the scheduler's view: its batch and capacity)."""

    def __init__(self, index: int, capacity: int = 4):
        self.index, self.ready, self.gone, self.load_error = index, True, False, None
        self.batch: dict = {}
        self.batch_id, self.batch_key, self.capacity = None, None, capacity


def test_waiting_requests_are_spread_over_the_replicas():
    """--dp-size 2, 4 requests at once: 2 per replica, not one batch of 4 beside an idle GPU; a newcomer joins
    the least busy replica."""
    from diffgen.engine.request import GenerationRequest
    from diffgen.engine.scheduler import ProcessExecutor

    scheduler = ProcessExecutor({"model_path": "unused"}, max_batch_size=4, num_workers=2)
    replicas = [_Replica(0), _Replica(1)]
    scheduler._workers.extend(replicas)
    jobs = [scheduler.submit(GenerationRequest.build(f"p{i}", height=32, width=32)) for i in range(4)]
    sent = {}
    with scheduler._lock:
        for _ in range(2):
            target, batch = scheduler._next_dispatch()
            target.batch.update({job.id: job for job in batch})
            target.batch_key = batch[0].batch_key
            sent[target.index] = [job.id for job in batch]
        assert sent == {0: [jobs[0].id, jobs[1].id], 1: [jobs[2].id, jobs[3].id]}
        replicas[1].batch.pop(jobs[2].id)  # replica 1 finished one: 1 job there, 2 on replica 0
        late = scheduler.submit(GenerationRequest.build("late", height=32, width=32))
        target, batch = scheduler._next_dispatch()
    assert target is replicas[1] and [job.id for job in batch] == [late.id]


# the listener thread ends by SystemExit (what its os._exit becomes here), which threading ignores and pytest reports
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_cancel_that_arrives_while_the_ranks_take_the_request_is_not_lost(monkeypatch):
    """A group's root receives ("run", request) then ("cancel",) on its socket; the cancel can arrive while the
    loop still waits for the other ranks to take the request (here: a slow broadcast). The request is cancelled,
    and the next one runs uncancelled. (Seen in the server test above under load: the deleted running job ran to
    completion.)"""
    import multiprocessing
    import threading
    import time
    from types import SimpleNamespace

    from diffgen.errors import CancelledError
    from diffgen.parallel import worker
    from diffgen.parallel.worker_group import receive, send

    class Pipeline:
        def run(self, request, progress=None, is_cancelled=None):
            for _ in range(20):
                if is_cancelled():
                    raise CancelledError(f"{request} cancelled")
                time.sleep(0.01)
            return SimpleNamespace(latents=None, pixels=None, request=request)

    def slow_broadcast(message, state):
        time.sleep(0.3)  # the other ranks are still busy: the cancel arrives meanwhile
        return message

    exits = []

    def exit_thread(code):  # the listener ends the process when the Engine's end closes: here only its thread
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(worker, "broadcast_from_replica_root", slow_broadcast)
    monkeypatch.setattr(worker.os, "_exit", exit_thread)
    engine_end, rank_end = multiprocessing.Pipe()
    state = SimpleNamespace(replica=SimpleNamespace(group=None), rank=0, device="cpu")
    loop = threading.Thread(target=worker.serve_rank, args=(Pipeline(), state, rank_end), daemon=True)
    loop.start()
    try:
        send(engine_end, ("run", "first"))
        send(engine_end, ("cancel",))
        assert engine_end.poll(30)
        kind, payload = receive(engine_end)
        assert kind == "failed" and isinstance(payload, CancelledError), (kind, payload)
        send(engine_end, ("run", "second"))
        assert engine_end.poll(30)
        kind, payload = receive(engine_end)
        assert kind == "done" and payload.request == "second", (kind, payload)
        send(engine_end, ("stop",))
        loop.join(30)
        assert not loop.is_alive()
    finally:
        engine_end.close()
        deadline = time.monotonic() + 30
        while not exits and time.monotonic() < deadline:  # the listener saw the close and ended its thread
            time.sleep(0.01)
    assert exits == [0]
