"""Pipeline definitions; importing this package registers all of them."""

from diffgen.pipelines import fastwan, flux, hunyuan_video, hunyuan_video15, qwen_image, wan  # noqa: F401
