"""diffusers vs diffgen's defaults vs each speed lever, on one GPU, same process, A/B alternated, medians.

    python bench/speed.py --sections flux,load         # one or more of: flux, wan, vae, qwen, load
    python bench/speed.py --quick                      # fewer repeats, no whole-request rows
    python bench/speed.py --tiny                       # tiny configs on CPU (aot_eager): checks the script itself

diffusers' models are built directly at the real configs with random bf16 weights (as ``from_pretrained``
leaves them: bf16, with diffusers' float32 modules kept in float32), not on the meta device over
shared tensors. diffgen's models share those weight tensors; "fused qkv" models hold their concatenated
projections on top (``DIFFGEN_FUSE_PROJECTIONS=1``, off by default: it measured slower). Rows:

- ``diffgen plain eager``: diffgen before this work (plain PyTorch q/k norm + RoPE).
- ``diffgen default``: what ``diffgen generate`` runs on CUDA (eager, Triton norm+RoPE kernel).
- ``diffgen compiled``: compiled blocks without graphs (``diffgen serve`` before CUDA graphs).
- ``diffgen compiled + CUDA graph``: what ``diffgen serve`` runs now (diffgen/engine/cuda_graphs.py).
- ``--inductor NAME``: diffgen's compiled rows with Inductor options (``coordinate-descent``,
  ``no-emulate-casts``, ``emulate-casts``, ``max-autotune``: GEMM templates with their epilogues fused,
  autotuned; ``pdl``: Inductor's kernels launched as programmatic dependent launches), to decide whether they
  pay; with ``--graph-kernels`` a comma list, every pair in one process.
- ``diffgen default without the GELU epilogue ...``: the eager default without cuBLASLt's bias + tanh-GELU
  epilogue (``diffgen.layers.linear.linear_gelu``) and FLUX's single-block projection without the concatenation.
- ``--graph-kernels norm_rope,all,off,default``: the compiled + CUDA graph rows with diffgen's Triton kernels
  inside the compiled graphs as custom ops (the q/k norm+RoPE; all: also AdaLN modulate and the gated residual)
  against Inductor's own kernels for the plain ops (off) and diffgen's default (the norm+RoPE op per head and
  across heads, and the cuBLASLt GELU epilogue op), each on its own model; ``no_epilogue`` / ``epilogue`` /
  ``epilogue_split``: the norm+RoPE op across heads without / with the GELU epilogue op (and the split single-block
  projection) in the graphs.
- ``... fused qkv ...``: the concatenated projections, with and without the Triton kernel.

Whole requests (not with ``--quick``), after each DiT section: FLUX.1-dev (1024², 28 steps), Qwen-Image (1024², true
CFG) and Wan2.1-T2V-1.3B (480x832x81, CFG), 20 steps for the last two unless ``--request-steps`` says otherwise (their
real default is 50; the step cost is linear). diffusers' pipeline class over its random components at the real
configs against diffgen's pipeline over the same components and DiT tensors: eager default, compiled, compiled + CUDA
graph; each variant's pixels are compared with diffusers' once (``request_rows``).

Every row runs in its own try/except: a failure prints and the rest goes on. Peak memory is the
CUDA allocator's peak during one call of that row.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import ab_medians, profile_one_call, random_init_, with_attention  # noqa: E402

FLUX = dict(
    real=dict(dit=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
              height=1024, width=1024, text_len=512, steps=28),
    tiny=dict(dit=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                       axes_dims_rope=(4, 4, 8)),
              height=64, width=64, text_len=32, steps=2),
)
WAN = dict(
    real=dict(dit=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                       out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                       eps=1e-6, rope_max_seq_len=1024),
              vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True]),
              height=480, width=832, frames=81, text_len=512),
    tiny=dict(dit=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                       out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                       eps=1e-6, rope_max_seq_len=32),
              vae=dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                       temperal_downsample=[False, True, True]),
              height=48, width=80, frames=9, text_len=16),
)
QWEN = dict(
    real=dict(dit=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
              height=1024, width=1024, text_len=256),
    tiny=dict(dit=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                       num_attention_heads=3, joint_attention_dim=24, axes_dims_rope=(8, 4, 4)),
              height=64, width=64, text_len=16),
)

ROWS: list[tuple[str, str, str, str, str]] = []  # (section, row, median, range, peak memory)
RESULTS: dict = {}


def record(section: str, name: str, stats: dict, peak_gib: float | None = None, unit: str = "ms") -> None:
    scale = 1000 if unit == "ms" else 1
    RESULTS.setdefault(section, {})[name] = {**stats, "peak_gib": peak_gib, "unit": unit}
    ROWS.append((section, name, f"{stats['median'] * scale:.1f} {unit}",
                 f"{stats['min'] * scale:.1f}..{stats['max'] * scale:.1f}",
                 "" if peak_gib is None else f"{peak_gib:.1f} GiB"))
    print("row: | " + " | ".join(ROWS[-1]) + " |", flush=True)  # kept if a later row is cut off


def guarded(section: str):
    """Run a bench section; on failure print the traceback and keep going."""
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception:
                traceback.print_exc()
                ROWS.append((section, f"FAILED: {fn.__name__}", "", "", ""))
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return run
    return wrap


def peak_gib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_direct(cls, kwargs: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A diffusers model built as from_pretrained leaves it: ``dtype``, its _keep_in_fp32_modules in float32."""
    keep = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    build_dtype = torch.float32 if keep else dtype  # cast after, so kept modules stay float32
    with torch.device(device), default_dtype(build_dtype):
        model = cls(**kwargs)
    random_init_(model)
    if keep and dtype != torch.float32:
        for name, param in model.named_parameters():
            if not set(name.split(".")) & keep:
                param.data = param.data.to(dtype)
    return model.eval().requires_grad_(False)


def native_over(native_cls, config, reference: torch.nn.Module, fused: bool) -> torch.nn.Module:
    """diffgen's model over the reference's tensors (fused: concatenated projections on top)."""
    from diffgen.layers.linear import fuse_projections

    with torch.device("meta"):
        model = native_cls(config)
    model.load_state_dict(reference.state_dict(), assign=True, strict=True)
    model.eval().requires_grad_(False)
    if fused:
        fuse_projections(model)
    return model


def with_kernels(enabled: bool, fn, disabled: tuple[str, ...] = (), graphs: bool | None = None,
                 opt_in: tuple[str, ...] = ()):
    """``fn`` with the Triton kernels on or off (``disabled`` families left out; ``graphs``: whether compiled
    graphs call them as custom ops, read when a block is traced; ``opt_in``: opt-in families eager code uses)."""
    from diffgen.layers.fused import set_fused_kernels

    def run():
        set_fused_kernels(enabled, disabled, graphs, opt_in)
        try:
            return fn()
        finally:
            set_fused_kernels(None)
    return run


