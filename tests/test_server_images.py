"""`diffgen serve` with an image model, driven by the official openai client over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from server_utils import ServerProcess, metric, sse_events, wait_until

SIZE = "64x64"
STEPS = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(tiny_flux, tmp_path_factory):
    # Fault injection is on for this module only: prompts with [[fault:...]] markers make the worker fail.
    process = ServerProcess(tiny_flux, tmp_path_factory.mktemp("serve-images") / "out", "--max-batch-size", "4",
                            env={"DIFFGEN_FAULT_INJECT": "1"}).start()
    yield process
    assert process.stop(), process.log()


@pytest.fixture(scope="module")
def engine(tiny_flux):
    from diffgen import Engine

    return Engine.from_pretrained(tiny_flux, device="cpu")


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_b64_images_equal_the_engine_for_the_same_seed(server, engine):
    client = server.client()
    response = client.images.generate(prompt="a red fox", n=2, size=SIZE, extra_body={**STEPS, "seed": 5})
    assert response.output_format == "png" and response.size == SIZE and len(response.data) == 2
    expected = engine.generate("a red fox", height=64, width=64, seed=5, num_outputs_per_prompt=2, **STEPS)
    for item, image in zip(response.data, expected.images, strict=True):
        got = _decode(item.b64_json)
        assert got.text["seed"] == "5"
        # The CLI's metadata builder: typed values, the model's defaults resolved, the served model name.
        parameters = json.loads(got.text["parameters"])
        assert parameters["seed"] == 5 and parameters["num_inference_steps"] == 2 and parameters["width"] == 64
        assert parameters["guidance_scale"] == 3.5 and parameters["model"] == server.model_path
        assert parameters == expected.metadata(parameters["output_index"]) | {"model": server.model_path}
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(image))
    # Two outputs of one request are different pictures (one generator, prompt-major noise).
    assert response.data[0].b64_json != response.data[1].b64_json


def test_url_images_download_and_match_b64(server):
    client = server.client()
    by_url = client.images.generate(prompt="a lighthouse", n=2, size=SIZE, response_format="url",
                                    extra_body={**STEPS, "seed": 11})
    by_b64 = client.images.generate(prompt="a lighthouse", n=2, size=SIZE, extra_body={**STEPS, "seed": 11})
    for url_item, b64_item in zip(by_url.data, by_b64.data, strict=True):
        assert url_item.b64_json is None and url_item.url.startswith(server.url + "/v1/images/img_")
        download = httpx.get(url_item.url, timeout=30)
        assert download.status_code == 200 and download.headers["content-type"] == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(download.content)).convert("RGB")),
                              np.asarray(_decode(b64_item.b64_json).convert("RGB")))


def test_url_images_name_the_bound_address_not_the_host_header(server):
    response = httpx.post(f"{server.url}/v1/images/generations", headers={"Host": "evil.example"}, timeout=120,
                          json={"prompt": "host", "size": SIZE, "response_format": "url", **STEPS})
    url = response.json()["data"][0]["url"]
    assert url.startswith(f"{server.url}/v1/images/img_"), url
    assert httpx.get(url).status_code == 200


def test_jpeg_and_webp_outputs(server):
    client = server.client()
    for fmt in ("jpeg", "webp"):
        response = client.images.generate(prompt="a cat", size="48x32", output_format=fmt, output_compression=80,
                                          extra_body=STEPS)
        image = _decode(response.data[0].b64_json)
        assert image.format == fmt.upper() and image.size == (48, 32) and response.output_format == fmt


def test_request_id_header_and_body(server):
    raw = server.client().images.with_raw_response.generate(prompt="a cat", size=SIZE, extra_body=STEPS)
    request_id = raw.headers["x-request-id"]
    assert request_id.startswith("req_") and raw.http_response.json()["id"] == request_id


def test_edit_on_a_model_that_cannot_edit_is_a_400_envelope(server):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().images.edit(image=("in.png", buffer.getvalue(), "image/png"), prompt="make it red")
    error = caught.value.body
    assert caught.value.status_code == 400 and error["code"] == "model_cannot_edit" and error["param"] == "image"
    assert "cannot edit" in error["message"]


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
def test_videos_on_an_image_model_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().videos.create(prompt="a cat walking")
    assert caught.value.body["code"] == "unsupported_model" and "/v1/images/generations" in caught.value.message


def test_sixteen_concurrent_requests_all_complete_once(server):
    client = server.client(max_retries=0, timeout=300)

    def one(seed: int):
        raw = client.images.with_raw_response.generate(prompt=f"image {seed}", size=SIZE,
                                                       extra_body={**STEPS, "seed": seed})
        return raw.headers["x-request-id"], raw.parse()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(100, 116)))
    request_ids = {request_id for request_id, _ in results}
    assert len(request_ids) == 16
    for seed, (_, response) in zip(range(100, 116), results, strict=True):
        image = _decode(response.data[0].b64_json)
        assert image.text["seed"] == str(seed) and image.text["prompt"] == f"image {seed}"
    assert len({response.data[0].b64_json for _, response in results}) == 16
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'diffgen_jobs_total{status="completed"}' in metrics


def test_a_failing_request_fails_alone(server):
    client = server.client(max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(prompt="boom [[fault:raise]]", size=SIZE, extra_body=STEPS)
    assert caught.value.status_code == 500 and "injected fault" in caught.value.body["message"]
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.generate(prompt="big [[fault:oom]]", size=SIZE, extra_body=STEPS)
    assert caught.value.status_code == 503 and caught.value.body["code"] == "out_of_memory"
    assert "out of memory" in caught.value.body["message"]
    after = client.images.generate(prompt="fine", size=SIZE, extra_body=STEPS)
    assert _decode(after.data[0].b64_json).size == (64, 64)


def test_a_dead_worker_fails_its_request_and_is_restarted(server):
    client = server.client(max_retries=0)
    before = server.info()
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.generate(prompt="die [[fault:exit]]", size=SIZE, extra_body=STEPS)
    assert caught.value.status_code == 503 and caught.value.body["code"] == "worker_died"
    assert "worker process died" in caught.value.body["message"]
    server.wait_ready()
    health = server.info()
    assert health["worker_pids"] != before["worker_pids"] and health["worker_restarts"] == before["worker_restarts"] + 1
    after = client.images.generate(prompt="alive again", size=SIZE, extra_body=STEPS)
    assert len(after.data) == 1


def test_models_health_and_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model_path]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert server.info()["output_kind"] == "image"
    text = httpx.get(f"{server.url}/metrics").text
    for family in ("diffgen_queue_depth", "diffgen_jobs_total", "diffgen_step_seconds_bucket",
                   "diffgen_stage_seconds_count", "diffgen_http_requests_total"):
        assert family in text
    assert 'stage="denoising"' in text
    # Routine lines are INFO, not WARNING.
    assert "INFO:diffgen.engine.scheduler:worker 0 ready" in server.log()
    assert not [line for line in server.log().splitlines() if line.startswith("WARNING") and "ready" in line]


def test_a_failed_generation_is_not_retried_by_the_openai_client(server):
    client = server.client()  # default retries: twice on 5xx, unless the server says not to
    before = metric(server.url, 'diffgen_jobs_total{status="generation_error"}')
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(prompt="boom again [[fault:raise]]", size=SIZE, extra_body=STEPS)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert metric(server.url, 'diffgen_jobs_total{status="generation_error"}') == before + 1  # ran once


def test_a_disconnected_client_cancels_its_job(server):
    before = metric(server.url, 'diffgen_jobs_total{status="cancelled"}')
    # >= 10 s of denoising (the slow marker); the client gives up long before.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/images/generations", timeout=2,
                   json={"prompt": "abandoned [[fault:slow]]", "size": SIZE, "num_inference_steps": 200})
    wait_until(lambda: metric(server.url, 'diffgen_jobs_total{status="cancelled"}') == before + 1,
               timeout=60, what="the abandoned job cancelled")
    wait_until(lambda: server.info()["running"] == 0, timeout=30, what="worker free")


def test_sigterm_finishes_in_flight_requests(tiny_flux, tmp_path):
    # The slow marker (>= 50 ms per step, so >= 2 s per job) keeps a job running when SIGTERM comes. A
    # generous --shutdown-timeout: on a loaded 2-core machine the two jobs took over the default 30 s.
    process = ServerProcess(tiny_flux, tmp_path / "out", "--shutdown-timeout", "300",
                            env={"DIFFGEN_FAULT_INJECT": "1"}).start()
    client = process.client(max_retries=0, timeout=400)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(client.images.generate, prompt=f"p{i} [[fault:slow]]", size=SIZE,
                               extra_body={"num_inference_steps": 40}) for i in range(2)]
        wait_until(lambda: process.info()["running"] > 0, what="a running job")
        assert process.stop(timeout=360), process.log()
        for future in futures:
            assert len(future.result().data) == 1


# -- streaming (stream=true): Server-Sent Events ------------------------------------------------------------
def test_stream_with_the_openai_client_sends_progress_partial_images_and_the_images(server):
    """Every step's progress in order, partial_images previews per output (8x8: the latent grid of 64x64),
    then one completed event per output whose image is the non-streamed one for the same seed."""
    request = {"prompt": "a lighthouse", "size": SIZE, "n": 2}
    extra = {"num_inference_steps": 6, "seed": 11}
    events = list(server.client().images.generate(**request, stream=True, partial_images=2, extra_body=extra))
    kinds = [event.type for event in events]
    progress = [event.model_extra["step"] for event in events if event.type == "image_generation.progress"]
    assert progress[-6:] == [1, 2, 3, 4, 5, 6] and set(progress[:-6]) <= {0}, kinds
    partial = [event for event in events if event.type == "image_generation.partial_image"]
    assert [(e.partial_image_index, e.model_extra["output_index"]) for e in partial] == [(0, 0), (0, 1), (1, 0),
                                                                                          (1, 1)]
    assert [e.model_extra["step"] for e in partial] == [2, 2, 4, 4]  # 6 steps, 2 partial images: every 2 steps
    assert all(_decode(e.b64_json).size == (8, 8) for e in partial)
    done = [event for event in events if event.type == "image_generation.completed"]
    assert kinds[-2:] == ["image_generation.completed"] * 2 and len(done) == 2
    plain = server.client().images.generate(**request, extra_body=extra)
    for event, expected in zip(done, plain.data, strict=True):
        assert event.size == SIZE and event.output_format == "png"
        assert np.array_equal(np.asarray(_decode(event.b64_json)), np.asarray(_decode(expected.b64_json)))


def test_stream_progress_fields(server):
    body = {"prompt": "a hill", "size": SIZE, "num_inference_steps": 3, "stream": True, "preview_every": 1}
    with httpx.stream("POST", f"{server.url}/v1/images/generations", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    steps = [data for kind, data in events if kind == "image_generation.progress" and data["step"] > 0]
    assert [data["step"] for data in steps] == [1, 2, 3] and {data["total_steps"] for data in steps} == {3}
    assert all(data["elapsed_s"] >= 0 and data["eta_s"] >= 0 for data in steps)
    assert steps[-1]["eta_s"] == 0
    partial = [data for kind, data in events if kind == "image_generation.partial_image"]
    assert [data["partial_image_index"] for data in partial] == [0, 1]  # steps 1 and 2; none after the last
    assert all(kind == data["type"] for kind, data in events)


def test_a_failing_streamed_job_ends_with_an_error_event(server):
    with pytest.raises(openai.APIError, match="injected fault"):
        list(server.client().images.generate(prompt="boom [[fault:raise]]", size=SIZE, stream=True,
                                             extra_body=STEPS))
    assert server.client().images.generate(prompt="fine", size=SIZE, extra_body=STEPS).data  # still serving


def test_a_client_gone_before_the_first_event_cancels_its_stream_job(server):
    """The client sends a streamed request and closes at once: the response's first write finds it gone, so the
    event generator may never run (nor the cleanup inside it); the job is cancelled all the same."""
    before = metric(server.url, 'diffgen_jobs_total{status="cancelled"}')
    body = json.dumps({"prompt": "gone at once [[fault:slow]]", "size": SIZE, "num_inference_steps": 1000,
                       "stream": True}).encode()
    host, port = httpx.URL(server.url).host, httpx.URL(server.url).port
    with socket.create_connection((host, port), timeout=10) as connection:
        connection.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        connection.shutdown(socket.SHUT_RDWR)
    # 1000 slow steps take >= 50 s: only a cancel moves the count within the wait.
    wait_until(lambda: metric(server.url, 'diffgen_jobs_total{status="cancelled"}') == before + 1,
               timeout=45, what="the job of the client that left cancelled")


def test_an_event_stream_ends_its_job_even_when_its_generator_never_ran():
    """The response's first write fails (the client is gone): the event generator is never started, so the
    cleanup in its ``finally`` cannot run; the stream's ``on_end`` (which cancels the job) runs all the same."""
    import asyncio

    from diffgen.entrypoints.http.openai_routes import _EventStream

    ran, ended = [], []

    async def events():
        ran.append(True)
        yield b"data: {}\n\n"

    async def gone(message):
        raise OSError("the client closed the connection")

    async def receive():
        return {"type": "http.disconnect"}

    for spec_version in ("2.4", "2.3"):  # Starlette streams differently before ASGI 2.4
        response = _EventStream(events(), on_end=lambda: ended.append(True))
        with pytest.raises(Exception):  # noqa: B017 (ClientDisconnect or the OSError, by spec version)
            asyncio.run(response({"type": "http", "asgi": {"spec_version": spec_version}}, receive, gone))
    assert ran == [] and ended == [True, True]


def test_a_client_leaving_a_stream_cancels_its_job_only(server):
    """The stream's job is cancelled (nobody can receive its images); a job queued behind it completes."""
    before = metric(server.url, 'diffgen_jobs_total{status="cancelled"}')
    body = {"prompt": "left behind [[fault:slow]]", "size": SIZE, "num_inference_steps": 200, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/images/generations", json=body, timeout=60) as response:
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(server.client().images.generate, prompt="still wanted", size=SIZE,
                                extra_body=STEPS)
            for kind, data in sse_events(response):
                if kind == "image_generation.progress" and data["step"] >= 2:
                    break  # leave mid-stream
            response.close()
            wait_until(lambda: metric(server.url, 'diffgen_jobs_total{status="cancelled"}') == before + 1,
                       timeout=60, what="the left stream's job cancelled")
            assert len(other.result(timeout=120).data) == 1
