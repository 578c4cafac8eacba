"""HunyuanVideo (1 and 1.5) and FastWan on one GPU, diffgen against diffusers in the same run.

    python bench/hunyuan.py                 # real configs, random bf16 weights, CUDA (about 5 minutes on an H100)
    python bench/hunyuan.py --tiny          # tiny configs on CPU, to check the script itself
    python bench/hunyuan.py --only fastwan  # one part (comma-separated: several); the parts are
                                            # hunyuan15-dit, hunyuan15-vae, hunyuan-dit, hunyuan-vae, fastwan, vsa

Rows (each in its own try/except: a failing row prints its error and the others still run; each row is
printed, and the --json file rewritten, as soon as it is measured):
- hunyuan15-dit: one forward of HunyuanVideo-1.5's DiT (480p_t2v config) at 480x848, 121 frames (49,290 video
  tokens; 32 latent channels, 16x VAE, patch 1) with a 1000-token Qwen2.5-VL text of which 128 are valid, the
  256 ByT5 tokens masked (no quoted text) and, for diffusers, the 729 zero image tokens of its T2V pipeline:
  each side as its pipeline calls it (diffusers packs and masks all 1,985 condition tokens; diffgen drops the
  unused ones and attends without a mask); their relative difference.
- hunyuan15-vae: the tiled decode of diffusers' AutoencoderKLHunyuanVideo15 (what diffgen runs) at that size.
- hunyuan-dit: one forward of HunyuanVideo's DiT at 720x1280, 129 frames (118,800 video tokens + 256 text
  tokens), diffgen's native DiT and diffusers' HunyuanVideoTransformer3DModel over the same tensors; the
  relative difference of their outputs; also diffgen with the text padding dropped, as its pipeline runs it
  (attention without a mask). A forward is ~20-40 s, so one warm-up-free timed call each by default.
- hunyuan-vae: the tiled decode of diffusers' AutoencoderKLHunyuanVideo (what diffgen runs) at that size.
- fastwan: a FastWan2.1-T2V-1.3B request (448x832, 61 frames: 3 DMD steps + VAE decode) through diffgen's
  WanDMDPipeline, against diffusers' WanTransformer3DModel + AutoencoderKLWan running the same DMD steps
  with the same noise (a one-layer text encoder stands in for UMT5-XXL; its time is not compared).
- vsa: whether the ``vsa`` kernel package imports here (FastWan2.1's Video Sparse Attention).
Weights are random (meta-built, allocated once in bf16, filled in place): speed and agreement only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import ab_medians, print_table  # noqa: E402
from bench.wan import REAL as WAN_REAL  # noqa: E402
from bench.wan import TINY as WAN_TINY  # noqa: E402
from bench.wan import build_vae as build_wan_vae  # noqa: E402
from bench.wan import materialize, peak_memory  # noqa: E402

REAL = dict(
    # hunyuanvideo-community/HunyuanVideo transformer/config.json (= diffusers' defaults)
    dit=dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
             num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
             guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
             rope_axes_dim=(16, 56, 56)),
    vae=dict(),  # AutoencoderKLHunyuanVideo's defaults are the released config
    height=720, width=1280, frames=129, text_len=256,
    fastwan=dict(height=448, width=832, frames=61),
)
REAL15 = dict(
    # HunyuanVideo-1.5-Diffusers-480p_t2v transformer config (diffusers' conversion script's "480p_t2v")
    dit=dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
             num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
             text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0,
             rope_axes_dim=(16, 56, 56), target_size=640, task_type="t2v"),
    vae=dict(),  # AutoencoderKLHunyuanVideo15's defaults are the released config (32 channels, 16x, 4x)
    height=480, width=848, frames=121, text_len=1000, text_valid=128, glyph_len=256, image_tokens=729,
)
TINY15 = dict(
    dit=dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
             num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
             rope_axes_dim=(4, 6, 6), target_size=64, task_type="t2v"),
    vae=dict(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1),
    height=48, width=80, frames=9, text_len=16, text_valid=8, glyph_len=8, image_tokens=5,
)
TINY = dict(
    dit=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
             num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
             text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 4, 4)),
    vae=dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
    height=48, width=80, frames=9, text_len=16,
    fastwan=dict(height=48, width=80, frames=9),
)


def fmt(stats: dict) -> str:
    return f"{stats['median'] * 1000:.1f} ms [{stats['min'] * 1000:.1f}..{stats['max'] * 1000:.1f}]"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def hunyuan_dit(cfg: dict, device, dtype, args, rows: list, results: dict) -> None:
    from diffusers import HunyuanVideoTransformer3DModel

    from diffgen.models.dits.hunyuan_video import HunyuanVideoConfig, HunyuanVideoTransformer

    with torch.device("meta"):
        native = HunyuanVideoTransformer(HunyuanVideoConfig(**cfg["dit"]))
        reference = HunyuanVideoTransformer3DModel(**cfg["dit"])
    native = materialize(native, device, dtype)
    reference.load_state_dict(native.state_dict(), assign=True)  # the same tensors
    reference.eval().requires_grad_(False)
    g = torch.Generator(device).manual_seed(0)
    d = cfg["dit"]
    latents = torch.randn(1, d["in_channels"], (cfg["frames"] - 1) // 4 + 1, cfg["height"] // 8, cfg["width"] // 8,
                          device=device, dtype=dtype, generator=g)
    text = torch.randn(1, cfg["text_len"], d["text_embed_dim"], device=device, dtype=dtype, generator=g)
    mask = torch.ones(1, cfg["text_len"], device=device, dtype=dtype)
    mask[:, cfg["text_len"] // 2:] = 0  # half the text is padding, as with a short prompt
    pooled = torch.randn(1, d["pooled_projection_dim"], device=device, dtype=dtype, generator=g)
    timestep = torch.tensor([900.0], device=device)
    guidance = torch.tensor([6.0], device=device, dtype=dtype) * 1000
    tokens = latents.shape[2] * (latents.shape[3] // 2) * (latents.shape[4] // 2)

    def ours():
        with torch.inference_mode():
            return native(latents, timestep, text, mask, pooled, guidance)

    def theirs():
        with torch.inference_mode():
            return reference(latents, timestep, text, mask, pooled, guidance, return_dict=False)[0]

    valid = cfg["text_len"] // 2

    def ours_unpadded():  # what diffgen's pipeline runs: the shared padding dropped, attention without a mask
        with torch.inference_mode():
            return native(latents, timestep, text[:, :valid], mask[:, :valid], pooled, guidance)

    with torch.inference_mode():
        diff = relative(ours(), theirs())
        diff_unpadded = relative(ours_unpadded(), theirs())
    results["hunyuan_dit_relative_diff"] = diff
    results["hunyuan_dit_unpadded_relative_diff"] = diff_unpadded
    print(f"HunyuanVideo DiT: diffgen vs diffusers relative diff {diff:.2e}, padding dropped {diff_unpadded:.2e} "
          f"({dtype})", flush=True)
    variants = {"diffgen": ours, "diffgen, padding dropped": ours_unpadded, "diffusers": theirs}
    stats = ab_medians(variants, device, warmup=args.dit_warmup, repeats=args.dit_repeats)
    for name, fn in variants.items():
        memory = peak_memory(fn, device) if args.memory else float("nan")
        results[f"hunyuan_dit_{name}"] = {**stats[name], "peak_gib": memory, "tokens": tokens}
        rows.append((f"HunyuanVideo DiT forward, {name}",
                     f"{cfg['height']}x{cfg['width']}x{cfg['frames']} ({tokens} + {cfg['text_len']} tokens)",
                     fmt(stats[name]), f"{memory:.1f}"))


def hunyuan_vae(cfg: dict, device, dtype, args, rows: list, results: dict) -> None:
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.device("meta"):
        vae = AutoencoderKLHunyuanVideo(**cfg["vae"])
    vae = materialize(vae, device, dtype)
    vae.use_tiling = True  # what diffgen's HunyuanVideoPipeline does
    g = torch.Generator(device).manual_seed(0)
    z = torch.randn(1, vae.config.latent_channels, (cfg["frames"] - 1) // 4 + 1, cfg["height"] // 8,
                    cfg["width"] // 8, device=device, dtype=dtype, generator=g)

    def decode():
        with torch.inference_mode():
            return vae.decode(z, return_dict=False)[0]

    stats = ab_medians({"decode": decode}, device, warmup=args.vae_warmup, repeats=args.vae_repeats)["decode"]
    memory = peak_memory(decode, device) if args.memory else float("nan")
    results["hunyuan_vae_tiled_decode"] = {**stats, "peak_gib": memory}
    rows.append(("HunyuanVideo VAE decode (tiled)", f"{cfg['frames']} frames {cfg['height']}x{cfg['width']}",
                 fmt(stats), f"{memory:.1f}"))


def hunyuan15_dit(cfg: dict, device, dtype, args, rows: list, results: dict) -> None:
    from diffusers import HunyuanVideo15Transformer3DModel

    from diffgen.models.dits.hunyuan_video15 import HunyuanVideo15Config, HunyuanVideo15Transformer

    cfg = TINY15 if args.tiny else REAL15
    with torch.device("meta"):
        native = HunyuanVideo15Transformer(HunyuanVideo15Config(**cfg["dit"]))
        reference = HunyuanVideo15Transformer3DModel(**cfg["dit"])
    native = materialize(native, device, dtype)
    reference.load_state_dict(native.state_dict(), assign=True)  # the same tensors
    reference.eval().requires_grad_(False)
    g = torch.Generator(device).manual_seed(0)
    d = cfg["dit"]
    latents = torch.randn(1, d["in_channels"], (cfg["frames"] - 1) // 4 + 1, cfg["height"] // 16, cfg["width"] // 16,
                          device=device, dtype=dtype, generator=g)
    latents[:, d["out_channels"]:] = 0  # T2V: no condition latent, mask 0
    text = torch.randn(1, cfg["text_len"], d["text_embed_dim"], device=device, dtype=dtype, generator=g)
    mask = torch.zeros(1, cfg["text_len"], device=device, dtype=dtype)
    mask[:, :cfg["text_valid"]] = 1
    glyphs = torch.zeros(1, cfg["glyph_len"], d["text_embed_2_dim"], device=device, dtype=dtype)
    glyph_mask = torch.zeros(1, cfg["glyph_len"], device=device, dtype=dtype)
    image = torch.zeros(1, cfg["image_tokens"], d["image_embed_dim"], device=device, dtype=dtype)
    timestep = torch.tensor([900.0], device=device, dtype=dtype)
    tokens = latents.shape[2] * latents.shape[3] * latents.shape[4]

    def ours():  # as diffgen's pipeline calls it: the padding of the text already dropped, no image tokens
        with torch.inference_mode():
            valid = cfg["text_valid"]
            return native(latents, timestep, text[:, :valid], mask[:, :valid], glyphs, glyph_mask)

    def theirs():
        with torch.inference_mode():
            return reference(latents, timestep, text, mask, encoder_hidden_states_2=glyphs,
                             encoder_attention_mask_2=glyph_mask, image_embeds=image, return_dict=False)[0]

    with torch.inference_mode():
        diff = relative(ours(), theirs())
    results["hunyuan15_dit_relative_diff"] = diff
    print(f"HunyuanVideo-1.5 DiT: diffgen vs diffusers relative diff {diff:.2e} ({dtype})", flush=True)
    variants = {"diffgen": ours, "diffusers": theirs}
    stats = ab_medians(variants, device, warmup=args.dit_warmup, repeats=args.dit_repeats)
    for name, fn in variants.items():
        memory = peak_memory(fn, device) if args.memory else float("nan")
        results[f"hunyuan15_dit_{name}"] = {**stats[name], "peak_gib": memory, "tokens": tokens}
        rows.append((f"HunyuanVideo-1.5 DiT forward, {name}",
                     f"{cfg['height']}x{cfg['width']}x{cfg['frames']} ({tokens} + {cfg['text_valid']} tokens)",
                     fmt(stats[name]), f"{memory:.1f}"))


def hunyuan15_vae(cfg: dict, device, dtype, args, rows: list, results: dict) -> None:
    from diffusers import AutoencoderKLHunyuanVideo15

    cfg = TINY15 if args.tiny else REAL15
    with torch.device("meta"):
        vae = AutoencoderKLHunyuanVideo15(**cfg["vae"])
    vae = materialize(vae, device, dtype)
    vae.use_tiling = True  # what diffgen's HunyuanVideo15Pipeline does
    g = torch.Generator(device).manual_seed(0)
    z = torch.randn(1, vae.config.latent_channels, (cfg["frames"] - 1) // 4 + 1, cfg["height"] // 16,
                    cfg["width"] // 16, device=device, dtype=dtype, generator=g)

    def decode():
        with torch.inference_mode():
            return vae.decode(z, return_dict=False)[0]

    stats = ab_medians({"decode": decode}, device, warmup=args.vae_warmup, repeats=args.vae_repeats)["decode"]
    memory = peak_memory(decode, device) if args.memory else float("nan")
    results["hunyuan15_vae_tiled_decode"] = {**stats, "peak_gib": memory}
    rows.append(("HunyuanVideo-1.5 VAE decode (tiled)", f"{cfg['frames']} frames {cfg['height']}x{cfg['width']}",
                 fmt(stats), f"{memory:.1f}"))


def fastwan(cfg: dict, device, dtype, args, rows: list, results: dict) -> None:
    """diffgen's WanDMDPipeline request vs the same DMD steps over diffusers' modules (shared tensors)."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from diffgen.configs.wan import FASTWAN_DMD_TIMESTEPS
    from diffgen.engine.request import GenerationRequest
    from diffgen.models.dits.wan import WanConfig, WanTransformer
    from diffgen.pipelines.fastwan import WanDMDPipeline
    from diffgen.testing.tokenizers import t5_tokenizer

    wan = WAN_TINY if args.tiny else WAN_REAL
    with torch.device("meta"):
        native = WanTransformer(WanConfig(**wan["dit"]))
        reference = WanTransformer3DModel(**wan["dit"])
    native = materialize(native, device, dtype, WanTransformer.keep_in_fp32_modules)
    reference.load_state_dict(native.state_dict(), assign=True)
    with torch.device(device):
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        reference.rope = WanRotaryPosEmbed(wan["dit"]["attention_head_dim"], wan["dit"]["patch_size"],
                                           wan["dit"]["rope_max_seq_len"])
    reference.eval().requires_grad_(False)
    vae = build_wan_vae(wan, device, dtype)
    text_dim = wan["dit"]["text_dim"]
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=256, d_model=text_dim, d_kv=64, d_ff=256, num_layers=1,
                                               num_heads=text_dim // 64 or 1, relative_attention_num_buckets=8,
                                               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    text_encoder = text_encoder.to(device, dtype).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    pipe = WanDMDPipeline({"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder,
                           "tokenizer": t5_tokenizer(), "transformer": native, "transformer_2": None},
                          "FastWan2.1-T2V-1.3B (random weights)", device, dtype, settings={})
    f = cfg["fastwan"]
    request = GenerationRequest.build("A curious raccoon", height=f["height"], width=f["width"], num_frames=f["frames"],
                                      seed=0, return_tensors=True)

    def ours():
        return pipe.run(request)

    text = pipe._encode(["A curious raccoon"], 512, 1)
    sigmas = [t / 1000 for t in FASTWAN_DMD_TIMESTEPS] + [0.0]

    def theirs():
        with torch.inference_mode():
            generator = torch.Generator("cpu").manual_seed(0)
            shape = (1, vae.config.z_dim, (f["frames"] - 1) // 4 + 1, f["height"] // 8, f["width"] // 8)
            x = torch.randn(shape, generator=generator).to(device)
            for i, t in enumerate(FASTWAN_DMD_TIMESTEPS):
                timestep = torch.full((1,), float(t), device=device)
                velocity = reference(x.to(dtype), timestep, text, return_dict=False)[0]
                clean = x - sigmas[i] * velocity.float()
                x = clean if sigmas[i + 1] == 0 else (
                    (1 - sigmas[i + 1]) * clean + sigmas[i + 1] * torch.randn(shape, generator=generator).to(device))
            mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1).to(dtype)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1).to(dtype)
            video = vae.decode(x.to(dtype) / inv_std + mean, return_dict=False)[0]
            return x, video

    result = ours()
    ref_latents, ref_video = theirs()
    diff = relative(result.latents.to(device), ref_latents)
    results["fastwan_latents_relative_diff"] = diff
    print(f"FastWan: diffgen request vs diffusers DMD loop, latents relative diff {diff:.2e}", flush=True)
    stats = ab_medians({"diffgen": ours, "diffusers": theirs}, device, warmup=1, repeats=args.fastwan_repeats)
    timings = result.timings
    results["fastwan_diffgen_stage_seconds"] = timings
    for name in ("diffgen", "diffusers"):
        results[f"fastwan_{name}"] = stats[name]
        work = (f"{f['height']}x{f['width']}x{f['frames']}, 3 steps + decode"
                + (" (whole request)" if name == "diffgen" else " (DMD loop + decode)"))
        rows.append((f"FastWan2.1 request, {name}", work, fmt(stats[name]), "-"))
    print(f"diffgen stages (s): {json.dumps({k: round(v, 3) for k, v in timings.items()})}", flush=True)