def with_cudnn_benchmark(fn):
    def run():
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            return fn()
        finally:
            torch.backends.cudnn.benchmark = previous
    return run


INDUCTOR_OPTIONS = {
    "default": None,  # diffgen's: INDUCTOR_DEFAULTS and the DiT's own inductor_options (engine/optimize.py)
    "coordinate-descent": {"coordinate_descent_tuning": True},
    # Inductor's own rounding (fused intermediates kept in float32): diffgen's default before 2026-11-27 06:00
    "no-emulate-casts": {"emulate_precision_casts": False},
    "emulate-casts": {"emulate_precision_casts": True},
    "max-autotune": {"max_autotune": True, "max_autotune_gemm": True, "epilogue_fusion": True,
                     "coordinate_descent_tuning": True},
    # programmatic dependent launch: each Inductor kernel may start while the one before it drains (Hopper on)
    "pdl": {"triton.enable_pdl": True},
}


def compile_blocks(model, args, inductor: str | None = None) -> None:
    """Compile ``model``'s blocks as serve does (disk cache), with ``--inductor``'s options (its first, or
    ``inductor``)."""
    from diffgen.engine.optimize import compile_repeated_blocks, use_persistent_compile_cache

    use_persistent_compile_cache()
    compile_repeated_blocks(model, INDUCTOR_OPTIONS[inductor or args.inductor])


def with_graphs(model, fn):
    """``fn`` with ``model``'s forward replayed from CUDA graphs (captured on the second call of a shape)."""
    from diffgen.engine.cuda_graphs import install_cuda_graphs

    if model.__dict__.get("forward") is None and torch.cuda.is_available():
        install_cuda_graphs(model)
    return fn


def graph_counts(section: str, model) -> None:
    """How many forwards the graph rows replayed (0 would mean they fell back to the plain forward)."""
    from diffgen.engine.cuda_graphs import graphed_forward

    forward = graphed_forward(model)
    if forward is not None:
        counts = {"graphs": len(forward.graphs), "replays": forward.replays, "failed": len(forward.failed)}
        RESULTS.setdefault(section, {})["CUDA graph counts"] = counts
        print(f"[{section}] CUDA graph counts: {counts}", flush=True)


def without_graphs(fn):
    from diffgen.engine.cuda_graphs import graphs_disabled

    def run():
        with graphs_disabled():
            return fn()
    return run


def kernel_profile(section: str, fn, device) -> None:
    """Where one call's GPU time goes: matmuls, attention, the rest (top kernels printed)."""
    if device.type != "cuda":
        return
    prof = profile_one_call(fn, device)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key.lower()
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if any(k in name for k in ("gemm", "nvjet", "xmma", "cutlass", "matmul", "_mm_", "addmm", "triton_tem")):
            kind = "matmul"
        elif any(k in name for k in ("attention", "fmha", "flash", "cudnn", "sdpa")):
            kind = "attention"
        elif "memcpy" in name or "memset" in name:
            kind = "copies"
        else:
            kind = "other (elementwise, norms)"
        totals[kind] = totals.get(kind, 0.0) + us
    summary = {kind: round(us / 1000, 2) for kind, us in sorted(totals.items())}
    RESULTS.setdefault(section, {})["profile ms"] = summary
    print(f"[{section}] GPU time by kind (ms): {summary}, sum {sum(totals.values()) / 1000:.1f}", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90), flush=True)


GRAPH_KERNEL_VARIANTS = {  # --graph-kernels name: (families compiled graphs call, row name)
    "norm_rope": (("norm_rope", "norm_rope_across_heads"), "Triton q/k norm+RoPE op in the graph"),
    "all": (("norm_rope", "norm_rope_across_heads", "modulation"),
            "Triton norm+RoPE, AdaLN modulate, gated residual ops in the graph"),
    "off": ((), "Inductor's kernels only"),
    "default": (True, "diffgen's default graph kernels (fused.GRAPH_KERNELS)"),
    "no_epilogue": (("norm_rope_across_heads",), "norm+RoPE op across heads only (the default before the epilogue)"),
    "epilogue": (("norm_rope_across_heads", "linear_gelu"), "norm+RoPE op across heads, cuBLASLt GELU epilogue op"),
    "epilogue_split": (("norm_rope_across_heads", "linear_gelu", "concat_linear"),
                       "norm+RoPE op across heads, cuBLASLt GELU epilogue op, single-block projection without cat"),
}
#: eager rows without this work's cuBLASLt GELU epilogue and split single-block projection (diffgen.layers.linear)
EPILOGUE_FAMILIES = ("linear_gelu", "concat_linear")


def graph_kernel_rows(section: str, build, forward_of, step_of, reference: dict, device, args) -> None:
    """``--graph-kernels``: the serve path (compiled + CUDA graph) with diffgen's Triton kernels called inside the
    compiled graphs and with Inductor's kernels for the same plain ops ("off"), each on its own model over the same
    weights (a graph replays what it captured), A/B alternated; one compiled forward of each against diffusers'
    eager forward (``reference``: its "forward" and its timed "step")."""
    forwards, rows, models = {"diffusers": reference["forward"]}, {"diffusers eager": reference["step"]}, {}
    # Every variant's blocks share one forward code object, each setting read while tracing (graph kernels, Inductor
    # options, attention backend) adds an entry to its cache: past the limit Dynamo would run the rest eagerly
    variants = len(args.attention_variants) * len(args.inductor_variants) * len(args.graph_kernel_variants)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * variants)
    for backend in args.attention_variants:
        for inductor in args.inductor_variants:
            for variant in args.graph_kernel_variants:
                families, label = GRAPH_KERNEL_VARIANTS[variant]
                if len(args.attention_variants) > 1:
                    label += f", attention {backend}"
                model = models[variant, inductor, backend] = build()
                begin = time.perf_counter()
                with_attention(backend, functools.partial(compile_blocks, model, args, inductor))()  # decides FA4
                name = f"diffgen compiled ({inductor}) + CUDA graph, {label}"
                forwards[name] = with_attention(backend, without_graphs(with_kernels(True, forward_of(model),
                                                                                     graphs=families)))
                rows[name] = with_attention(backend, with_graphs(model, with_kernels(True, step_of(model),
                                                                                     graphs=families)))
                with torch.inference_mode():
                    forwards[name]()
                torch.cuda.synchronize() if device.type == "cuda" else None
                print(f"[{section}] compile ({inductor}, graph kernels {variant}, attention {backend}) + first "
                      f"forward: {time.perf_counter() - begin:.1f} s", flush=True)
    one_forward_diffs(section, forwards)
    time_rows(section, rows, device, args, warmup=3)
    for (variant, inductor, backend), model in models.items():
        graph_counts(f"{section}, graph kernels {variant}, {inductor}, attention {backend}", model)
        if args.profile:
            families = GRAPH_KERNEL_VARIANTS[variant][0]
            kernel_profile(f"{section}, compiled ({inductor}), no graph, graph kernels {variant}, attention {backend}",
                           with_attention(backend, without_graphs(with_kernels(True, step_of(model),
                                                                               graphs=families))), device)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def one_forward_diffs(section: str, forwards: dict) -> None:
    """Relative difference of one forward of each variant against the first (guidance amplifies it in a step)."""
    with torch.inference_mode():
        outputs = {name: fn() for name, fn in forwards.items()}
    first, *others = outputs
    for name in others:
        value = relative(outputs[name], outputs[first])
        RESULTS.setdefault(section, {})[f"one forward: {name} rel diff vs {first}"] = value
        print(f"[{section}] one forward: {name} relative diff vs {first} {value:.2e}", flush=True)


