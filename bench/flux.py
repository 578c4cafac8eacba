"""FLUX.1-dev on one GPU: diffgen vs diffusers, same random bf16 weights, A/B alternated, medians.

    python bench/flux.py            # real FLUX.1-dev config, 1024x1024, 512 text tokens, 28 steps
    python bench/flux.py --tiny     # a tiny config on CPU, to check the script itself

Part 1: one DiT forward (diffgen's native FluxTransformer vs diffusers' FluxTransformer2DModel,
sharing the same weight tensors). Part 2: the whole pipeline end to end (CLIP-L + T5-XXL + the
FLUX VAE, all random at their real configs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import ab_medians, print_table, random_init_  # noqa: E402

REAL = dict(
    dit=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56)),
    clip=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
    t5=dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=32),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    height=1024, width=1024, text_len=512, steps=28,
)
TINY = dict(
    dit=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
             axes_dims_rope=(4, 4, 8)),
    clip=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77, projection_dim=32, hidden_act="gelu"),
    t5=dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=8),
    vae=dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
    height=64, width=64, text_len=32, steps=2,
)


def build_models(cfg: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffgen.models.dits.flux import FluxConfig, FluxTransformer

    with torch.device(device):
        reference = random_init_(FluxTransformer2DModel(**cfg["dit"]).to(dtype)).eval()
        clip = random_init_(CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                                         **cfg["clip"])).to(dtype)).eval()
        t5 = random_init_(T5EncoderModel(T5Config(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                                  **cfg["t5"])).to(dtype)).eval()
        vae = random_init_(AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.1159, scaling_factor=0.3611, **cfg["vae"]).to(dtype)).eval()
    with torch.device("meta"):
        native = FluxTransformer(FluxConfig(**cfg["dit"]))
    native.load_state_dict(reference.state_dict(), assign=True)  # shares the very same tensors
    return reference, native.eval(), clip, t5, vae


def dit_forward_inputs(cfg: dict, device: torch.device, dtype: torch.dtype) -> dict:
    tokens = (cfg["height"] // 16) * (cfg["width"] // 16)
    g = torch.Generator(device).manual_seed(0)
    grid_w = cfg["width"] // 16
    img_ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // grid_w, torch.arange(tokens) % grid_w], -1)
    return dict(hidden_states=torch.randn(1, tokens, 64, device=device, dtype=dtype, generator=g),
                encoder_hidden_states=torch.randn(1, cfg["text_len"], cfg["dit"]["joint_attention_dim"],
                                                  device=device, dtype=dtype, generator=g),
                pooled_projections=torch.randn(1, cfg["dit"]["pooled_projection_dim"], device=device, dtype=dtype,
                                               generator=g),
                timestep=torch.tensor([0.5], device=device, dtype=dtype),
                guidance=torch.tensor([3.5], device=device, dtype=dtype),
                img_ids=img_ids.to(device), txt_ids=torch.zeros(cfg["text_len"], 3, device=device))


def profile_forward(variants: dict) -> None:
    """Top kernels by device time for one forward of each variant (explains A/B gaps)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    for name, fn in variants.items():
        with torch.inference_mode(), profile(activities=activities) as prof:
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        print(f"\n## top kernels: {name}")
        print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one forward of each")
    parser.add_argument("--compile", action="store_true",
                        help="also time both with their blocks compiled (diffusers: compile_repeated_blocks)")
    args = parser.parse_args()
    cfg = TINY if args.tiny else REAL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    reference, native, clip, t5, vae = build_models(cfg, device, dtype)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__}

    inputs = dit_forward_inputs(cfg, device, dtype)
    with torch.inference_mode():
        ref_out = reference(**inputs).sample
        nat_out = native(**inputs)
        rel = ((nat_out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
        forward = ab_medians({"diffusers": lambda: reference(**inputs), "diffgen": lambda: native(**inputs)},
                             device, repeats=args.repeats)
    results["dit_forward"] = forward
    results["dit_forward_rel_diff"] = rel
    print_table(f"FLUX.1-dev DiT forward {cfg['height']}x{cfg['width']}, {cfg['text_len']} text tokens "
                f"(rel diff diffgen vs diffusers {rel:.2e})",
                [(k, f"{v['median'] * 1000:.1f}", f"{v['min'] * 1000:.1f}..{v['max'] * 1000:.1f}")
                 for k, v in forward.items()], ("impl", "median ms", "range ms"))

    if args.profile:
        profile_forward({"diffusers": lambda: reference(**inputs), "diffgen": lambda: native(**inputs)})

    if not args.skip_pipeline:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers import FluxPipeline as DiffusersFlux

        from diffgen.pipelines.flux import FluxPipeline
        from diffgen.testing.tokenizers import clip_tokenizer, t5_tokenizer

        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        shared = dict(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(),
                      text_encoder_2=t5, tokenizer_2=t5_tokenizer())
        theirs = DiffusersFlux(transformer=reference, **shared)
        theirs.set_progress_bar_config(disable=True)
        ours = FluxPipeline(dict(transformer=native, **shared), "random-flux-dev", device, dtype)
        call = dict(prompt="a photo of a raccoon", height=cfg["height"], width=cfg["width"],
                    num_inference_steps=cfg["steps"], guidance_scale=3.5, max_sequence_length=cfg["text_len"])
        from diffgen.engine.request import GenerationRequest

        request = GenerationRequest.build(seed=0, **call)
        run_theirs = lambda: theirs(generator=torch.Generator("cpu").manual_seed(0), output_type="pil", **call)
        run_ours = lambda: ours.run(request)
        e2e = ab_medians({"diffusers": run_theirs, "diffgen": run_ours}, device, warmup=1,
                         repeats=max(2, args.repeats // 2))
        stage = ours.run(request).timings
        results["pipeline"] = e2e
        results["diffgen_stages"] = stage
        print_table(f"FLUX.1-dev pipeline end to end, {cfg['height']}x{cfg['width']}, {cfg['steps']} steps",
                    [(k, f"{v['median']:.3f}", f"{v['min']:.3f}..{v['max']:.3f}") for k, v in e2e.items()],
                    ("impl", "median s", "range s"))
        print_table("diffgen stages (one run)", [(k, f"{v * 1000:.1f}") for k, v in stage.items()], ("stage", "ms"))
    if args.compile:
        from diffgen.engine.optimize import compile_repeated_blocks

        with torch.device("meta"):
            from diffgen.models.dits.flux import FluxConfig, FluxTransformer

            compiled_native = FluxTransformer(FluxConfig(**cfg["dit"]))
        compiled_native.load_state_dict(reference.state_dict(), assign=True)
        compile_repeated_blocks(compiled_native.eval())
        compiled_reference = reference  # compiled in place: keep this part last
        compiled_reference.compile_repeated_blocks(fullgraph=True)
        with torch.inference_mode():
            compiled = ab_medians({"diffusers compiled": lambda: compiled_reference(**inputs),
                                   "diffgen compiled": lambda: compiled_native(**inputs)}, device,
                                  warmup=3, repeats=args.repeats)
        results["dit_forward_compiled"] = compiled
        print_table("FLUX.1-dev DiT forward, blocks compiled",
                    [(k, f"{v['median'] * 1000:.1f}", f"{v['min'] * 1000:.1f}..{v['max'] * 1000:.1f}")
                     for k, v in compiled.items()], ("impl", "median ms", "range ms"))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
