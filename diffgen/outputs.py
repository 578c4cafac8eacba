"""Turn pixels into files: images with their generation parameters in metadata, videos as MP4."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from diffgen.errors import DiffgenError, InvalidRequestError

IMAGE_FORMATS = ("png", "jpeg", "webp")
VIDEO_FORMATS = ("mp4", "gif", "webp", "png-frames")
FORMATS = {"image": IMAGE_FORMATS, "video": VIDEO_FORMATS}
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "mp4": "mp4", "gif": "gif", "png-frames": ""}


def to_uint8(pixels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float [0, 1] pixels (..., 3) -> uint8, rounded as diffusers' numpy_to_pil does."""
    if isinstance(pixels, torch.Tensor):
        pixels = pixels.detach().float().cpu().numpy()
    return (pixels * 255).round().astype(np.uint8)


def encode_image(image: Image.Image, output_format: str, metadata: dict[str, Any] | None = None,
                 quality: int | None = None) -> bytes:
    """Encode one image. PNG carries ``metadata`` (``GenerationResult.metadata``) twice: one text chunk
    per field, and a JSON ``parameters`` chunk that keeps the values' types (numbers stay numbers)."""
    import io

    buffer = io.BytesIO()
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in (metadata or {}).items():
            info.add_text(key, str(value))
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


def write_mp4(frames: np.ndarray, path: Path, fps: int, metadata: dict[str, Any] | None = None) -> None:
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


#: threads that encode PNG frames at once (Pillow's zlib encoder releases the GIL): the CPUs this process may use
PNG_THREADS = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 16)


def write_png_frames(frames: np.ndarray, folder: Path, metadata: dict[str, Any] | None = None) -> None:
    """One PNG per frame, ``frame_00000.png`` ..., in ``folder`` (the first frame carries the metadata).

    The frames are encoded on several threads, the same bytes as one: one at a time, 81 frames of 480x832 took 7.7 s
    of a one-shot Wan run on an H200 machine (docs/benchmarks.md); 81 synthetic frames of that size took 6.0 s on one
    thread and 3.1 s on a pool of four on a 2-core CPU machine (both cores busy)."""
    folder.mkdir(parents=True, exist_ok=True)  # save_outputs has reserved it

    def write(index: int) -> None:
        data = encode_image(Image.fromarray(frames[index]), "png", metadata if index == 0 else None)
        (folder / f"frame_{index:05d}.png").write_bytes(data)

    pool = ThreadPoolExecutor(max_workers=max(1, min(PNG_THREADS, len(frames))))
    try:
        for future in [pool.submit(write, index) for index in range(len(frames))]:
            future.result()  # a frame's exception is raised here
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, frames not yet started are not encoded


def write_video(frames: np.ndarray, path: Path, fps: int, output_format: str,
                metadata: dict[str, Any] | None = None) -> None:
    """(F, H, W, 3) uint8 frames as ``output_format``: mp4, gif, webp or png-frames (a folder)."""
    if output_format == "mp4":
        write_mp4(frames, path, fps, metadata)
    elif output_format in ("gif", "webp"):
        write_animation(frames, path, fps, output_format)
    elif output_format == "png-frames":
        write_png_frames(frames, path, metadata)
    else:
        raise InvalidRequestError("output_format", f"{output_format!r}; allowed: {', '.join(VIDEO_FORMATS)}")


def check_output_format(output_format: str | None, output_kind: str) -> str:
    """The normalised format for an ``output_kind`` ("image" or "video") model; None gives its default.

    Needs no loaded model, so the CLI checks ``--output-format`` before loading one.
    """
    fmt = (output_format or ("mp4" if output_kind == "video" else "png")).lower()
    fmt = "jpeg" if fmt == "jpg" else fmt
    allowed = FORMATS[output_kind]
    if fmt not in allowed:
        other = "video" if output_kind == "image" else "image"
        what = f"is {'an' if other == 'image' else 'a'} {other} format" if fmt in FORMATS[other] else "is not supported"
        raise InvalidRequestError(
            "output_format", f"{fmt!r} {what}; this {output_kind} model writes {', '.join(allowed)}")
    return fmt


