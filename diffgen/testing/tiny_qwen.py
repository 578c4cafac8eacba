"""Tiny random Qwen-Image and Qwen-Image-Edit pipelines, built offline from configs in code.

Saved with the component layout and class names of the hub repositories: Qwen/Qwen-Image has
scheduler, text_encoder (Qwen2_5_VLForConditionalGeneration), tokenizer (Qwen2Tokenizer),
transformer, vae; Qwen/Qwen-Image-Edit (and -2509, -2511) add processor (Qwen2VLProcessor).

transformers' ``Qwen2VLProcessor`` cannot be constructed without torchvision (its video processor
needs it), so the in-memory edit pipeline holds :class:`ImageOnlyQwen2VLProcessor`, and the saved
``processor/`` folder is written piece by piece (tokenizer + Qwen2-VL image processor config), as
the hub folder is, and recorded as ``["transformers", "Qwen2VLProcessor"]``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from diffgen.testing.tokenizers import byte_alphabet

SEED = 0
LATENT_CHANNELS = 16  # as the real VAE: 16 channels, 8x downsampling; 2x2 packing -> 64 DiT channels
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")
# The real Qwen-Image scheduler config (dynamic exponential shift, terminal sigma 0.02).
QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
    num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
    time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True, use_exponential_sigmas=False,
    use_karras_sigmas=False)


def _seeded(build):
    torch.manual_seed(SEED)
    return build()


def qwen2_tokenizer():
    """Byte-level Qwen2 BPE without merges (one token per byte), with Qwen's chat and vision tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]})
    return tokenizer


def qwen2_vl_image_processor():
    """Qwen2-VL's PIL image processor (no torchvision); a small pixel budget keeps the vision tower cheap."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=64 * 28 * 28)


def image_only_processor_class():
    """``Qwen2VLProcessor`` without its video processor: constructible without torchvision.

    The edit pipelines only call ``processor(text=..., images=...)``, so the video branch is never used.
    """
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor


def image_only_processor(folder: str | Path | None = None):
    """An :func:`image_only_processor_class` instance: from a saved ``processor/`` folder, or the tiny one."""
    if folder is None:
        return image_only_processor_class()(image_processor=qwen2_vl_image_processor(), tokenizer=qwen2_tokenizer())
    from diffgen.models.encoders.qwen_vl import load_qwen2_vl_processor_parts

    tokenizer, image_processor = load_qwen2_vl_processor_parts(Path(folder))
    return image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer)


def _text_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default"},
                         rope_theta=1000000.0, **special),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[1]),
        vocab_size=len(tokenizer), hidden_size=16,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return _seeded(lambda: Qwen2_5_VLForConditionalGeneration(config))


def _components(zero_cond_t: bool = False) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    tokenizer = qwen2_tokenizer()
    z = LATENT_CHANNELS
    transformer = _seeded(lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z, out_channels=z, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t))
    # Non-trivial latent statistics so the (de)normalisation is exercised.
    vae = _seeded(lambda: AutoencoderKLQwenImage(
        base_dim=8, z_dim=z, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[round(-0.5 + i / z, 4) for i in range(z)],
        latents_std=[round(0.5 + 2 * i / z, 4) for i in range(z)]))
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae,
                text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer, transformer=transformer)


def qwen_image_pipeline():
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**_components())


def qwen_image_edit_pipeline():
    from diffusers import QwenImageEditPipeline

    components = _components()
    processor = image_only_processor_class()(image_processor=qwen2_vl_image_processor(),
                                             tokenizer=components["tokenizer"])
    return QwenImageEditPipeline(processor=processor, **components)


def qwen_image_edit_plus_pipeline(zero_cond_t: bool = False):
    """Edit-2509 (several input images); ``zero_cond_t`` as in Edit-2511."""
    from diffusers import QwenImageEditPlusPipeline

    components = _components(zero_cond_t)
    processor = image_only_processor_class()(image_processor=qwen2_vl_image_processor(),
                                             tokenizer=components["tokenizer"])
    return QwenImageEditPlusPipeline(processor=processor, **components)


def save_processor_as_hub(pipe, path: Path) -> None:
    """Rewrite ``processor/`` as the hub repository holds it and record it as transformers' Qwen2VLProcessor."""
    folder = path / "processor"
    shutil.rmtree(folder, ignore_errors=True)
    pipe.processor.tokenizer.save_pretrained(folder)
    pipe.processor.image_processor.save_pretrained(folder)
    config_file = folder / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor",
                  min_pixels=config["size"]["shortest_edge"], max_pixels=config["size"]["longest_edge"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_processor_as_transformers5(path: Path) -> None:
    """Rewrite the ``processor/`` folder of a saved edit checkpoint as transformers 5's
    ``save_pretrained`` writes it: one ``processor_config.json`` with the image processor nested."""
    folder = path / "processor"
    processor = image_only_processor(folder)
    shutil.rmtree(folder)
    processor.save_pretrained(folder)
    config_file = folder / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["processor_class"] = "Qwen2VLProcessor"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# family -> builder of the reference pipeline, and family -> fix-up after ``save_pretrained``.
QWEN_FAMILIES = {
    "qwen-image": qwen_image_pipeline,  # Qwen/Qwen-Image
    "qwen-image-edit": qwen_image_edit_pipeline,  # Qwen/Qwen-Image-Edit
    "qwen-image-edit-2509": qwen_image_edit_plus_pipeline,  # Qwen/Qwen-Image-Edit-2509
    "qwen-image-edit-2511": lambda: qwen_image_edit_plus_pipeline(zero_cond_t=True),  # Qwen/Qwen-Image-Edit-2511
}
QWEN_AFTER_SAVE = {family: save_processor_as_hub for family in QWEN_FAMILIES if family != "qwen-image"}
