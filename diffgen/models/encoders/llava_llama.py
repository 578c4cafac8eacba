"""HunyuanVideo-I2V prompt encoding: Llava-Llama-3 reads the prompt and the input image in one chat template.

The template holds one ``<image>`` token at index 5, which becomes the 576 image tokens of the vision
tower. From the hidden states of the third-last layer the reference keeps: every ``interleave``-th
image token, then the user prompt (the system part and the assistant header are cropped), with
their attention mask. This follows diffusers' ``HunyuanVideoImageToVideoPipeline`` step by step.
"""

from __future__ import annotations

import torch

TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following aspects "
    "according to the reference image: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
CROP_START = 103  # template tokens before the user prompt (real tokenizer)
IMAGE_START, IMAGE_LEN = 5, 576  # where the image tokens sit in the expanded sequence, and how many
ASSISTANT_HEADER_LEN = 4  # "<|eot_id|><|start_header_id|>assistant<|end_header_id|>" before the assistant turn


def expand_image_tokens(ids: torch.Tensor, mask: torch.Tensor, image_token: int, pad_token: int) -> dict:
    """Token ids with the one ``<image>`` token widened to IMAGE_LEN positions (and mask, position ids)."""
    is_image = ids == image_token
    length = ids.shape[1] + int(is_image.sum(-1).max()) * (IMAGE_LEN - 1)
    new_positions = torch.cumsum(is_image * (IMAGE_LEN - 1) + 1, -1) - 1
    rows, cols = torch.where(~is_image)
    expanded = torch.full((ids.shape[0], length), pad_token, dtype=ids.dtype, device=ids.device)
    expanded[rows, new_positions[rows, cols]] = ids[rows, cols]
    expanded[:, IMAGE_START:IMAGE_START + IMAGE_LEN] = image_token
    attention = (expanded != pad_token).to(mask.dtype)
    positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 1)
    return {"input_ids": expanded, "attention_mask": attention, "position_ids": positions}


def encode_llava_prompt(text_encoder, tokenizer, image_processor, prompts: list[str], image,
                        max_sequence_length: int, interleave: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (B, image tokens + text tokens, dim), mask) for ``prompts`` about ``image``."""
    device = text_encoder.device
    tokens = tokenizer([TEMPLATE.format(p) for p in prompts], max_length=max_sequence_length + CROP_START,
                       padding="max_length", truncation=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    pixels = image_processor(image, return_tensors="pt").pixel_values.to(device)
    inputs = expand_image_tokens(ids, mask, text_encoder.config.image_token_index, text_encoder.config.pad_token_id)
    hidden = text_encoder(**inputs, pixel_values=pixels, output_hidden_states=True).hidden_states[-3]
    hidden = hidden.to(text_encoder.dtype)

    end_header = tokenizer.convert_tokens_to_ids("<|end_header_id|>")
    text_start = CROP_START - 1 + IMAGE_LEN
    embeds, masks = [], []
    for row in range(ids.shape[0]):
        headers = torch.where(ids[row] == end_header)[0].tolist()
        # the assistant header was truncated away when only two headers remain
        assistant = (headers[-1] if len(headers) > 2 else ids.shape[1] - 1) + 1
        text = torch.cat([hidden[row, text_start:assistant - 1 + IMAGE_LEN - ASSISTANT_HEADER_LEN],
                          hidden[row, assistant - 1 + IMAGE_LEN:]])
        text_mask = torch.cat([mask[row, CROP_START:assistant - ASSISTANT_HEADER_LEN], mask[row, assistant:]])
        image_tokens = hidden[row, IMAGE_START:IMAGE_START + IMAGE_LEN][::interleave]
        embeds.append(torch.cat([image_tokens, text]))
        masks.append(torch.cat([text_mask.new_ones(image_tokens.shape[0]), text_mask]))
    return torch.stack(embeds), torch.stack(masks)
