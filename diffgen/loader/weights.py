"""Build native models without allocating random weights, then fill them from safetensors files."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from diffgen.errors import ModelLoadError

_WEIGHT_NAME = "diffusion_pytorch_model"
FAST_LOAD_ENV = "DIFFGEN_FAST_LOAD"  # "0": safetensors' own safe_open path (for comparison)


def safetensors_files(folder: Path) -> list[Path]:
    """The component's weight files: a single file, or the shards named by an index."""
    found = find_safetensors_files(folder)
    if not found:
        raise ModelLoadError(f"{folder} has no .safetensors weights")
    return found


def find_safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of a component folder (diffusers' or transformers' names, sharded or not); [] if none."""
    for stem in (_WEIGHT_NAME, "model"):
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
    return sorted(folder.glob("*.safetensors"))


def config_from_json(config_cls: type, folder: Path):
    """Instantiate a config dataclass from the component's config.json, ignoring unknown keys."""
    raw = json.loads((folder / "config.json").read_text())
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names}
    return config_cls(**values)


def load_native_model(model_cls: type[nn.Module], folder: Path, dtype: torch.dtype,
                      device: torch.device | str) -> nn.Module:
    """Construct ``model_cls`` on the meta device and assign the checkpoint's tensors to it.

    Strict: the checkpoint must hold exactly the model's parameter names; otherwise the error lists
    the missing and the unexpected keys. Optional class attributes: ``keep_in_fp32_modules`` (module
    names whose tensors stay float32 whatever ``dtype`` is, as diffusers' ``_keep_in_fp32_modules``),
    ``keep_in_fp32_modules_under_fp16`` (kept float32 only when ``dtype`` is float16, as transformers'
    ``_keep_in_fp32_modules``), ``ignored_checkpoint_keys`` (name parts of checkpoint tensors the model
    does not use) and ``checkpoint_names(keys)`` (a classmethod: {name on disk: the model's name, or None
    for a tensor not to read} for names the library maps, e.g. a tied alias or an older prefix).
    """
    return build_native_model(model_cls, folder, read_native_checkpoint(model_cls, folder, dtype, device))


def read_native_checkpoint(model_cls: type[nn.Module], folder: Path, dtype: torch.dtype,
                           device: torch.device | str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors on ``device`` in the dtypes ``model_cls`` wants (file reads only: thread-safe)."""
    keep_fp32 = set(getattr(model_cls, "keep_in_fp32_modules", ()))
    if dtype == torch.float16:
        keep_fp32 |= set(getattr(model_cls, "keep_in_fp32_modules_under_fp16", ()))
    ignored = set(getattr(model_cls, "ignored_checkpoint_keys", ()))
    files = safetensors_files(folder)
    names = _checkpoint_names(model_cls, files)

    def convert(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        return tensor.to(torch.float32 if set(names.get(key, key).split(".")) & keep_fp32 else dtype)

    skipped = {key for key, name in names.items() if name is None}
    state = _read_tensors(files, torch.device(device), ignored, convert, skipped)
    return {names.get(key, key): tensor for key, tensor in state.items()}


def _checkpoint_names(model_cls: type[nn.Module], files: list[Path]) -> dict[str, str | None]:
    """The model's own renames of the files' tensor names (see :func:`load_native_model`); {} when it has none."""
    rename = getattr(model_cls, "checkpoint_names", None)
    if rename is None:
        return {}
    from diffgen.loader.fast_read import read_header

    return rename([entry.name for file in files for entry in read_header(file)])


def read_library_checkpoint(folder: Path, dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
    """All tensors of a library model's (transformers') safetensors files on ``device``, floating ones in
    ``dtype`` as the library's ``from_pretrained(dtype=...)`` casts them (file reads only: thread-safe)."""

    def convert(key: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    return _read_tensors(safetensors_files(folder), torch.device(device), set(), convert)


def build_native_model(model_cls: type[nn.Module], folder: Path, state: dict[str, torch.Tensor]) -> nn.Module:
    """``model_cls`` from its config.json with ``state`` assigned strictly (see :func:`load_native_model`)."""
    config = config_from_json(model_cls.config_class, folder)
    with torch.device("meta"):
        model = model_cls(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint {folder} does not match {model_cls.__name__}: "
            f"missing keys {_short(missing)}; unexpected keys {_short(unexpected)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _read_tensors(files: list[Path], device: torch.device, ignored: set[str],
                  convert: Callable[[str, torch.Tensor], torch.Tensor],
                  skipped: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors on ``device`` through ``convert``, minus names with an ``ignored`` part and the
    ``skipped`` names."""
    keep = lambda key: not set(key.split(".")) & ignored and key not in skipped
    if device.type == "cuda" and os.environ.get(FAST_LOAD_ENV, "1") != "0":
        from diffgen.loader.fast_read import load_files

        return load_files(files, device, keep, convert)  # parallel reads through pinned buffers
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in filter(keep, f.keys()):
                tensor = f.get_tensor(key)
                # On CPU, safetensors hands out views into the memory-mapped file at arbitrary alignment;
                # kernels round differently on unaligned data, so copy into fresh (aligned) storage, as
                # diffusers does.
                state[key] = convert(key, tensor.clone() if device.type == "cpu" else tensor)
    return state


def _short(keys: list[str], limit: int = 20) -> str:
    if not keys:
        return "[]"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"
