"""/v1/images/edits with an edit model (tiny Qwen-Image-Edit): input images reach the pipeline, and a
mask keeps the original pixels outside the area to edit."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from server_utils import ServerProcess

from diffgen.testing import TINY_FAMILIES

pytestmark = pytest.mark.skipif("qwen-image-edit" not in TINY_FAMILIES,
                                reason="needs the tiny Qwen-Image-Edit checkpoint (qwen-image-edit)")
PARAMS = {"num_inference_steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def edit_model(tiny_checkpoint):
    return tiny_checkpoint("qwen-image-edit")


@pytest.fixture(scope="module")
def server(edit_model, tmp_path_factory):
    process = ServerProcess(edit_model, tmp_path_factory.mktemp("serve-edits") / "out").start()
    yield process
    assert process.stop(), process.log()


def _source() -> Image.Image:
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(64, dtype=np.uint8)[None, :] * 4
    pixels[..., 2] = 180
    return Image.fromarray(pixels)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_edit_matches_the_engine_and_the_mask_keeps_the_rest(server, edit_model):
    from diffgen import Engine

    source = _source()
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # transparent left half: edit there only
    # A list of images goes out as the multipart field image[], as the openai client sends it.
    response = server.client().images.edit(image=[("in.png", _png(source), "image/png")],
                                           mask=("mask.png", _png(mask), "image/png"), prompt="make it green",
                                           size="64x64", extra_body=PARAMS)
    got = _pixels(response.data[0].b64_json)
    expected = Engine.from_pretrained(edit_model, device="cpu").generate(
        "make it green", images=[source], height=64, width=64, **PARAMS).images[0]
    assert np.array_equal(got[:, :32], np.asarray(expected)[:, :32])  # the model's edit, from our image
    assert np.array_equal(got[:, 32:], np.asarray(source)[:, 32:])  # the original outside the mask
    assert not np.array_equal(got[:, :32], np.asarray(source)[:, :32])


@pytest.mark.parametrize("name,data,files,param", [
    ("zero images", {"prompt": "x"}, {}, "image"),
    ("non-image upload", {"prompt": "x"}, {"image": ("a.png", b"not a picture", "image/png")}, "image"),
    ("mask of another size", {"prompt": "x"},
     {"image": ("a.png", None, "image/png"), "mask": ("m.png", "small-mask", "image/png")}, "mask"),
])
def test_bad_edit_inputs_get_an_envelope_naming_the_field(server, name, data, files, param):
    import httpx

    source = _png(_source())
    small_mask = _png(Image.new("RGBA", (32, 32), (0, 0, 0, 0)))
    files = {key: (fname, source if body is None else small_mask if body == "small-mask" else body, kind)
             for key, (fname, body, kind) in files.items()}
    response = httpx.post(f"{server.url}/v1/images/edits", data=data, files=files or None, timeout=60)
    assert response.status_code == 400, (name, response.text)
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], error
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
