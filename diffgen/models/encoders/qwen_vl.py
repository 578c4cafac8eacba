"""Qwen2.5-VL as the prompt (and edit-image) encoder of Qwen-Image.

The language model comes from transformers unchanged. Its processor, transformers'
``Qwen2VLProcessor``, needs torchvision only for its video half, which diffgen never uses; so the
``processor/`` folder of a checkpoint is loaded here as its two pieces (tokenizer and the PIL
Qwen2-VL image processor) and :class:`QwenVLProcessor` does what the edit pipelines ask of it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from diffgen.errors import ModelLoadError

IMAGE_TOKEN = "<|image_pad|>"


def load_qwen2_vl_processor_parts(folder: Path):
    """(tokenizer, image processor) from a ``Qwen2VLProcessor`` folder; torchvision is optional.

    Both layouts load, as in transformers: the hub's (``preprocessor_config.json`` beside the tokenizer)
    and transformers 5's ``save_pretrained`` (one ``processor_config.json``, the image processor nested
    under ``"image_processor"``). With torchvision installed, the image processor is the one
    transformers' own ``Qwen2VLProcessor`` would pick (its torchvision backend, which resizes slightly
    differently from PIL), so the vision tokens match the reference pipeline's on the same machine;
    without it, the PIL backend.
    """
    from transformers import AutoTokenizer

    if not (folder / "preprocessor_config.json").is_file() and not _has_nested_image_processor(folder):
        raise ModelLoadError(f"{folder} has neither preprocessor_config.json nor a processor_config.json with an "
                             "'image_processor' entry (a Qwen2VLProcessor folder is expected)")
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(folder)
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder), image_processor


def _has_nested_image_processor(folder: Path) -> bool:
    config = folder / "processor_config.json"
    try:
        return config.is_file() and isinstance(json.loads(config.read_text()).get("image_processor"), dict)
    except (json.JSONDecodeError, AttributeError):
        return False


class QwenVLProcessor:
    """Tokenizer + Qwen2-VL image processor, producing the text encoder's inputs as ``Qwen2VLProcessor`` does.

    Each ``<|image_pad|>`` in the text is expanded to one token per merged vision patch of the
    corresponding image (images are consumed in order across the batch).
    """

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    @classmethod
    def from_folder(cls, folder: Path, dtype: torch.dtype | None = None,
                    device: torch.device | None = None) -> QwenVLProcessor:
        return cls(*load_qwen2_vl_processor_parts(folder))

    def __call__(self, text: list[str], images: list[Image.Image] | None = None) -> dict[str, torch.Tensor]:
        inputs: dict[str, Any] = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            inputs.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
            tokens_per_image = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
            text = _expand_image_tokens(text, tokens_per_image)
        tokens = self.tokenizer(text, padding=True, return_tensors="pt")
        inputs.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return inputs


def _expand_image_tokens(texts: list[str], tokens_per_image: list[int]) -> list[str]:
    counts = iter(tokens_per_image)
    expanded = []
    for text in texts:
        pieces = text.split(IMAGE_TOKEN)
        out = pieces[0]
        for piece in pieces[1:]:
            count = next(counts, None)
            if count is None:
                raise ValueError("more image placeholders in the prompt template than images")
            out += IMAGE_TOKEN * count + piece
        expanded.append(out)
    if next(counts, None) is not None:
        raise ValueError("more images than image placeholders in the prompt template")
    return expanded


def encode_qwen_vl_prompts(text_encoder, inputs: dict[str, torch.Tensor], drop_tokens: int,
                           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states of the valid tokens after the template's first ``drop_tokens``.

    Returns zero-padded embeddings (B, T, D) and their mask (B, T) of 1s and 0s (int64), T being
    the longest prompt; exactly the reference pipelines' ``_get_qwen_prompt_embeds``.
    """
    inputs = {k: v.to(device) for k, v in inputs.items()}
    output = text_encoder(**inputs, output_hidden_states=True)
    hidden = output.hidden_states[-1]
    valid = inputs["attention_mask"].bool()
    per_prompt = [states[mask][drop_tokens:] for states, mask in zip(hidden, valid, strict=True)]
    length = max(e.shape[0] for e in per_prompt)
    embeds = torch.stack([torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e in per_prompt])
    mask = torch.stack([torch.cat([torch.ones(e.shape[0], dtype=torch.long, device=e.device),
                                   torch.zeros(length - e.shape[0], dtype=torch.long, device=e.device)])
                        for e in per_prompt])
    return embeds, mask
