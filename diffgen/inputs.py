"""Reading user-supplied inputs: images from files or http(s) URLs, prompt files, config files."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from diffgen.errors import InvalidRequestError

MAX_IMAGE_BYTES = 50 * 1024 * 1024


def load_image(source: str | bytes, field: str = "image_path") -> Image.Image:
    """An RGB image from a local path, an http(s) URL or raw bytes; a clear error naming ``field`` otherwise."""
    if isinstance(source, bytes):
        data = source
    elif source.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(source, timeout=30) as response:  # noqa: S310 (user asked for it)
                data = response.read(MAX_IMAGE_BYTES + 1)
        except OSError as e:
            raise InvalidRequestError(field, f"cannot download {source!r}: {e}") from e
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise InvalidRequestError(field, f"{source!r} does not exist or is not a file")
        data = path.read_bytes()
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidRequestError(field, f"image larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        name = source if isinstance(source, str) else "upload"
        raise InvalidRequestError(field, f"{name!r} is not a readable image") from e
    return image.convert("RGB")


def read_prompt_file(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise InvalidRequestError("prompt_file", f"{path!r} does not exist")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InvalidRequestError("prompt_file", f"{path!r} holds no prompt (one per line)")
    return prompts


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON mapping of option names (kebab- or snake-case) to values."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InvalidRequestError("config", f"{path!r} does not exist")
    text = file.read_text()
    try:
        if file.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise InvalidRequestError("config", f"{path!r} cannot be parsed: {e}") from e
    if not isinstance(data, dict):
        raise InvalidRequestError("config", f"{path!r} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
