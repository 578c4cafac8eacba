"""Tiny random HunyuanVideo pipelines in the component layout of hunyuanvideo-community/HunyuanVideo.

| family      | mirrors (hunyuanvideo-community/...) | pipeline class                   | notes                  |
|-------------|--------------------------------------|----------------------------------|------------------------|
| hunyuan     | HunyuanVideo                         | HunyuanVideoPipeline             | Llama text tower       |
| hunyuan-i2v | HunyuanVideo-I2V                     | HunyuanVideoImageToVideoPipeline | Llava, token replace   |
| hunyuan15   | HunyuanVideo-1.5-Diffusers-480p_t2v  | HunyuanVideo15Pipeline           | Qwen2.5-VL + ByT5      |
| hunyuan15-i2v | HunyuanVideo-1.5-Diffusers-480p_i2v | HunyuanVideo15ImageToVideoPipeline | + SigLIP, cond. latent |
| hunyuan15-i2v-distilled | ...-480p_i2v_step_distilled | HunyuanVideo15ImageToVideoPipeline | MeanFlow, no CFG |

Components: text_encoder (LlamaModel) + tokenizer (Llama, with the Llama-3 chat tokens), text_encoder_2
(CLIPTextModel) + tokenizer_2, transformer (patch 2, guidance embedding), vae (4x temporal, 8x spatial),
scheduler (flow matching, shift 7 as the real one). The I2V text encoder is a Llava model whose vision
tower gives 576 image tokens (48-px images in 2-px patches), as many as the real template reserves.

HunyuanVideo-1.5: text_encoder (Qwen2_5_VLTextModel, 3 layers so that the third-from-last hidden state
has passed one) + tokenizer (byte-level Qwen2 with a Qwen chat template), text_encoder_2 (T5 encoder
over ByT5's byte vocabulary) + tokenizer_2 (ByT5Tokenizer), transformer (patch 1), vae (16x spatial,
4x temporal, as the real one), guider (CFG 6.0; 1.0 distilled), scheduler (shift 5; 7 distilled);
I2V adds image_encoder (SigLIP, 9 tokens of a 30-px image) + feature_extractor. ``target_size`` 64
makes the default size a small bucket (80x48 for 16:9).
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


#: a Qwen2-style chat template (system, user, then the assistant's turn opened)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hunyuan15_transformer(task: str, meanflow: bool = False):
    from diffusers import HunyuanVideo15Transformer3DModel

    return _seeded(lambda: HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(4, 6, 6), target_size=64, task_type=task, use_meanflow=meanflow),
        offset=1)


def hunyuan15_vae():
    from diffusers import AutoencoderKLHunyuanVideo15

    return _seeded(lambda: AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1,
        spatial_compression_ratio=16, temporal_compression_ratio=4, downsample_match_channel=True,
        upsample_match_channel=True, scaling_factor=1.03682))


def qwen25_text_encoder(tokenizer):
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    special = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>"))}
    return _seeded(lambda: Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), **special, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1000000.0,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"})), offset=2)


def byt5_encoder():
    from transformers import T5Config, T5EncoderModel

    return _seeded(lambda: T5EncoderModel(T5Config(
        vocab_size=384, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)), offset=3)


def _hunyuan15_components(task: str, distilled: bool = False) -> dict:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler
    from transformers import ByT5Tokenizer

    from diffgen.testing.tiny_qwen import qwen2_tokenizer

    tokenizer = qwen2_tokenizer()
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return dict(
        text_encoder=qwen25_text_encoder(tokenizer), tokenizer=tokenizer,
        transformer=hunyuan15_transformer(task, distilled), vae=hunyuan15_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0 if distilled else 5.0),
        text_encoder_2=byt5_encoder(), tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=1.0 if distilled else 6.0))


def hunyuan15_t2v():
    from diffusers import HunyuanVideo15Pipeline

    return HunyuanVideo15Pipeline(**_hunyuan15_components("t2v"))


def hunyuan15_i2v(distilled: bool = False):
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    image_encoder = _seeded(lambda: SiglipVisionModel(SiglipVisionConfig(
        hidden_size=12, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=30,
        patch_size=10)), offset=4)
    return HunyuanVideo15ImageToVideoPipeline(
        **_hunyuan15_components("i2v", distilled), image_encoder=image_encoder,
        feature_extractor=SiglipImageProcessor(size={"height": 30, "width": 30}))


HUNYUAN_FAMILIES = {"hunyuan": hunyuan_t2v, "hunyuan-i2v": hunyuan_i2v, "hunyuan15": hunyuan15_t2v,
                    "hunyuan15-i2v": hunyuan15_i2v,
                    "hunyuan15-i2v-distilled": lambda: hunyuan15_i2v(distilled=True)}
