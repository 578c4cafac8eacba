"""Write tiny random-weight pipelines in the layout of the real diffusers repositories.

Each builder constructs the reference diffusers pipeline from configs in code (seeded, so the same
call writes the same weights); every parameter that a config build leaves constant (norm weights,
biases) is then randomized, so that a wiring mistake on it changes the output; then ``save_pretrained``.
Nothing is downloaded. Head dims are chosen so that the RoPE axis splits are unequal, as in the real
models (FLUX and Qwen-Image 16/56/56 of 128 -> 4/6/6 of 16; Wan 44/42/42 of 128 -> 8/4/4 of 16).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from diffgen.errors import DiffgenError
from diffgen.testing import tokenizers as tok
from diffgen.testing.randomize import randomize_constant_parameters

SEED = 0
#: the real FLUX.1-dev / schnell vae/config.json (benchmarks and real-size GPU tests build random VAEs from it)
FLUX1_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)


def _seeded(build: Callable):
    torch.manual_seed(SEED)
    return build()


def flux_pipeline(variant: str = "dev"):
    """A tiny FLUX.1 pipeline; dev has the guidance embedding and dynamic shift, schnell neither."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    dev = variant == "dev"
    transformer = _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=dev,
        axes_dims_rope=(4, 6, 6)))
    text_encoder = _seeded(lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32,
        hidden_act="gelu")))
    text_encoder_2 = _seeded(lambda: T5EncoderModel(T5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)))
    # 3 downsamples -> scale factor 8 and 16 latent channels (64 packed), as in the real FLUX VAE.
    vae = _seeded(lambda: AutoencoderKL(**{**FLUX1_VAE_CONFIG, "block_out_channels": (8, 8, 16, 16),
                                           "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64}))
    if dev:  # the real FLUX.1-dev scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:  # the real FLUX.1-schnell scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok.clip_tokenizer(),
                        text_encoder_2=text_encoder_2, tokenizer_2=tok.t5_tokenizer(), transformer=transformer)


# family name -> builder of the reference pipeline object; each model family adds its own.
TINY_FAMILIES: dict[str, Callable] = {
    "flux": lambda: flux_pipeline("dev"),
    "flux-schnell": lambda: flux_pipeline("schnell"),
}


# family -> function(pipeline, path) run after save_pretrained (components saved as the hub stores them)
_AFTER_SAVE: dict[str, Callable] = {}


def _register_wan() -> None:
    from diffgen.testing.tiny_wan import WAN_AFTER_SAVE, WAN_FAMILIES

    TINY_FAMILIES.update(WAN_FAMILIES)
    _AFTER_SAVE.update(WAN_AFTER_SAVE)


_register_wan()


def _register_hunyuan() -> None:
    from diffgen.testing.tiny_hunyuan import HUNYUAN_FAMILIES

    TINY_FAMILIES.update(HUNYUAN_FAMILIES)


_register_hunyuan()


def _register_qwen() -> None:
    from diffgen.testing.tiny_qwen import QWEN_AFTER_SAVE, QWEN_FAMILIES

    TINY_FAMILIES.update(QWEN_FAMILIES)
    _AFTER_SAVE.update(QWEN_AFTER_SAVE)


_register_qwen()


def build_tiny_pipeline(family: str):
    """The in-memory diffusers pipeline of a tiny family, in eval mode."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    pipe = TINY_FAMILIES[family]()
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            component.eval()  # built from configs -> train mode; T5 dropout would make outputs random
            randomize_constant_parameters(component, seed=name)
    return pipe


def write_tiny_checkpoint(family: str, path: str | os.PathLike, shard_size: str | None = None,
                          overwrite: bool = False) -> Path:
    """Write a tiny random checkpoint of ``family`` to ``path`` in diffusers format; returns the path.

    ``shard_size`` (e.g. "20KB") shards the safetensors of each model component. An existing
    non-empty ``path`` is refused, unless it is a checkpoint and ``overwrite`` is set.
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        is_checkpoint = (path / "model_index.json").is_file()
        if not overwrite or not is_checkpoint:
            what = "a diffusers checkpoint" if is_checkpoint else "and is not a diffusers checkpoint"
            hint = ("pass --overwrite (Python: overwrite=True) to replace it, or choose another path" if is_checkpoint
                    else "choose another path (--overwrite replaces only a checkpoint)")
            raise DiffgenError(f"{path} already exists ({what}); {hint}")
        shutil.rmtree(path)  # no file of the earlier checkpoint is left behind
    pipe = build_tiny_pipeline(family)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    pipe.save_pretrained(path, safe_serialization=True, **kwargs)
    _use_hub_class_names(path)
    if family in _AFTER_SAVE:
        _AFTER_SAVE[family](pipe, path)
    return path


def _use_hub_class_names(path: Path) -> None:
    """Name components as the hub repositories do.

    Without torchvision, transformers 5 builds ``CLIPImageProcessor`` (``SiglipImageProcessor``) as its
    PIL backend and records that class name; the real repositories say ``CLIPImageProcessor``
    (``SiglipImageProcessor``), which loads the same backend.
    """
    import json

    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    renamed = {"CLIPImageProcessorPil": "CLIPImageProcessor", "SiglipImageProcessorPil": "SiglipImageProcessor"}
    for value in index.values():
        if isinstance(value, list) and len(value) == 2 and value[1] in renamed:
            value[1] = renamed[value[1]]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
