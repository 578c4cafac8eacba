"""Opt-in speed-ups applied to a loaded pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

CACHE_DIR_ENV = "DIFFGEN_CACHE_DIR"

DIT_COMPONENTS = ("transformer", "transformer_2")


# Inductor keeps fused intermediates in float32 unless told to round them where eager rounds: without it the
# compiled Qwen-Image forward was 2.16e-2 from diffusers' bf16 forward (bound 2e-2), with it 1.67e-2 (eager:
# 1.66e-2) at +0.6% step time (docs/benchmarks.md, "Compiled agreement").
INDUCTOR_DEFAULTS = {"emulate_precision_casts": True}


def inductor_options(model: nn.Module, options: dict | None = None) -> dict:
    """The Inductor options ``model``'s blocks compile with: ``INDUCTOR_DEFAULTS``, then what the DiT class
    declares as ``inductor_options`` (a setting measured per model, docs/benchmarks.md), then ``options``."""
    return {**INDUCTOR_DEFAULTS, **getattr(model, "inductor_options", {}), **(options or {})}


def compile_repeated_blocks(model: nn.Module, options: dict | None = None) -> int:
    """torch.compile each block of the DiT's block lists in place; returns how many were compiled.

    Compiling one block at a time (rather than the whole model) keeps compile time to a few blocks'
    worth, since identical blocks share the compiled code. ``options``: Inductor options over
    :func:`inductor_options`'s (bench/speed.py measures some). The blocks call diffgen's Triton kernels that
    beat Inductor's own (diffgen.layers.fused.GRAPH_KERNELS) as custom ops.
    """
    from diffgen.layers.attention import prepare_compiled_attention
    from diffgen.layers.fused import prepare_graph_kernels

    prepare_graph_kernels()
    parameter = next(model.parameters(), None)
    if parameter is not None:
        prepare_compiled_attention(parameter.device)
    options = inductor_options(model, options)
    count = 0
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                block.compile(fullgraph=False, options=options)
                count += 1
    return count


QUANTIZATIONS = ("fp8",)


def apply_quantization(components: dict, method: str) -> int:
    """Quantize the DiT(s) of a pipeline; returns the number of linears replaced."""
    from diffgen.errors import DiffgenError
    from diffgen.layers.linear import quantize_linears_fp8

    if method not in QUANTIZATIONS:
        raise DiffgenError(f"--quantize {method!r} is not supported; choose one of {', '.join(QUANTIZATIONS)}")
    return sum(quantize_linears_fp8(components[name]) for name in DIT_COMPONENTS
               if isinstance(components.get(name), nn.Module))


def cache_dir() -> Path:
    """diffgen's own cache folder: $DIFFGEN_CACHE_DIR, else $XDG_CACHE_HOME/diffgen, else ~/.cache/diffgen."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffgen"


def use_persistent_compile_cache() -> Path:
    """Keep Inductor's FX-graph and AOT-autograd caches (and Triton's kernels) in diffgen's cache folder.

    A restarted server or a second ``generate --compile`` then loads compiled blocks instead of
    compiling them again. A TORCHINDUCTOR_CACHE_DIR set by the user wins.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor")))
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder


def check_compile_options(compile: bool | None, lora_mode: str | None) -> None:
    """What cannot be compiled, refused before anything loads.

    Dynamic LoRA: each adapted linear reads the adapters the running request picked (a context variable)
    in its forward. The compiler cannot trace that read: it breaks every block's graph there and falls
    back to eager, recompiling per set of scales, so compiling would cost start-up time and gain nothing.
    Merged LoRAs compile (their weights change in place, which compiled blocks read), and so does
    offload (blocks stream their weights in outside the compiled blocks).
    """
    from diffgen.errors import DiffgenError

    if compile and lora_mode == "dynamic":
        raise DiffgenError("--compile cannot be used with --lora-mode dynamic: the compiler cannot trace the "
                           "per-request LoRA choice inside each linear; use --lora-mode merged to compile, or "
                           "leave --compile out (dynamic LoRA runs eager)")


def resolve_compile(requested: bool | None, device: torch.device, serving: bool,
                    lora_mode: str | None = None) -> bool:
    """``--compile`` / ``--no-compile`` win; by default compile only a server's DiT on CUDA.

    A server pays the compilation once at start-up (warm-up) and gains on every request; a one-shot
    ``generate`` gains less than compiling costs (docs/benchmarks.md: FLUX.1-dev 28 steps saves
    ~1.2 s of denoising against >= 3 s of compilation with a warm cache), so it runs eager. Dynamic
    LoRA runs eager (see check_compile_options).
    """
    check_compile_options(requested, lora_mode)
    if requested is not None:
        return bool(requested)
    return serving and device.type == "cuda" and hasattr(torch, "compile") and lora_mode != "dynamic"


def apply_compile(components: dict) -> int:
    if not hasattr(torch, "compile"):
        return 0
    use_persistent_compile_cache()
    return sum(compile_repeated_blocks(components[name]) for name in DIT_COMPONENTS
               if isinstance(components.get(name), nn.Module))


def apply_cuda_graphs(components: dict) -> int:
    """Replay the (compiled) DiTs' forwards from CUDA graphs (diffgen.engine.cuda_graphs); returns how many DiTs.

    For a server on CUDA whose DiT stays on its device: each input signature is captured on its second
    forward (the warm-up's second step for the warmed sizes). ``DIFFGEN_CUDA_GRAPHS=0`` leaves them off.
    """
    from diffgen.engine.cuda_graphs import cuda_graphs_enabled, install_cuda_graphs

    if not cuda_graphs_enabled():
        return 0
    count = 0
    for name in DIT_COMPONENTS:
        model = components.get(name)
        if isinstance(model, nn.Module) and next(model.parameters()).device.type == "cuda":
            install_cuda_graphs(model)
            count += 1
    return count


def release_cuda_graphs(components: dict) -> None:
    """Destroy the DiTs' CUDA graphs (their forwards run plainly again). A rank calls it before destroying its
    process group: graphs that captured collectives hold on to the communicator's resources."""
    import gc

    from diffgen.engine.cuda_graphs import graphed_forward, uninstall_cuda_graphs

    for name in DIT_COMPONENTS:
        forward = graphed_forward(components.get(name))
        if forward is not None:
            forward.drop_graphs()
            uninstall_cuda_graphs(components[name])
    gc.collect()  # a graph's closures may sit in a reference cycle
