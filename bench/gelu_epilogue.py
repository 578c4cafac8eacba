"""The tanh-GELU MLP input at the real models' shapes: addmm then GELU (the plain eager path) against cuBLASLt's
bias + GELU epilogue (``diffgen.layers.linear.linear_gelu``); and FLUX's single-block projections (q/k/v, MLP
input, GELU, concatenation, output projection) in the layouts diffgen can run.

    python bench/gelu_epilogue.py            # on CUDA, bf16
    python bench/gelu_epilogue.py --tiny     # tiny shapes on the CPU (plain paths only): checks the script
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import ab_medians, bench_shapes, kernel_bench_setup, profile_one_call  # noqa: E402

SHAPES = {  # name: (tokens, in features, out features)
    "FLUX double block image MLP in": (4096, 3072, 12288),
    "FLUX double block text MLP in": (512, 3072, 12288),
    "FLUX single block MLP in": (4608, 3072, 12288),
    "Qwen-Image text MLP in": (256, 3072, 12288),
    "Wan2.1-1.3B FFN in (480x832x81)": (32760, 1536, 8960),
}
TINY = {"tiny": (40, 16, 64)}
FLUX_SINGLE = dict(real=(4608, 3072, 12288), tiny=(40, 16, 64))  # tokens, dim, mlp dim


def _median_rows(title: str, variants: dict, device: torch.device, repeats: int, work: dict | None = None) -> dict:

    with torch.inference_mode():
        stats = ab_medians(variants, device, warmup=3, repeats=repeats)
    for variant, s in stats.items():
        extra = f" | {work[variant] / s['median'] / 1e12:.0f}" if work and variant in work else " |"
        print(f"| {title} | {variant} | {s['median'] * 1e6:.1f} | {s['min'] * 1e6:.1f}..{s['max'] * 1e6:.1f}"
              f"{extra} |", flush=True)
    return stats


def _kernel_names(fn, device: torch.device) -> list[str]:
    """The GPU kernels one call launches (does the epilogue path run a separate GELU kernel?)."""
    if device.type != "cuda":
        return []
    prof = profile_one_call(fn, device)
    return [event.key[:80] for event in prof.key_averages() if (getattr(event, "device_time_total", 0) or 0) > 0]


def bench_mlp_in(name: str, shape: tuple, device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    from diffgen.layers.linear import _addmm_gelu, linear_gelu
    from diffgen.testing.bounds import gelu_epilogue_bound

    tokens, k, n = shape
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, tokens, k, device=device, dtype=dtype, generator=g)
    linear = torch.nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
    linear.weight.normal_(0, k**-0.5, generator=g)
    linear.bias.normal_(0, 0.5, generator=g)
    plain = lambda: F.gelu(linear(x), approximate="tanh")  # noqa: E731
    variants = {"addmm alone (no GELU)": lambda: linear(x), "addmm + GELU kernel (plain eager)": plain}
    if device.type == "cuda":
        variants["cuBLASLt bias + GELU epilogue"] = lambda: _addmm_gelu(x, linear.weight, linear.bias)
    stats = _median_rows(name, variants, device, repeats, work={v: 2 * tokens * k * n for v in variants})
    with torch.inference_mode():
        z = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        exact = F.gelu(z, approximate="tanh")
        for variant in list(variants)[1:]:
            got = variants[variant]().float()
            print(f"  {name}: {variant}: relative error vs float32 {(got - exact).norm() / exact.norm():.3e}, "
                  f"max abs {(got - exact).abs().max():.3e}", flush=True)
        if device.type == "cuda":
            epilogue, reference = variants["cuBLASLt bias + GELU epilogue"]().float(), plain().float()
            bound = gelu_epilogue_bound(x, linear.weight, linear.bias, z, epilogue, reference)
            print(f"  {name}: epilogue vs plain: max |diff| / the GPU test's bound "
                  f"{((epilogue - reference).abs() / bound).max():.3f}",
                  flush=True)
            print(f"  {name}: kernels of linear_gelu: {_kernel_names(lambda: linear_gelu(linear, x), device)}",
                  flush=True)
    saved = stats["addmm + GELU kernel (plain eager)"]["median"] - stats.get("cuBLASLt bias + GELU epilogue",
                                                                              {"median": float("nan")})["median"]
    print(f"  {name}: epilogue saves {saved * 1e6:.1f} µs per call against the plain eager path", flush=True)


def which_gelu(device: torch.device) -> None:
    """In float32 (TF32 off), which GELU does the epilogue apply: the tanh approximation or the exact one?"""
    if device.type != "cuda":
        return
    from diffgen.layers.linear import _addmm_gelu

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        g = torch.Generator(device).manual_seed(1)
        x = torch.randn(256, 512, device=device, generator=g)
        w = torch.randn(1024, 512, device=device, generator=g) / 8
        b = torch.randn(1024, device=device, generator=g)
        with torch.inference_mode():
            got, z = _addmm_gelu(x, w, b), F.linear(x, w, b)
        for approximate in ("tanh", "none"):
            print(f"float32 epilogue vs gelu(approximate={approximate!r}): max abs diff "
                  f"{(got - F.gelu(z, approximate=approximate)).abs().max():.3e}", flush=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def bench_flux_single(device: torch.device, dtype: torch.dtype, repeats: int, tiny: bool) -> None:
    """A FLUX single block without its attention (the attention output stands in as a random tensor): how to get
    q/k/v and the MLP activations from h, and how to project [attention, MLP] back."""
    from diffgen.layers import fused
    from diffgen.layers.linear import fuse_linears, linear_gelu, linear_of_concat

    tokens, dim, mlp_dim = FLUX_SINGLE["tiny" if tiny else "real"]
    g = torch.Generator(device).manual_seed(2)

    def linear(k, n):
        layer = torch.nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
        layer.weight.normal_(0, k**-0.5, generator=g)
        layer.bias.normal_(0, 0.5, generator=g)
        return layer
    to_q, to_k, to_v, proj_mlp, proj_out = (linear(dim, dim), linear(dim, dim), linear(dim, dim),
                                            linear(dim, mlp_dim), linear(dim + mlp_dim, dim))
    to_qkv, to_qkv_mlp = fuse_linears(to_q, to_k, to_v), fuse_linears(to_q, to_k, to_v, proj_mlp)
    h = torch.randn(1, tokens, dim, device=device, dtype=dtype, generator=g)
    attn = torch.randn(1, tokens, dim, device=device, dtype=dtype, generator=g)

    def separate(epilogue: bool, split: bool):
        def run():
            q, k, v = to_q(h), to_k(h), to_v(h)
            mlp = linear_gelu(proj_mlp, h) if epilogue else F.gelu(proj_mlp(h), approximate="tanh")
            out = linear_of_concat(proj_out, [attn, mlp]) if split else proj_out(torch.cat([attn, mlp], -1))
            return out, q, k, v
        return run

    def qkv_fused(epilogue: bool, split: bool):
        def run():
            q, k, v = to_qkv(h).split([dim] * 3, dim=-1)
            mlp = linear_gelu(proj_mlp, h) if epilogue else F.gelu(proj_mlp(h), approximate="tanh")
            out = linear_of_concat(proj_out, [attn, mlp]) if split else proj_out(torch.cat([attn, mlp], -1))
            return out, q, k, v
        return run

    def all_fused():
        q, k, v, mlp = to_qkv_mlp(h).split([dim, dim, dim, mlp_dim], dim=-1)
        return proj_out(torch.cat([attn, F.gelu(mlp, approximate="tanh")], -1)), q, k, v

    variants = {
        "separate q/k/v + MLP in, GELU kernel, cat, proj_out (default before)": separate(False, False),
        "(a) one q/k/v+MLP matmul, GELU on its slice, cat, proj_out (DIFFGEN_FUSE_PROJECTIONS=1)": all_fused,
        "separate q/k/v, MLP in with the GELU epilogue, cat, proj_out": separate(True, False),
        "(b) one q/k/v matmul, MLP in with the GELU epilogue, cat, proj_out": qkv_fused(True, False),
        "separate q/k/v, GELU epilogue, proj_out as two matmuls (c), no cat (default now)": separate(True, True),
        "(b)+(c) one q/k/v matmul, GELU epilogue, proj_out as two matmuls, no cat": qkv_fused(True, True),
    }
    fused.set_fused_kernels(True if device.type == "cuda" else None)
    try:
        _median_rows(f"FLUX single block without attention, {tokens} tokens", variants, device, repeats)
        with torch.inference_mode():
            expected = variants["separate q/k/v + MLP in, GELU kernel, cat, proj_out (default before)"]()[0].float()
            for variant, fn in variants.items():
                diff = (fn()[0].float() - expected).norm() / expected.norm()
                print(f"  {variant}: relative diff vs the default before {diff:.2e}", flush=True)
    finally:
        fused.set_fused_kernels(None)


def main() -> None:
    args, device, dtype = kernel_bench_setup(__doc__)
    which_gelu(device)
    bench_shapes(args, device, dtype, ("shape", "variant", "median µs", "range", "TFLOP/s"), SHAPES, TINY,
                 bench_mlp_in)
    bench_flux_single(device, dtype, args.repeats, args.tiny)


if __name__ == "__main__":
    main()