def time_rows(section: str, variants: dict, device, args, reference_name: str | None = None, warmup: int = 2):
    if reference_name:
        with torch.inference_mode():
            expected = variants[reference_name]()
            for name, fn in variants.items():
                if name != reference_name:
                    RESULTS.setdefault(section, {})[f"{name} rel diff vs {reference_name}"] = relative(fn(), expected)
                    print(f"[{section}] {name}: one call relative diff vs {reference_name} "
                          f"{RESULTS[section][f'{name} rel diff vs {reference_name}']:.2e}", flush=True)
    with torch.inference_mode():
        stats = ab_medians(variants, device, warmup=warmup, repeats=args.repeats)
    for name, s in stats.items():
        record(section, name, s, peak_gib(variants[name], device))


def umt5_encoder(tiny: bool, device, dtype: torch.dtype) -> torch.nn.Module:
    """Wan's text encoder, UMT5-XXL's encoder at its real config (tiny: 2 layers of width 32), random weights."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=256 if tiny else 256384, d_model=WAN["tiny" if tiny else "real"]["dit"]["text_dim"],
                        d_kv=8 if tiny else 64, d_ff=64 if tiny else 10240, num_layers=2 if tiny else 24,
                        num_heads=4 if tiny else 64, relative_attention_num_buckets=8 if tiny else 32,
                        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.device(device), default_dtype(dtype):
        return random_init_(UMT5EncoderModel(config)).eval().requires_grad_(False)


def qwen25_vl_encoder(tokenizer, tiny: bool, small: bool, device, dtype: torch.dtype) -> torch.nn.Module:
    """Qwen-Image's text encoder, Qwen2.5-VL-7B at its real config, random weights; ``small``: 2 layers of its width
    (a stand-in where the 7B does not fit); tiny: 2 layers of width 24. ``tokenizer`` gives the special token ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from diffgen.testing.tiny_qwen import QWEN_SPECIAL_TOKENS

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    width = QWEN["tiny" if tiny else "real"]["dit"]["joint_attention_dim"]
    vocab = len(tokenizer) if tiny else 152064
    text = dict(vocab_size=vocab, hidden_size=width, intermediate_size=48 if tiny else 18944,
                num_hidden_layers=2 if tiny or small else 28, num_attention_heads=3 if tiny else 28,
                num_key_value_heads=3 if tiny else 4, max_position_embeddings=128000, rope_theta=1000000.0,
                rms_norm_eps=1e-6, rope_scaling={"mrope_section": [1, 1, 2] if tiny else [16, 24, 24],
                                                 "rope_type": "default"},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2 if tiny else 32, hidden_size=16 if tiny else 1280, intermediate_size=16 if tiny else 3420,
                  num_heads=2 if tiny else 16, out_hidden_size=width,
                  fullatt_block_indexes=[1] if tiny else [7, 15, 23, 31])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=vocab, hidden_size=width,
                              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with torch.device(device), default_dtype(dtype):
        return random_init_(Qwen2_5_VLForConditionalGeneration(config)).eval().requires_grad_(False)


