"""Turn pixels into files: images with their generation parameters in metadata, videos as MP4."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from diffgen.errors import InvalidRequestError

if TYPE_CHECKING:
    from diffgen.engine.request import GenerationResult

IMAGE_FORMATS = ("png", "jpeg", "webp")
VIDEO_FORMATS = ("mp4",)
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "mp4": "mp4"}


def to_uint8(pixels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float [0, 1] pixels (..., 3) -> uint8, rounded as diffusers' numpy_to_pil does."""
    if isinstance(pixels, torch.Tensor):
        pixels = pixels.detach().float().cpu().numpy()
    return (pixels * 255).round().astype(np.uint8)


def generation_metadata(result: GenerationResult, index: int) -> dict[str, str]:
    r = result.request
    per_prompt = r.num_outputs_per_prompt
    return {
        "prompt": r.prompt[index // per_prompt],
        "negative_prompt": (r.negative_prompt or [""])[index // per_prompt] if r.negative_prompt else "",
        "seed": str(result.seed),
        "output_index": str(index),
        "steps": str(r.num_inference_steps),
        "guidance_scale": str(r.guidance_scale),
        "width": str(r.width),
        "height": str(r.height),
        "model": result.model,
        "software": "diffgen",
    }


def encode_image(image: Image.Image, output_format: str, metadata: dict[str, str] | None = None,
                 quality: int | None = None) -> bytes:
    """Encode one image; PNG carries ``metadata`` as text chunks (plus a JSON 'parameters' chunk)."""
    import io

    buffer = io.BytesIO()
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in (metadata or {}).items():
            info.add_text(key, value)
        if metadata:
            info.add_text("parameters", json.dumps(metadata))
        image.save(buffer, format="PNG", pnginfo=info)
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality or 95)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality or 95)
    else:
        raise InvalidRequestError("output_format", f"{output_format!r}; allowed: {', '.join(IMAGE_FORMATS)}")
    return buffer.getvalue()


def write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    """Write (F, H, W, 3) uint8 frames as H.264 MP4 with the ffmpeg that imageio-ffmpeg ships."""
    import imageio_ffmpeg

    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv420p", quality=8, macro_block_size=1,
                                         output_params=["-loglevel", "error"])
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def safe_stem(text: str, limit: int = 60) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit]
    return stem or "output"


def save_result(result: GenerationResult, output_dir: Path, file_name: str | None,
                output_format: str | None) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    count = len(result.frames) if result.is_video else len(result.images)
    fmt = (output_format or ("mp4" if result.is_video else "png")).lower()
    allowed = VIDEO_FORMATS if result.is_video else IMAGE_FORMATS
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in allowed:
        raise InvalidRequestError("output_format", f"{fmt!r}; allowed: {', '.join(allowed)}")
    stem = Path(file_name).stem if file_name else f"{safe_stem(result.request.prompt[0])}_{result.seed}"
    paths = []
    for i in range(count):
        suffix = f"_{i}" if count > 1 else ""
        path = output_dir / f"{stem}{suffix}.{_EXTENSIONS[fmt]}"
        if result.is_video:
            write_mp4(result.frames[i], path, result.fps or 16)
        else:
            path.write_bytes(encode_image(result.images[i], fmt, generation_metadata(result, i)))
        paths.append(path)
    return paths
