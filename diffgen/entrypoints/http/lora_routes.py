"""LoRAs at run time: /v1/loras (load, list), /v1/loras/{name} (change the scale, unload).

The engine makes each change in every worker process (every rank of a worker group) between
requests, never in the middle of one; a route answers once all have made it. A file that does not
fit the model (not safetensors, keys or shapes that do not match, missing) is a 400 naming what does
not match, and nothing changed. LoRAs apply as the server's ``--lora-mode`` says: merged into the
weights, or dynamic (then requests choose them with their ``loras`` field).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from diffgen.engine import NotReadyError
from diffgen.entrypoints.http.schemas import APIError, Text, _Body, read_json, validate
from diffgen.errors import DiffgenError, InvalidRequestError
from diffgen.options import LORA_COMPONENTS, MAX_LORA_SCALE

router = APIRouter()

# the engine's names for what a route's body calls otherwise
_PARAMS = {"lora_path": "path"}


class LoRALoadBody(_Body):
    path: Text = Field(min_length=1, max_length=4096)
    name: str | None = Field(None, max_length=64)
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)
    component: Literal[LORA_COMPONENTS] = "transformer"  # type: ignore[valid-type]


class LoRAScaleBody(_Body):
    scale: float = Field(ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)


def _lora_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"object": "lora", **row}


async def _change(request: Request, change: Callable[..., Any], *args: Any) -> Any:
    """Run an Engine LoRA call off the event loop (it waits for the workers); its errors as API errors."""
    from diffgen.entrypoints.http.app import submission_error

    state = request.app.state.diffgen
    state.require_ready()
    try:
        return await asyncio.to_thread(change, *args)
    except InvalidRequestError as e:
        param = _PARAMS.get(e.field, e.field)
        raise APIError(400, f"{param}: {e.message}", param=param, code="invalid_value") from None
    except NotReadyError as e:
        raise submission_error(e, final=state.engine.status().failed) from None
    except DiffgenError as e:
        raise APIError(400, str(e), code="invalid_value") from None


def _loaded(request: Request, name: str) -> dict[str, Any]:
    engine = request.app.state.diffgen.engine
    for row in engine.loras:
        if row["name"] == name:
            return row
    raise APIError(404, f"No LoRA named '{name}' is loaded.", param="name", code="lora_not_found")


@router.get("/v1/loras")
async def list_loras(request: Request):
    state = request.app.state.diffgen
    state.require_ready()
    return {"object": "list", "mode": state.engine.lora_mode, "data": [_lora_object(r) for r in state.engine.loras]}


@router.post("/v1/loras")
async def load_lora(request: Request):
    body: LoRALoadBody = validate(LoRALoadBody, await read_json(request), strict=True)
    engine = request.app.state.diffgen.engine
    name = await _change(request, engine.load_lora, body.path, body.name, body.scale, body.component)
    return _lora_object(_loaded(request, name))


@router.get("/v1/loras/{name}")
async def retrieve_lora(request: Request, name: str):
    request.app.state.diffgen.require_ready()
    return _lora_object(_loaded(request, name))


@router.post("/v1/loras/{name}")
async def set_lora_scale(request: Request, name: str):
    """A new scale for a loaded LoRA (merged: the weights are recomputed from the originals)."""
    body: LoRAScaleBody = validate(LoRAScaleBody, await read_json(request), strict=True)
    request.app.state.diffgen.require_ready()
    _loaded(request, name)
    await _change(request, request.app.state.diffgen.engine.set_lora_scales, {name: body.scale})
    return _lora_object(_loaded(request, name))


@router.delete("/v1/loras/{name}")
async def unload_lora(request: Request, name: str):
    request.app.state.diffgen.require_ready()
    _loaded(request, name)
    await _change(request, request.app.state.diffgen.engine.unload_lora, name)
    return {"id": name, "object": "lora", "deleted": True}
