"""A hostile client against one real server: malformed HTTP, JSON and multipart, unicode tricks, path
tricks, slow and half-closed connections, too many connections, Range headers, a forged Host header.
Every refusal is a 4xx in the OpenAI envelope; afterwards /health is 200 and a valid request is served.
Also: 32 clients at once, the model routes, /health versus /server_info, /liveness, /health_generate,
and a clean shutdown (no "leaked semaphore objects")."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from server_utils import ServerProcess, metric, wait_until

KEY = "sk-hostile"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2}
HEADER_TIMEOUT = 3  # seconds (--header-timeout)
BODY_TIMEOUT = 2  # seconds (--body-timeout)
MAX_CONNECTIONS = 40  # --max-connections: the 32-client test fits under it


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def server(tiny_flux, tmp_path_factory):
    process = ServerProcess(tiny_flux, tmp_path_factory.mktemp("serve-hostile") / "out",
                            "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
                            "--max-connections", str(MAX_CONNECTIONS), env={"DIFFGEN_API_KEY": KEY})
    # URLs of response_format=url images name this address, whatever Host header a client sends.
    process.extra += ["--public-url", f"http://localhost:{process.port}/"]
    process.start()
    yield process
    helpers = _children(process.process.pid)  # the worker and multiprocessing's resource tracker
    assert process.stop(), process.log()
    wait_until(lambda: not any(_alive(pid) for pid in helpers), timeout=60, what="the server's helpers exit")
    assert "leaked semaphore" not in process.log(), process.log()
    assert "Traceback" not in process.log(), process.log()


def _png(size=(64, 64), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _gen(**changes) -> dict:
    return {k: v for k, v in {**GOOD, **changes}.items() if v is not None}


def _raw(server, payload: bytes, shut_write: bool = False, timeout: float = 30.0) -> bytes:
    """Send raw bytes on a fresh connection; return all the server sends until it closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(payload)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks)


