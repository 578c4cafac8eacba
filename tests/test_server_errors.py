"""Bad requests: each gets a 4xx OpenAI error envelope and the server keeps serving. Also the API key."""

from __future__ import annotations

import io

import httpx
import openai
import pytest
from PIL import Image
from server_utils import ServerProcess, metric

KEY = "sk-test-diffgen"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(tiny_flux, tmp_path_factory):
    process = ServerProcess(tiny_flux, tmp_path_factory.mktemp("serve-errors") / "out", "--max-upload-mb", "1",
                            env={"DIFFGEN_API_KEY": KEY}).start()
    yield process
    assert process.stop(), process.log()


def _png(size=(64, 64), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _gen(**changes) -> dict:
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not None}


G, E, V = "/v1/images/generations", "/v1/images/edits", "/v1/videos"
PNG = ("a.png", _png(), "image/png")

# (name, method, path, httpx keyword arguments, expected status)
CORPUS = [
    # -- broken bodies
    ("broken json", "POST", G, {"content": b'{"prompt": "a', "headers": {"content-type": "application/json"}}, 400),
    ("json array", "POST", G, {"json": ["a cat"]}, 400),
    ("json string", "POST", G, {"json": "a cat"}, 400),
    ("empty body", "POST", G, {"content": b"", "headers": {"content-type": "application/json"}}, 400),
    ("not utf8", "POST", G, {"content": b"\xff\xfe{", "headers": {"content-type": "application/json"}}, 400),
    ("form to json route", "POST", G, {"data": {"prompt": "a cat"}}, 400),
    ("json too large", "POST", G, {"json": {"prompt": "x" * (2 * 2**20)}}, 413),
    # -- prompt
    ("missing prompt", "POST", G, {"json": {"size": "64x64"}}, 400),
    ("empty prompt", "POST", G, {"json": _gen(prompt="")}, 400),
    ("blank prompt", "POST", G, {"json": _gen(prompt="   ")}, 400),
    ("prompt number", "POST", G, {"json": _gen(prompt=42)}, 400),
    ("prompt list", "POST", G, {"json": _gen(prompt=["a", "b"])}, 400),
    ("huge prompt", "POST", G, {"json": _gen(prompt="x" * 20_001)}, 400),
    ("negative prompt huge", "POST", G, {"json": _gen(negative_prompt="x" * 20_001)}, 400),
    ("negative prompt number", "POST", G, {"json": _gen(negative_prompt=3)}, 400),
    # -- n
    # -- step cache and LoRA fields
    ("unknown cache method", "POST", G, {"json": _gen(cache="second-block")}, 400),
    ("cache threshold negative", "POST", G, {"json": _gen(cache="first-block", cache_threshold=-1)}, 400),
    ("loras not a map", "POST", G, {"json": _gen(loras=["style"])}, 400),
    ("lora not loaded", "POST", G, {"json": _gen(loras={"style": 1.0})}, 400),
    ("n zero", "POST", G, {"json": _gen(n=0)}, 400),
    ("n eleven", "POST", G, {"json": _gen(n=11)}, 400),
    ("n string", "POST", G, {"json": _gen(n="2")}, 400),
    ("n float", "POST", G, {"json": _gen(n=1.5)}, 400),
    ("n bool", "POST", G, {"json": _gen(n=True)}, 400),
    # -- size
    ("size word", "POST", G, {"json": _gen(size="big")}, 400),
    ("size too small", "POST", G, {"json": _gen(size="8x8")}, 400),
    ("size too large", "POST", G, {"json": _gen(size="99999x64")}, 400),
    ("size not multiple", "POST", G, {"json": _gen(size="65x64")}, 400),
    ("size negative", "POST", G, {"json": _gen(size="-64x64")}, 400),
    ("size number", "POST", G, {"json": _gen(size=64)}, 400),
    # -- steps, guidance, seed
    ("steps zero", "POST", G, {"json": _gen(num_inference_steps=0)}, 400),
    ("steps huge", "POST", G, {"json": _gen(num_inference_steps=100_000)}, 400),
    ("steps string", "POST", G, {"json": _gen(num_inference_steps="2")}, 400),
    ("guidance negative", "POST", G, {"json": _gen(guidance_scale=-1)}, 400),
    ("guidance huge", "POST", G, {"json": _gen(guidance_scale=1e9)}, 400),
    ("guidance string", "POST", G, {"json": _gen(guidance_scale="high")}, 400),
    ("true cfg negative", "POST", G, {"json": _gen(true_cfg_scale=-2)}, 400),
    ("seed negative", "POST", G, {"json": _gen(seed=-1)}, 400),
    ("seed too big", "POST", G, {"json": _gen(seed=2**64)}, 400),
    ("seed float", "POST", G, {"json": _gen(seed=1.5)}, 400),
    # -- openai options
    ("response format", "POST", G, {"json": _gen(response_format="file")}, 400),
    ("output format gif", "POST", G, {"json": _gen(output_format="gif")}, 400),
    ("compression 101", "POST", G, {"json": _gen(output_format="jpeg", output_compression=101)}, 400),
    ("compression negative", "POST", G, {"json": _gen(output_compression=-1)}, 400),
    ("background transparent", "POST", G, {"json": _gen(background="transparent")}, 400),
    ("background other", "POST", G, {"json": _gen(background="green")}, 400),
    ("stream string", "POST", G, {"json": _gen(stream="yes")}, 400),
    ("partial images without stream", "POST", G, {"json": _gen(partial_images=2)}, 400),
    ("partial images 4", "POST", G, {"json": _gen(stream=True, partial_images=4)}, 400),
    ("partial images negative", "POST", G, {"json": _gen(stream=True, partial_images=-1)}, 400),
    ("preview every without stream", "POST", G, {"json": _gen(preview_every=1)}, 400),
    ("preview every 0", "POST", G, {"json": _gen(stream=True, preview_every=0)}, 400),
    ("preview every huge", "POST", G, {"json": _gen(stream=True, preview_every=10**6)}, 400),
    ("preview every string", "POST", G, {"json": _gen(stream=True, preview_every="2")}, 400),
    ("preview every and partial images", "POST", G, {"json": _gen(stream=True, partial_images=1, preview_every=1)},
     400),
    ("edit partial images without stream", "POST", E,
     {"data": {"prompt": "x", "partial_images": "1"}, "files": {"image": PNG}}, 400),
    ("edit stream not a bool", "POST", E, {"data": {"prompt": "x", "stream": "maybe"}, "files": {"image": PNG}}, 400),
    ("video preview every 0", "POST", V, {"json": {"prompt": "x", "preview_every": 0}}, 400),
    ("events of an unknown video", "GET", "/v1/videos/video_0123456789abcdef0123456789abcdef/events", {}, 404),
    ("events of a bad video id", "GET", "/v1/videos/nope/events", {}, 404),
    ("unknown field", "POST", G, {"json": _gen(foo=1)}, 400),
    ("unknown model", "POST", G, {"json": _gen(model="gpt-image-1")}, 404),
    ("num frames on image model", "POST", G, {"json": _gen(num_frames=5)}, 400),
    # -- edits (multipart)
    ("edit json body", "POST", E, {"json": {"prompt": "x"}}, 400),
    ("edit without image", "POST", E, {"data": {"prompt": "x"}, "files": {"mask": PNG}}, 400),
    ("edit text image", "POST", E, {"data": {"prompt": "x", "image": "not a file"}, "files": {"mask": PNG}}, 400),
    ("edit non image upload", "POST", E, {"data": {"prompt": "x"}, "files": {"image": ("a.png", b"hi")}}, 400),
    ("edit empty upload", "POST", E, {"data": {"prompt": "x"}, "files": {"image": ("a.png", b"", "image/png")}}, 400),
    ("edit truncated png", "POST", E, {"data": {"prompt": "x"}, "files": {"image": ("a", _png()[:40])}}, 400),
    ("edit mask without alpha", "POST", E, {"data": {"prompt": "x"}, "files": {"image": PNG, "mask": PNG}}, 400),
    ("edit mask other size", "POST", E,
     {"data": {"prompt": "x"}, "files": {"image": PNG, "mask": ("m.png", _png((32, 32), "RGBA"), "image/png")}}, 400),
    ("edit n string", "POST", E, {"data": {"prompt": "x", "n": "many"}, "files": {"image": PNG}}, 400),
    ("edit unknown field", "POST", E, {"data": {"prompt": "x", "colour": "red"}, "files": {"image": PNG}}, 400),
    ("edit unknown file", "POST", E, {"data": {"prompt": "x"}, "files": {"image": PNG, "other": PNG}}, 400),
    ("edit on image model", "POST", E, {"data": {"prompt": "x"}, "files": {"image": PNG}}, 400),
    ("broken multipart", "POST", E,
     {"content": b"--xyz\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx",
      "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400),
    ("multipart no boundary", "POST", E, {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400),
    # -- videos
    ("video on image model", "POST", V, {"json": {"prompt": "a cat"}}, 400),
    ("video seconds word", "POST", V, {"json": {"prompt": "a cat", "seconds": "long"}}, 400),
    ("video seconds zero", "POST", V, {"json": {"prompt": "a cat", "seconds": "0"}}, 400),
    ("video seconds huge", "POST", V, {"json": {"prompt": "a cat", "seconds": 3600}}, 400),
    ("video frames zero", "POST", V, {"json": {"prompt": "a cat", "num_frames": 0}}, 400),
    ("video frames huge", "POST", V, {"json": {"prompt": "a cat", "num_frames": 100_000}}, 400),
    ("video fps zero", "POST", V, {"json": {"prompt": "a cat", "fps": 0}}, 400),
    ("video size bad", "POST", V, {"json": {"prompt": "a cat", "size": "1280*720"}}, 400),
    ("video reference in json", "POST", V, {"json": {"prompt": "a cat", "input_reference": "x"}}, 400),
    ("video reference not image", "POST", V,
     {"data": {"prompt": "a cat"}, "files": {"input_reference": ("r.png", b"GIF89a", "image/png")}}, 400),
    ("video form frames word", "POST", V, {"data": {"prompt": "a cat", "num_frames": "many"}}, 400),
    ("video missing prompt form", "POST", V, {"data": {"seconds": "4"}}, 400),
    ("video unknown id", "GET", "/v1/videos/video_00000000000000000000000000000000", {}, 404),
    # (not "/v1/videos/../../etc/passwd": httpx normalises that to /etc/passwd before sending it)
    ("video id bad hex", "GET", "/v1/videos/video_zz", {}, 404),
    ("video id not hex", "GET", "/v1/videos/video_" + "g" * 32, {}, 404),
    ("video id traversal", "GET", "/v1/videos/..%2F..%2Fetc%2Fpasswd", {}, 404),
    ("video content bad id", "GET", "/v1/videos/video_" + "g" * 32 + "/content", {}, 404),
    ("video delete bad id", "DELETE", "/v1/videos/video_zz", {}, 404),
    ("video content unknown", "GET", "/v1/videos/video_00000000000000000000000000000000/content", {}, 404),
    ("video delete unknown", "DELETE", "/v1/videos/nope", {}, 404),
    ("video list limit zero", "GET", "/v1/videos?limit=0", {}, 400),
    ("video list limit word", "GET", "/v1/videos?limit=ten", {}, 400),
    ("video list limit superscript", "GET", "/v1/videos?limit=%C2%B2", {}, 400),  # "²".isdigit() is True
    ("video list limit long", "GET", "/v1/videos?limit=0000000001", {}, 400),
    ("video list order", "GET", "/v1/videos?order=up", {}, 400),
    ("video list unknown param", "GET", "/v1/videos?page=2", {}, 400),
    # -- routes and methods
    ("image content unknown", "GET", "/v1/images/img_00000000000000000000000000000000/content", {}, 404),
    ("image content traversal", "GET", "/v1/images/..%2f..%2fjobs.sqlite3/content", {}, 404),
    ("unknown route", "GET", "/v1/chat/completions", {}, 404),
    ("wrong method", "GET", G, {}, 405),
]


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 50 and len({name for name, *_ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(("name", "method", "path", "kwargs", "status"), CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_request_gets_an_error_envelope(server, name, method, path, kwargs, status):
    kwargs = dict(kwargs)
    headers = {**AUTH, **kwargs.pop("headers", {})}
    response = httpx.request(method, server.url + path, headers=headers, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert response.headers["x-request-id"].startswith("req_")


def test_field_errors_name_the_field(server):
    response = httpx.post(server.url + G, headers=AUTH, json=_gen(n=11))
    assert response.json()["error"]["param"] == "n" and "10" in response.json()["error"]["message"]
    response = httpx.post(server.url + G, headers=AUTH, json=_gen(size="65x64"))
    error = response.json()["error"]  # the client sent `size`, so the error names it, then the side at fault
    assert error["param"] == "size" and error["message"].startswith("size: 65x64: width: 65 is not a multiple of 16")
    response = httpx.post(server.url + G, headers=AUTH, json=_gen(foo=1))
    assert response.json()["error"] == {"message": "Unknown parameter: 'foo'.", "type": "invalid_request_error",
                                        "param": "foo", "code": "unknown_parameter"}


def test_server_still_serves_after_the_corpus(server):
    for _, method, path, kwargs, _status in CORPUS:  # the whole corpus again, back to back
        kwargs = dict(kwargs)
        headers = {**AUTH, **kwargs.pop("headers", {})}
        assert httpx.request(method, server.url + path, headers=headers, timeout=60, **kwargs).status_code < 500
    assert httpx.get(server.url + "/health").status_code == 200
    response = server.client(api_key=KEY).images.generate(prompt="still here", size="64x64",
                                                          extra_body={"num_inference_steps": 2})
    assert len(response.data) == 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_api_key_required(server, headers):
    for method, path in (("POST", G), ("GET", "/v1/models"), ("GET", "/v1/videos")):
        response = httpx.request(method, server.url + path, headers=headers, json=GOOD)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_api_key_with_the_openai_client(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert server.client(api_key=KEY).models.list().data[0].id == server.model_path
    # Health and metrics stay open for probes and scrapers.
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_errors_are_counted_in_metrics(server):
    bad = 'diffgen_http_requests_total{method="POST",route="/v1/images/generations",status="400"}'
    unauthorized = 'diffgen_http_requests_total{method="GET",route="unmatched",status="401"}'
    before = metric(server.url, bad), metric(server.url, unauthorized)
    assert httpx.post(server.url + G, headers=AUTH, json=_gen(n=11)).status_code == 400
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert (metric(server.url, bad), metric(server.url, unauthorized)) == (before[0] + 1, before[1] + 1)


def _multipart(size: int, boundary: str = "diffgenboundary"):
    """A multipart body with one file of ``size`` bytes, in 64 KiB chunks (sent chunked: no length)."""
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--{boundary}\r\n"
           'Content-Disposition: form-data; name="image"; filename="a.png"\r\n'
           "Content-Type: image/png\r\n\r\n").encode()
    for start in range(0, size, 2**16):
        yield b"\0" * min(2**16, size - start)
    yield f"\r\n--{boundary}--\r\n".encode()


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_multipart_body_limit(server, chunked):
    # The server runs with --max-upload-mb 1.
    body = _multipart(3 * 2**20)
    headers = {**AUTH, "content-type": "multipart/form-data; boundary=diffgenboundary"}
    response = httpx.post(server.url + E, headers=headers, content=body if chunked else b"".join(body), timeout=60)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "too_large" and "1 MiB" in response.json()["error"]["message"]
    assert response.headers["x-request-id"].startswith("req_")
    # A body under the limit is parsed (and refused for what it is: an edit on a model that cannot edit).
    small = b"".join(_multipart(1000))
    assert httpx.post(server.url + E, headers=headers, content=small).json()["error"]["code"] == "model_cannot_edit"


def test_cache_fields_are_served(server):
    """A request choosing its own step cache runs (the field reaches the worker's pipeline)."""
    response = httpx.post(server.url + G, headers=AUTH, timeout=120,
                          json=_gen(cache="first-block", cache_threshold=2.0, num_inference_steps=3))
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1


def test_fault_markers_are_ordinary_prompts_without_the_test_variable(server):
    # This server runs without DIFFGEN_FAULT_INJECT: no request can make the worker fail on purpose.
    client = server.client(api_key=KEY, max_retries=0)
    response = client.images.generate(prompt="a cat [[fault:raise]] [[fault:exit]] [[fault:oom]]", size="64x64",
                                      extra_body={"num_inference_steps": 2})
    assert len(response.data) == 1
    assert server.info(api_key=KEY)["worker_restarts"] == 0
    assert "fault injection" not in server.log_path.read_text(errors="replace")
