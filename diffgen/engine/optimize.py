"""Opt-in speed-ups applied to a loaded pipeline."""

from __future__ import annotations

import torch
from torch import nn

DIT_COMPONENTS = ("transformer", "transformer_2")


def compile_repeated_blocks(model: nn.Module) -> int:
    """torch.compile each block of the DiT's block lists in place; returns how many were compiled.

    Compiling one block at a time (rather than the whole model) keeps compile time to a few blocks'
    worth, since identical blocks share the compiled code.
    """
    count = 0
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                block.compile(fullgraph=False)
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


def apply_compile(components: dict) -> int:
    if not hasattr(torch, "compile"):
        return 0
    return sum(compile_repeated_blocks(components[name]) for name in DIT_COMPONENTS
               if isinstance(components.get(name), nn.Module))
