"""LoRAs at run time through a real ``diffgen serve``: POST/GET/DELETE /v1/loras, a worker group's ranks.

Every output is compared with the same request run in this process (an in-process Engine holding the same
LoRAs): the server's workers hold exactly the LoRAs the routes say, changes wait for the running request,
a refused file leaves the served model bit for bit as it was, and a restarted worker catches up.
"""

from __future__ import annotations

import base64
import functools
import io
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from server_utils import ServerProcess, wait_until
from test_lora import write_lora

from diffgen import Engine
from diffgen.errors import InvalidRequestError

KEY = "sk-lora-test"
PROMPT = "a lighthouse at dusk"
SAMPLING = dict(num_inference_steps=2, seed=4, max_sequence_length=16)
SLOW_STEPS = 24  # [[fault:slow]] adds 50 ms per step: ~1.2 s in which a change must wait


@pytest.fixture(scope="module")
def reference(tiny_flux):
    """In-process engines (merged, dynamic) computing what the server must answer."""
    engines: dict[str, Engine] = {}

    def get(mode: str) -> Engine:
        if mode not in engines:
            engines[mode] = Engine.from_pretrained(tiny_flux, device="cpu", dtype="float32", lora_mode=mode)
        return engines[mode]

    return get


def _expected(engine: Engine, prompt: str = PROMPT, steps: int = 2, **kwargs) -> np.ndarray:
    image = engine.generate(prompt, height=32, width=32, **{**SAMPLING, "num_inference_steps": steps, **kwargs})
    return np.asarray(image.images[0])


def _post_image(url: str, prompt: str = PROMPT, steps: int = 2, **fields) -> httpx.Response:
    body = {"prompt": prompt, "size": "32x32", **SAMPLING, "num_inference_steps": steps, **fields}
    return httpx.post(f"{url}/v1/images/generations", json=body, headers=_auth(), timeout=120)


def _image(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).convert("RGB"))


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _bad_files(tmp_path, good: str) -> list[tuple[dict, str]]:
    """(POST body, what the 400 must say) for files that do not fit the tiny FLUX."""
    from safetensors.torch import load_file

    text = tmp_path / "text.safetensors"
    text.write_bytes(b"not a safetensors file")
    keys = tmp_path / "keys.safetensors"
    save_file(_zeros_pair("transformer.transformer_blocks.0.attn.no_such"), str(keys))
    tensors = load_file(good)
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    shapes = tmp_path / "shapes.safetensors"
    save_file(tensors, str(shapes))
    return [({"path": str(text)}, "is not a safetensors file"),
            ({"path": str(keys)}, "transformer_blocks.0.attn.no_such: no such layer in the transformer"),
            ({"path": str(shapes)}, r"transformer_blocks.0.attn.to_q: A \(4, \d+\) and B \(\d+, 4\) do not fit"),
            ({"path": str(tmp_path / "missing.safetensors")}, "no such file")]


def _zeros_pair(stem: str) -> dict:
    return {f"{stem}.lora_A.weight": torch.zeros(4, 8), f"{stem}.lora_B.weight": torch.zeros(8, 4)}


