"""Qwen-Image DiT on one GPU: one denoising step with true CFG, diffgen vs diffusers, same random bf16 weights.

    python bench/qwen_image.py           # real config (60 layers, 24x128 heads), 1024x1024, 256 text tokens
    python bench/qwen_image.py --tiny    # a tiny config on CPU, to check the script itself

The native model is built on the meta device, cast to bf16 there and only then materialised on
the GPU and filled with random values, so the ~20B parameters are allocated once (~41 GB). The
diffusers model is built on meta too and shares those very tensors. One step = the conditional
and the unconditional forward, the norm-preserving CFG combination and the Euler update, exactly as
the pipeline runs it (``QwenImagePipeline.predict_noise``). Timings: CUDA events, 2 warm-ups, then
variants alternated, median of ``--repeats`` (5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import ab_medians, print_table, random_init_  # noqa: E402

REAL = dict(dit=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
            height=1024, width=1024, text_len=256)
TINY = dict(dit=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                     num_attention_heads=3, joint_attention_dim=32, axes_dims_rope=(8, 4, 4)),
            height=64, width=64, text_len=16)
TRUE_CFG_SCALE = 4.0


def build_native(cfg: dict, device: torch.device, dtype: torch.dtype):
    from diffgen.models.dits.qwen_image import QwenImageConfig, QwenImageTransformer

    with torch.device("meta"):
        model = QwenImageTransformer(QwenImageConfig(**cfg["dit"])).to(dtype)  # dtype set while still free
    model.to_empty(device=device)  # the only allocation
    return random_init_(model).eval().requires_grad_(False)


def build_reference(cfg: dict, native: torch.nn.Module):
    """diffusers' model over the native model's tensors (no second copy of the weights)."""
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    with torch.device("meta"):
        reference = QwenImageTransformer2DModel(**cfg["dit"])
    reference.load_state_dict(native.state_dict(), assign=True, strict=True)
    # Its RoPE tables are plain tensors made in __init__ (meta above): rebuild them for real.
    reference.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(cfg["dit"]["axes_dims_rope"]), scale_rope=True)
    return reference.eval().requires_grad_(False)


def step_inputs(cfg: dict, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator(device).manual_seed(0)
    rows, cols = cfg["height"] // 16, cfg["width"] // 16
    text = dict(size=(1, cfg["text_len"], cfg["dit"]["joint_attention_dim"]), device=device, dtype=dtype, generator=g)
    return dict(latents=torch.randn(1, rows * cols, cfg["dit"]["in_channels"], device=device, dtype=dtype, generator=g),
                prompt=torch.randn(**text), negative=torch.randn(**text), image_shapes=[(1, rows, cols)],
                sigma=0.8, sigma_next=0.78)


def native_step(pipe, state, inputs: dict) -> torch.Tensor:
    """One pipeline step: predict_noise (both CFG branches + combination), then the Euler update."""
    latents = inputs["latents"]
    t = torch.tensor(inputs["sigma"] * 1000, device=latents.device)
    pred = pipe.predict_noise(state, latents, t, 0)
    return latents + (inputs["sigma_next"] - inputs["sigma"]) * pred


def reference_step(reference, inputs: dict) -> torch.Tensor:
    """The same step through diffusers' model, combined as QwenImagePipeline does."""
    latents = inputs["latents"]
    timestep = torch.full((1,), inputs["sigma"], device=latents.device, dtype=latents.dtype)

    def forward(text):
        return reference(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                         encoder_hidden_states_mask=None, img_shapes=[inputs["image_shapes"]], return_dict=False)[0]

    cond, uncond = forward(inputs["prompt"]), forward(inputs["negative"])
    combined = uncond + TRUE_CFG_SCALE * (cond - uncond)
    pred = combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    return latents + (inputs["sigma_next"] - inputs["sigma"]) * pred


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (checks the script)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true", help="time diffgen only")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--compile", action="store_true", help="diffgen with its blocks compiled (--compile)")
    parser.add_argument("--fp8", action="store_true", help="diffgen with FP8 block linears (--quantize fp8)")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()

    from diffgen.engine.request import GenerationRequest
    from diffgen.layers.attention import set_attention_backend
    from diffgen.pipelines.base import PipelineState
    from diffgen.pipelines.qwen_image import QwenImagePipeline

    cfg = TINY if args.tiny else REAL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    set_attention_backend(args.attention_backend)
    native = build_native(cfg, device, dtype)
    inputs = step_inputs(cfg, device, dtype)

    pipe = QwenImagePipeline({"transformer": native}, "random-qwen-image", device, dtype)
    request = GenerationRequest.build("bench", negative_prompt=" ", true_cfg_scale=TRUE_CFG_SCALE,
                                      height=cfg["height"], width=cfg["width"])
    state = PipelineState(request=request, device=device, dtype=dtype, seed=0)
    state.cond = {"encoder_hidden_states": inputs["prompt"], "encoder_hidden_states_mask": None}
    state.uncond = {"encoder_hidden_states": inputs["negative"], "encoder_hidden_states_mask": None}
    state.extras["image_shapes"] = inputs["image_shapes"]

    variants = {"diffgen": lambda: native_step(pipe, state, inputs)}
    with torch.inference_mode():
        if not args.no_reference:
            reference = build_reference(cfg, native)  # before any swap below: it shares the bf16 weights
            variants["diffusers"] = lambda: reference_step(reference, inputs)
    optimized = []
    if args.fp8:
        from diffgen.layers.linear import quantize_linears_fp8

        quantize_linears_fp8(native)
        optimized.append("fp8")
    if args.compile:
        from diffgen.engine.optimize import compile_repeated_blocks

        compile_repeated_blocks(native)
        optimized.append("compile")
    name = "diffgen" + "".join(f"+{o}" for o in optimized)
    variants = {name: variants.pop("diffgen"), **variants}
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "config": {k: v for k, v in cfg.items()}}
    title = (f"Qwen-Image DiT, one step with true CFG (2 forwards), {cfg['height']}x{cfg['width']}, "
             f"{cfg['text_len']} text tokens, {dtype}".replace("torch.", ""))
    with torch.inference_mode():
        if not args.no_reference:
            ours, theirs = variants[name]().float(), variants["diffusers"]().float()
            results["rel_diff"] = ((ours - theirs).norm() / theirs.norm()).item()
            title += f" (rel diff diffgen vs diffusers {results['rel_diff']:.2e})"
        timings = ab_medians(variants, device, warmup=2, repeats=args.repeats)
    results["step"] = timings
    if device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print_table(title, [(name, f"{t['median'] * 1000:.1f}", f"{t['min'] * 1000:.1f}..{t['max'] * 1000:.1f}")
                        for name, t in timings.items()], ("impl", "median ms", "range ms"))
    if "peak_memory_gib" in results:
        print(f"peak GPU memory {results['peak_memory_gib']:.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
