"""The q/k RMS-norm + RoPE alone, per call: plain PyTorch ops, the same ops compiled by Inductor, diffgen's Triton
kernel (eager launch) and the custom op inside a compiled function; time and effective bandwidth (x read once,
the result written once) at the real models' shapes.

    python bench/norm_rope.py            # on CUDA
    python bench/norm_rope.py --tiny     # tiny shapes on the CPU (the plain rows only): checks the script
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # name: (batch, tokens, heads, head_dim, norm over heads, round before scale)
    "FLUX double block image q (4096 tokens)": (1, 4096, 24, 128, False, False),
    "FLUX single block q (4608 tokens)": (1, 4608, 24, 128, False, False),
    "Qwen-Image image q (4096 tokens)": (1, 4096, 24, 128, False, True),
    "Wan2.1-1.3B q 480x832x81 (32760 tokens)": (1, 32760, 12, 128, True, False),
}
TINY = {"tiny per head": (1, 16, 2, 16, False, False), "tiny across heads": (2, 8, 3, 8, True, False)}


def bench_shape(name: str, shape: tuple, device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    from bench.common import ab_medians
    from diffgen.layers.fused import rms_norm_rope, rms_norm_rope_op
    from diffgen.layers.norm import RMSNorm
    from diffgen.layers.rope import apply_rope, rope_tables

    batch, tokens, heads, head_dim, over, rbs = shape
    g = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(batch, tokens, 3 * heads, head_dim, device=device, dtype=dtype, generator=g)
    x = qkv[:, :, :heads]  # q as a view of the fused projection's output
    norm = RMSNorm(heads * head_dim if over else head_dim, 1e-6, round_before_scale=rbs).to(device, dtype)
    norm.requires_grad_(False)
    cos, sin = (t.to(device) for t in rope_tables(torch.randn(tokens, head_dim // 2, device=device)))

    def plain():
        y = norm(x.flatten(2)).unflatten(2, x.shape[2:]) if over else norm(x)
        return apply_rope(y, cos, sin)
    op_args = (x, norm.weight, norm.eps, cos, sin, over, rbs and dtype != torch.float32)
    variants = {"plain PyTorch ops": plain, "plain ops compiled by Inductor": torch.compile(plain)}
    if device.type == "cuda":
        variants["diffgen Triton kernel (eager launch)"] = lambda: rms_norm_rope(*op_args)
        variants["custom op in a compiled function"] = torch.compile(lambda: rms_norm_rope_op(*op_args))
    with torch.inference_mode():
        stats = ab_medians(variants, device, warmup=3, repeats=repeats)
        expected = plain()
        for variant, fn in variants.items():
            diff = ((fn().float() - expected.float()).norm() / expected.float().norm()).item()
            if diff > 1e-2:
                raise AssertionError(f"{name}: {variant} differs from the plain ops by {diff:.2e}")
    nbytes = 2 * x.numel() * x.element_size()
    for variant, s in stats.items():
        print(f"| {name} | {variant} | {s['median'] * 1e6:.1f} | {nbytes / s['median'] / 1e9:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"## {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| shape | variant | median µs | GB/s |\n|---|---|---|---|")
    for name, shape in (TINY if args.tiny else SHAPES).items():
        bench_shape(name, shape, device, dtype, args.repeats)


if __name__ == "__main__":
    main()
