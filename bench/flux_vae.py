"""FLUX's VAE and sampler, diffgen's own vs diffusers': decode time at 1024², agreement, and the import seconds a
one-shot process saves by not importing diffusers.

    python bench/flux_vae.py                  # GPU: FLUX.1-dev VAE config, random bf16 weights, 1024x1024
    python bench/flux_vae.py --tiny           # tiny config on CPU, float32: checks the script itself
    python bench/flux_vae.py --sections decode --repeats 10

Sections:

- ``decode``: diffusers' ``AutoencoderKL.decode`` and diffgen's (``diffgen.models.vaes.autoencoder_kl``) on the same
  weight tensors, one 128x128 latent (1024² pixels), CUDA events, A/B alternated, medians; peak memory per
  variant; each side's relative error against diffusers' float32 decode, and whether the two bf16 decodes are
  bit-equal.
- ``imports``: fresh processes, alternated, median wall time of importing diffgen's FLUX pipeline module (what a
  FLUX ``generate`` imports for its models) with and without diffusers' VAE and scheduler classes on top: the
  start-up seconds the native VAE and sampler remove.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import ab_medians, print_table  # noqa: E402
from diffgen.testing.tiny import FLUX1_VAE_CONFIG as FLUX_VAE  # noqa: E402

TINY_VAE = {**FLUX_VAE, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4,
            "sample_size": 64}


def build_pair(config: dict, device: torch.device, dtype: torch.dtype):
    """diffusers' AutoencoderKL with random weights (norms and biases randomized too) and diffgen's over the very
    same tensors."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from diffgen.models.vaes.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
    from diffgen.testing.randomize import randomize_constant_parameters

    torch.manual_seed(0)
    reference = DiffusersAutoencoderKL(**config)
    randomize_constant_parameters(reference)
    reference = reference.to(device, dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = AutoencoderKL(AutoencoderKLConfig(**config))
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return ours.eval().requires_grad_(False), reference


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_decode(args, device: torch.device, dtype: torch.dtype) -> list[tuple[str, ...]]:
    config = TINY_VAE if args.tiny else FLUX_VAE
    size = 64 if args.tiny else 1024
    ours, reference = build_pair(config, device, dtype)
    z = torch.randn(1, 16, size // 8, size // 8, device=device, dtype=dtype,
                    generator=torch.Generator(device).manual_seed(1))
    variants = {"diffusers AutoencoderKL.decode": lambda: reference.decode(z, return_dict=False)[0],
                "diffgen AutoencoderKL.decode": lambda: ours.decode(z, return_dict=False)[0]}
    section = f"FLUX VAE decode {size}x{size} ({'tiny, ' if args.tiny else ''}{str(dtype).removeprefix('torch.')})"
    rows = []
    with torch.inference_mode():
        truth = copy.deepcopy(reference).float().decode(z.float(), return_dict=False)[0]
        outputs = {name: fn() for name, fn in variants.items()}
        for name, out in outputs.items():
            print(f"[{section}] {name}: relative error vs diffusers float32 {relative(out, truth):.2e}", flush=True)
        mine, theirs = outputs.values()
        print(f"[{section}] diffgen vs diffusers at {dtype}: relative diff {relative(mine, theirs):.2e}, "
              f"bit-equal {torch.equal(mine, theirs)}", flush=True)
        del truth, outputs, mine, theirs
        stats = ab_medians(variants, device, warmup=2, repeats=args.repeats)
        base = stats["diffusers AutoencoderKL.decode"]["median"]
        for name, fn in variants.items():
            peak = "-"
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                fn()
                torch.cuda.synchronize(device)
                peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
            s = stats[name]
            rows.append((section, name, f"{s['median'] * 1e3:.1f} ms", f"{s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f}",
                         f"{base / s['median']:.2f}x", peak))
    return rows


#: what a FLUX generate imports (the pipeline module: its DiT, text encoders, VAE and sampler), and diffusers' VAE and
#: scheduler classes on top (what it imported before)
IMPORTS = {
    "diffgen FLUX pipeline": "import diffgen.pipelines.flux",
    "diffgen FLUX pipeline + diffusers' VAE and scheduler": (
        "import diffgen.pipelines.flux\n"
        "from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler"),
}


def bench_imports(args, device: torch.device, dtype: torch.dtype) -> list[tuple[str, ...]]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    # "import torch" first in every process, so each row is what comes on top of torch (which every run imports)
    samples: dict[str, list[float]] = {name: [] for name in IMPORTS}
    rounds = 2 if args.tiny else max(3, args.repeats)
    for _ in range(rounds + 1):  # the first round warms the file cache and is dropped
        for name, code in IMPORTS.items():
            script = f"import time, torch\nt = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)"
            out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root,
                                 timeout=600)
            if out.returncode != 0:
                raise RuntimeError(f"{name}: {out.stderr[-2000:]}")
            samples[name].append(float(out.stdout.strip().splitlines()[-1]))
    rows = []
    for name, values in samples.items():
        values = values[1:]
        rows.append(("imports on top of torch, fresh process", name, f"{statistics.median(values):.2f} s",
                     f"{min(values):.2f}-{max(values):.2f}", "", "-"))
    return rows


SECTIONS = {"decode": bench_decode, "imports": bench_imports}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="decode,imports", help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU, float32")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for name in args.sections.split(","):
        began = time.perf_counter()
        rows += SECTIONS[name.strip()](args, device, dtype)
        print(f"[{name}] section took {time.perf_counter() - began:.0f} s", flush=True)
    print_table(f"{card}, torch {torch.__version__}", rows,
                ("section", "variant", "median", "range", "speed-up vs diffusers", "peak memory"))


if __name__ == "__main__":
    main()
