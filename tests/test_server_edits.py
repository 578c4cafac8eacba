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


def test_a_streamed_edit_sends_image_edit_events_and_keeps_the_mask(server):
    source = _source()
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    events = list(server.client().images.edit(image=("in.png", _png(source), "image/png"),
                                              mask=("mask.png", _png(mask), "image/png"), prompt="make it green",
                                              size="64x64", stream=True, partial_images=1, extra_body=PARAMS))
    kinds = [event.type for event in events]
    assert kinds.count("image_edit.partial_image") == 1 and kinds[-1] == "image_edit.completed", kinds
    assert [e.model_extra["step"] for e in events if e.type == "image_edit.progress"][-2:] == [1, 2]
    got = _pixels(events[-1].b64_json)
    assert np.array_equal(got[:, 32:], np.asarray(source)[:, 32:])  # composited after the stream's job, too
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


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` 16-bit RGBA (8 bytes a pixel) over pixel data that
    is garbage: only a decoder would find out. Pillow reads the header without decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 64) + \
        chunk(b"IEND", b"")


def _post_images(server, *images: bytes):
    import httpx

    files = [("image[]", (f"in{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "x"}, files=files, timeout=60)


def test_the_image_count_is_checked_before_any_image_is_decoded(server):
    # Qwen-Image-Edit takes one image. Two undecodable ones: refused for their number, not their pixels.
    response = _post_images(server, _png_declaring(64, 64), _png_declaring(64, 64))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "image" and "at most 1" in error["message"] and error["code"] == "invalid_value"


def test_declared_dimensions_are_checked_before_decoding(server):
    # 8000 x 8000 16-bit RGBA (512 MB decoded) in a file of ~100 bytes: refused from its header.
    response = _post_images(server, _png_declaring(8000, 8000))
    assert response.status_code == 400, response.text
    assert "8000x8000 is too large" in response.json()["error"]["message"]
    assert _post_images(server, _png_declaring(64, 64)).json()["error"]["code"] == "invalid_image"  # data checked


@pytest.mark.parametrize("kind", ["BMP", "TIFF", "ICO", "GIF", "EPS", "PPM"])
def test_only_png_jpeg_and_webp_uploads_are_read(server, kind):
    buffer = io.BytesIO()
    _source().save(buffer, format=kind)
    response = _post_images(server, buffer.getvalue())
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image", response.text
    assert "png, jpeg or webp" in response.json()["error"]["message"]


@pytest.mark.parametrize("kind", ["JPEG", "WEBP"])
def test_jpeg_and_webp_uploads_are_read(server, kind):
    import httpx

    buffer = io.BytesIO()
    _source().save(buffer, format=kind)
    small_mask = _png(Image.new("RGBA", (32, 32), (0, 0, 0, 0)))
    # Refused for the mask's size against the image's: the image was read (no generation is run).
    response = httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "x"}, timeout=60,
                          files={"image": ("in", buffer.getvalue(), "image/png"), "mask": ("m.png", small_mask)})
    assert response.status_code == 400 and "the image is 64x64" in response.json()["error"]["message"], response.text


def test_the_model_card_says_image_to_image(server):
    card = server.client().models.retrieve(server.model_path)
    assert card.model_extra["task_type"] == "I2I"


@pytest.mark.parametrize("size", [(1, 300), (300, 1)])
def test_an_input_too_elongated_for_the_vision_encoder_is_a_400(server, size):
    import httpx

    image = ("a.png", _png(Image.new("RGB", size)), "image/png")
    response = httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "x"}, files={"image": image}, timeout=60)
    assert response.status_code == 400, response.text  # used to be a 500 from inside the image processor
    error = response.json()["error"]
    assert error["param"] == "image" and f"image 1 ({size[0]}x{size[1]}" in error["message"]
    assert "up to 200:1" in error["message"]
