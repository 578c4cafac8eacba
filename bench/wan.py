"""Wan2.1-T2V-1.3B on one GPU: one CFG denoising step of the native DiT, and the VAE decode.

    python bench/wan.py                       # real config, 480x832, 81 frames, 512 text tokens, bf16, CUDA
    python bench/wan.py --compare-diffusers   # also time diffusers' WanTransformer3DModel on the same tensors
    python bench/wan.py --vae-tiled           # also time the tiled VAE decode (and its peak memory)
    python bench/wan.py --tiny                # a tiny config on CPU, to check the script itself

Weights are random (built on the meta device, allocated once in bf16, then filled in place), so
the numbers are speed and memory only. Part 1 (DiT) needs no diffusers unless --compare-diffusers;
part 2 (VAE) uses diffusers' AutoencoderKLWan at its real config. Times: CUDA events, median of 5
after 2 warm-ups (min..max in brackets).
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
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
    dit=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
             text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, eps=1e-6,
             rope_max_seq_len=1024),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers vae/config.json (the Wan2.1 VAE)
    vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[False, True, True]),
    height=480, width=832, frames=81, text_len=512,
)
TINY = dict(
    dit=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
             text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=32),
    vae=dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
             temperal_downsample=[False, True, True]),
    height=48, width=80, frames=9, text_len=16,
)


def materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                keep_fp32: tuple[str, ...] = ()) -> torch.nn.Module:
    """Meta-built module -> ``device`` in ``dtype`` (``keep_fp32`` module names in float32), allocated once."""
    module.to(dtype)  # still on meta: no memory
    for name, param in module.named_parameters():
        if set(name.split(".")) & set(keep_fp32):
            param.data = param.data.float()
    return random_init_(module.to_empty(device=device)).eval().requires_grad_(False)


def build_native_dit(cfg: dict, device: torch.device, dtype: torch.dtype):
    from diffgen.models.dits.wan import WanConfig, WanTransformer

    with torch.device("meta"):
        model = WanTransformer(WanConfig(**cfg["dit"]))
    return materialize(model, device, dtype, WanTransformer.keep_in_fp32_modules)


def build_reference_dit(cfg: dict, native: torch.nn.Module, device: torch.device):
    """diffusers' WanTransformer3DModel sharing the native model's tensors (its RoPE tables built on device)."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    with torch.device("meta"):
        reference = WanTransformer3DModel(**cfg["dit"])
    reference.load_state_dict(native.state_dict(), assign=True)
    with torch.device(device):
        reference.rope = WanRotaryPosEmbed(cfg["dit"]["attention_head_dim"], cfg["dit"]["patch_size"],
                                           cfg["dit"]["rope_max_seq_len"])
    return reference.eval().requires_grad_(False)