def test_merged_server_loads_rescales_unloads_and_refuses_bad_files(tiny_flux, reference, tmp_path):
    import re

    merged = reference("merged")
    good = write_lora(tmp_path / "style.safetensors", merged, "flux-peft", seed=11)
    plain_expected = _expected(merged)
    slow_prompt = f"{PROMPT} [[fault:slow]]"
    slow_plain = _expected(merged, slow_prompt, steps=SLOW_STEPS)
    merged.load_lora(good, scale=0.8)
    try:
        with_lora = _expected(merged)
        merged.set_lora_scales({"style": 0.3})
        with_lora_03 = _expected(merged)
    finally:
        merged.unload_lora()
    assert not np.array_equal(with_lora, plain_expected) and not np.array_equal(with_lora_03, plain_expected)
    assert not np.array_equal(with_lora, with_lora_03)

    server = ServerProcess(tiny_flux, tmp_path / "out", "--dtype", "float32", "--api-key", KEY,
                           env={"DIFFGEN_FAULT_INJECT": "1"})
    server.start()
    try:
        url = server.url
        assert httpx.get(f"{url}/v1/loras", timeout=30).status_code == 401  # behind the API key
        listed = httpx.get(f"{url}/v1/loras", headers=_auth(), timeout=30).json()
        assert listed == {"object": "list", "mode": "merged", "data": []}
        plain = _image(_post_image(url))
        assert np.array_equal(plain, plain_expected)

        for body, message in _bad_files(tmp_path, good):
            response = httpx.post(f"{url}/v1/loras", json=body, headers=_auth(), timeout=60)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "path" and re.search(message, error["message"]), error
        for body, param in (({"path": good, "component": "vae"}, "component"), ({"path": good, "scale": 11.0}, "scale"),
                            ({"path": good, "name": "no spaces"}, "name"), ({"path": good, "extra": 1}, "extra")):
            response = httpx.post(f"{url}/v1/loras", json=body, headers=_auth(), timeout=60)
            assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        assert np.array_equal(_image(_post_image(url)), plain)  # bit for bit: the refused files changed nothing

        # a change waits for the running request: the slow request runs wholly without the LoRA
        slow: dict = {}
        thread = threading.Thread(target=lambda: slow.setdefault("r", _post_image(url, slow_prompt, SLOW_STEPS)))
        thread.start()
        wait_until(lambda: server.info(KEY)["running"] == 1, what="the slow request running")
        response = httpx.post(f"{url}/v1/loras", json={"path": good, "scale": 0.8}, headers=_auth(), timeout=120)
        thread.join(timeout=120)
        assert response.status_code == 200, response.text
        assert response.json() == {"object": "lora", "name": "style", "path": good, "scale": 0.8,
                                   "component": "transformer", "layers": 3}
        assert np.array_equal(_image(slow["r"]), slow_plain)
        assert np.array_equal(_image(_post_image(url)), with_lora)
        assert [r["name"] for r in httpx.get(f"{url}/v1/loras", headers=_auth(), timeout=30).json()["data"]] == \
            ["style"]
        again = httpx.post(f"{url}/v1/loras", json={"path": good}, headers=_auth(), timeout=60)
        assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]

        response = httpx.post(f"{url}/v1/loras/style", json={"scale": 0.3}, headers=_auth(), timeout=60)
        assert response.status_code == 200 and response.json()["scale"] == 0.3, response.text
        assert np.array_equal(_image(_post_image(url)), with_lora_03)

        # the worker dies and is restarted: it loads the start-up LoRAs (none), then catches up before any batch
        died = _post_image(url, f"{PROMPT} [[fault:exit]]")
        assert died.status_code == 503 and died.json()["error"]["code"] == "worker_died"
        server.wait_ready()
        assert np.array_equal(_image(_post_image(url)), with_lora_03)

        response = httpx.delete(f"{url}/v1/loras/style", headers=_auth(), timeout=60)
        assert response.json() == {"id": "style", "object": "lora", "deleted": True}
        assert np.array_equal(_image(_post_image(url)), plain)
        gone = httpx.delete(f"{url}/v1/loras/style", headers=_auth(), timeout=60)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "lora_not_found"
        assert httpx.get(f"{url}/v1/loras", headers=_auth(), timeout=30).json()["data"] == []
    finally:
        assert server.stop(), server.log()


