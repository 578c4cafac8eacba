"""The OpenAI-compatible routes: /v1/images/generations, /v1/images/edits, /v1/videos, /v1/models."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from PIL import Image
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from diffgen.engine import GenerationRequest, GenerationResult, JobError, ModelSpec
from diffgen.entrypoints.http.events import (
    HEARTBEAT,
    HEARTBEAT_S,
    SSE_HEADERS,
    STORE_POLL_S,
    JobProgress,
    encode_preview,
    next_snapshot,
    sse,
)
from diffgen.entrypoints.http.job_store import JobStoreUnavailable
from diffgen.entrypoints.http.jobs import is_video_id, video_key, video_object
from diffgen.entrypoints.http.output_store import OutputStore
from diffgen.entrypoints.http.schemas import (
    MAX_VIDEO_SECONDS,
    APIError,
    ImageEditBody,
    ImageGenerationBody,
    VideoBody,
    invalid,
    parse_size,
    read_form,
    read_json,
    read_upload,
    validate,
)
from diffgen.errors import InvalidRequestError
from diffgen.options import MAX_FRAMES, http_options

router = APIRouter()

MAX_INPUT_SIDE = 8192
MAX_INPUT_PIXELS = 4096 * 4096  # what an upload may declare; checked from its header, before decoding
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # what the API documents; Pillow would open BMP, TIFF, ICO, EPS...
POLL_AFTER_MS = "250"  # hint for the openai client's videos.poll


def _state(request: Request):
    return request.app.state.diffgen


def _is_multipart(request: Request) -> bool:
    content_type = request.headers.get("content-type", "").lower()
    return content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded"))


def _build(prompt: str, **params: Any) -> GenerationRequest:
    try:
        return GenerationRequest.build(prompt, **{k: v for k, v in params.items() if v is not None})
    except InvalidRequestError as e:
        raise invalid(e.field, str(e)) from None


def _sampling(body) -> dict[str, Any]:
    """The sampling options every generation route takes (diffgen.options, ``http="all"``)."""
    return {o.name: getattr(body, o.name) for o in http_options("image")}


def _require_kind(spec: ModelSpec, kind: str, model_id: str) -> None:
    if spec.output_kind != kind:
        other = "/v1/videos" if spec.output_kind == "video" else "/v1/images/generations"
        raise invalid("model", f"The model '{model_id}' makes {spec.output_kind}s, not {kind}s; use {other}.",
                      code="unsupported_model")


def _check_image_options(body: ImageGenerationBody) -> None:
    if body.partial_images and not body.stream:
        raise invalid("partial_images", "partial_images are sent only in a stream; set stream=true")
    if body.preview_every is not None and not body.stream:
        raise invalid("preview_every", "previews of an image are sent only in a stream; set stream=true")
    if body.partial_images and body.preview_every is not None:
        raise invalid("preview_every", "give partial_images (how many previews) or preview_every (every how many "
                      "steps), not both")
    if body.background == "transparent":
        raise invalid("background", "transparent backgrounds are not supported; use 'auto' or 'opaque'")


# -- models ------------------------------------------------------------------------------------
def _gpus(status) -> int:
    """One per worker process, except that a worker that is a group of ranks counts its ranks."""
    return len(status.worker_pids) - len(status.worker_groups) + sum(len(g["rank_pids"])
                                                                     for g in status.worker_groups)


def _model_card(state) -> dict[str, Any]:
    status, spec = state.engine.status(), state.spec
    on_gpu = status.device is not None and status.device.startswith("cuda")
    return {"id": state.model_id, "object": "model", "created": 0, "owned_by": "diffgen",
            "output_kind": spec.output_kind if spec else None, "ready": status.ready,
            "task_type": spec.task_type if spec else None,
            "num_gpus": _gpus(status) if on_gpu else 0,
            "dit_precision": status.dit_precision, "vae_precision": status.vae_precision}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(_state(request))]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(request: Request, model_id: str):
    """The openai client's ``models.retrieve``; hub ids carry a slash ("org/name"), hence ``:path``."""
    state = _state(request)
    state.check_model(model_id)
    return _model_card(state)


