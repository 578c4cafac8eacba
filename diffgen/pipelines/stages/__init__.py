from diffgen.pipelines.stages.common import (
    DecodingStage,
    DenoisingStage,
    ImageEncodingStage,
    InputValidationStage,
    LatentsStage,
    TextEncodingStage,
    TimestepsStage,
    draw_noise,
)

__all__ = [
    "DecodingStage", "DenoisingStage", "ImageEncodingStage", "InputValidationStage", "LatentsStage",
    "TextEncodingStage", "TimestepsStage", "draw_noise",
]
