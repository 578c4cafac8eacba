"""The q/k RMS-norm + RoPE alone, per call: plain PyTorch ops, the same ops compiled by Inductor, diffgen's Triton
kernel (eager launch; its tile sizes swept) and the custom op inside a compiled function;
time and effective bandwidth (x read once, the result written once) at the real models' shapes. On CUDA each
variant runs 20 times inside a CUDA graph and a replay is timed: the GPU's time per call, not the host's launch.

    python bench/norm_rope.py            # on CUDA
    python bench/norm_rope.py --tiny     # tiny shapes on the CPU (the plain rows only): checks the script
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import ab_medians, bench_shapes, kernel_bench_setup  # noqa: E402

SHAPES = {  # name: (batch, tokens, heads, head_dim, norm over heads, round before scale)
    "FLUX single block q (4608 tokens)": (1, 4608, 24, 128, False, False),
    "Qwen-Image image q, true CFG (2 x 4096 tokens)": (2, 4096, 24, 128, False, True),
    "FLUX text q (512 tokens)": (1, 512, 24, 128, False, False),
    "Wan2.1-1.3B q 480x832x81 (32760 tokens)": (1, 32760, 12, 128, True, False),
}
TINY = {"tiny per head": (1, 16, 2, 16, False, False), "tiny across heads": (2, 8, 3, 8, True, False)}
TILES = (2048, 8192)  # NORM_ROPE_TILE values tried besides the default


def with_tile(tile: int, fn):
    """``fn`` with the norm + RoPE kernel's tile set to ``tile`` elements per program."""
    from diffgen.layers import fused

    def run():
        default, fused.NORM_ROPE_TILE = fused.NORM_ROPE_TILE, tile
        try:
            return fn()
        finally:
            fused.NORM_ROPE_TILE = default
    return run


GRAPH_CALLS = 20  # calls per CUDA graph replay: the GPU's time per call, without the host's launch latency


def graphed(fn, device: torch.device):
    """On CUDA, ``fn`` called GRAPH_CALLS times inside one CUDA graph (a replay is timed, then divided); ``fn`` as
    it is (one call timed) elsewhere or where the capture fails. Returns (callable, calls per timed call)."""
    from diffgen.engine.cuda_graphs import capture_cuda_graph

    if device.type != "cuda":
        return fn, 1
    try:
        fn()  # compile / autotune outside the capture
        replay, _ = capture_cuda_graph(lambda: [fn() for _ in range(GRAPH_CALLS)], device, None)
        return replay, GRAPH_CALLS
    except Exception as error:  # noqa: BLE001 (the bench goes on with the host-timed call)
        print(f"  (no CUDA graph for this variant: {type(error).__name__}: {error}; one call timed)", flush=True)
        return fn, 1


def bench_shape(name: str, shape: tuple, device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    from diffgen.layers.fused import NORM_ROPE_TILE, rms_norm_rope, rms_norm_rope_op
    from diffgen.layers.norm import RMSNorm
    from diffgen.layers.rope import apply_rope, rope_tables

    torch._dynamo.reset()  # each shape compiled for itself: static shapes, no recompile limit across shapes
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
        for tile in (NORM_ROPE_TILE, *TILES):
            label = f"diffgen Triton kernel, tile {tile}" + (" (the default)" if tile == NORM_ROPE_TILE else "")
            variants[label] = with_tile(tile, lambda: rms_norm_rope(*op_args))
        variants["custom op in a compiled function"] = torch.compile(lambda: rms_norm_rope_op(*op_args))
    with torch.inference_mode():
        expected = plain()
        agreement = {}
        for variant, fn in variants.items():
            got = fn()
            diff = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
            if diff > 1e-2:
                raise AssertionError(f"{name}: {variant} differs from the plain ops by {diff:.2e}")
            agreement[variant] = f"{diff:.1e}, {(got != expected).float().mean().item() * 100:.2f}% differ"
        timed = {variant: graphed(fn, device) for variant, fn in variants.items()}
        stats = ab_medians({variant: call for variant, (call, _) in timed.items()}, device, warmup=2, repeats=repeats)
    nbytes = 2 * x.numel() * x.element_size()
    for variant, s in stats.items():
        seconds = s["median"] / timed[variant][1]
        print(f"| {name} | {variant} | {seconds * 1e6:.1f} | {nbytes / seconds / 1e9:.0f} | {agreement[variant]} |",
              flush=True)


def main() -> None:
    args, device, dtype = kernel_bench_setup(__doc__)
    bench_shapes(args, device, dtype, ("shape", "variant", "median µs per call", "GB/s",
                                       "vs plain ops (relative, elements that differ)"), SHAPES, TINY, bench_shape)


if __name__ == "__main__":
    main()
