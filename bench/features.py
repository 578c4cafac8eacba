"""Layerwise offload and step caching on one GPU (H100/H200), random bf16 weights at the real configs.

    python bench/features.py                  # every row (~5-6 minutes on an H200)
    python bench/features.py --only offload   # the offload rows; --only cache for the step-cache rows
    python bench/features.py --tiny           # tiny configs on CPU: checks the script itself

Offload rows: one DiT forward, plain (all weights on the GPU) against ``--offload layerwise``
(blocks streamed from pinned CPU memory, prefetch 1), with peak memory from
``torch.cuda.max_memory_allocated`` (the DiT phase of a request: the text encoders are offloaded
then). Targets: Wan2.1-14B 480x832x81 under 24 GB at <= 1.3x the plain time; FLUX.1-dev 1024²
under 16 GB.

Step-cache rows: a whole denoising loop of the DiT alone (random text embeddings, Euler flow
steps, CFG where the model uses it) uncached and with each method at its published default
threshold; speed-up of the loop and relative error ||cached - uncached|| / ||uncached|| of the
final latents. RANDOM WEIGHTS SAY NOTHING ABOUT PICTURE QUALITY: with trained weights the residuals
change differently from step to step, so both the reuse rate and the error will differ.

Every row runs in its own try/except: a failure prints and the next row runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import print_table, random_init_  # noqa: E402

WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, eps=1e-6)
WAN_1_3B = dict(WAN_14B, num_attention_heads=12, ffn_dim=8960, num_layers=30)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
TINY = {
    "wan": dict(WAN_14B, num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=32, num_layers=3),
    "flux": dict(FLUX_DEV, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
    "qwen": dict(QWEN_IMAGE, num_layers=3, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=32,
                 axes_dims_rope=(8, 4, 4)),
}


def build(kind: str, cfg: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A native DiT with random weights, allocated once on ``device``."""
    if kind == "wan":
        from diffgen.models.dits.wan import WanConfig as Config
        from diffgen.models.dits.wan import WanTransformer as Model
    elif kind == "flux":
        from diffgen.models.dits.flux import FluxConfig as Config
        from diffgen.models.dits.flux import FluxTransformer as Model
    else:
        from diffgen.models.dits.qwen_image import QwenImageConfig as Config
        from diffgen.models.dits.qwen_image import QwenImageTransformer as Model
    with torch.device("meta"):
        model = Model(Config(**cfg)).to(dtype)
    keep = set(getattr(Model, "keep_in_fp32_modules", ()))
    for name, param in model.named_parameters():
        if set(name.split(".")) & keep:
            param.data = param.data.float()
    return random_init_(model.to_empty(device=device)).eval().requires_grad_(False)


def inputs(kind: str, cfg: dict, size: tuple[int, int, int], text_len: int, device, dtype, seed: int = 0) -> dict:
    """Keyword arguments of one forward (``timestep`` filled per step), for a (frames, height, width) output."""
    g = torch.Generator(device).manual_seed(seed)
    frames, height, width = size

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    if kind == "wan":
        return dict(hidden_states=randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8),
                    encoder_hidden_states=randn(1, text_len, cfg["text_dim"]))
    rows, cols = height // 16, width // 16
    if kind == "flux":
        ids = torch.stack([torch.zeros(rows * cols), torch.arange(rows * cols) // cols,
                           torch.arange(rows * cols) % cols], -1).to(device)
        return dict(hidden_states=randn(1, rows * cols, 64),
                    encoder_hidden_states=randn(1, text_len, cfg["joint_attention_dim"]),
                    pooled_projections=randn(1, cfg["pooled_projection_dim"]), img_ids=ids,
                    txt_ids=torch.zeros(text_len, 3, device=device), guidance=torch.tensor([3.5], device=device))
    return dict(hidden_states=randn(1, rows * cols, 64), encoder_hidden_states=randn(1, text_len,
                cfg["joint_attention_dim"]), image_shapes=[(1, rows, cols)])


def timestep(kind: str, sigma: float, device) -> torch.Tensor:
    return torch.tensor([sigma * 1000 if kind == "wan" else sigma], device=device)


def timed(fn, device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak GiB) over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return sorted(times)[len(times) // 2], peak


def offload_row(name: str, kind: str, cfg: dict, size, text_len: int, device, dtype, repeats: int,
                target_gib: float) -> list[tuple[str, ...]]:
    from diffgen.engine.offload import LayerwiseOffloader
    from diffgen.layers.block_loop import attach_offloader

    model = build(kind, cfg, device, dtype)
    kwargs = inputs(kind, cfg, size, text_len, device, dtype)
    t = timestep(kind, 0.5, device)

    def forward():
        with torch.inference_mode():
            model(timestep=t, **kwargs)

    plain_s, plain_gib = timed(forward, device, repeats)
    LayerwiseOffloader(model, device, prefetch=1)  # moves the blocks to (pinned) CPU memory; attaches itself
    if device.type == "cuda":
        torch.cuda.empty_cache()
    offload_s, offload_gib = timed(forward, device, repeats)
    attach_offloader(model, None)  # the model and its pinned copies go when this row returns
    ok = "yes" if offload_gib < target_gib else "NO"
    return [(name, "plain", f"{plain_s * 1000:.0f}", f"{plain_gib:.1f}", "", ""),
            (name, "layerwise", f"{offload_s * 1000:.0f}", f"{offload_gib:.1f}", f"{offload_s / plain_s:.2f}x",
             f"< {target_gib:g} GB: {ok}")]


def denoise(model, kind: str, cond: dict, uncond: dict | None, guidance: float, steps: int, device,
            cache_config=None) -> tuple[torch.Tensor, float, dict]:
    """An Euler flow-matching loop over the DiT alone; returns final latents, seconds and cache counts."""
    from diffgen.engine.step_cache import StepCacheSession
    from diffgen.layers.block_loop import active_block_hook

    latents = cond["hidden_states"].clone()
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]
    session = StepCacheSession(cache_config, steps) if cache_config is not None else None
    token = active_block_hook.set(session)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for i in range(steps):
                if session is not None:
                    session.begin_step(i)
                t = timestep(kind, sigmas[i], device)
                pred = model(**{**cond, "hidden_states": latents}, timestep=t).float()
                if uncond is not None:
                    neg = model(**{**uncond, "hidden_states": latents}, timestep=t).float()
                    pred = neg + guidance * (pred - neg)
                latents = (latents.float() + (sigmas[i + 1] - sigmas[i]) * pred).to(latents.dtype)
    finally:
        active_block_hook.reset(token)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return latents, time.perf_counter() - start, session.timings() if session else {}


