"""Timing helpers shared by the bench scripts (device events on CUDA, medians, A/B alternation)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call; CUDA events on GPU, a host clock (after a sync) elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def ab_medians(variants: dict[str, Callable[[], object]], device: torch.device, warmup: int = 2,
               repeats: int = 5) -> dict[str, dict[str, float]]:
    """Warm every variant, then time them alternately; median and spread (min..max) per variant."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(time_call(fn, device))
    return {name: {"median": statistics.median(s), "min": min(s), "max": max(s)} for name, s in samples.items()}


def with_attention(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` under diffgen's attention backend ``backend``, the previous one restored after (a compiled block
    traces the choice; the rows keep it set while they run)."""
    from diffgen.layers.attention import get_attention_backend, set_attention_backend

    def run():
        previous = get_attention_backend()
        set_attention_backend(backend)
        try:
            return fn()
        finally:
            set_attention_backend(previous)
    return run


def random_init_(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Fill every floating parameter with N(0, std) (norm scales with 1) in place, deterministically."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            if p.ndim == 1 and ("norm" in name or name.endswith("scale")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
    return module


def print_header(header: tuple[str, ...]) -> None:
    """A markdown table's header and rule."""
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    print(f"\n## {title}")
    print_header(header)
    for row in rows:
        print("| " + " | ".join(row) + " |")


def profile_one_call(fn: Callable[[], object], device: torch.device):
    """The CUDA profiler over one call of ``fn`` after a warm one (inference mode); its ``key_averages()`` tell which
    kernels ran and for how long."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
    return prof


def kernel_bench_setup(description: str) -> tuple[argparse.Namespace, torch.device, torch.dtype]:
    """The kernel benches' command line (``--tiny``: CPU, float32, to check the script; ``--repeats``), their device
    and dtype (CUDA and bf16 where there is a GPU); prints the card and torch version."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"## {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    return args, device, dtype


def bench_shapes(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, header: tuple[str, ...],
                 shapes: dict, tiny_shapes: dict, bench_shape: Callable) -> None:
    """A kernel bench's table: the header, then ``bench_shape(name, shape, device, dtype, repeats)`` per shape of
    ``shapes`` (``tiny_shapes`` with ``--tiny``), each printing its rows."""
    print_header(header)
    for name, shape in (tiny_shapes if args.tiny else shapes).items():
        bench_shape(name, shape, device, dtype, args.repeats)
