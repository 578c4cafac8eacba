"""Load a pipeline's components: native DiTs from safetensors, the rest through their libraries."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from diffgen.errors import ModelLoadError
from diffgen.layers.linear import fuse_projections
from diffgen.loader.resolve import CheckpointInfo, read_model_index, resolve_model_path
from diffgen.loader.weights import (
    FAST_LOAD_ENV,
    build_native_model,
    find_safetensors_files,
    load_native_model,
    read_library_checkpoint,
    read_native_checkpoint,
)

logger = logging.getLogger(__name__)
# Concatenated q/k/v (and FLUX's q/k/v + MLP-in) projections measured *slower* on an H200 (FLUX.1-dev
# eager forward 150.1 vs 145.6 ms with the Triton norm+RoPE; compiled no faster): off unless set to 1.
FUSE_PROJECTIONS_ENV = "DIFFGEN_FUSE_PROJECTIONS"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None, device: torch.device, flag: str = "--dtype") -> torch.dtype:
    """A dtype from its name; None means bfloat16 on GPUs and float32 on CPU."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"{flag} {name!r} is not supported; choose one of {', '.join(DTYPES)}, auto")
    return DTYPES[name]


def parse_device(name: str | torch.device | None) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ModelLoadError(f"--device {name!r} is not a valid device (e.g. cpu, cuda, cuda:1)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def load_pipeline(model_path: str, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, revision: str | None = None,
                  vae_dtype: str | torch.dtype | None = None):
    """Resolve ``model_path``, pick the registered pipeline for its model_index.json, load it.

    ``vae_dtype`` overrides ``dtype`` for the VAE only (e.g. float32 decoding under a bf16 model).
    """
    from diffgen.pipelines.base import pipeline_for

    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    component_dtype = {"vae": parse_dtype(vae_dtype, device, flag="--vae-dtype")} if vae_dtype else {}
    local = Path(model_path).expanduser()
    if local.exists():
        folder = resolve_model_path(local)
        index = read_model_index(folder)
        pipeline_cls = pipeline_for(index.get("_class_name", "?"), folder)
    else:
        # Read the index first to learn which component folders this pipeline needs.
        from huggingface_hub import hf_hub_download

        try:
            index_path = Path(hf_hub_download(str(model_path), "model_index.json", revision=revision))
        except Exception:
            folder = resolve_model_path(model_path, revision=revision)  # raises the precise error
            index_path = folder / "model_index.json"
        index = read_model_index(index_path.parent)
        pipeline_cls = pipeline_for(index.get("_class_name", "?"), Path(str(model_path)))
        wanted = [c for c in (*pipeline_cls.required_components, *pipeline_cls.optional_components)
                  if isinstance(index.get(c), list) and index[c][0] is not None]
        folder = resolve_model_path(model_path, components=wanted, revision=revision)

    components: dict[str, Any] = {}
    to_load = []
    for name in (*pipeline_cls.required_components, *pipeline_cls.optional_components):
        entry = index.get(name)
        if not isinstance(entry, list) or entry[0] is None:
            if name in pipeline_cls.required_components:
                raise ModelLoadError(f"{folder}: model_index.json has no {name!r} component")
            components[name] = None
            continue
        if not (folder / name).is_dir():
            raise ModelLoadError(f"component folder {folder / name} is missing")
        to_load.append((name, *entry))
    # Weights that diffgen reads itself (native DiTs; the libraries' models with safetensors files) are read
    # in one background thread, in component order (the text encoders before the DiT), while this thread
    # imports the libraries and loads the small components; then each model is built around its tensors.
    # Modules are built on this thread only: the libraries' empty-weight initialisation patches global state.
    load_dtype = {name: component_dtype.get(name, dtype) for name, _, _ in to_load}
    natives = {name: native_class(pipeline_cls, folder / name, class_name) for name, _, class_name in to_load}
    # the library that loads each component (None: diffgen does, so that library need not be imported)
    loading_library = {name: None if class_name in pipeline_cls.component_loaders or natives[name] else library
                       for name, library, class_name in to_load}
    began = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffgen-weights")
    # The GPU libraries load in a thread of their own, beside the reads: after them it kept a one-shot
    # FLUX.1-dev process waiting ~0.9 s (H100 timeline, docs/benchmarks.md).
    warmup = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffgen-warmup")
    try:
        if device.type == "cuda":
            warmup.submit(_load_gpu_libraries, device, dtype)
        reads = {name: pool.submit(_timed_read, read, folder / name, load_dtype[name], device)
                 for name, library, class_name in to_load
                 if (read := _weight_reader(pipeline_cls, folder / name, library, class_name, natives[name]))
                 is not None}
        for name, library, class_name in to_load:
            if name not in reads:
                with _no_library_progress_bars(loading_library[name]):
                    components[name] = load_component(folder / name, library, class_name, pipeline_cls,
                                                      load_dtype[name], device, native=natives[name])
        for name, library, class_name in to_load:
            if name in reads:
                state, seconds, size = reads[name].result()
                with _no_library_progress_bars(loading_library[name]):
                    components[name] = _build_around(state, folder / name, library, class_name, pipeline_cls,
                                                     load_dtype[name], device, natives[name])
                logger.info("diffgen: read %s (%.2f GB) in %.2f s, %.1f GB/s", name, size / 1e9, seconds,
                            size / 1e9 / max(seconds, 1e-9))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error: no further reads start
        warmup.shutdown(wait=True)
    total = sum(path.stat().st_size for name, _, _ in to_load for path in find_safetensors_files(folder / name))
    seconds = time.perf_counter() - began
    logger.info("diffgen: loaded %s in %.2f s (%.2f GB of safetensors, %.1f GB/s)", model_path, seconds, total / 1e9,
                total / 1e9 / max(seconds, 1e-9))
    # Pipeline-level settings of model_index.json (Wan: boundary_ratio, expand_timesteps).
    checkpoint = CheckpointInfo.from_folder(folder, str(model_path))
    return pipeline_cls(components, str(model_path), device, dtype, settings=checkpoint.settings,
                        spec=pipeline_cls.describe(checkpoint))


