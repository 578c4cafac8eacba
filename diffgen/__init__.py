"""diffgen: fast inference and serving for image and video diffusion transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["DiffgenError", "Engine", "GenerationRequest", "GenerationResult", "__version__"]

if TYPE_CHECKING:
    from diffgen.engine.engine import Engine
    from diffgen.engine.request import GenerationRequest, GenerationResult
    from diffgen.errors import DiffgenError

# Imported on first use, so that `import diffgen.<anything>` (the CLI's argument parsing above all)
# does not pay for torch.
_LAZY = {"Engine": "diffgen.engine.engine", "GenerationRequest": "diffgen.engine.request",
         "GenerationResult": "diffgen.engine.request", "DiffgenError": "diffgen.errors"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffgen' has no attribute {name!r}")
