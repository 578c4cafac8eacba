"""Turn ``--model-path`` (a local folder or a hub id) into a local diffusers pipeline folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from diffgen.errors import ModelLoadError

# Weight formats we never need when safetensors exist: skipping them keeps hub downloads minimal.
_IGNORED_WEIGHTS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.gguf"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_model_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"--model-path {str(folder)!r} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        return json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{index} is not valid JSON: {e}") from e


def resolve_model_path(model_path: str | os.PathLike, components: list[str] | None = None,
                       revision: str | None = None) -> Path:
    """Return a local folder holding the pipeline.

    A path that exists is used as it is. Otherwise ``model_path`` must look like a hub id
    ("org/name"); it is resolved with huggingface_hub, which honours HF_HOME, HF_HUB_OFFLINE and the
    local cache, and downloads only model_index.json and the component folders the pipeline uses
    (``components``; None means every component named in model_index.json).
    """
    path = Path(model_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"--model-path {str(model_path)!r} is a file; expected a diffusers pipeline folder")
        read_model_index(path)
        return path
    text = str(model_path)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelLoadError(f"--model-path {text!r} not found: no such folder, and it is not a hub id (org/name)")
    return _download(text, components, revision)


def _download(repo_id: str, components: list[str] | None, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        index_file = hf_hub_download(repo_id, "model_index.json", revision=revision)
        index = json.loads(Path(index_file).read_text())
        wanted = components if components is not None else _component_names(index)
        patterns = ["model_index.json"] + [f"{name}/*" for name in wanted]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      ignore_patterns=_IGNORED_WEIGHTS))
    except GatedRepoError as e:  # a RepositoryNotFoundError too: must come first
        raise ModelLoadError(
            f"--model-path {repo_id!r} is gated: accept its licence on the hub, then log in "
            "(`hf auth login` or HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(f"--model-path {repo_id!r}: no such repository on the hub (or no access to it)") from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"--revision {revision!r}: no such revision of {repo_id!r}") from e
    except RemoteEntryNotFoundError as e:
        raise ModelLoadError(
            f"--model-path {repo_id!r} is not a diffusers pipeline repository (it has no model_index.json); "
            "many models publish one under a '-Diffusers' name") from e
    except LocalEntryNotFoundError as e:
        raise ModelLoadError(
            f"--model-path {repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); download it first or pass a folder") from e
    except HfHubHTTPError as e:
        raise ModelLoadError(f"--model-path {repo_id!r}: the hub refused the download: {e}") from e


def _component_names(index: dict) -> list[str]:
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]


class CheckpointInfo:
    """What a pipeline class may read to describe a checkpoint (``describe``): model_index.json's
    settings and the components' JSON configs, from a folder or from already loaded components."""

    def __init__(self, model_path: str, index: dict, read_config):
        self.model_path = model_path
        self.index = index
        self._read_config = read_config

    @property
    def settings(self) -> dict:
        """Non-component entries of model_index.json (e.g. Wan2.2's boundary_ratio)."""
        return {k: v for k, v in self.index.items() if not k.startswith("_") and not isinstance(v, list)}

    def has(self, component: str) -> bool:
        entry = self.index.get(component)
        return isinstance(entry, list) and entry[0] is not None

    def config(self, component: str) -> dict:
        """The component's config as a dict; {} when the component is absent."""
        return dict(self._read_config(component) or {}) if self.has(component) else {}

    @classmethod
    def from_folder(cls, folder: Path, model_path: str | None = None) -> CheckpointInfo:
        def read(component: str) -> dict:
            for name in ("config.json", "scheduler_config.json", "guider_config.json"):
                file = folder / component / name
                if file.is_file():
                    return json.loads(file.read_text())
            return {}

        return cls(model_path or str(folder), read_model_index(folder), read)

    @classmethod
    def from_components(cls, model_path: str, components: dict, settings: dict) -> CheckpointInfo:
        import dataclasses

        def read(component: str) -> dict:
            config = getattr(components.get(component), "config", None)
            if config is None:
                return {}
            return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)

        index = {**settings, **{name: ["?", "?"] for name, value in components.items() if value is not None}}
        return cls(model_path, index, read)
