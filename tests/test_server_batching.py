"""Batching through `diffgen serve`: concurrent HTTP clients share denoising forwards, joining a running batch
between steps; each gets the image it would get alone; a cancelled, failing or out-of-memory request leaves
the others' outputs unchanged."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from server_utils import ServerProcess, metric, wait_until

SIZE = "32x48"  # width x height
HEIGHT, WIDTH = 48, 32


@pytest.fixture(scope="module")
def server(tiny_flux, tmp_path_factory):
    process = ServerProcess(tiny_flux, tmp_path_factory.mktemp("serve-batching") / "out", "--max-batch-size", "4",
                            env={"DIFFGEN_FAULT_INJECT": "1"}).start()
    yield process
    assert process.stop(), process.log()


@pytest.fixture(scope="module")
def engine(tiny_flux):
    from diffgen import Engine

    return Engine.from_pretrained(tiny_flux, device="cpu")


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def _alone(engine, prompt: str, seed: int, steps: int, **extra) -> np.ndarray:
    image = engine.generate(prompt, height=HEIGHT, width=WIDTH, seed=seed, num_inference_steps=steps, **extra).images[0]
    return np.asarray(image).astype(np.int16)


def _assert_same_image(got: np.ndarray, expected: np.ndarray) -> None:
    # Batched float32 matmuls round differently in the last bits: at most one level of 255 may flip.
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1


def _generate(server, prompt: str, seed: int, steps: int, **extra):
    client = server.client(max_retries=0, timeout=300)
    return client.images.generate(prompt=prompt, size=SIZE, extra_body={"seed": seed, "num_inference_steps": steps,
                                                                         **extra})


def _shared(server) -> tuple[float, float]:
    """(finished jobs, sum over them of the most requests that shared one of their forwards)."""
    return (metric(server.url, "diffgen_batched_requests_count"), metric(server.url, "diffgen_batched_requests_sum"))


def _start_long_job(pool, server, prompt: str, steps: int = 16):
    """A slow job (>= 50 ms per step) that the others join; returns its future once it runs."""
    future = pool.submit(_generate, server, f"{prompt} [[fault:slow]]", 1, steps)
    wait_until(lambda: server.info()["running"] >= 1, timeout=120, what="the long job running")
    return future


def test_concurrent_clients_join_the_running_batch_and_get_their_own_images(server, engine):
    count, total = _shared(server)
    requests = [(f"client {i} prompt of some length {'x ' * i}", 10 + i, 2 + i % 3, {"guidance_scale": 2.0 + i})
                for i in range(5)]
    with ThreadPoolExecutor(6) as pool:
        long = _start_long_job(pool, server, "the long one")
        futures = [pool.submit(_generate, server, prompt, seed, steps, **extra)
                   for prompt, seed, steps, extra in requests]
        responses = [future.result() for future in futures]
        long_response = long.result()
    for (prompt, seed, steps, extra), response in zip(requests, responses, strict=True):
        _assert_same_image(_pixels(response.data[0].b64_json), _alone(engine, prompt, seed, steps, **extra))
    _assert_same_image(_pixels(long_response.data[0].b64_json),
                       _alone(engine, "the long one [[fault:slow]]", 1, 16))
    new_count, new_total = _shared(server)
    assert new_count - count == 6 and new_total - total > 6  # requests really shared forwards


def test_cancelling_one_request_of_a_batch_leaves_the_others_unchanged(server, engine):
    cancelled = metric(server.url, 'diffgen_jobs_total{status="cancelled"}')
    with ThreadPoolExecutor(3) as pool:
        long = _start_long_job(pool, server, "stays")
        other = pool.submit(_generate, server, "also stays", 7, 12)
        wait_until(lambda: server.info()["running"] >= 2, timeout=120, what="two jobs running")
        with pytest.raises(httpx.TimeoutException):  # the client gives up: its job is cancelled
            # Slow steps (>= 50 ms each) keep the abandoned job running well past the client's 2 s on any machine.
            httpx.post(f"{server.url}/v1/images/generations", timeout=2,
                       json={"prompt": "abandoned [[fault:slow]]", "size": SIZE, "num_inference_steps": 200, "seed": 3})
        wait_until(lambda: metric(server.url, 'diffgen_jobs_total{status="cancelled"}') == cancelled + 1,
                   timeout=120, what="the abandoned job cancelled")
        long_pixels, other_pixels = _pixels(long.result().data[0].b64_json), _pixels(other.result().data[0].b64_json)
    _assert_same_image(long_pixels, _alone(engine, "stays [[fault:slow]]", 1, 16))
    _assert_same_image(other_pixels, _alone(engine, "also stays", 7, 12))


def test_a_failing_request_fails_alone_and_an_oom_batch_is_retried_one_by_one(server, engine):
    with ThreadPoolExecutor(4) as pool:
        long = _start_long_job(pool, server, "survives")
        # 8 steps: near enough to the long job's 16 that the step policy lets them share forwards
        oom = pool.submit(_generate, server, "too big together [[fault:batch-oom]]", 5, 8)
        broken = pool.submit(_generate, server, "boom [[fault:raise]]", 6, 3)
        with pytest.raises(openai.InternalServerError) as caught:
            broken.result()
        assert "injected fault" in caught.value.body["message"]
        oom_pixels = _pixels(oom.result().data[0].b64_json)
        long_pixels = _pixels(long.result().data[0].b64_json)
    _assert_same_image(oom_pixels, _alone(engine, "too big together [[fault:batch-oom]]", 5, 8))
    _assert_same_image(long_pixels, _alone(engine, "survives [[fault:slow]]", 1, 16))
    assert "running them one by one" in server.log_path.read_text(errors="replace")
