"""Request bodies of the OpenAI-compatible routes, the error envelope and the parsing of bodies.

JSON bodies are validated strictly (``"n": "2"`` is refused); multipart forms carry every value as
text, so they are validated in pydantic's lax mode ("2" -> 2). Unknown fields are refused by name;
OpenAI fields that have no meaning here (quality, style, moderation, ...) are accepted and ignored.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import Message

from diffgen.options import MAX_PROMPT_CHARS, MAX_SIDE, http_field, http_options, option

MAX_JSON_BYTES = 1 * 2**20
MAX_UPLOAD_BYTES = 50 * 2**20  # per file
MAX_BODY_BYTES = int(option("max_upload_mb").default * 2**20)  # whole request
MAX_FILES = 16
MAX_VIDEO_SECONDS = 60.0


class APIError(Exception):
    """An error answered in the OpenAI envelope: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Control characters (tab and newlines aside) and lone surrogates ("\ud800" is valid JSON) mean nothing in
# a prompt, and a lone surrogate cannot even be written into the PNG's metadata.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _printable(text: str) -> str:
    if found := _UNPRINTABLE.search(text):
        raise ValueError(f"contains the control character or lone surrogate {found.group()!r}")
    return text


Text = Annotated[str, AfterValidator(_printable)]
Prompt = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


def _extensions(route: str) -> type[_Body]:
    """diffgen's sampling fields settable on ``route`` (options with ``http`` set), with their bounds."""
    fields = {o.name: ((Text if o.type is str else o.type) | None, http_field(o.name)) for o in http_options(route)}
    return create_model(f"_{route.title()}Extensions", __base__=_Body, **fields)


class ImageGenerationBody(_extensions("image")):
    prompt: Text = Prompt
    model: str | None = Field(None, max_length=512)
    n: int = http_field("num_outputs_per_prompt", 1)
    size: str | None = Field("auto", max_length=32)
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["auto", "opaque", "transparent"] | None = None
    user: str | None = Field(None, max_length=512)
    # OpenAI fields with no meaning for these models: accepted, ignored.
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["auto", "low"] | None = None
    safety_identifier: str | None = Field(None, max_length=512)
    stream: bool | None = None
    partial_images: int | None = Field(None, ge=0, le=3)


class ImageEditBody(ImageGenerationBody):
    input_fidelity: Literal["high", "low"] | None = None


class VideoBody(_extensions("video")):
    prompt: Text = Prompt
    model: str | None = Field(None, max_length=512)
    n: int = http_field("num_outputs_per_prompt", 1)
    seconds: str | float | None = None
    size: str | None = Field(None, max_length=32)
    user: str | None = Field(None, max_length=512)


class Form:
    """A parsed multipart body: text fields (validated later) and uploaded files by field name."""

    def __init__(self, fields: dict[str, str], files: dict[str, list[UploadFile]]):
        self.fields = fields
        self.files = files


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_json(request: Request) -> dict[str, Any]:
    body = await _read_limited(request, MAX_JSON_BYTES)
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:  # "[" x 50000
        raise invalid(None, "the body is not valid JSON: nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits, NaN
        raise invalid(None, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(None, "the body must be a JSON object", code="invalid_json")
    return data


async def _read_limited(request: Request, limit: int) -> bytes:
    if _declared_length(request) > limit:
        raise APIError(413, f"the request body is larger than {limit // 1024} KiB", code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit // 1024} KiB", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _declared_length(request: Request) -> int:
    """Content-Length when it is a plain ASCII number, else 0 (the bytes are counted as they arrive)."""
    length = request.headers.get("content-length", "")
    return int(length) if re.fullmatch(r"[0-9]{1,20}", length) else 0


async def read_form(request: Request, file_fields: set[str], max_bytes: int = MAX_BODY_BYTES) -> Form:
    """Parse multipart/form-data (or urlencoded); ``file_fields``: names that may carry files; a body
    over ``max_bytes`` is a 413."""
    too_large = APIError(413, f"the request body is larger than {max_bytes / 2**20:g} MiB", code="too_large")
    if _declared_length(request) > max_bytes:
        raise too_large
    # Content-Length may be absent (chunked) or lie: count the bytes as they arrive, before the
    # multipart parser spools them to disk.
    received = 0

    async def counting_receive() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > max_bytes:
            raise too_large
        return message

    try:
        form = await Request(request.scope, counting_receive).form(max_files=MAX_FILES, max_fields=100)
    except (APIError, ClientDisconnect):
        raise
    except Exception as e:  # python-multipart / starlette parse errors
        raise invalid(None, f"the multipart body cannot be parsed: {e}", code="invalid_multipart") from e
    fields: dict[str, str] = {}
    files: dict[str, list[UploadFile]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            name = key[:-2] if key.endswith("[]") else key
            if name not in file_fields:
                raise invalid(key, f"Unknown file field: '{key}'.", code="unknown_parameter")
            files.setdefault(name, []).append(value)
        else:
            if key in file_fields or key.rstrip("[]") in file_fields:
                raise invalid(key, f"'{key}' must be a file upload, not text")
            if key in fields:
                raise invalid(key, f"'{key}' is given more than once")
            fields[key] = value
    return Form(fields, files)


async def read_upload(upload: UploadFile, param: str) -> bytes:
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise APIError(413, f"{param}: the file is larger than {MAX_UPLOAD_BYTES // 2**20} MiB", param=param,
                       code="too_large")
    if not data:
        raise invalid(param, f"{param}: the uploaded file is empty")
    return data


def validate(model: type[BaseModel], data: dict[str, Any], strict: bool) -> Any:
    """Validate into ``model``; the first problem becomes one 400 naming the field and the value."""
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        if error["type"] == "extra_forbidden":
            raise invalid(param, f"Unknown parameter: '{param}'.", code="unknown_parameter") from None
        if error["type"] == "missing":
            raise invalid(param, f"Missing required parameter: '{param}'.", code="missing_required_parameter") \
                from None
        shown = repr(error.get("input"))
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise invalid(param, f"{param}: {error['msg']} (got {shown})") from None


# ASCII digits only (\d takes fullwidth and Arabic-Indic digits), matched in full (``$`` lets "64x64\n" in).
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


def parse_size(size: str | None, param: str = "size") -> tuple[int | None, int | None]:
    """"WxH" -> (height, width); "auto" or None -> (None, None): the model's default."""
    if size is None or size == "auto":
        return None, None
    match = _SIZE.fullmatch(size)
    if not match:
        raise invalid(param, f"size {size!r} is not of the form WIDTHxHEIGHT (e.g. 1024x1024) or 'auto'")
    width, height = int(match.group(1)), int(match.group(2))
    for value in (width, height):
        if not 16 <= value <= MAX_SIDE:
            raise invalid(param, f"size {size!r}: each side must be between 16 and {MAX_SIDE} pixels")
    return height, width