def cache_rows(name: str, kind: str, model_name: str, cfg: dict, size, text_len: int, steps: int, guidance: float,
               device, dtype, methods: tuple[str, ...]) -> list[tuple[str, ...]]:
    from diffgen.engine.step_cache import StepCacheConfig, resolve_step_cache

    model = build(kind, cfg, device, dtype)
    cond = inputs(kind, cfg, size, text_len, device, dtype, seed=0)
    uncond = None
    if guidance > 1:
        uncond = dict(cond, encoder_hidden_states=inputs(kind, cfg, size, text_len, device, dtype,
                                                         seed=1)["encoder_hidden_states"])
    denoise(model, kind, cond, uncond, guidance, 2, device)  # warm-up: kernels chosen, memory allocated
    reference, plain_s, _ = denoise(model, kind, cond, uncond, guidance, steps, device)
    rows = [(name, "none", "", f"{plain_s:.2f}", "1.00x", "0", f"{steps * (2 if uncond else 1)}/0")]
    inner_dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    for method in methods:
        try:
            config = resolve_step_cache(StepCacheConfig(method), None, None, model_name, inner_dim)
            latents, seconds, counts = denoise(model, kind, cond, uncond, guidance, steps, device, config)
            error = ((latents.float() - reference.float()).norm() / reference.float().norm()).item()
            rows.append((name, method, f"{config.threshold:g}", f"{seconds:.2f}", f"{plain_s / seconds:.2f}x",
                         f"{error:.4f}", f"{int(counts['cache_forwards_computed'])}/"
                         f"{int(counts['cache_forwards_reused'])}"))
        except Exception as e:  # one method's failure leaves the others
            traceback.print_exc()
            rows.append((name, method, "", "failed", "", str(e)[:60], ""))
    return rows


def free_memory(device: torch.device) -> None:
    """Drop the previous row's model (a failed row's traceback may hold it) before the next one builds."""
    sys.last_traceback = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (checks the script)")
    parser.add_argument("--only", choices=["offload", "cache"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wan-steps", type=int, default=50, help="steps of the Wan2.1-1.3B cache rows")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        wan14, flux, wan13, qwen = TINY["wan"], TINY["flux"], TINY["wan"], TINY["qwen"]
        video, image, text_len = (9, 32, 48), (1, 64, 64), 16
    else:
        wan14, flux, wan13, qwen = WAN_14B, FLUX_DEV, WAN_1_3B, QWEN_IMAGE
        video, image, text_len = (81, 480, 832), (1, 1024, 1024), 512
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {gpu}, torch {torch.__version__}")
    print("RANDOM WEIGHTS: speed and memory only; the step-cache errors say nothing about picture quality.")

    if args.only in (None, "offload"):
        rows: list[tuple[str, ...]] = []
        for name, kind, cfg, size, length, target in (
                ("Wan2.1-14B 480x832x81", "wan", wan14, video, text_len, 24),
                ("FLUX.1-dev 1024²", "flux", flux, image, text_len, 16)):
            try:
                rows += offload_row(name, kind, cfg, size, length, device, dtype, args.repeats, target)
            except Exception as e:
                traceback.print_exc()
                rows.append((name, "failed", "", "", "", str(e)[:80]))
            free_memory(device)
        print_table("layerwise offload: one DiT forward", rows,
                    ("model", "offload", "ms / forward", "peak GiB", "vs plain", "target"))

    if args.only in (None, "cache"):
        rows = []
        for name, kind, model_name, cfg, size, tokens, steps, guidance, methods in (
                ("FLUX.1-dev 1024², 28 steps", "flux", "FLUX.1-dev", flux, image, text_len, 28, 1.0,
                 ("first-block", "teacache")),
                (f"Wan2.1-1.3B 480x832x81, {args.wan_steps} steps, CFG", "wan", "Wan2.1-T2V", wan13, video, text_len,
                 args.wan_steps, 5.0, ("first-block", "teacache")),
                ("Qwen-Image 1024², 50 steps, CFG", "qwen", "Qwen-Image", qwen, image,
                 text_len if args.tiny else 256, 50, 4.0, ("first-block",))):
            if args.tiny:
                steps = min(steps, 6)
            try:
                rows += cache_rows(name, kind, model_name, cfg, size, tokens, steps, guidance, device, dtype, methods)
            except Exception as e:
                traceback.print_exc()
                rows.append((name, "failed", "", "", "", str(e)[:80], ""))
            free_memory(device)
        print_table("step cache at the published default thresholds (random weights!)", rows,
                    ("run", "cache", "threshold", "seconds", "speed-up", "rel. error of final latents",
                     "forwards computed/reused"))


if __name__ == "__main__":
    main()