# -- FLUX.1-dev ------------------------------------------------------------------------------------
def flux_inputs(cfg, device, dtype):
    tokens = (cfg["height"] // 16) * (cfg["width"] // 16)
    g = torch.Generator(device).manual_seed(0)
    grid_w = cfg["width"] // 16
    img_ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // grid_w, torch.arange(tokens) % grid_w], -1)
    dit = cfg["dit"]
    return dict(hidden_states=torch.randn(1, tokens, 64, device=device, dtype=dtype, generator=g),
                encoder_hidden_states=torch.randn(1, cfg["text_len"], dit["joint_attention_dim"], device=device,
                                                  dtype=dtype, generator=g),
                pooled_projections=torch.randn(1, dit["pooled_projection_dim"], device=device, dtype=dtype,
                                               generator=g),
                timestep=torch.tensor([0.5], device=device, dtype=dtype),
                guidance=torch.tensor([3.5], device=device, dtype=dtype),
                img_ids=img_ids.to(device), txt_ids=torch.zeros(cfg["text_len"], 3, device=device))


@guarded("flux")
def bench_flux(args, device, dtype):
    from diffusers import FluxTransformer2DModel

    from diffgen.engine.optimize import compile_repeated_blocks
    from diffgen.models.dits.flux import FluxConfig, FluxTransformer

    cfg = FLUX["tiny" if args.tiny else "real"]
    reference = build_direct(FluxTransformer2DModel, cfg["dit"], device, dtype)
    unfused = native_over(FluxTransformer, FluxConfig(**cfg["dit"]), reference, fused=False)
    fused = native_over(FluxTransformer, FluxConfig(**cfg["dit"]), reference, fused=True) if args.fused_qkv else None
    inputs = flux_inputs(cfg, device, dtype)
    section = f"FLUX.1-dev DiT forward {cfg['height']}x{cfg['width']}, {cfg['text_len']} text tokens"
    variants = {
        "diffusers eager": lambda: reference(**inputs, return_dict=False)[0],
        "diffgen plain eager": with_kernels(False, lambda: unfused(**inputs)),
        "diffgen Triton norm/rope only (the default before)": with_kernels(True, lambda: unfused(**inputs),
                                                                           disabled=("modulation", *EPILOGUE_FAMILIES)),
        "diffgen default (Triton norm/rope + AdaLN modulate + gated residual)":
            with_kernels(True, lambda: unfused(**inputs)),
        "diffgen default without the GELU epilogue":
            with_kernels(True, lambda: unfused(**inputs), disabled=EPILOGUE_FAMILIES),
        "diffgen default + the split projection (opt-in)": with_kernels(True, lambda: unfused(**inputs),
                                                                        opt_in=("concat_linear",)),
    }
    if args.fused_qkv:
        variants["diffgen fused qkv + Triton kernels"] = with_kernels(True, lambda: fused(**inputs))
    if args.graphs and device.type == "cuda":
        eager_graphed = native_over(FluxTransformer, FluxConfig(**cfg["dit"]), reference, fused=False)
        variants["diffgen default + CUDA graph"] = with_graphs(
            eager_graphed, with_kernels(True, lambda: eager_graphed(**inputs)))
    if not args.skip_eager:
        time_rows(section, variants, device, args, reference_name="diffusers eager")
    if args.graph_kernels and not args.skip_compile:
        graph_kernel_rows(section + ", compiled", lambda: native_over(FluxTransformer, FluxConfig(**cfg["dit"]),
                                                                      reference, fused=False),
                          lambda model: lambda: model(**inputs), lambda model: lambda: model(**inputs),
                          {"forward": variants["diffusers eager"], "step": variants["diffusers eager"]}, device, args)
    elif not args.skip_compile:
        begin = time.perf_counter()
        compile_blocks(unfused, args)
        with torch.inference_mode():
            unfused(**inputs)
        torch.cuda.synchronize() if device.type == "cuda" else None
        RESULTS.setdefault(section, {})["compile + first call s"] = time.perf_counter() - begin
        print(f"[flux] compile ({args.inductor}) + first forward: {time.perf_counter() - begin:.1f} s", flush=True)
        compiled = {"diffusers eager": variants["diffusers eager"],
                    f"diffgen compiled ({args.inductor})": without_graphs(lambda: unfused(**inputs))}
        if args.graphs:
            compiled[f"diffgen compiled ({args.inductor}) + CUDA graph (serve default)"] = with_graphs(
                unfused, lambda: unfused(**inputs))
        if fused is not None:
            compile_repeated_blocks(fused)
            compiled["diffgen compiled, fused qkv"] = lambda: fused(**inputs)
        time_rows(section + ", compiled", compiled, device, args, reference_name="diffusers eager", warmup=3)
        graph_counts(section + ", compiled", unfused)
        if args.profile:
            kernel_profile(section + f", compiled ({args.inductor}), no graph", without_graphs(
                lambda: unfused(**inputs)), device)
    if not args.quick:
        flux_request(args, cfg, reference, device, dtype)
    if args.diffusers_compiled and not args.skip_compile:
        begin = time.perf_counter()
        reference.compile_repeated_blocks(fullgraph=True)
        with torch.inference_mode():
            reference(**inputs, return_dict=False)
        print(f"[flux] diffusers compile_repeated_blocks + first forward: {time.perf_counter() - begin:.1f} s",
              flush=True)
        rows = {"diffusers compiled (compile_repeated_blocks)": variants["diffusers eager"],
                f"diffgen compiled ({args.inductor}) + CUDA graph (serve default)": lambda: unfused(**inputs)}
        time_rows(section + ", both compiled", rows, device, args, warmup=3)


def flux_request(args, cfg, reference, device, dtype):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from diffusers import FluxPipeline as DiffusersFlux
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffgen.models.dits.flux import FluxConfig, FluxTransformer
    from diffgen.pipelines.flux import FluxPipeline
    from diffgen.testing.tokenizers import clip_tokenizer, t5_tokenizer

    tiny = args.tiny
    clip_cfg = dict(vocab_size=1000 if tiny else 49408, hidden_size=32 if tiny else 768,
                    intermediate_size=37 if tiny else 3072, num_hidden_layers=2 if tiny else 12,
                    num_attention_heads=4 if tiny else 12, max_position_embeddings=77,
                    projection_dim=32 if tiny else 768, hidden_act="quick_gelu")
    t5_cfg = dict(vocab_size=256 if tiny else 32128, d_model=32 if tiny else 4096, d_kv=8 if tiny else 64,
                  d_ff=64 if tiny else 10240, num_layers=2 if tiny else 24, num_heads=4 if tiny else 64,
                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=8 if tiny else 32)
    vae_cfg = dict(block_out_channels=(8, 8, 16, 16) if tiny else (128, 256, 512, 512), layers_per_block=1 if tiny
                   else 2, norm_num_groups=4 if tiny else 32)
    with torch.device(device), default_dtype(dtype):
        clip = random_init_(CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, **clip_cfg)))
        t5 = random_init_(T5EncoderModel(T5Config(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **t5_cfg)))
        vae = random_init_(AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.1159, scaling_factor=0.3611, **vae_cfg))
    shared = dict(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=vae,
                  text_encoder=clip, tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer())
    steps = args.request_steps or cfg["steps"]
    call = dict(prompt="a photo of a raccoon", height=cfg["height"], width=cfg["width"],
                num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=cfg["text_len"])
    request_rows(f"FLUX.1-dev request {cfg['height']}x{cfg['width']}, {steps} steps (encode+denoise+decode)",
                 DiffusersFlux, FluxPipeline, shared, reference,
                 lambda: native_over(FluxTransformer, FluxConfig(**cfg["dit"]), reference, fused=False),
                 call, device, dtype, args)