def vsa(cfg: dict, device, dtype, args, rows: list, results: dict) -> None:
    try:
        import vsa as vsa_module  # noqa: F401
        status = f"imports ({getattr(vsa_module, '__file__', '?')})"
    except Exception as e:  # ImportError, or an undefined libtorch symbol of a wheel built for another torch
        status = f"does not import: {type(e).__name__}: {str(e)[:200]}"
    results["vsa"] = status
    rows.append(("vsa (Video Sparse Attention kernel)", f"torch {torch.__version__}", status, "-"))


PARTS = {"hunyuan15-dit": hunyuan15_dit, "hunyuan15-vae": hunyuan15_vae, "hunyuan-dit": hunyuan_dit,
         "hunyuan-vae": hunyuan_vae, "fastwan": fastwan, "vsa": vsa}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (checks the script)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--only", help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--dit-warmup", type=int, default=0)
    parser.add_argument("--dit-repeats", type=int, default=1)
    parser.add_argument("--vae-warmup", type=int, default=0)
    parser.add_argument("--vae-repeats", type=int, default=1)
    parser.add_argument("--fastwan-repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="one more call per row to record peak memory")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    from diffgen.layers.attention import set_attention_backend

    cfg = TINY if args.tiny else REAL
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = torch.float32 if args.tiny else torch.bfloat16
    set_attention_backend(args.attention_backend)
    rows: list = []
    results: dict = {}
    title = (f"HunyuanVideo / FastWan{' (tiny)' if args.tiny else ''} on {device} "
             f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), {dtype}, "
             f"attention {args.attention_backend}, torch {torch.__version__}")
    names = args.only.split(",") if args.only else list(PARTS)
    unknown = [name for name in names if name not in PARTS]
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    for name in names:
        start = time.perf_counter()
        measured = len(rows)
        try:
            PARTS[name](cfg, device, dtype, args, rows, results)
        except Exception as e:
            traceback.print_exc()
            rows.append((name, "failed", f"{type(e).__name__}: {str(e)[:160]}", "-"))
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        for row in rows[measured:]:  # at once: a run cut short by its time limit keeps what it measured
            print("ROW " + " | ".join(row), flush=True)
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"title": title, "results": results}, f, indent=1, default=str)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(title, rows, ("what", "work", "median", "peak GiB"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
