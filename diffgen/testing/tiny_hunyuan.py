"""Tiny random HunyuanVideo pipelines in the component layout of hunyuanvideo-community/HunyuanVideo.

| family      | mirrors (hunyuanvideo-community/...) | pipeline class                   | notes                  |
|-------------|--------------------------------------|----------------------------------|------------------------|
| hunyuan     | HunyuanVideo                         | HunyuanVideoPipeline             | Llama text tower       |
| hunyuan-i2v | HunyuanVideo-I2V                     | HunyuanVideoImageToVideoPipeline | Llava, token replace   |

Components: text_encoder (LlamaModel) + tokenizer (Llama, with the Llama-3 chat tokens), text_encoder_2
(CLIPTextModel) + tokenizer_2, transformer (patch 2, guidance embedding), vae (4x temporal, 8x spatial),
scheduler (flow matching, shift 7 as the real one). The I2V text encoder is a Llava model whose vision
tower gives 576 image tokens (48-px images in 2-px patches), as many as the real template reserves.
"""

from __future__ import annotations

import torch

from diffgen.testing import tokenizers as tok

SEED = 0


def _seeded(build, offset: int = 0):
    torch.manual_seed(SEED + offset)
    return build()


def llama_text_encoder():
    from transformers import LlamaConfig, LlamaModel

    return _seeded(lambda: LlamaModel(LlamaConfig(
        vocab_size=400, hidden_size=16, intermediate_size=37, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=3, bos_token_id=1, eos_token_id=2, pad_token_id=3, max_position_embeddings=1024)))


def clip_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return _seeded(lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=8, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32,
        hidden_act="gelu")))


def hunyuan_vae():
    from diffusers import AutoencoderKLHunyuanVideo

    return _seeded(lambda: AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True))


def hunyuan_transformer(image_condition_type: str | None = None):
    from diffusers import HunyuanVideoTransformer3DModel

    return _seeded(lambda: HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),  # unequal, as 16/56/56
        image_condition_type=image_condition_type), offset=1)


def llava_text_encoder(image_token_index: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=400, hidden_size=16, intermediate_size=37, num_attention_heads=4,
                       num_key_value_heads=4, num_hidden_layers=3, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                       max_position_embeddings=2048)
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                              image_size=48, patch_size=2, projection_dim=8)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", pad_token_id=3)
    return _seeded(lambda: LlavaForConditionalGeneration(config), offset=2)


def clip_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})


def hunyuan_t2v():
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    return HunyuanVideoPipeline(
        text_encoder=llama_text_encoder(), tokenizer=tok.llama_tokenizer(), transformer=hunyuan_transformer(),
        vae=hunyuan_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip_text_encoder(), tokenizer_2=tok.clip_tokenizer())


def hunyuan_i2v():
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoImageToVideoPipeline

    tokenizer = tok.llama_tokenizer(llava=True)
    return HunyuanVideoImageToVideoPipeline(
        text_encoder=llava_text_encoder(tokenizer.convert_tokens_to_ids("<image>")), tokenizer=tokenizer,
        transformer=hunyuan_transformer("token_replace"), vae=hunyuan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip_text_encoder(),
        tokenizer_2=tok.clip_tokenizer(), image_processor=clip_image_processor())


HUNYUAN_FAMILIES = {"hunyuan": hunyuan_t2v, "hunyuan-i2v": hunyuan_i2v}
