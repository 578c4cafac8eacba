"""Tiny random Wan pipelines in the component layout of the real hub repositories.

| family         | mirrors (Wan-AI/...-Diffusers) | pipeline class          | notes                          |
|----------------|--------------------------------|-------------------------|--------------------------------|
| wan-t2v        | Wan2.1-T2V-1.3B                | WanPipeline             |                                |
| wan-i2v        | Wan2.1-I2V-14B-480P            | WanImageToVideoPipeline | CLIP image encoder + processor |
| wan22-a14b     | Wan2.2-T2V-A14B                | WanPipeline             | transformer_2, boundary 0.875  |
| wan22-i2v-a14b | Wan2.2-I2V-A14B                | WanImageToVideoPipeline | transformer_2, boundary 0.9    |
| wan22-ti2v     | Wan2.2-TI2V-5B                 | WanPipeline             | expand_timesteps, 48-ch VAE 16x|
| fastwan-t2v    | FastVideo/FastWan2.1-T2V-1.3B  | WanDMDPipeline          | + VSA gate weights (unused)    |
| fastwan22-ti2v | FastVideo/FastWan2.2-TI2V-5B-FullAttn | WanDMDPipeline   | expand_timesteps, 48-ch VAE 16x|

Schedulers are the real UniPC flow configs (flow_shift 3 / 5 / 12 as in the repositories; FastWan 8 / 5).
The FastWan folders are Wan folders saved by diffusers whose model_index.json names FastVideo's
``WanDMDPipeline``; FastWan2.1's DiT also stores the ``to_gate_compress`` projections of Video Sparse
Attention in each self-attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffgen.testing import tokenizers as tok

SEED = 0


def _seeded(build, offset: int = 0):
    torch.manual_seed(SEED + offset)
    return build()


def unipc_scheduler(flow_shift: float):
    """The UniPC flow-matching scheduler config of the real Wan checkpoints."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                   flow_shift=flow_shift, solver_order=2, solver_type="bh2", predict_x0=True,
                                   lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace")


def umt5_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    return _seeded(lambda: UMT5EncoderModel(UMT5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)))


def wan21_vae():
    """16 latent channels, 8x spatial and 4x temporal compression, as the Wan2.1 VAE."""
    from diffusers import AutoencoderKLWan

    return _seeded(lambda: AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                            temperal_downsample=[False, True, True]))


def wan22_vae():
    """The Wan2.2 (TI2V-5B) VAE shape: 48 latent channels, 2x2 pixel patchify, 16x spatial compression."""
    from diffusers import AutoencoderKLWan

    z_dim = 48
    return _seeded(lambda: AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=[0.05 * (i % 7) - 0.1 for i in range(z_dim)],
        latents_std=[1.0 + 0.1 * (i % 5) for i in range(z_dim)]))


def wan_transformer(in_channels: int = 16, out_channels: int = 16, image_dim: int | None = None, offset: int = 0):
    from diffusers import WanTransformer3DModel

    heads, head_dim = 2, 16  # RoPE axes 8/4/4 (frames/rows/cols): unequal, as 44/42/42 in the real 128
    # I2V: CLIP tokens (image_dim) are embedded to the model width, which the added k/v projections take.
    added_kv_proj_dim = heads * head_dim if image_dim is not None else None
    return _seeded(lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=out_channels, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
        added_kv_proj_dim=added_kv_proj_dim), offset)


def clip_image_encoder():
    """A tiny CLIPVisionModel (32 px, 4 px patches -> 65 tokens) and its CLIPImageProcessor (PIL backend)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = _seeded(lambda: CLIPVisionModel(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32,
        patch_size=4, projection_dim=16, hidden_act="quick_gelu")))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   do_center_crop=True, do_normalize=True, do_resize=True, resample=3,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    return encoder, processor


def wan21_t2v():
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=tok.t5_tokenizer(), text_encoder=umt5_encoder(), vae=wan21_vae(),
                       scheduler=unipc_scheduler(3.0), transformer=wan_transformer())


def wan21_i2v():
    from diffusers import WanImageToVideoPipeline

    encoder, processor = clip_image_encoder()
    # 16 noise + 4 mask + 16 first-frame latent channels in, as the real I2V transformer
    return WanImageToVideoPipeline(tokenizer=tok.t5_tokenizer(), text_encoder=umt5_encoder(), vae=wan21_vae(),
                                   scheduler=unipc_scheduler(3.0), image_encoder=encoder, image_processor=processor,
                                   transformer=wan_transformer(in_channels=36, image_dim=16))


def wan22_t2v_a14b():
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=tok.t5_tokenizer(), text_encoder=umt5_encoder(), vae=wan21_vae(),
                       scheduler=unipc_scheduler(12.0), transformer=wan_transformer(offset=1),
                       transformer_2=wan_transformer(offset=2), boundary_ratio=0.875)


def wan22_i2v_a14b():
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline(tokenizer=tok.t5_tokenizer(), text_encoder=umt5_encoder(), vae=wan21_vae(),
                                   scheduler=unipc_scheduler(5.0), image_encoder=None, image_processor=None,
                                   transformer=wan_transformer(in_channels=36, offset=1),
                                   transformer_2=wan_transformer(in_channels=36, offset=2), boundary_ratio=0.9)


def wan22_ti2v():
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=tok.t5_tokenizer(), text_encoder=umt5_encoder(), vae=wan22_vae(),
                       scheduler=unipc_scheduler(5.0), transformer=wan_transformer(48, 48, offset=3),
                       expand_timesteps=True)


def fastwan21_t2v():
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=tok.t5_tokenizer(), text_encoder=umt5_encoder(), vae=wan21_vae(),
                       scheduler=unipc_scheduler(8.0), transformer=wan_transformer(offset=4))


def fastwan22_ti2v():
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=tok.t5_tokenizer(), text_encoder=umt5_encoder(), vae=wan22_vae(),
                       scheduler=unipc_scheduler(5.0), transformer=wan_transformer(48, 48, offset=5),
                       expand_timesteps=True)


def save_as_fastvideo(pipe, path: Path) -> None:
    """Name FastVideo's pipeline class in model_index.json; add VSA gate weights to a Wan2.1-sized DiT."""
    from safetensors.torch import load_file, save_file

    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = "WanDMDPipeline"
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if pipe.transformer.config.in_channels != 16:
        return  # FastWan2.2-TI2V-5B-FullAttn: full attention only
    weights_file = path / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    generator = torch.Generator().manual_seed(SEED)
    dim = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    for i in range(pipe.transformer.config.num_layers):
        weights[f"blocks.{i}.attn1.to_gate_compress.weight"] = torch.randn(dim, dim, generator=generator) * 0.02
        weights[f"blocks.{i}.attn1.to_gate_compress.bias"] = torch.zeros(dim)
    save_file(weights, weights_file, metadata={"format": "pt"})


WAN_FAMILIES = {
    "wan-t2v": wan21_t2v,
    "wan-i2v": wan21_i2v,
    "wan22-a14b": wan22_t2v_a14b,
    "wan22-i2v-a14b": wan22_i2v_a14b,
    "wan22-ti2v": wan22_ti2v,
    "fastwan-t2v": fastwan21_t2v,
    "fastwan22-ti2v": fastwan22_ti2v,
}

WAN_AFTER_SAVE = {"fastwan-t2v": save_as_fastvideo, "fastwan22-ti2v": save_as_fastvideo}
