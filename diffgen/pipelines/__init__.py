"""Pipeline definitions; importing this package registers all of them."""

from diffgen.pipelines import fastwan, flux, hunyuan_video, qwen_image, wan  # noqa: F401
