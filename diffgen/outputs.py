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
VIDEO_FORMATS = ("mp4", "gif", "webp", "png-frames")
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "mp4": "mp4", "gif": "gif", "png-frames": ""}


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


def write_mp4(frames: np.ndarray, path: Path, fps: int, metadata: dict[str, str] | None = None) -> None:
    """Write (F, H, W, 3) uint8 frames as H.264 MP4 with the ffmpeg that imageio-ffmpeg ships.

    ``metadata`` goes into the container's comment tag as JSON (``ffprobe -show_format`` shows it).
    """
    import imageio_ffmpeg

    height, width = frames.shape[1:3]
    params = ["-loglevel", "error"]
    if metadata:
        params += ["-metadata", f"comment={json.dumps(metadata)}"]
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv420p", quality=8, macro_block_size=1,
                                         output_params=params)
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def write_animation(frames: np.ndarray, path: Path, fps: int, output_format: str) -> None:
    """Animated GIF (256 colours) or lossy WebP, looping, with Pillow."""
    images = [Image.fromarray(frame) for frame in frames]
    options = {"quality": 90} if output_format == "webp" else {"optimize": False, "disposal": 2}
    images[0].save(path, format=output_format.upper(), save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0, **options)


def write_png_frames(frames: np.ndarray, folder: Path, metadata: dict[str, str] | None = None) -> None:
    """One PNG per frame, ``frame_00000.png`` ..., in ``folder`` (the first frame carries the metadata)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        data = encode_image(Image.fromarray(frame), "png", metadata if index == 0 else None)
        (folder / f"frame_{index:05d}.png").write_bytes(data)


def write_video(frames: np.ndarray, path: Path, fps: int, output_format: str,
                metadata: dict[str, str] | None = None) -> None:
    """(F, H, W, 3) uint8 frames as ``output_format``: mp4, gif, webp or png-frames (a folder)."""
    if output_format == "mp4":
        write_mp4(frames, path, fps, metadata)
    elif output_format in ("gif", "webp"):
        write_animation(frames, path, fps, output_format)
    elif output_format == "png-frames":
        write_png_frames(frames, path, metadata)
    else:
        raise InvalidRequestError("output_format", f"{output_format!r}; allowed: {', '.join(VIDEO_FORMATS)}")


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
        extension = f".{_EXTENSIONS[fmt]}" if _EXTENSIONS[fmt] else ""  # png-frames: a folder per output
        path = output_dir / f"{stem}{suffix}{extension}"
        if result.is_video:
            metadata = {**generation_metadata(result, i), "num_frames": str(len(result.frames[i])),
                        "fps": str(result.fps or 16)}
            write_video(result.frames[i], path, result.fps or 16, fmt, metadata)
        else:
            path.write_bytes(encode_image(result.images[i], fmt, generation_metadata(result, i)))
        paths.append(path)
    return paths
