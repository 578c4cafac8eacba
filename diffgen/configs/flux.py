"""FLUX.1 defaults (dev: 28 steps, guidance 3.5; schnell: 4 steps, no guidance)."""

from diffgen.configs.models import ModelDefaults

FLUX_DEV = ModelDefaults(
    name="FLUX.1-dev", num_inference_steps=28, guidance_scale=3.5, height=1024, width=1024,
    resolution_multiple=16, max_sequence_length=512, max_sequence_length_limit=512)

FLUX_SCHNELL = ModelDefaults(
    name="FLUX.1-schnell", num_inference_steps=4, guidance_scale=0.0, height=1024, width=1024,
    resolution_multiple=16, max_sequence_length=256, max_sequence_length_limit=512)