def request_rows(section: str, diffusers_cls, diffgen_cls, shared: dict, reference: torch.nn.Module, build_dit,
                 call: dict, device: torch.device, dtype: torch.dtype, args) -> None:
    """Whole requests (encode + denoise + decode), same process, A/B alternated, medians and peak memory:
    diffusers' pipeline built as its users build it (``diffusers_cls(transformer=..., **components)``) against
    diffgen's pipeline over the same components and the same DiT tensors (``build_dit``: a native DiT over
    ``reference``'s weights), eager (``diffgen generate``'s default on CUDA) and compiled, with CUDA graphs
    (``diffgen serve``'s default). diffgen's pipeline gets its own copies of the VAE (its constructor installs
    diffgen's decoder in it) and of the scheduler; the text encoders are the same library modules on both sides
    (the loader would build diffgen's native ones where it has them: the one-shot bench, bench/oneshot.py, times
    that path)."""
    import copy

    from diffgen.engine.request import GenerationRequest

    for module in shared.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    theirs = diffusers_cls(transformer=reference, **shared)
    theirs.set_progress_bar_config(disable=True)
    request = GenerationRequest.build(seed=0, **call)

    def ours_over(dit):
        own = {"vae": copy.deepcopy(shared["vae"]), "scheduler": copy.deepcopy(shared["scheduler"])}
        return diffgen_cls({**shared, **own, "transformer": dit}, "random", device, dtype)

    eager = ours_over(build_dit())
    variants = {"diffusers eager": lambda: theirs(generator=torch.Generator("cpu").manual_seed(0), **call),
                "diffgen default (eager)": with_kernels(True, lambda: eager.run(request))}
    if not args.skip_compile:
        dit = build_dit()
        compile_blocks(dit, args)
        compiled = ours_over(dit)
        variants[f"diffgen compiled ({args.inductor})"] = without_graphs(
            with_kernels(True, lambda: compiled.run(request)))
        if args.graphs:
            variants[f"diffgen compiled ({args.inductor}) + CUDA graph (serve default)"] = with_graphs(
                dit, with_kernels(True, lambda: compiled.run(request)))
    with torch.inference_mode():
        outputs = {name: pixels_of(fn()) for name, fn in variants.items()}  # also each variant's warm-up call
        spread = float(outputs["diffusers eager"].std())  # a flat picture would make the agreement below empty
        RESULTS.setdefault(section, {})["diffusers eager pixel std"] = spread
        print(f"[{section}] diffusers eager: pixel standard deviation {spread:.1f}", flush=True)
        for name, value in outputs.items():
            if name != "diffusers eager":
                differs = float(np.abs(value - outputs["diffusers eager"]).max())
                RESULTS.setdefault(section, {})[f"{name} max pixel diff vs diffusers eager"] = differs
                print(f"[{section}] {name}: max pixel difference vs diffusers eager {differs:.0f} of 255", flush=True)
        stats = ab_medians(variants, device, warmup=0, repeats=max(2, args.repeats // 2))
    for name, s in stats.items():
        record(section, name, s, peak_gib(variants[name], device), unit="s")


def pixels_of(output) -> np.ndarray:
    """The uint8 pixels of a diffusers pipeline output (PIL images or float frames) or a diffgen result."""
    if hasattr(output, "images") and output.images:
        return np.stack([np.asarray(image) for image in output.images]).astype(np.int16)
    frames = output.frames
    frames = frames[0] if isinstance(frames, list) else frames
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:  # diffusers' video output: floats in [0, 1]
        frames = (frames * 255).round().clip(0, 255)
    return frames.squeeze().astype(np.int16)


# -- Wan2.1-T2V-1.3B --------------------------------------------------------------------------------
@guarded("wan")
def bench_wan(args, device, dtype):
    from diffusers import WanTransformer3DModel

    from diffgen.models.dits.wan import WanConfig, WanTransformer

    cfg = WAN["tiny" if args.tiny else "real"]
    reference = build_direct(WanTransformer3DModel, cfg["dit"], device, dtype)
    unfused = native_over(WanTransformer, WanConfig(**cfg["dit"]), reference, fused=False)
    fused = native_over(WanTransformer, WanConfig(**cfg["dit"]), reference, fused=True) if args.fused_qkv else None
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, 16, (cfg["frames"] - 1) // 4 + 1, cfg["height"] // 8, cfg["width"] // 8,
                          device=device, dtype=dtype, generator=g)
    text = torch.randn(2, cfg["text_len"], cfg["dit"]["text_dim"], device=device, dtype=dtype, generator=g)
    timestep = torch.tensor([999], device=device)

    def cfg_step(forward):
        def run():
            cond, uncond = forward(latents, timestep, text[:1]), forward(latents, timestep, text[1:])
            return uncond + 5.0 * (cond - uncond)
        return run

    section = f"Wan2.1-1.3B CFG step (2 forwards) {cfg['height']}x{cfg['width']}x{cfg['frames']}"
    variants = {
        "diffusers eager (direct build)": cfg_step(lambda *a: reference(*a, return_dict=False)[0]),
        "diffgen plain eager": with_kernels(False, cfg_step(unfused)),
        "diffgen Triton norm/rope only (the default before)": with_kernels(True, cfg_step(unfused),
                                                                           disabled=("modulation", *EPILOGUE_FAMILIES)),
        "diffgen default (Triton norm/rope + AdaLN modulate + gated residual)": with_kernels(True, cfg_step(unfused)),
        "diffgen default without the GELU epilogue": with_kernels(True, cfg_step(unfused), disabled=EPILOGUE_FAMILIES),
    }
    if args.fused_qkv:
        variants["diffgen fused qkv + Triton kernels"] = with_kernels(True, cfg_step(fused))
    one_forward_diffs("wan", {"diffusers": lambda: reference(latents, timestep, text[:1], return_dict=False)[0],
                              "diffgen plain": with_kernels(False, lambda: unfused(latents, timestep, text[:1])),
                              "diffgen default": with_kernels(True, lambda: unfused(latents, timestep, text[:1]))})
    if not args.skip_eager:
        time_rows(section, variants, device, args, reference_name="diffusers eager (direct build)")
    if args.graph_kernels and not args.skip_compile:
        graph_kernel_rows(section + ", compiled", lambda: native_over(WanTransformer, WanConfig(**cfg["dit"]),
                                                                      reference, fused=False),
                          lambda model: lambda: model(latents, timestep, text[:1]), cfg_step,
                          {"forward": lambda: reference(latents, timestep, text[:1], return_dict=False)[0],
                           "step": variants["diffusers eager (direct build)"]}, device, args)
    elif not args.skip_compile:
        compile_blocks(unfused, args)
        one_forward_diffs("wan", {"diffusers": lambda: reference(latents, timestep, text[:1], return_dict=False)[0],
                                  "diffgen compiled": without_graphs(lambda: unfused(latents, timestep, text[:1])),
                                  "diffgen compiled + CUDA graph": with_graphs(
                                      unfused, lambda: [unfused(latents, timestep, text[:1]) for _ in range(2)][-1])})
        compiled = {"diffusers eager (direct build)": variants["diffusers eager (direct build)"],
                    f"diffgen compiled ({args.inductor})": without_graphs(cfg_step(unfused))}
        if args.graphs:
            compiled[f"diffgen compiled ({args.inductor}) + CUDA graph (serve default)"] = cfg_step(unfused)
        time_rows(section + ", compiled", compiled, device, args, warmup=2)
        graph_counts(section + ", compiled", unfused)
        if args.profile:
            kernel_profile(section + ", compiled, no graph", without_graphs(cfg_step(unfused)), device)
    if not args.quick:
        wan_request(args, cfg, reference, device, dtype)


def wan_request(args, cfg, reference, device, dtype):
    """Wan2.1-T2V-1.3B text-to-video: UMT5-XXL at its real config (tiny: 2 layers), the UniPC flow scheduler of the
    hub repository (flow shift 3), the Wan2.1 VAE; CFG 5 with a negative prompt."""
    from diffusers import AutoencoderKLWan
    from diffusers import WanPipeline as DiffusersWan

    from diffgen.models.dits.wan import WanConfig, WanTransformer
    from diffgen.pipelines.wan import WanPipeline
    from diffgen.testing.tiny_wan import unipc_scheduler
    from diffgen.testing.tokenizers import t5_tokenizer

    tiny = args.tiny
    text_encoder = umt5_encoder(tiny, device, dtype)
    vae = build_direct(AutoencoderKLWan, cfg["vae"], device, dtype)
    shared = dict(scheduler=unipc_scheduler(3.0), vae=vae, text_encoder=text_encoder,
                  tokenizer=t5_tokenizer(cfg["text_len"]))
    steps = args.request_steps or (2 if tiny else 20)
    call = dict(prompt="a raccoon walking through a forest", negative_prompt="blurry, static", height=cfg["height"],
                width=cfg["width"], num_frames=cfg["frames"], num_inference_steps=steps, guidance_scale=5.0,
                max_sequence_length=cfg["text_len"])
    request_rows(f"Wan2.1-T2V-1.3B request {cfg['height']}x{cfg['width']}x{cfg['frames']}, {steps} steps, CFG "
                 "(encode+denoise+decode)", DiffusersWan, WanPipeline, shared, reference,
                 lambda: native_over(WanTransformer, WanConfig(**cfg["dit"]), reference, fused=False),
                 call, device, dtype, args)


@guarded("vae")
def bench_vae(args, device, dtype):
    """Wan VAE decode: diffusers vs diffgen's decoder before this round (every convolution adds its bias, nearest
    upsampling then a 3x3 conv), with the biases folded into the next pass, with the sub-pixel upsampling, and
    with both (the default); with --vae-sweep also chunk sizes, kernels off and cuDNN's autotuner. The same for
    Qwen-Image's VAE on one 1024² image. Every row's error is against diffusers in float32."""
    from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan

    cfg = WAN["tiny" if args.tiny else "real"]
    vae = build_direct(AutoencoderKLWan, cfg["vae"], device, dtype)
    z = torch.randn(1, 16, (cfg["frames"] - 1) // 4 + 1, cfg["height"] // 8, cfg["width"] // 8, device=device,
                    dtype=dtype, generator=torch.Generator(device).manual_seed(0))
    section = f"Wan VAE decode {cfg['frames']} frames {cfg['height']}x{cfg['width']}"
    vae_decode_rows(section, vae, z, device, args, chunks=(1, 2, 3, 7, 21) if not args.tiny else (1, 3))
    qwen_cfg = dict(cfg["vae"])
    size = 64 if args.tiny else 1024
    qwen = build_direct(AutoencoderKLQwenImage, qwen_cfg, device, dtype)
    z = torch.randn(1, 16, 1, size // 8, size // 8, device=device, dtype=dtype,
                    generator=torch.Generator(device).manual_seed(1))
    vae_decode_rows(f"Qwen-Image VAE decode {size}x{size}", qwen, z, device, args, chunks=())


#: diffgen's decoder variants: (fold_biases, subpixel_upsample); None: the default (folded where the kernels run)
DECODER_VARIANTS = {"diffgen decoder before (bias adds, nearest upsampling)": (False, False),
                    "diffgen decoder, biases folded": (None, False),
                    "diffgen decoder, sub-pixel upsampling": (False, True),
                    "diffgen decoder now (both; default)": (None, True)}


def vae_decode_rows(section, vae, z, device, args, chunks) -> None:
    import copy

    from diffgen.models.vaes.wan import WanVAEDecoder, channels_last_conv3d

    with torch.inference_mode():  # the float32 reference, then dropped
        reference = copy.deepcopy(vae).float().decode(z.float(), return_dict=False)[0]
    truth = {"float32": reference}
    variants = {"diffusers plain": lambda: vae.decode(z, return_dict=False)[0]}
    if device.type == "cuda":
        last = copy.deepcopy(vae)
        channels_last_conv3d(last)  # what diffgen ran before its own decoder
        z_last = z.contiguous(memory_format=torch.channels_last_3d)
        if args.vae_sweep:
            variants["diffusers, conv3d weights channels-last (diffgen before)"] = (
                lambda: last.decode(z_last, return_dict=False)[0])
        native_vae = last
    else:
        native_vae = vae
    for name, (fold, subpixel) in DECODER_VARIANTS.items():
        decoder = WanVAEDecoder.from_vae(native_vae)
        decoder.fold_biases, decoder.subpixel_upsample = fold, subpixel
        variants[name] = with_kernels(True, lambda d=decoder: d(z))
    default = variants["diffgen decoder now (both; default)"]
    if args.vae_sweep:
        variants["diffgen decoder, default chunk, no Triton"] = with_kernels(False, default)
        for chunk in chunks:
            decoder = WanVAEDecoder.from_vae(native_vae, chunk_frames=chunk)
            variants[f"diffgen decoder, {chunk} latent frames per call"] = with_kernels(True, lambda d=decoder: d(z))
        if device.type == "cuda":  # cuDNN's autotuner: the profile showed sm80 conv kernels chosen for the chunks
            variants["diffgen decoder, default chunk, cudnn.benchmark"] = with_cudnn_benchmark(default)
            variants["diffusers, channels-last, cudnn.benchmark"] = with_cudnn_benchmark(
                variants["diffusers, conv3d weights channels-last (diffgen before)"])
    with torch.inference_mode():
        for name, fn in variants.items():
            value = relative(fn(), truth["float32"])
            RESULTS.setdefault(section, {})[f"{name} rel err vs float32"] = value
            print(f"[{section}] {name}: relative error vs diffusers float32 {value:.2e}", flush=True)
    del truth, reference
    time_rows(section, variants, device, args, warmup=1)
    if device.type == "cuda" and args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("diffgen decoder before (bias adds, nearest upsampling)", "diffgen decoder now (both; default)"):
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                variants[name]()
                torch.cuda.synchronize(device)
            print(f"[{section}] profile of the {name}:")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70))


