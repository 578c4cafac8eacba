"""Pipeline definitions; importing this package registers all of them."""

from diffgen.pipelines import flux  # noqa: F401
from diffgen.pipelines import qwen_image  # noqa: F401