# -- images ------------------------------------------------------------------------------------
@router.post("/v1/images/generations")
async def create_image(request: Request):
    state = _state(request)
    if _is_multipart(request):
        raise invalid(None, "this endpoint takes a JSON body (Content-Type: application/json)",
                      code="invalid_content_type")
    body: ImageGenerationBody = validate(ImageGenerationBody, await read_json(request), strict=True)
    _check_image_options(body)
    height, width = parse_size(body.size)
    generation = _build(body.prompt, height=height, width=width, num_outputs_per_prompt=body.n, **_sampling(body))
    state.check_model(body.model)
    _require_kind(state.require_ready(), "image", state.model_id)
    generation = state.resolve(generation)
    if body.stream:
        return _stream_images(request, body, generation, "image_generation")
    output = await state.run(generation, request.state.request_id, request)
    return await _images_response(request, body, generation, output)


@router.post("/v1/images/edits")
async def edit_image(request: Request):
    state = _state(request)
    if not _is_multipart(request):
        raise invalid(None, "this endpoint takes multipart/form-data (image files and fields)",
                      code="invalid_content_type")
    form = await read_form(request, {"image", "mask"}, state.config.max_body_bytes)
    body: ImageEditBody = validate(ImageEditBody, form.fields, strict=False)
    _check_image_options(body)
    height, width = parse_size(body.size)
    uploads = form.files.get("image", [])
    if not uploads:
        raise invalid("image", "Missing required parameter: 'image' (one or more image files).",
                      code="missing_required_parameter")
    if len(form.files.get("mask", [])) > 1:
        raise invalid("mask", "give one mask")
    state.check_model(body.model)
    spec = state.require_ready()
    _require_kind(spec, "image", state.model_id)
    if not spec.accepts_images:
        raise invalid("image", f"The model '{state.model_id}' cannot edit images (it takes no input image); "
                      "use /v1/images/generations or serve an edit model such as Qwen-Image-Edit.",
                      code="model_cannot_edit")
    # The files' headers only (format, declared size); the model then checks their number, sizes and
    # aspect ratios (resolve) before a single pixel is decoded.
    images = [await _probe_upload(upload, "image") for upload in uploads]
    mask = await _probe_upload(form.files["mask"][0], "mask") if form.files.get("mask") else None
    if mask is not None:
        _check_mask(mask, images[0].size)
    generation = _build(body.prompt, height=height, width=width, num_outputs_per_prompt=body.n, images=images,
                        **_sampling(body))
    generation = state.resolve(generation)
    images = await asyncio.to_thread(lambda: [_decode(image, "image").convert("RGB") for image in images])
    if mask is not None:
        mask = await asyncio.to_thread(lambda: _decode(mask, "mask").convert("RGBA"))
    generation = dataclasses.replace(generation, images=images)

    def keep_unmasked(output: GenerationResult) -> None:
        if mask is not None:
            output.images = [composite_with_mask(result, images[0], mask) for result in output.images]

    if body.stream:
        return _stream_images(request, body, generation, "image_edit", finish=keep_unmasked)
    output = await state.run(generation, request.state.request_id, request)
    await asyncio.to_thread(keep_unmasked, output)  # pixel work off the event loop
    return await _images_response(request, body, generation, output)


async def _read_image(upload, param: str) -> Image.Image:
    data = await read_upload(upload, param)
    # _open_image reads only the header; decoding (convert) takes a while: not on the event loop.
    return await asyncio.to_thread(lambda: _open_image(data, param).convert("RGB"))


async def _probe_upload(upload, param: str) -> Image.Image:
    data = await read_upload(upload, param)
    return await asyncio.to_thread(_probe_image, data, param)