# -- Qwen-Image ------------------------------------------------------------------------------------
@guarded("qwen")
def bench_qwen(args, device, dtype):
    from diffusers import QwenImageTransformer2DModel

    from diffgen.models.dits.qwen_image import QwenImageConfig, QwenImageTransformer

    cfg = QWEN["tiny" if args.tiny else "real"]
    reference = build_direct(QwenImageTransformer2DModel, cfg["dit"], device, dtype)
    ours_model = native_over(QwenImageTransformer, QwenImageConfig(**cfg["dit"]), reference, fused=False)
    rows, cols = cfg["height"] // 16, cfg["width"] // 16
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, rows * cols, 64, device=device, dtype=dtype, generator=g)
    text = torch.randn(2, cfg["text_len"], cfg["dit"]["joint_attention_dim"], device=device, dtype=dtype, generator=g)
    t = torch.tensor([0.5], device=device)
    shapes = [(1, rows, cols)]

    def true_cfg(forward):
        def run():
            cond, uncond = forward(text[:1]), forward(text[1:])
            combined = uncond + 4.0 * (cond - uncond)
            return combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        return run

    theirs = true_cfg(lambda c: reference(hidden_states=x, encoder_hidden_states=c, timestep=t,
                                          img_shapes=[shapes], return_dict=False)[0])
    ours = with_kernels(True, true_cfg(lambda c: ours_model(x, t, c, shapes)))
    before = with_kernels(True, true_cfg(lambda c: ours_model(x, t, c, shapes)),
                          disabled=("modulation", *EPILOGUE_FAMILIES))
    no_epilogue = with_kernels(True, true_cfg(lambda c: ours_model(x, t, c, shapes)), disabled=EPILOGUE_FAMILIES)
    plain = with_kernels(False, true_cfg(lambda c: ours_model(x, t, c, shapes)))
    forward = {"diffusers": lambda: reference(hidden_states=x, encoder_hidden_states=text[:1], timestep=t,
                                              img_shapes=[shapes], return_dict=False)[0],
               "diffgen plain": with_kernels(False, lambda: ours_model(x, t, text[:1], shapes)),
               "diffgen default": with_kernels(True, lambda: ours_model(x, t, text[:1], shapes))}
    one_forward_diffs("qwen", forward)
    section = f"Qwen-Image true-CFG step (2 forwards) {cfg['height']}x{cfg['width']}, {cfg['text_len']} text tokens"
    if not args.skip_eager:
        time_rows(section, {"diffusers eager": theirs, "diffgen plain eager": plain,
                            "diffgen Triton norm/rope only (the default before)": before,
                            "diffgen default (Triton norm/rope + AdaLN modulate + gated residual)": ours,
                            "diffgen default without the GELU epilogue": no_epilogue},
                  device, args, reference_name="diffusers eager")
    if args.graph_kernels and not args.skip_compile:
        graph_kernel_rows(section + ", compiled", lambda: native_over(QwenImageTransformer,
                                                                      QwenImageConfig(**cfg["dit"]), reference, False),
                          lambda model: lambda: model(x, t, text[:1], shapes),
                          lambda model: true_cfg(lambda c: model(x, t, c, shapes)),
                          {"forward": forward["diffusers"], "step": theirs}, device, args)
    elif not args.skip_compile:
        compile_blocks(ours_model, args)
        forward.pop("diffgen plain")
        compiled_forward = forward.pop("diffgen default")
        forward["diffgen compiled"] = without_graphs(compiled_forward)
        forward["diffgen compiled + CUDA graph"] = with_graphs(
            ours_model, lambda: [compiled_forward() for _ in range(2)][-1])
        one_forward_diffs("qwen", forward)
        rows = {"diffusers eager": theirs, f"diffgen compiled ({args.inductor})": without_graphs(ours)}
        if args.graphs:
            rows[f"diffgen compiled ({args.inductor}) + CUDA graph (serve default)"] = ours
        time_rows(section + ", compiled", rows, device, args)
        graph_counts(section + ", compiled", ours_model)
        if args.profile:
            kernel_profile(section + ", compiled, no graph", without_graphs(ours), device)
    if not args.quick:
        qwen_request(args, cfg, reference, device, dtype)