def read_model_spec(model_path: str, revision: str | None = None):
    """The ModelSpec of a checkpoint from its JSON files, without loading (or downloading) weights.

    Raises ModelLoadError for a path that is neither a pipeline folder nor a reachable hub id, or an
    unsupported pipeline class: what a front end checks before it starts workers.
    """
    checkpoint = read_checkpoint_info(model_path, revision)
    return checkpoint_pipeline_class(checkpoint).describe(checkpoint)


def read_checkpoint_info(model_path: str, revision: str | None = None) -> CheckpointInfo:
    """The JSON files of a checkpoint (model_index.json, component configs on demand), without any weights."""
    local = Path(model_path).expanduser()
    if local.exists() or not _looks_like_hub_id(str(model_path)):
        folder = resolve_model_path(local)  # raises the precise error for a missing / bad folder
        return CheckpointInfo.from_folder(folder, str(model_path))
    return _hub_checkpoint(str(model_path), revision)


def checkpoint_pipeline_class(checkpoint: CheckpointInfo):
    """The pipeline class that runs ``checkpoint`` (ModelLoadError for an unsupported one)."""
    from diffgen.pipelines.base import pipeline_for

    return pipeline_for(checkpoint.index.get("_class_name", "?"), Path(checkpoint.model_path))


def _looks_like_hub_id(text: str) -> bool:
    from diffgen.loader.resolve import _HUB_ID

    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def _hub_checkpoint(repo_id: str, revision: str | None) -> CheckpointInfo:
    """model_index.json and, on demand, component configs from the hub (small JSON files only)."""
    import json

    from huggingface_hub import hf_hub_download

    try:
        index_file = Path(hf_hub_download(repo_id, "model_index.json", revision=revision))
    except Exception:
        resolve_model_path(repo_id, components=[], revision=revision)  # raises the precise error
        raise

    def read(component: str) -> dict:
        for name in ("config.json", "scheduler_config.json", "guider_config.json"):
            try:
                return json.loads(Path(hf_hub_download(repo_id, f"{component}/{name}", revision=revision)).read_text())
            except Exception:  # noqa: S112 (a component without this file: try the next name)
                continue
        return {}

    return CheckpointInfo(repo_id, read_model_index(index_file.parent), read)


def native_class(pipeline_cls, folder: Path, class_name: str) -> type | None:
    """The native class that replaces this component, or None: the pipeline registers none for its class, or the
    native class declines this checkpoint: its switch (``native_env``) is 0, or ``unsupported(config)`` names
    what of the component's config.json it does not build, or (a class without weights: a tokenizer)
    ``unsupported_folder(folder)`` what of its files (logged: the library's class loads it instead)."""
    native = pipeline_cls.native_models.get(class_name)
    if native is None:
        return None
    switch = getattr(native, "native_env", None)
    if switch is not None and os.environ.get(switch, "1") == "0":
        reason = f"{switch}=0"
    elif not _has_weights(native):
        reason = native.unsupported_folder(folder)
    else:
        config_file = folder / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        reason = native.unsupported(config) if hasattr(native, "unsupported") else None
    if reason is not None:
        logger.info("diffgen: %s: %s; the library's %s loads it", folder, reason, class_name)
        return None
    return native


@contextlib.contextmanager
def _no_library_progress_bars(library: str | None):
    """No "Loading weights" / "Loading checkpoint shards" bars from transformers or diffusers while one of
    their components loads (the Python API too, not only the CLI); the library's setting is restored after.
    Imports only the component's own library."""
    if library not in ("transformers", "diffusers"):
        yield
        return
    library_logging = importlib.import_module(f"{library}.utils.logging")
    was_enabled = library_logging.is_progress_bar_enabled()
    library_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            library_logging.enable_progress_bar()