def _envelope_of(raw: bytes) -> tuple[int, dict]:
    """Status and error envelope of the first response in ``raw``."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ", 2)[1]), json.loads(body[:int(headers["content-length"])])["error"]


G, E, V = "/v1/images/generations", "/v1/images/edits", "/v1/videos"
JSON = {"content-type": "application/json"}
PNG = ("a.png", _png(), "image/png")
DEEP = b"[" * 50_000 + b"]" * 50_000
IMAGE_ID = "img_" + "0" * 32

# (name, method, path, httpx keyword arguments, expected status)
CORPUS = [
    # -- JSON that breaks parsers
    ("deeply nested array", "POST", G, {"content": DEEP, "headers": JSON}, 400),
    ("deeply nested in a field", "POST", G, {"content": b'{"prompt": ' + DEEP + b"}", "headers": JSON}, 400),
    ("deeply nested objects", "POST", G, {"content": b'{"a":' * 20_000 + b"1" + b"}" * 20_000, "headers": JSON}, 400),
    ("integer of 5000 digits", "POST", G, {"content": b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}",
                                           "headers": JSON}, 400),
    ("integer of 5000 digits as n", "POST", G, {"content": b'{"prompt": "a", "n": 1' + b"0" * 5000 + b"}",
                                                "headers": JSON}, 400),
    ("float overflow", "POST", G, {"content": b'{"prompt": "a", "guidance_scale": 1e999}', "headers": JSON}, 400),
    ("NaN", "POST", G, {"content": b'{"prompt": "a", "guidance_scale": NaN}', "headers": JSON}, 400),
    ("Infinity", "POST", G, {"content": b'{"prompt": "a", "seed": -Infinity}', "headers": JSON}, 400),
    ("trailing garbage", "POST", G, {"content": b'{"prompt": "a"} {"prompt": "b"}', "headers": JSON}, 400),
    ("utf16 bom garbage", "POST", G, {"content": b"\xfe\xff\x00{", "headers": JSON}, 400),
    ("null body", "POST", G, {"content": b"null", "headers": JSON}, 400),
    ("number body", "POST", G, {"content": b"1e5", "headers": JSON}, 400),
    ("lone surrogate prompt", "POST", G, {"content": b'{"prompt": "\\ud800", "size": "64x64"}', "headers": JSON},
     400),
    ("nul in prompt", "POST", G, {"json": _gen(prompt="\x00")}, 400),
    # -- wrong types and huge values
    ("n list", "POST", G, {"json": _gen(n=[1])}, 400),
    ("n object", "POST", G, {"json": _gen(n={"value": 1})}, 400),
    ("n huge", "POST", G, {"json": _gen(n=10**30)}, 400),
    ("size object", "POST", G, {"json": _gen(size={"w": 64})}, 400),
    ("size null bytes", "POST", G, {"json": _gen(size="64\x00x64")}, 400),
    ("model number", "POST", G, {"json": _gen(model=7)}, 400),
    ("model huge", "POST", G, {"json": _gen(model="m" * 100_000)}, 400),
    ("steps float huge", "POST", G, {"json": _gen(num_inference_steps=1e308)}, 400),
    ("seed huge", "POST", G, {"json": _gen(seed=10**40)}, 400),
    ("prompt object", "POST", G, {"json": _gen(prompt={"text": "a"})}, 400),
    ("prompt too long multibyte", "POST", G, {"json": _gen(prompt="\U0001f600" * 20_001)}, 400),
    # -- unicode tricks in size
    ("size fullwidth digits", "POST", G, {"json": _gen(size="\uff16\uff14x\uff16\uff14")}, 400),
    ("size arabic-indic digits", "POST", G, {"json": _gen(size="\u0666\u0664x\u0666\u0664")}, 400),
    ("size trailing newline", "POST", G, {"json": _gen(size="64x64\n")}, 400),
    ("size leading space", "POST", G, {"json": _gen(size=" 64x64")}, 400),
    ("size capital x", "POST", G, {"json": _gen(size="64X64")}, 400),
    ("size multiplication sign", "POST", G, {"json": _gen(size="64\u00d764")}, 400),
    ("size superscript", "POST", G, {"json": _gen(size="6\u00b2x64")}, 400),
    ("form size newline", "POST", V, {"data": {"prompt": "a", "size": "64x64\n"}}, 400),
    # -- multipart
    ("multipart bad boundary", "POST", E, {"content": b"--a\r\n\r\n", "headers": {
        "content-type": "multipart/form-data; boundary=" + "b" * 5000}}, 400),
    ("multipart header only", "POST", E, {"content": b"--xyz\r\nContent-Disposition: form-data",
                                          "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400),
    ("multipart duplicate field", "POST", E,
     {"content": b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na\r\n--xyz\r\n'
                 b'Content-Disposition: form-data; name="prompt"\r\n\r\nb\r\n--xyz--\r\n',
      "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400),
    ("multipart too many fields", "POST", E,
     {"data": {f"f{i}": "x" for i in range(150)}}, 400),
    ("multipart too many files", "POST", E,
     {"data": {"prompt": "x"}, "files": [("image", PNG)] * 20}, 400),
    ("multipart traversal filename", "POST", E,
     {"data": {"prompt": "x"}, "files": {"image": ("../../../etc/passwd", _png(), "image/png")}}, 400),
    ("urlencoded to edits", "POST", E, {"content": b"prompt=a&image=b",
                                        "headers": {"content-type": "application/x-www-form-urlencoded"}}, 400),
    ("json content type to edits", "POST", E, {"content": b"--xyz--", "headers": JSON}, 400),
    # -- wrong methods
    ("put generations", "PUT", G, {"json": GOOD}, 405),
    ("patch generations", "PATCH", G, {"json": GOOD}, 405),
    ("delete generations", "DELETE", G, {}, 405),
    ("post models", "POST", "/v1/models", {"json": {}}, 405),
    ("post health", "POST", "/health", {}, 405),
    ("put video", "PUT", "/v1/videos/video_" + "0" * 32, {}, 405),
    ("trace", "TRACE", G, {}, 405),
    # -- path tricks
    ("image content newline", "GET", f"/v1/images/{IMAGE_ID}/content%0A", {}, 404),
    ("image content nul", "GET", f"/v1/images/{IMAGE_ID}%00/content", {}, 404),
    ("image content tab", "GET", f"/v1/images/{IMAGE_ID}%09/content", {}, 404),
    ("image id uppercase", "GET", f"/v1/images/{IMAGE_ID.upper()}/content", {}, 404),
    ("image id fullwidth", "GET", "/v1/images/img_%EF%BC%90" + "0" * 31 + "/content", {}, 404),
    ("video id newline", "GET", "/v1/videos/video_" + "0" * 32 + "%0A", {}, 404),
    ("video content newline", "GET", "/v1/videos/video_" + "0" * 32 + "/content%0a", {}, 404),
    ("double slash", "GET", "//v1/models", {}, 404),
    ("upper case route", "GET", "/V1/models", {}, 404),
    ("dot segments", "GET", "/v1/images/%2e%2e/%2e%2e/jobs.sqlite3", {}, 404),
    ("unknown model", "GET", "/v1/models/gpt-4o", {}, 404),
    ("unknown model with slash", "GET", "/v1/models/openai/gpt-4o", {}, 404),
    ("server info without key", "GET", "/server_info", {"headers": {"Authorization": "Bearer nope"}}, 401),
    # -- headers
    ("oversized header", "GET", "/v1/models", {"headers": {"x-big": "a" * 20_000}}, 431),
    ("many headers", "GET", "/v1/models", {"headers": {f"x-h{i}": "v" * 100 for i in range(300)}}, 431),
    ("bearer with latin-1", "GET", "/v1/models", {"headers": {"Authorization": "Bearer k\u00e9y".encode("latin-1")}},
     401),
]


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 60 and len({name for name, *_ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(("name", "method", "path", "kwargs", "status"), CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_request_gets_an_error_envelope(server, name, method, path, kwargs, status):
    kwargs = dict(kwargs)
    headers = {**AUTH, **kwargs.pop("headers", {})}
    response = httpx.request(method, server.url + path, headers=headers, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error


POST_HEAD = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
RAW = [
    ("garbage request line", b"HELLO\r\n\r\n", 400),
    ("non-ascii target", b"GET /v1/\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 404),  # h11 reads "PRI *" as a request
    ("content-length and chunked", POST_HEAD + b"Content-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("two content-lengths", POST_HEAD + b"Content-Length: 3\r\n"
     b"Content-Length: 4\r\n\r\nabcd", 400),
    ("negative content-length", POST_HEAD + b"Content-Length: -1\r\n\r\n", 400),
    ("bad chunk size", POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
     b"zz\r\n", 400),
    ("header without colon", b"GET /health HTTP/1.1\r\nHost: x\r\nbroken header\r\n\r\n", 400),
    ("oversized request line", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 431),
]


@pytest.mark.parametrize(("name", "payload", "status"), RAW, ids=[r[0] for r in RAW])
def test_invalid_http_gets_an_error_envelope(server, name, payload, status):
    got, error = _envelope_of(_raw(server, payload))
    assert got == status and error["message"], error


def test_range_requests_on_content(server):
    client = server.client(api_key=KEY)
    url = client.images.generate(prompt="range", size="64x64", response_format="url",
                                 extra_body={"num_inference_steps": 2}).data[0].url
    whole = httpx.get(url)
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    size = len(whole.content)
    part = httpx.get(url, headers={"range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == whole.content[:10]
    assert part.headers["content-range"] == f"bytes 0-9/{size}"
    tail = httpx.get(url, headers={"range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == whole.content[-5:]
    for bad in ("bytes=999999-", "bytes=5-2", "bytes=abc", "bytes=", "bytes=-0", "bytes=\u00b2-3"):
        response = httpx.get(url, headers={"range": bad.encode("latin-1")})
        assert response.status_code == 416, (bad, response.text)
        assert response.headers["content-range"] == f"bytes */{size}"
        assert response.json()["error"]["code"] == "range_not_satisfiable"
    assert httpx.get(url, headers={"range": "items=0-1"}).status_code == 200  # another unit: ignored
    # The capability URL must match exactly: a trailing newline is another (unknown) path.
    assert httpx.get(url + "%0A").status_code == 404


def test_urls_ignore_the_host_header(server):
    response = httpx.post(server.url + G, headers={**AUTH, "Host": "evil.example"}, timeout=120,
                          json=_gen(response_format="url"))
    url = response.json()["data"][0]["url"]
    assert url.startswith(f"http://localhost:{server.port}/v1/images/img_"), url  # --public-url
    assert httpx.get(url).status_code == 200


def test_health_is_minimal_and_details_need_the_key(server):
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert server.model_path not in health.text
    assert httpx.get(server.url + "/server_info").status_code == 401
    info = server.info(api_key=KEY)
    assert info["model_path"] == server.model_path and all(isinstance(p, int) for p in info["worker_pids"])
    assert httpx.get(server.url + "/liveness").json() == {"status": "alive"}


def test_health_generate_runs_a_tiny_generation(server):
    before = metric(server.url, 'diffgen_jobs_total{status="completed"}')
    response = httpx.get(server.url + "/health_generate", timeout=120)
    assert response.status_code == 200 and response.json()["status"] == "ok", response.text
    assert metric(server.url, 'diffgen_jobs_total{status="completed"}') == before + 1


def test_models_retrieve_and_cards(server):
    client = server.client(api_key=KEY)
    card = client.models.retrieve(server.model_path)
    assert card.id == server.model_path
    extra = card.model_extra
    assert extra["task_type"] == "T2I" and extra["num_gpus"] == 0
    assert extra["dit_precision"] == "float32" and extra["vae_precision"] == "float32"
    assert client.models.list().data[0].model_extra["task_type"] == "T2I"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-image-1")
    assert caught.value.body["code"] == "model_not_found"


def test_video_list_after_a_deleted_id_is_an_empty_page(server):
    page = httpx.get(server.url + "/v1/videos", params={"after": "video_" + "f" * 32}, headers=AUTH)
    assert page.status_code == 200, page.text
    assert page.json() == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


def test_slow_headers_get_a_408_and_the_connection_closes(server):
    # Headers dripped one byte at a time: the timeout counts from the first byte, not from the last.
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # closed by the server: its 408 is waiting to be read
                break
            time.sleep(HEADER_TIMEOUT / 10)
        status, error = _envelope_of(_read_all(sock))
    assert status == 408 and error["code"] == "request_timeout"


def test_a_stalled_body_is_a_client_disconnect(server):
    before = metric(server.url, "diffgen_client_disconnects_total")
    raw = _raw(server, POST_HEAD + b"Content-Type: application/json\r\n"
               b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
    assert raw == b""  # closed after --body-timeout
    wait_until(lambda: metric(server.url, "diffgen_client_disconnects_total") == before + 1, timeout=30,
               what="the disconnect counted")


@pytest.mark.parametrize("path", [G, E])
def test_a_half_closed_body_is_a_client_disconnect(server, path):
    before = metric(server.url, "diffgen_client_disconnects_total")
    content_type, start = (b"application/json", b'{"prompt": "a c') if path == G else \
        (b"multipart/form-data; boundary=xyz", b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na c')
    raw = _raw(server, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type
               + b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n" + start,
               shut_write=True)
    assert b" 500 " not in raw
    wait_until(lambda: metric(server.url, "diffgen_client_disconnects_total") == before + 1, timeout=30,
               what="the disconnect counted")
    assert 'status="500"' not in httpx.get(server.url + "/metrics").text


def test_too_many_connections_are_refused_with_an_envelope(server):
    sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in range(MAX_CONNECTIONS + 10)]
    try:
        answers = [_envelope_of(_read_all(sock)) for sock in sockets]  # 503 at once, or 408 after the timeout
    finally:
        for sock in sockets:
            sock.close()
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {408, 503} and statuses.count(503) >= 10, statuses
    assert {error["code"] for status, error in answers if status == 503} == {"too_many_connections"}
    assert httpx.get(server.url + "/health").status_code == 200


def test_thirty_two_clients_at_once_nothing_lost_or_duplicated(server):
    client = server.client(api_key=KEY, max_retries=0, timeout=600)
    before = metric(server.url, 'diffgen_jobs_total{status="completed"}')

    def one(seed: int):
        raw = client.images.with_raw_response.generate(prompt=f"crowd {seed}", size="32x32",
                                                       extra_body={"num_inference_steps": 1, "seed": seed})
        return raw.headers["x-request-id"], raw.parse()

    seeds = list(range(1000, 1032))
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, seeds))
    assert len({request_id for request_id, _ in results}) == 32
    for seed, (request_id, response) in zip(seeds, results, strict=True):
        assert response.id == request_id and len(response.data) == 1
        image = Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json)))
        assert image.text["seed"] == str(seed) and image.text["prompt"] == f"crowd {seed}"
    assert len({response.data[0].b64_json for _, response in results}) == 32
    assert metric(server.url, 'diffgen_jobs_total{status="completed"}') == before + 32


def test_still_healthy_and_serving_after_everything(server):
    for _, method, path, kwargs, _status in CORPUS:
        kwargs = dict(kwargs)
        headers = {**AUTH, **kwargs.pop("headers", {})}
        assert httpx.request(method, server.url + path, headers=headers, timeout=60, **kwargs).status_code < 500
    for _, payload, _status in RAW:
        assert b" 500 " not in _raw(server, payload)
    assert httpx.get(server.url + "/health").status_code == 200
    assert 'status="500"' not in httpx.get(server.url + "/metrics").text
    response = server.client(api_key=KEY).images.generate(prompt="still here", size="64x64",
                                                          extra_body={"num_inference_steps": 2})
    assert len(response.data) == 1
