"""Attention alone, per call: cuDNN's kernel through SDPA (diffgen's "cudnn"), FlashAttention-4 (``flash-attn-4``,
diffgen's "fa4") and what "auto" picks inside compiled blocks (serve), at the real models' shapes and at the
lengths between them that set ``diffgen.layers.attention.FA4_MIN_KEYS``; time, TFLOP/s (4·B·H·S²·D) and the
relative error of each against float32 attention where it fits in memory. A/B alternated, CUDA events, medians.

    python bench/attention.py            # on CUDA (the FA4 rows where flash-attn-4 is installed)
    python bench/attention.py --tiny     # tiny shapes on the CPU (SDPA rows only): checks the script
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import ab_medians, bench_shapes, kernel_bench_setup, with_attention  # noqa: E402

SHAPES = {  # name: (batch, tokens, heads, head_dim)
    "FLUX.1 1024² (4608 tokens)": (1, 4608, 24, 128),
    "Qwen-Image 1024², true CFG (2 x 4352)": (2, 4352, 24, 128),
    "8192 tokens, 24 heads": (1, 8192, 24, 128),
    "12288 tokens, 24 heads": (1, 12288, 24, 128),
    "16384 tokens, 24 heads": (1, 16384, 24, 128),
    "16384 tokens, 12 heads": (1, 16384, 12, 128),
    "24576 tokens, 12 heads": (1, 24576, 12, 128),
    "Wan2.1-1.3B 480x832x81 (32760 tokens)": (1, 32760, 12, 128),
    "Wan2.1-14B 720p (75600 tokens, 40 heads)": (1, 75600, 40, 128),
}
TINY = {"tiny": (1, 64, 2, 16), "tiny, two rows": (2, 33, 3, 8)}
EXACT_LIMIT = 2**32  # float32 scores (B·H·S² elements) up to this size are computed for the error column


def bench_shape(name: str, shape: tuple, device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    from diffgen.layers.attention import fa4_attention_op, fa4_installed, prepare_compiled_attention, sdpa
    from diffgen.testing.bounds import float32_attention

    torch._dynamo.reset()  # each shape compiled for itself: static shapes, no recompile limit across shapes
    batch, tokens, heads, head_dim = shape
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=g) for _ in range(3))
    # "auto" (the default backend) as compiled blocks call it (serve's default), decided before the trace as they
    # do; on the CPU through Dynamo alone (no C++ compiler needed)
    prepare_compiled_attention(device)
    compiled = torch.compile(sdpa, backend="inductor" if device.type == "cuda" else "aot_eager")
    variants = {"cuDNN (SDPA)": with_attention("cudnn", lambda: sdpa(q, k, v)),
                "auto, compiled (serve)": lambda: compiled(q, k, v)}
    if device.type == "cuda" and fa4_installed():
        variants["FlashAttention-4"] = lambda: fa4_attention_op(q, k, v, None, False)
    with torch.inference_mode():
        begin = time.perf_counter()
        outputs = {variant: fn() for variant, fn in variants.items()}
        first = time.perf_counter() - begin
        errors = {variant: "" for variant in variants}
        if batch * heads * tokens * tokens <= EXACT_LIMIT:
            exact = float32_attention(q, k, v)
            errors = {variant: f"{((out.float() - exact).norm() / exact.norm()).item():.2e}"
                      for variant, out in outputs.items()}
        stats = ab_medians(variants, device, warmup=3, repeats=repeats)
    flops = 4 * batch * heads * tokens * tokens * head_dim
    cudnn = stats["cuDNN (SDPA)"]["median"]
    for variant, s in stats.items():
        print(f"| {name} | {variant} | {s['median'] * 1e3:.3f} ({s['min'] * 1e3:.3f}..{s['max'] * 1e3:.3f}) | "
              f"{flops / s['median'] / 1e12:.0f} | {cudnn / s['median']:.3f} | {errors[variant]} |", flush=True)
    print(f"  (first calls of the row, FA4's compilation included: {first:.1f} s)", flush=True)


def main() -> None:
    args, device, dtype = kernel_bench_setup(__doc__)
    bench_shapes(args, device, dtype, ("shape", "kernel", "median ms (range)", "TFLOP/s", "speed-up over cuDNN",
                                       "rel. error vs float32"), SHAPES, TINY, bench_shape)


if __name__ == "__main__":
    main()