def qwen_request(args, cfg, reference, device, dtype):
    """Qwen-Image text-to-image with true CFG (4.0, a negative prompt): Qwen2.5-VL-7B at its real config (tiny:
    2 layers; a byte-level stand-in tokenizer, so the template is ~5x more tokens than the real one's, on both
    sides), the hub repository's scheduler, the Qwen-Image VAE. With ``--small-text-encoder`` the 7B encoder is a
    2-layer stand-in of its width (the row says so): for a card without room for it beside the 20B DiT."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from diffusers import QwenImagePipeline as DiffusersQwen

    from diffgen.models.dits.qwen_image import QwenImageConfig, QwenImageTransformer
    from diffgen.pipelines.qwen_image import QwenImagePipeline
    from diffgen.testing.tiny_qwen import QWEN_IMAGE_SCHEDULER, qwen2_tokenizer

    tiny = args.tiny
    tokenizer = qwen2_tokenizer()
    text_encoder = qwen25_vl_encoder(tokenizer, tiny, args.small_text_encoder, device, dtype)
    vae = build_direct(AutoencoderKLQwenImage, WAN["tiny" if tiny else "real"]["vae"], device, dtype)
    shared = dict(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae,
                  text_encoder=text_encoder, tokenizer=tokenizer)
    steps = args.request_steps or (2 if tiny else 20)
    call = dict(prompt="a photo of a raccoon reading a newspaper", negative_prompt=" ", height=cfg["height"],
                width=cfg["width"], num_inference_steps=steps, true_cfg_scale=4.0,
                max_sequence_length=cfg["text_len"])
    encoder = ", 2-layer stand-in text encoder" if args.small_text_encoder and not tiny else ""
    request_rows(f"Qwen-Image request {cfg['height']}x{cfg['width']}, {steps} steps, true CFG{encoder} "
                 "(encode+denoise+decode)", DiffusersQwen, QwenImagePipeline, shared, reference,
                 lambda: native_over(QwenImageTransformer, QwenImageConfig(**cfg["dit"]), reference, fused=False),
                 call, device, dtype, args)


# -- loading ---------------------------------------------------------------------------------------
@guarded("load")
def bench_load(args, device, dtype):
    """Write ``--load-gb`` of bf16 shards, read them once (page cache), then time both readers alternately."""
    from safetensors.torch import save_file

    from diffgen.loader import weights

    total = 0.02 if args.tiny else args.load_gb
    folder = tempfile.mkdtemp(prefix="diffgen-load-")
    tensor_bytes = 3072 * 12288 * 2
    count = max(2, int(total * 2**30 // tensor_bytes))
    per_shard = 40
    files, shard = [], {}
    g = torch.Generator(device).manual_seed(0)
    shape = (3072, 12288) if not args.tiny else (64, 128)
    for i in range(count):
        shard[f"blocks.{i}.weight"] = torch.randn(*shape, device=device, dtype=dtype, generator=g).cpu()
        if len(shard) == per_shard or i == count - 1:
            files.append(os.path.join(folder, f"shard{len(files)}.safetensors"))
            save_file(shard, files[-1])
            shard = {}
    nbytes = sum(os.path.getsize(f) for f in files)
    from pathlib import Path

    paths = [Path(f) for f in files]
    keep_dtype = lambda key, t: t

    def read(fast: bool):
        def run():
            os.environ[weights.FAST_LOAD_ENV] = "1" if fast else "0"
            state = weights._read_tensors(paths, device, set(), keep_dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return state
        return run

    variants = {"safetensors safe_open(device=cuda)": read(False), "diffgen parallel pinned reader": read(True)}
    with torch.inference_mode():
        a, b = variants["safetensors safe_open(device=cuda)"](), variants["diffgen parallel pinned reader"]()
        assert all(torch.equal(a[k], b[k]) for k in a), "the two readers disagree"
        del a, b
        stats = ab_medians(variants, device, warmup=1, repeats=3 if not args.quick else 2)
    section = f"load {nbytes / 1e9:.1f} GB of bf16 shards from the page cache to {device.type}"
    for name, s in stats.items():
        record(section, name, s, unit="s")
        RESULTS[section][name]["GB/s"] = nbytes / 1e9 / s["median"]
        print(f"[load] {name}: {nbytes / 1e9 / s['median']:.1f} GB/s", flush=True)
    os.environ.pop(weights.FAST_LOAD_ENV, None)
    for f in files:
        os.remove(f)


SECTIONS = {"flux": bench_flux, "wan": bench_wan, "vae": bench_vae, "qwen": bench_qwen, "load": bench_load}


def comma_list(parser: argparse.ArgumentParser, flag: str, value: str | None, allowed) -> list[str]:
    """``value``'s comma-separated names, each one of ``allowed`` (else the parser's error naming them)."""
    names = [name.strip() for name in (value or "").split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or (value is not None and not names):
        what = f"unknown {unknown} in {value!r}" if unknown else f"{value!r} names none"
        parser.error(f"{flag}: {what}; choose from {', '.join(allowed)}")
    return names


def release_section_memory(device) -> None:
    """Free what a section's models held before the next section (its compiled blocks and graphs sit in reference
    cycles), so each row's peak memory is its own section's: a run of Qwen-Image then Wan measured Wan's step at
    40.9-42.4 GiB peak with Qwen-Image's weights still allocated (2.8-4.3 GiB in a Wan-only run)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        print(f"memory still allocated after the section: {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="flux,wan,qwen,vae,load", help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU, float32")
    parser.add_argument("--quick", action="store_true", help="3 repeats, no whole-request rows")
    parser.add_argument("--request-steps", type=int, default=None,
                        help="steps of the whole-request rows (default: FLUX 28, its real count; Qwen-Image and Wan "
                        "20, fewer than their real 50 to keep a call under 10 minutes: the step cost is linear)")
    parser.add_argument("--small-text-encoder", action="store_true",
                        help="Qwen-Image request: a 2-layer stand-in of Qwen2.5-VL-7B (named in the row)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--load-gb", type=float, default=8.0, help="size of the load test's shards")
    parser.add_argument("--json", help="write all numbers here")
    parser.add_argument("--fused-qkv", action="store_true", help="also time the concatenated projections (off by "
                        "default: they measured slower)")
    parser.add_argument("--profile", action="store_true", help="print a kernel profile of the sections that have one")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false", help="leave out the CUDA-graph rows")
    parser.add_argument("--inductor", default="default",
                        help="Inductor options of diffgen's compiled rows, one of " + ", ".join(INDUCTOR_OPTIONS) +
                             "; with --graph-kernels a comma list (each graph-kernel variant under each, A/B in one "
                             "process; the other compiled rows use the first)")
    parser.add_argument("--skip-eager", action="store_true", help="leave out the eager rows (a compiled-only run)")
    parser.add_argument("--graph-kernels", default=None,
                        help="flux/wan/qwen compiled rows, a comma list of " + ", ".join(GRAPH_KERNEL_VARIANTS) +
                             ": diffgen's Triton kernels inside the compiled graphs (norm_rope: the q/k norm+RoPE; "
                             "all: also AdaLN modulate and gated residual) or Inductor's (off), each on its own "
                             "model, A/B alternated, CUDA graph on")
    parser.add_argument("--attention", default="auto",
                        help="with --graph-kernels: a comma list of attention backends (auto, fa4, cudnn, ...), each "
                             "variant compiled under each, A/B in one process")
    parser.add_argument("--diffusers-compiled", action="store_true",
                        help="FLUX: also diffusers' compile_repeated_blocks against diffgen's serve default")
    parser.add_argument("--vae-sweep", action="store_true", help="vae: also chunk sizes, kernels off, cuDNN autotuner")
    args = parser.parse_args()
    from diffgen.options import ATTENTION_BACKENDS

    args.graph_kernel_variants = comma_list(parser, "--graph-kernels", args.graph_kernels, GRAPH_KERNEL_VARIANTS)
    args.inductor_variants = comma_list(parser, "--inductor", args.inductor, INDUCTOR_OPTIONS)
    args.attention_variants = comma_list(parser, "--attention", args.attention, ATTENTION_BACKENDS)
    if len(args.inductor_variants) > 1 and not args.graph_kernels:
        parser.error(f"--inductor: {args.inductor!r}: a comma list needs --graph-kernels")
    if args.attention_variants != ["auto"] and not args.graph_kernels:
        parser.error(f"--attention: {args.attention!r}: another backend than auto needs --graph-kernels")
    args.inductor = args.inductor_variants[0]
    args.repeats = args.repeats or (3 if args.quick else 5)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.tiny and device.type == "cpu":  # the compiled rows' logic with Dynamo's capture, no C++ kernels built
        compile_module = torch.nn.Module.compile
        torch.nn.Module.compile = lambda self, **kw: compile_module(self, **{**kw, "backend": "aot_eager",
                                                                             "options": None})
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    RESULTS["meta"] = {"card": card, "torch": torch.__version__, "args": vars(args)}
    for name in args.sections.split(","):
        start = time.perf_counter()
        SECTIONS[name.strip()](args, device, dtype)
        print(f"[{name}] section took {time.perf_counter() - start:.0f} s", flush=True)
        release_section_memory(device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    print(f"\n## {card}, torch {torch.__version__}")
    print("| section | variant | median | range | peak memory |\n|---|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