def _weight_reader(pipeline_cls, folder: Path, library: str, class_name: str, native: type | None):
    """How diffgen reads this component's weights itself (a function of (folder, dtype, device)), or None when
    its library loads it. Decided from the files alone, before the library is imported. ``native``: the
    component's :func:`native_class`."""
    if native is not None:
        if not _has_weights(native):
            return None
        return lambda folder, dtype, device: read_native_checkpoint(native, folder, dtype, device)
    if os.environ.get(FAST_LOAD_ENV, "1") == "0" or class_name in pipeline_cls.component_loaders:
        return None
    if library == "transformers" and (folder / "config.json").is_file() and find_safetensors_files(folder):
        return read_library_checkpoint
    return None


def _has_weights(native: type) -> bool:
    """Whether a native class is a model (read from safetensors) rather than a tokenizer (built from its files)."""
    return issubclass(native, torch.nn.Module)


def _load_gpu_libraries(device: torch.device, dtype: torch.dtype) -> None:
    """One small matmul and one attention call, so that cuBLAS and the attention backend's libraries are
    loaded (in a fresh process, a few tenths of a second) while the caller is still importing and building."""
    from diffgen.layers.attention import attention

    x = torch.randn(1, 256, 2, 128, device=device, dtype=dtype)
    attention(x, x, x)
    torch.nn.functional.linear(x.flatten(0, 1), x[0, :, 0])
    torch.cuda.synchronize(device)


def _timed_read(read, folder: Path, dtype: torch.dtype, device: torch.device) -> tuple[dict, float, int]:
    """``read(folder, dtype, device)``, its seconds and the bytes it read."""
    began = time.perf_counter()
    state = read(folder, dtype, device)  # every tensor has arrived when it returns (the readers synchronise)
    return state, time.perf_counter() - began, sum(t.numel() * t.element_size() for t in state.values())


def _build_around(state: dict[str, torch.Tensor], folder: Path, library: str, class_name: str, pipeline_cls,
                  dtype: torch.dtype, device: torch.device, native: type | None) -> Any:
    """The component built around tensors that diffgen read: ``native`` models strictly; a transformers model
    through its own ``from_pretrained`` (key renames, tied weights, its initialisation of what the file lacks),
    unless the class keeps some modules in float32 at this dtype: then the library reads the files itself."""
    if native is not None:
        model = build_native_model(native, folder, state)
        if os.environ.get(FUSE_PROJECTIONS_ENV) == "1":
            fuse_projections(model)  # after the strict load: names on disk stay per projection
        return model
    cls = _library_class(folder, library, class_name)
    keeps_fp32 = getattr(cls, "_keep_in_fp32_modules_strict", None) or (
        dtype == torch.float16 and getattr(cls, "_keep_in_fp32_modules", None))
    if (not (isinstance(cls, type) and issubclass(cls, torch.nn.Module) and hasattr(cls, "config_class"))
            or keeps_fp32 or not _room_for_library_warmup(state, device)):
        state.clear()
        return load_component(folder, library, class_name, pipeline_cls, dtype, device, native=None)
    config = cls.config_class.from_pretrained(folder)
    # device_map: without it the library "loads" the tensors to the CPU first (measured on an H200: T5-XXL's
    # 9.5 GB took 9.1 s through the CPU and back); with it, tensors already on the device stay where they are.
    model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, device_map={"": device})
    model.name_or_path = model.config.name_or_path = str(folder)  # as from_pretrained(folder) records it
    return model.to(device).eval().requires_grad_(False)


def _room_for_library_warmup(state: dict[str, torch.Tensor], device: torch.device) -> bool:
    """Whether the GPU has the model's size free once more: with a device_map, transformers reserves that much
    at once before placing the tensors (its caching-allocator warm-up), freed to PyTorch's cache right after."""
    if device.type != "cuda":
        return True
    size = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    return torch.cuda.mem_get_info(device)[0] > size + 2 * 2**30


def _library_class(folder: Path, library: str, class_name: str) -> Any:
    try:
        return getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"{folder}: component class {library}.{class_name} cannot be imported: {e}") from e


def load_component(folder: Path, library: str, class_name: str, pipeline_cls, dtype: torch.dtype,
                   device: torch.device, native: type | None) -> Any:
    """One component from its folder; ``native``: its :func:`native_class` (None: its library or the pipeline's
    ``component_loaders`` loads it)."""
    if not folder.is_dir():
        raise ModelLoadError(f"component folder {folder} is missing")
    if native is not None:
        if not _has_weights(native):
            return native.from_folder(folder)  # a tokenizer
        model = load_native_model(native, folder, dtype, device)
        if os.environ.get(FUSE_PROJECTIONS_ENV) == "1":
            fuse_projections(model)
        return model
    custom_loader = pipeline_cls.component_loaders.get(class_name)
    if custom_loader is not None:
        return custom_loader(folder, dtype, device)
    cls = _library_class(folder, library, class_name)
    if library == "diffusers" and "Scheduler" in class_name:
        return cls.from_pretrained(folder)
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        model = cls.from_pretrained(folder, dtype=dtype)
        return model.to(device).eval().requires_grad_(False)
    return cls.from_pretrained(folder)  # tokenizers, processors