def safe_stem(text: str, limit: int = 60) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit].rstrip("_")
    return stem or "output"


def output_names(prompts: list[str], outputs_per_prompt: int, seed: int, file_name: str | None = None) -> list[str]:
    """File stems of a request's outputs, in prompt-major order.

    Without ``file_name``: ``<prompt>-seed<seed>-out<i>``, each named after its own prompt, ``i`` the
    output's index in the request (the ``output_index`` of its metadata). With ``file_name``: that
    stem for one output, ``<file_name>-out<i>`` for several.
    """
    count = len(prompts) * outputs_per_prompt
    if file_name:
        stem = Path(file_name).name
        stem = stem[: -len(Path(stem).suffix)] if Path(stem).suffix.lstrip(".").lower() in _ALL_EXTENSIONS else stem
        return [stem] if count == 1 else [f"{stem}-out{i}" for i in range(count)]
    return [f"{safe_stem(prompts[i // outputs_per_prompt])}-seed{seed}-out{i}" for i in range(count)]


_ALL_EXTENSIONS = {"png", "jpg", "jpeg", "webp", "mp4", "gif"}


def output_paths(output_dir: Path, stems: list[str], output_format: str) -> list[Path]:
    extension = f".{_EXTENSIONS[output_format]}" if _EXTENSIONS[output_format] else ""  # png-frames: a folder
    return [output_dir / f"{stem}{extension}" for stem in stems]


def refuse_existing(paths: list[Path]) -> None:
    """Raise if any of ``paths`` exists (an explicit file name is never replaced without ``overwrite``)."""
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        raise DiffgenError(f"{', '.join(existing)} already exist(s); pass --overwrite (Python: overwrite=True) "
                           "to replace, or choose another --output-file-name")


def _reserve(path: Path, overwrite: bool, numbered: bool, folder: bool) -> Path:
    """Claim ``path`` atomically (an empty file, or the folder of png-frames). A taken name is refused,
    or with ``numbered`` becomes ``<stem>-2``, ``<stem>-3``, ...; ``overwrite`` replaces it."""
    stem, extension = (path.name, "") if folder else (path.name[: -len(path.suffix)], path.suffix)
    candidate, number = path, 1
    while True:
        try:
            if folder:
                candidate.mkdir(exist_ok=overwrite)
            else:
                with open(candidate, "wb" if overwrite else "xb"):
                    pass
            return candidate
        except FileExistsError:
            if not numbered:
                refuse_existing([candidate])
            number += 1
            candidate = path.with_name(f"{stem}-{number}{extension}")


def save_outputs(outputs: list[Image.Image] | list[np.ndarray], metadata: list[dict[str, Any]], output_dir: Path,
                 stems: list[str], output_format: str, output_kind: str, fps: int | None = None,
                 overwrite: bool = False, numbered: bool = True) -> list[Path]:
    """Write images (PIL) or videos ((F, H, W, 3) uint8) with their metadata; returns the paths written.

    An existing file is never replaced unless ``overwrite``: a taken name gets a ``-2``, ``-3``...
    suffix (``numbered``) or is refused.
    """
    fmt = check_output_format(output_format, output_kind)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for output, meta, path in zip(outputs, metadata, output_paths(output_dir, stems, fmt), strict=True):
        path = _reserve(path, overwrite, numbered, folder=fmt == "png-frames")
        try:
            if output_kind == "video":
                write_video(output, path, fps or 16, fmt, meta)
            else:
                path.write_bytes(encode_image(output, fmt, meta))
        except BaseException:
            if path.is_file():  # no empty or half-written file left behind
                path.unlink()
            raise
        paths.append(path)
    return paths