def test_dynamic_server_reaches_both_workers_and_requests_pick_their_loras(tiny_flux, reference, tmp_path):
    dynamic = reference("dynamic")
    a = write_lora(tmp_path / "a.safetensors", dynamic, "flux-peft", seed=12)
    b = write_lora(tmp_path / "b.safetensors", dynamic, "flux-kohya", seed=13)
    slow_prompt = f"{PROMPT} [[fault:slow]]"
    dynamic.load_lora(a)
    dynamic.load_lora(b, scale=0.5)
    try:
        expected = {"a": _expected(dynamic, loras={"a": 1.0}), "both": _expected(dynamic),
                    "none": _expected(dynamic, loras={}),
                    "slow_b": _expected(dynamic, slow_prompt, steps=SLOW_STEPS, loras={"b": 0.5})}
    finally:
        dynamic.unload_lora()

    server = ServerProcess(tiny_flux, tmp_path / "out", "--dtype", "float32", "--api-key", KEY, "--lora-mode",
                           "dynamic", "--num-gpus", "2", "--dp-size", "2", env={"DIFFGEN_FAULT_INJECT": "1"})
    server.wait_ready = functools.partial(ServerProcess.wait_ready, server, timeout=600)
    server.start()
    try:
        url = server.url
        wait_until(lambda: len(server.info(KEY)["worker_pids"]) == 2, what="two workers")
        for body in ({"path": a}, {"path": b, "scale": 0.5}):
            assert httpx.post(f"{url}/v1/loras", json=body, headers=_auth(), timeout=120).status_code == 200
        assert httpx.get(f"{url}/v1/loras", headers=_auth(), timeout=30).json()["mode"] == "dynamic"
        # worker 0 is held by a slow request, so the next one runs on worker 1: both have the LoRAs
        slow: dict = {}
        thread = threading.Thread(target=lambda: slow.setdefault(
            "r", _post_image(url, slow_prompt, SLOW_STEPS, loras={"b": 0.5})))
        thread.start()
        wait_until(lambda: server.info(KEY)["running"] == 1, what="the slow request running")
        assert np.array_equal(_image(_post_image(url, loras={"a": 1.0})), expected["a"])
        thread.join(timeout=120)
        assert np.array_equal(_image(slow["r"]), expected["slow_b"])
        assert np.array_equal(_image(_post_image(url)), expected["both"])  # the loaded scales by default
        assert np.array_equal(_image(_post_image(url, loras={})), expected["none"])
        assert httpx.delete(f"{url}/v1/loras/a", headers=_auth(), timeout=60).status_code == 200
        refused = _post_image(url, loras={"a": 1.0})
        assert refused.status_code == 400 and "no LoRA named 'a' is loaded (loaded: b)" in refused.text
    finally:
        assert server.stop(), server.log()


def test_worker_group_ranks_change_loras_together(tiny_flux, reference, tmp_path):
    """Engine.load_lora on an Engine whose model runs in a group of 2 ranks (Ulysses): each rank changes."""
    merged = reference("merged")
    good = write_lora(tmp_path / "style.safetensors", merged, "flux-peft", seed=14)
    request = dict(height=32, width=32, return_tensors=True, **SAMPLING)
    plain = merged.generate(PROMPT, **request).pixels
    merged.load_lora(good, scale=0.6)
    try:
        with_lora = merged.generate(PROMPT, **request).pixels
    finally:
        merged.unload_lora()
    with Engine.from_pretrained(tiny_flux, device="cpu", dtype="float32", num_gpus=2, ulysses_degree=2) as engine:
        with pytest.raises(InvalidRequestError, match="is not a safetensors file"):
            engine.load_lora(str(_bad_files(tmp_path, good)[0][0]["path"]))
        with pytest.raises(InvalidRequestError, match="loras: choosing LoRAs per request needs --lora-mode dynamic"):
            engine.generate(PROMPT, loras={"style": 1.0}, **request)  # a rank's error crosses processes intact
        assert engine.load_lora(good, scale=0.6) == "style"
        assert [(r["name"], r["scale"]) for r in engine.loras] == [("style", 0.6)]
        assert (engine.generate(PROMPT, **request).pixels - with_lora).abs().max().item() <= 1e-5
        engine.unload_lora()
        assert engine.loras == []
        assert (engine.generate(PROMPT, **request).pixels - plain).abs().max().item() <= 1e-5
