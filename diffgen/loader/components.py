"""Load a pipeline's components: native DiTs from safetensors, the rest through their libraries."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from diffgen.errors import ModelLoadError
from diffgen.layers.linear import fuse_projections
from diffgen.loader.resolve import CheckpointInfo, read_model_index, resolve_model_path
from diffgen.loader.weights import build_native_model, load_native_model, read_native_checkpoint

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
    # The native DiTs' files are read in the background (plain file reads and GPU copies) while the
    # other components load here; modules are built on this thread only, since the libraries'
    # empty-weight initialisation patches global state.
    with ThreadPoolExecutor(max_workers=2) as pool:
        reads = {name: pool.submit(read_native_checkpoint, pipeline_cls.native_models[class_name], folder / name,
                                   component_dtype.get(name, dtype), device)
                 for name, _, class_name in to_load if class_name in pipeline_cls.native_models}
        for name, library, class_name in to_load:
            if name not in reads:
                with _no_library_progress_bars():
                    components[name] = load_component(folder / name, library, class_name, pipeline_cls,
                                                      component_dtype.get(name, dtype), device)
        for name, _library, class_name in to_load:
            if name in reads:
                components[name] = build_native_model(pipeline_cls.native_models[class_name], folder / name,
                                                      reads[name].result())
                if os.environ.get(FUSE_PROJECTIONS_ENV) == "1":
                    fuse_projections(components[name])  # after the strict load: names on disk stay per projection
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


@contextlib.contextmanager
def _no_library_progress_bars():
    """No "Loading weights" / "Loading checkpoint shards" bars from transformers and diffusers while a
    component loads (the Python API too, not only the CLI); each library's setting is restored after."""
    import diffusers
    import transformers

    libraries = [transformers.utils.logging, diffusers.utils.logging]
    enabled = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was_enabled in zip(libraries, enabled, strict=True):
            if was_enabled:
                library.enable_progress_bar()


def load_component(folder: Path, library: str, class_name: str, pipeline_cls, dtype: torch.dtype,
                   device: torch.device) -> Any:
    if not folder.is_dir():
        raise ModelLoadError(f"component folder {folder} is missing")
    native = pipeline_cls.native_models.get(class_name)
    if native is not None:
        model = load_native_model(native, folder, dtype, device)
        if os.environ.get(FUSE_PROJECTIONS_ENV) == "1":
            fuse_projections(model)
        return model
    custom_loader = pipeline_cls.component_loaders.get(class_name)
    if custom_loader is not None:
        return custom_loader(folder, dtype, device)
    try:
        module = importlib.import_module(library)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"{folder}: component class {library}.{class_name} cannot be imported: {e}") from e
    if library == "diffusers" and "Scheduler" in class_name:
        return cls.from_pretrained(folder)
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        model = cls.from_pretrained(folder, dtype=dtype)
        return model.to(device).eval().requires_grad_(False)
    return cls.from_pretrained(folder)  # tokenizers, processors
