"""diffgen: fast inference and serving for image and video diffusion transformers."""

from diffgen.engine.engine import Engine
from diffgen.engine.request import GenerationRequest, GenerationResult
from diffgen.errors import DiffgenError

__version__ = "0.1.0"
__all__ = ["DiffgenError", "Engine", "GenerationRequest", "GenerationResult", "__version__"]