def _check_mask(mask: Image.Image, size: tuple[int, int]) -> None:
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise invalid("mask", "the mask must be a PNG with an alpha channel; transparent pixels mark the area "
                      "to edit")
    if mask.size != size:
        raise invalid("mask", f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; "
                      "they must have the same size")


def _open_image(data: bytes, param: str) -> Image.Image:
    return _decode(_probe_image(data, param), param)


def _probe_image(data: bytes, param: str) -> Image.Image:
    """Open an upload of a documented format and check the size its header declares; nothing is decoded."""
    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except Exception:  # UnidentifiedImageError (not one of the formats) or a header Pillow cannot parse
        raise _unreadable(param) from None
    width, height = image.size
    if max(width, height) > MAX_INPUT_SIDE or width * height > MAX_INPUT_PIXELS:
        raise invalid(param, f"{param}: {width}x{height} is too large; at most {MAX_INPUT_SIDE} pixels per side "
                      f"and {MAX_INPUT_PIXELS // 2**20} megapixels")
    return image


def _decode(image: Image.Image, param: str) -> Image.Image:
    try:
        image.load()
    except Exception:  # truncated or corrupt pixel data, decompression bomb
        raise _unreadable(param) from None
    return image


def _unreadable(param: str) -> APIError:
    return invalid(param, f"{param}: the uploaded file is not a readable image (png, jpeg or webp)",
                   code="invalid_image")


