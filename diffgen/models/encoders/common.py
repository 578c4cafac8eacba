"""What the native text encoders share: their output (the fields pipelines read from transformers' model outputs),
their switch, dtype and device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: "0": transformers' classes for every text encoder (diffgen's own are the default where a pipeline registers them)
NATIVE_TEXT_ENCODERS_ENV = "DIFFGEN_NATIVE_TEXT_ENCODERS"
#: "0": transformers' tokenizers where diffgen's CLIP / T5 tokenizers would load (diffgen/models/encoders/tokenizers.py)
NATIVE_TOKENIZERS_ENV = "DIFFGEN_NATIVE_TOKENIZERS"


@dataclass
class TextEncoderOutput:
    last_hidden_state: torch.Tensor  # (B, T, dim)
    pooler_output: torch.Tensor | None = None  # (B, dim): CLIP's state at each row's end-of-text token


class NativeTextEncoder(nn.Module):
    """What the loader and pipelines ask of every native text encoder: its switch, what of a config.json it does
    not build (``unsupported``; the loader's ``native_class`` then loads transformers' class), dtype and device."""

    native_env = NATIVE_TEXT_ENCODERS_ENV

    @classmethod
    def unsupported(cls, config: dict) -> str | None:
        """Why a checkpoint's config.json needs transformers' model instead (None: built here)."""
        return None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