def build_vae(cfg: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan(**cfg["vae"])
    return materialize(vae, device, dtype)


def latent_shape(cfg: dict, batch: int = 1) -> tuple[int, ...]:
    return (batch, cfg["dit"]["in_channels"], (cfg["frames"] - 1) // 4 + 1, cfg["height"] // 8, cfg["width"] // 8)


def peak_memory(fn, device: torch.device) -> float:
    """GiB of peak allocated memory during one call (CUDA only; 0 elsewhere)."""
    if device.type != "cuda":
        fn()
        return 0.0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (checks the script)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 (float32 with --tiny)")
    parser.add_argument("--attention-backend", default="auto", help="diffgen attention backend (auto = cuDNN)")
    parser.add_argument("--cfg", choices=["sequential", "batched"], default="sequential",
                        help="CFG as two forwards (what the pipeline does) or one forward of batch 2")
    parser.add_argument("--compare-diffusers", action="store_true", help="also time diffusers' DiT (same tensors)")
    parser.add_argument("--vae-tiled", action="store_true", help="also time the tiled VAE decode")
    parser.add_argument("--skip-vae", action="store_true")
    parser.add_argument("--skip-dit", action="store_true")
    parser.add_argument("--vae-compile", action="store_true", help="also time the VAE with its decoder compiled")
    parser.add_argument("--vae-variants", action="store_true",
                        help="also time the VAE decode with cuDNN autotuning and in float32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--compile", action="store_true", help="also time diffgen with its blocks compiled")
    parser.add_argument("--fp8", action="store_true", help="also time diffgen --quantize fp8 (with --compile if given)")
    args = parser.parse_args()

    from diffgen.layers.attention import set_attention_backend

    cfg = TINY if args.tiny else REAL
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))
    set_attention_backend(args.attention_backend)
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict[str, dict] = {}
    rows = []

    def fmt(stats: dict) -> str:
        return f"{stats['median'] * 1000:.1f} ms [{stats['min'] * 1000:.1f}..{stats['max'] * 1000:.1f}]"

    # -- part 1: the DiT, one denoising step with CFG ---------------------------------------------
    g = torch.Generator(device).manual_seed(0)
    if not args.skip_dit:
        native = build_native_dit(cfg, device, dtype)
        latents = torch.randn(latent_shape(cfg), device=device, dtype=dtype, generator=g)
        text = torch.randn(2, cfg["text_len"], cfg["dit"]["text_dim"], device=device, dtype=dtype, generator=g)
        timestep = torch.tensor([999], device=device)
        tokens = latents.shape[2] * (latents.shape[3] // 2) * (latents.shape[4] // 2)

        def cfg_step(forward):
            def run():
                with torch.inference_mode():
                    if args.cfg == "batched":
                        return forward(latents.expand(2, -1, -1, -1, -1), timestep.expand(2), text)
                    cond = forward(latents, timestep, text[:1])
                    uncond = forward(latents, timestep, text[1:])
                    return uncond + 5.0 * (cond - uncond)
            return run

        variants = {"diffgen DiT": cfg_step(native)}
        if args.compare_diffusers:
            reference = build_reference_dit(cfg, native, device)
            variants["diffusers DiT"] = cfg_step(lambda *inputs: reference(*inputs, return_dict=False)[0])
            with torch.inference_mode():
                ours, theirs = native(latents, timestep, text[:1]), reference(latents, timestep, text[:1])[0]
                relative = ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()
                difference = (variants["diffgen DiT"]() - variants["diffusers DiT"]()).abs().max().item()
            results["dit_max_abs_diff_vs_diffusers"] = {"value": difference, "one_forward_relative": relative}
            print(f"diffgen vs diffusers DiT: one forward relative diff {relative:.2e}; CFG step max abs diff "
                  f"{difference:.3g} ({dtype})")
        if args.compile or args.fp8:
            from diffgen.engine.optimize import compile_repeated_blocks
            from diffgen.layers.linear import quantize_linears_fp8
            from diffgen.models.dits.wan import WanConfig, WanTransformer

            with torch.device("meta"):
                tuned = WanTransformer(WanConfig(**cfg["dit"]))
            tuned.load_state_dict(native.state_dict(), assign=True)  # the same tensors
            tuned.eval()
            if args.fp8:
                quantize_linears_fp8(tuned)
            if args.compile:
                compile_repeated_blocks(tuned)
            label = "diffgen DiT" + (" compiled" if args.compile else "") + (" fp8" if args.fp8 else "")
            variants[label] = cfg_step(tuned)
            with torch.inference_mode():
                relative = ((tuned(latents, timestep, text[:1]).float() - native(latents, timestep, text[:1]).float())
                            .norm() / native(latents, timestep, text[:1]).float().norm()).item()
            results[f"{label} relative diff vs bf16 eager"] = {"value": relative}
            print(f"{label}: one forward relative diff vs bf16 eager {relative:.2e}")
        dit_stats = ab_medians(variants, device, warmup=args.warmup, repeats=args.repeats)
        for name, stats in dit_stats.items():
            memory = peak_memory(variants[name], device)
            results[name] = {**stats, "peak_gib": memory, "tokens": tokens, "cfg": args.cfg}
            rows.append((name, f"CFG step ({args.cfg}, 2 x {tokens} tokens)", fmt(stats), f"{memory:.1f}"))
        del native, variants
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # -- part 2: the VAE decode ----------------------------------------------------------------
    if not args.skip_vae:
        vae = build_vae(cfg, device, dtype)
        z = torch.randn(latent_shape(cfg), device=device, dtype=dtype, generator=g)

        def decode(tiled: bool):
            def run():
                with torch.inference_mode():
                    return (vae.tiled_decode if tiled else vae.decode)(z, return_dict=False)[0]
            return run

        vae_variants = {"VAE decode": decode(False)}
        if args.vae_tiled:
            vae_variants["VAE decode (tiled)"] = decode(True)
        if args.vae_variants:
            def autotuned():
                torch.backends.cudnn.benchmark = True
                try:
                    return decode(False)()
                finally:
                    torch.backends.cudnn.benchmark = False

            vae32 = build_vae(cfg, device, torch.float32)
            vae32.load_state_dict(vae.state_dict())
            z32 = z.float()

            def decode_fp32():
                with torch.inference_mode():
                    return vae32.decode(z32, return_dict=False)[0]

            vae_variants["VAE decode (cudnn.benchmark)"] = autotuned
            vae_variants["VAE decode (float32)"] = decode_fp32
        if args.vae_compile:
            compiled_vae = build_vae(cfg, device, dtype)
            compiled_vae.load_state_dict(vae.state_dict())
            compiled_vae.decoder.compile()

            def decode_compiled():
                with torch.inference_mode():
                    return compiled_vae.decode(z, return_dict=False)[0]

            with torch.inference_mode():
                reference_frames = decode(False)()
                relative = ((decode_compiled().float() - reference_frames.float()).norm()
                            / reference_frames.float().norm()).item()
            print(f"compiled VAE decoder: relative diff vs eager {relative:.2e}")
            vae_variants["VAE decode (compiled decoder)"] = decode_compiled
        vae_stats = ab_medians(vae_variants, device, warmup=args.warmup, repeats=args.repeats)
        for name, stats in vae_stats.items():
            memory = peak_memory(vae_variants[name], device)
            results[name] = {**stats, "peak_gib": memory}
            rows.append((name, f"{cfg['frames']} frames {cfg['height']}x{cfg['width']}", fmt(stats), f"{memory:.1f}"))

    title = (f"Wan2.1-T2V-1.3B{' (tiny)' if args.tiny else ''} on {device} "
             f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), {dtype}, "
             f"attention {args.attention_backend}, torch {torch.__version__}")
    print_table(title, rows, ("what", "work", f"median of {args.repeats}", "peak GiB"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
