"""What the native text encoders share: their output (the fields pipelines read from transformers' model outputs)
and the check of a checkpoint's config.json that decides whether they build it."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)
#: "0": transformers' classes for every text encoder (diffgen's own are the default where a pipeline registers them)
NATIVE_TEXT_ENCODERS_ENV = "DIFFGEN_NATIVE_TEXT_ENCODERS"


@dataclass
class TextEncoderOutput:
    last_hidden_state: torch.Tensor  # (B, T, dim)
    pooler_output: torch.Tensor | None = None  # (B, dim): CLIP's state at each row's end-of-text token


class NativeTextEncoder(nn.Module):
    """What the loader and pipelines ask of every native text encoder: whether it builds a checkpoint, its dtype and
    device. A subclass says what it cannot build in ``unsupported(config)``."""

    @classmethod
    def unsupported(cls, config: dict) -> str | None:
        """Why a checkpoint's config.json needs transformers' model instead (None: built here)."""
        return None

    @classmethod
    def accepts(cls, folder: Path) -> bool:
        """Whether this class builds the checkpoint in ``folder`` (``unsupported`` finds nothing in its config.json,
        and ``DIFFGEN_NATIVE_TEXT_ENCODERS`` is not 0); otherwise the library's class loads it, and the reason is
        logged."""
        if os.environ.get(NATIVE_TEXT_ENCODERS_ENV, "1") == "0":
            return False
        config_file = Path(folder) / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        reason = cls.unsupported(config)
        if reason is not None:
            logger.info("diffgen: %s: %s; transformers' class builds it", folder, reason)
        return reason is None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