def composite_with_mask(result: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Keep the original outside the mask: the model's pixels only where the mask is transparent
    (alpha 0, the OpenAI convention for "edit here"). Works at the result's size."""
    if original.size != result.size:
        original = original.resize(result.size, Image.Resampling.LANCZOS)
        mask = mask.resize(result.size, Image.Resampling.NEAREST)
    keep = mask.getchannel("A").point(lambda alpha: 255 if alpha > 0 else 0)
    return Image.composite(original.convert("RGB"), result.convert("RGB"), keep)


def _encode_outputs(request: Request, body: ImageGenerationBody, output: GenerationResult) -> list[dict[str, Any]]:
    """The response's ``data`` entries: each image encoded (with its metadata) as b64_json or stored for a url."""
    from diffgen.engine import generation_metadata
    from diffgen.outputs import encode_image

    state = _state(request)
    fmt = body.output_format or "png"
    quality = body.output_compression if fmt != "png" else None
    data = []
    for index, image in enumerate(output.images):
        metadata = generation_metadata(output.request, seed=output.seed, model=state.model_id, output_index=index)
        encoded = encode_image(image, fmt, metadata, quality=quality)
        if body.response_format == "url":
            image_id, url = state.images.save(encoded, fmt)
            data.append({"url": url or f"{_public_base(request)}/v1/images/{image_id}/content",
                         "revised_prompt": body.prompt})
        else:
            data.append({"b64_json": base64.b64encode(encoded).decode("ascii"), "revised_prompt": body.prompt})
    return data


def _usage(output: GenerationResult) -> dict[str, Any]:
    done = output.request
    tokens = len(output.images) * (done.height // 16) * (done.width // 16)
    return {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": tokens, "output_tokens_details": {"image_tokens": tokens, "text_tokens": 0},
            "total_tokens": tokens}


def _stream_error(error: Exception) -> dict[str, Any]:
    """The error envelope's body for a job that failed after its stream began (the status is already 200)."""
    if isinstance(error, JobError):
        client_side = error.code in ("invalid_request", "cancelled")
        return {"message": error.message, "type": "invalid_request_error" if client_side else "server_error",
                "param": error.param, "code": error.code}
    return {"message": f"generation failed: {type(error).__name__}", "type": "server_error", "param": None,
            "code": "generation_error"}


async def _images_response(request: Request, body: ImageGenerationBody, generation: GenerationRequest,
                           output: GenerationResult) -> JSONResponse:
    data = await asyncio.to_thread(_encode_outputs, request, body, output)
    done = output.request
    return JSONResponse({
        "created": int(time.time()), "id": request.state.request_id, "data": data,
        "output_format": body.output_format or "png", "size": f"{done.width}x{done.height}", "background": "opaque",
        "seed": output.seed, "usage": _usage(output),
    })


def _stream_images(request: Request, body: ImageGenerationBody, generation: GenerationRequest, kind: str,
                   finish: Callable[[GenerationResult], None] | None = None) -> StreamingResponse:
    """``stream=true``: queue the job now (a refusal is still a plain 4xx/429), then answer Server-Sent
    Events (``kind``: image_generation or image_edit): ``{kind}.progress`` after every step,
    ``{kind}.partial_image`` for each preview, ``{kind}.completed`` for each image, or one ``error`` event.

    A client that disconnects cancels its own job (nobody can receive its images); other jobs go on."""
    state = _state(request)
    limit = body.partial_images or None  # OpenAI's count of partial images; None: every preview_every one
    if limit:
        generation = dataclasses.replace(
            generation, preview_every=max(1, generation.num_inference_steps // (limit + 1)))
    board, job_id = state.progress, request.state.request_id
    updates = board.subscribe(job_id)  # before submitting: no event of the job is missed
    try:
        job = state.submit(generation, job_id, listener=board.on_event)
    except BaseException:
        board.unsubscribe(job_id, updates)
        raise
    fmt = body.output_format or "png"
    common = {"size": f"{generation.width}x{generation.height}", "quality": body.quality or "auto",
              "background": "opaque", "output_format": fmt}

    def partial_images(snapshot: JobProgress, index: int) -> list[bytes]:
        events = []
        for output_index, frames in enumerate(snapshot.preview):
            encoded = base64.b64encode(encode_preview(frames[len(frames) // 2], fmt)).decode("ascii")
            events.append(sse(f"{kind}.partial_image", {
                "b64_json": encoded, "created_at": int(time.time()), **common, "partial_image_index": index,
                "output_index": output_index, **snapshot.timing()}))
        return events

    ended = False

    def end(finished: bool) -> None:
        """Once, when the stream ends: a job whose images were not all sent is cancelled."""
        nonlocal ended
        if not ended:
            ended = True
            board.unsubscribe(job_id, updates)
            if not finished:  # the client left (or the server stops): nobody will read this job's images
                state.engine.cancel(job_id)

    async def events():
        # Never cancelled here: cancelling an asyncio.wrap_future would cancel the job itself.
        done = asyncio.wrap_future(job.future)
        finished, sent = False, 0
        try:
            while True:
                snapshot = await next_snapshot(updates, HEARTBEAT_S, done)
                if snapshot is None:
                    if done.done() and updates.empty():
                        break
                    yield HEARTBEAT
                    continue
                yield sse(f"{kind}.progress", {"created_at": int(time.time()), **snapshot.timing()})
                if snapshot.preview is not None and snapshot.preview_step == snapshot.step and \
                        (limit is None or sent < limit):
                    for event in await asyncio.to_thread(partial_images, snapshot, sent):
                        yield event
                    sent += 1
            try:
                output = job.result()
            except Exception as error:
                finished = True
                yield sse("error", {"error": _stream_error(error)})
                return
            if finish is not None:
                await asyncio.to_thread(finish, output)
            data = await asyncio.to_thread(_encode_outputs, request, body, output)
            total = output.request.num_inference_steps
            for index, entry in enumerate(data):
                entry = {k: v for k, v in entry.items() if k != "revised_prompt"}
                yield sse(f"{kind}.completed", {**entry, "created_at": int(time.time()), **common,
                                                "usage": _usage(output), "output_index": index, "seed": output.seed,
                                                "step": total, "total_steps": total})
            finished = True
        finally:
            end(finished)

    return _EventStream(events(), on_end=lambda: end(False))


class _EventStream(StreamingResponse):
    """An event stream that calls ``on_end`` when the response is over, however it ended: also when the client
    left before the first event was sent, so that its generator (and the ``finally`` in it) never ran."""

    def __init__(self, content: Any, on_end: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.on_end = on_end

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()


def _public_base(request: Request) -> str:
    """--public-url, else the address of the socket the client reached (never the Host header, which the
    client chooses)."""
    configured = _state(request).config.public_url
    if configured:
        return configured
    host, port = request.scope["server"]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ContentResponse(FileResponse):
    """A FileResponse that honours valid ``Range`` headers (206) and answers the others 416 in the OpenAI
    envelope (Starlette answers them in plain text)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        http_range, if_range = headers.get("range"), headers.get("if-range")
        if http_range is not None and scope["method"] in ("GET", "HEAD"):
            self.stat_result = await asyncio.to_thread(os.stat, self.path)
            self.set_stat_headers(self.stat_result)
            size = self.stat_result.st_size
            unit = http_range.partition("=")[0].strip().lower()
            if unit != "bytes":  # another unit: ignored, the whole file (RFC 9110 14.2)
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
            elif if_range is None or self._should_use_range(if_range):
                try:
                    self._parse_range_header(http_range, size)
                except (MalformedRangeHeader, RangeNotSatisfiable):
                    error = APIError(416, f"Range {http_range[:100]!r} cannot be served: the content has {size} "
                                     "bytes; give e.g. 'bytes=0-1023' or 'bytes=-1024'.", param="range",
                                     code="range_not_satisfiable")
                    response = JSONResponse(error.body(), status_code=416,
                                            headers={"content-range": f"bytes */{size}"})
                    return await response(scope, receive, send)
        await super().__call__(scope, receive, send)


async def _stored_content(request: Request, outputs: OutputStore, key: str, media_type: str,
                          filename: str | None = None):
    """A stored output as a response: a local file with Range support, else streamed from the store (a
    ``Range`` request is redirected to the object's presigned or public URL: the store serves byte ranges);
    None when it is missing."""
    found = await asyncio.to_thread(outputs.stat, key)
    if found is None:
        return None
    if found.path is not None:
        return ContentResponse(found.path, media_type=media_type, filename=filename)
    if "range" in request.headers and (url := await asyncio.to_thread(outputs.url, key)) is not None:
        return RedirectResponse(url, status_code=307)
    chunks = outputs.read(key)
    first = await asyncio.to_thread(next, chunks, b"")  # the store's errors surface here, before the headers
    headers = {"content-length": str(found.size)}
    if filename:
        headers["content-disposition"] = f'attachment; filename="{filename}"'

    async def body():
        yield first
        while chunk := await asyncio.to_thread(next, chunks, b""):
            yield chunk

    return StreamingResponse(body(), media_type=media_type, headers=headers)


@router.get("/v1/images/{image_id}/content")
async def image_content(request: Request, image_id: str):
    images = _state(request).images
    found = await asyncio.to_thread(images.find, image_id)
    response = None if found is None else await _stored_content(request, images.outputs, *found)
    if response is None:
        raise APIError(404, f"No image with id '{image_id}'.", param="image_id", code="not_found")
    return response


# -- videos ------------------------------------------------------------------------------------
@router.post("/v1/videos")
async def create_video(request: Request):
    state = _state(request)
    reference = None
    if _is_multipart(request):
        form = await read_form(request, {"input_reference"}, state.config.max_body_bytes)
        body: VideoBody = validate(VideoBody, form.fields, strict=False)
        uploads = form.files.get("input_reference", [])
        if len(uploads) > 1:
            raise invalid("input_reference", "give one input_reference image")
        if uploads:
            reference = await _read_image(uploads[0], "input_reference")
    else:
        data = await read_json(request)
        if "input_reference" in data:
            raise invalid("input_reference", "upload input_reference as a file (multipart/form-data)")
        body = validate(VideoBody, data, strict=True)
    seconds = _parse_seconds(body.seconds)
    height, width = parse_size(body.size)
    generation = _build(body.prompt, height=height, width=width, num_frames=body.num_frames, fps=body.fps,
                        num_outputs_per_prompt=body.n, images=[reference] if reference is not None else None,
                        **_sampling(body))
    state.check_model(body.model)
    spec = state.require_ready()
    _require_kind(spec, "video", state.model_id)
    if reference is not None and not spec.accepts_images:
        raise invalid("input_reference", f"The model '{state.model_id}' takes no input image (text-to-video only).",
                      code="unsupported_input")
    if seconds is not None and body.num_frames is None:
        generation.num_frames = _frames_for(seconds, body.fps or spec.defaults.fps, spec.frame_multiple)
    generation = state.resolve(generation)  # the model's defaults for what the body leaves out; 400 if bad
    fps = generation.fps
    shown_seconds = body.seconds if isinstance(body.seconds, str) else f"{generation.num_frames / fps:.3g}"
    record = await state.create_video(
        generation, state.model_id, str(shown_seconds),
        f"{generation.width}x{generation.height}",
        {"num_frames": generation.num_frames, "fps": fps, "seed": generation.seed,
         "num_inference_steps": generation.num_inference_steps, "n": generation.num_outputs_per_prompt})
    return JSONResponse(video_object(record), headers={"x-request-id": record["id"]})


def _parse_seconds(value: str | float | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise invalid("seconds", f"seconds {value!r} is not a number") from None
    if not 0 < seconds <= MAX_VIDEO_SECONDS:
        raise invalid("seconds", f"seconds {value!r} is out of range; allowed (0, {MAX_VIDEO_SECONDS:g}]")
    return seconds


def _frames_for(seconds: float, fps: int, multiple: int | None) -> int:
    """Frames for a duration, snapped to the VAE's k*multiple+1 frame counts."""
    frames = max(1, round(seconds * fps))
    if multiple:
        frames = max(1, round((frames - 1) / multiple)) * multiple + 1
    if frames > MAX_FRAMES:
        raise invalid("seconds", f"{seconds:g} s at {fps} fps is {frames} frames; at most {MAX_FRAMES}")
    return frames


def _video_record(request: Request, video_id: str) -> dict[str, Any]:
    record = _state(request).store.get(video_id) if is_video_id(video_id) else None
    if record is None:
        raise APIError(404, f"No video with id '{video_id}'.", param="video_id", code="not_found")
    return record


@router.get("/v1/videos/{video_id}")
async def retrieve_video(request: Request, video_id: str):
    record = await asyncio.to_thread(_video_record, request, video_id)
    return JSONResponse(video_object(record), headers={"openai-poll-after-ms": POLL_AFTER_MS})


@router.get("/v1/videos")
async def list_videos(request: Request):
    query = request.query_params
    unknown = sorted(set(query) - {"after", "limit", "order"})
    if unknown:
        raise invalid(unknown[0], f"Unknown parameter: '{unknown[0]}'.", code="unknown_parameter")
    limit_text = query.get("limit", "20")
    # Not str.isdigit(): it accepts "²", which int() refuses.
    if not re.fullmatch(r"[0-9]{1,3}", limit_text) or not 1 <= int(limit_text) <= 100:
        raise invalid("limit", f"limit {limit_text!r} must be an integer between 1 and 100")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("order", f"order {order!r} must be 'asc' or 'desc'")
    after = query.get("after")
    try:
        rows, has_more = await asyncio.to_thread(_state(request).store.list, after, int(limit_text), order)
    except KeyError:  # deleted meanwhile (or never existed): the page after it cannot be placed, so it is empty
        rows, has_more = [], False
    data = [video_object(row) for row in rows]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.delete("/v1/videos/{video_id}")
async def delete_video(request: Request, video_id: str):
    state = _state(request)
    if not is_video_id(video_id) or not await asyncio.to_thread(state.videos.delete, video_id):
        raise APIError(404, f"No video with id '{video_id}'.", param="video_id", code="not_found")
    return {"id": video_id, "object": "video.deleted", "deleted": True}


@router.get("/v1/videos/{video_id}/content")
async def video_content(request: Request, video_id: str):
    variant = request.query_params.get("variant", "video")
    if variant != "video":
        raise invalid("variant", f"variant {variant!r} is not available; only 'video'")
    record = await asyncio.to_thread(_video_record, request, video_id)
    outputs = json.loads(record.get("params") or "{}").get("n", 1)
    index_text = request.query_params.get("index", "0")
    if not re.fullmatch(r"[0-9]{1,2}", index_text) or int(index_text) >= outputs:
        raise invalid("index", f"index {index_text!r}: this video job has {outputs} output(s); index 0..{outputs - 1}")
    if record["status"] != "completed":
        raise APIError(409, f"The video '{video_id}' is {record['status']}; its content exists once it is "
                       "completed.", param="video_id", code="video_not_ready")
    response = await _stored_content(request, _state(request).videos.outputs, video_key(video_id, int(index_text)),
                                     "video/mp4", filename=f"{video_id}.mp4")
    if response is None:
        raise APIError(404, f"The content of video '{video_id}' is missing from the output store.",
                       param="video_id", code="not_found")
    return response


@router.get("/v1/videos/{video_id}/events")
async def video_events(request: Request, video_id: str):
    """Server-Sent Events of a video job until it ends: ``video.progress`` (status, percent, and on the
    replica that runs it step, total_steps, elapsed_s, eta_s), ``video.partial_image`` (a PNG of the middle
    latent frame of each output, when the job was created with ``preview_every``), then ``video.completed``
    or ``video.failed`` with the video object. Leaving the stream does not cancel the job (DELETE does)."""
    state = _state(request)
    first = await asyncio.to_thread(_video_record, request, video_id)  # 404 (or 503) before the stream starts

    async def events():
        updates = state.progress.subscribe(video_id)
        try:
            last, shown, record, read_at, quiet_since = None, 0, first, time.monotonic(), time.monotonic()
            snapshot = state.progress.get(video_id)  # running here already: its progress so far
            while True:
                if time.monotonic() - read_at >= STORE_POLL_S:
                    read_at = time.monotonic()
                    try:
                        record = await asyncio.to_thread(state.store.get, video_id)
                    except JobStoreUnavailable:  # the database is away: go on with what was last read
                        pass
                    if record is None:
                        yield sse("error", {"error": {"message": f"The video '{video_id}' was deleted.",
                                                      "type": "invalid_request_error", "param": "video_id",
                                                      "code": "not_found"}})
                        return
                if record["status"] in ("completed", "failed"):
                    yield sse(f"video.{record['status']}", video_object(record))
                    return
                progress = {"id": video_id, "status": record["status"], "progress": record["progress"],
                            **(snapshot.timing() if snapshot is not None else {})}
                key = (record["status"], record["progress"], progress.get("step"))
                if key != last:
                    yield sse("video.progress", progress)
                    last, quiet_since = key, time.monotonic()
                if snapshot is not None and snapshot.preview is not None and snapshot.preview_step > shown:
                    shown = snapshot.preview_step
                    for output_index, frames in enumerate(snapshot.preview):
                        image = await asyncio.to_thread(encode_preview, frames[len(frames) // 2])
                        yield sse("video.partial_image", {
                            "id": video_id, "b64_json": base64.b64encode(image).decode("ascii"),
                            "output_format": "png", "output_index": output_index, **snapshot.timing()})
                if time.monotonic() - quiet_since > HEARTBEAT_S:
                    yield HEARTBEAT
                    quiet_since = time.monotonic()
                snapshot = await next_snapshot(updates, STORE_POLL_S) or state.progress.get(video_id)
        finally:
            state.progress.unsubscribe(video_id, updates)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
