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


def native_model(cfg: dict, reference, fp8: bool = False, compile: bool = False):
    """A diffgen FluxTransformer over the reference's weight tensors, optionally fp8 and/or compiled."""
    from diffgen.engine.optimize import compile_repeated_blocks
    from diffgen.layers.linear import quantize_linears_fp8
    from diffgen.models.dits.flux import FluxConfig, FluxTransformer

    with torch.device("meta"):
        model = FluxTransformer(FluxConfig(**cfg["dit"]))
    model.load_state_dict(reference.state_dict(), assign=True)
    model.eval()
    if fp8:
        quantize_linears_fp8(model)
    if compile:
        compile_repeated_blocks(model)
    return model


def timed_table(title: str, variants: dict, device: torch.device, repeats: int, warmup: int = 2,
                unit: str = "ms") -> dict:
    with torch.inference_mode():
        timings = ab_medians(variants, device, warmup=warmup, repeats=repeats)
    scale = 1000 if unit == "ms" else 1
    print_table(title, [(k, f"{v['median'] * scale:.1f}" if unit == "ms" else f"{v['median']:.3f}",
                         f"{v['min'] * scale:.1f}..{v['max'] * scale:.1f}" if unit == "ms"
                         else f"{v['min']:.3f}..{v['max']:.3f}") for k, v in timings.items()],
                ("impl", f"median {unit}", f"range {unit}"))
    return timings


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one forward of each")
    parser.add_argument("--compile", action="store_true",
                        help="also time compiled blocks (diffusers: compile_repeated_blocks, timed last)")
    parser.add_argument("--fp8", action="store_true", help="also time diffgen with --quantize fp8")
    args = parser.parse_args()
    cfg = TINY if args.tiny else REAL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reference, native, clip, t5, vae = build_models(cfg, device, dtype)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__}
    size = f"{cfg['height']}x{cfg['width']}"
    inputs = dit_forward_inputs(cfg, device, dtype)
    variants = {"diffusers": lambda: reference(**inputs).sample, "diffgen": lambda: native(**inputs)}
    if args.fp8:
        native_fp8 = native_model(cfg, reference, fp8=True)
        variants["diffgen fp8"] = lambda: native_fp8(**inputs)
    with torch.inference_mode():
        expected = variants["diffusers"]()
        results["rel_diff_vs_diffusers"] = {k: relative_diff(fn(), expected) for k, fn in variants.items()}
    print_table("relative difference of one forward vs diffusers",
                [(k, f"{v:.2e}") for k, v in results["rel_diff_vs_diffusers"].items()], ("impl", "rel diff"))
    results["dit_forward"] = timed_table(f"FLUX.1-dev DiT forward {size}, {cfg['text_len']} text tokens, eager",
                                         variants, device, args.repeats)
    if args.profile:
        profile_forward({"diffusers": variants["diffusers"], "diffgen": variants["diffgen"]})

    compiled = {}
    if args.compile:
        compiled["diffgen compiled"] = native_model(cfg, reference, compile=True)
        if args.fp8:
            compiled["diffgen compiled fp8"] = native_model(cfg, reference, fp8=True, compile=True)
        results["dit_forward_compiled"] = timed_table(
            f"FLUX.1-dev DiT forward {size}, compiled blocks",
            {k: (lambda m=m: m(**inputs)) for k, m in compiled.items()}, device, args.repeats, warmup=3)

    if not args.skip_pipeline:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers import FluxPipeline as DiffusersFlux

        from diffgen.engine.request import GenerationRequest
        from diffgen.pipelines.flux import FluxPipeline
        from diffgen.testing.tokenizers import clip_tokenizer, t5_tokenizer

        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        shared = dict(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(),
                      text_encoder_2=t5, tokenizer_2=t5_tokenizer())
        theirs = DiffusersFlux(transformer=reference, **shared)
        theirs.set_progress_bar_config(disable=True)
        call = dict(prompt="a photo of a raccoon", height=cfg["height"], width=cfg["width"],
                    num_inference_steps=cfg["steps"], guidance_scale=3.5, max_sequence_length=cfg["text_len"])
        request = GenerationRequest.build(seed=0, **call)
        pipelines = {"diffgen": FluxPipeline(dict(transformer=native, **shared), "random", device, dtype)}
        for name, model in compiled.items():
            pipelines[name] = FluxPipeline(dict(transformer=model, **shared), "random", device, dtype)
        e2e = {"diffusers": lambda: theirs(generator=torch.Generator("cpu").manual_seed(0), **call)}
        e2e.update({name: (lambda p=p: p.run(request)) for name, p in pipelines.items()})
        results["pipeline"] = timed_table(f"FLUX.1-dev pipeline end to end, {size}, {cfg['steps']} steps",
                                          e2e, device, max(2, args.repeats // 2), warmup=1, unit="s")
        for name, pipe in pipelines.items():
            stages = pipe.run(request).timings
            results[f"stages {name}"] = stages
            print_table(f"{name} stages (one run)", [(k, f"{v * 1000:.1f}") for k, v in stages.items()],
                        ("stage", "ms"))

    if args.compile:  # diffusers compiles in place, so it is timed after everything that uses `reference`
        reference.compile_repeated_blocks(fullgraph=True)
        results["dit_forward_compiled_diffusers"] = timed_table(
            f"FLUX.1-dev DiT forward {size}, diffusers compile_repeated_blocks",
            {"diffusers compiled": lambda: reference(**inputs)}, device, args.repeats, warmup=3)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
