"""Running models larger than the GPU: components or DiT blocks live in CPU memory until used.

- ``model``: each component (text encoders, DiT(s), VAE) stays on the CPU and moves to the GPU when
  it runs; the component that ran before goes back. Costs one copy of each component per request.
- ``layerwise``: as ``model`` for the other components, and the DiT keeps only its small parts on the
  GPU: its blocks stream in from pinned CPU memory on a side stream, ``prefetch`` blocks ahead of the
  one running, and leave right after it ran, so a few blocks are on the GPU at any time. The copies
  overlap the previous blocks' compute (PCIe ~25 GB/s against a 14B block's ~10 ms of work per 0.7 GB).

Both are driven by the model's own calls (a forward pre-hook per component, the block loop's
hooks per block): the pipelines do not know about offloading. Every move is appended to ``moves``
so tests (and curious users) can see what was moved when.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from diffgen.layers.block_loop import attach_offloader
from diffgen.options import OFFLOAD_MODES

DIT_COMPONENTS = ("transformer", "transformer_2")
#: component methods that run the module without its forward (diffusers VAEs)
_ENTRY_METHODS = ("encode", "decode", "tiled_decode", "tiled_encode")


class ModelOffloader:
    """Components on the CPU; the one about to run moves to ``device``, the previous one leaves."""

    def __init__(self, components: dict[str, Any], device: torch.device, resident: tuple[str, ...] = ()):
        """``resident``: components that manage their own memory (layerwise DiTs): they never move, but
        when one runs, the component on the device leaves (the text encoders during denoising)."""
        self.device = device
        self.modules = {name: c for name, c in components.items() if isinstance(c, nn.Module)}
        self.resident = set(resident)
        self.on_device: str | None = None
        self.moves: list[tuple[str, str]] = []  # (component, "in" | "out")
        for name, module in self.modules.items():
            if name not in self.resident:
                module.to("cpu")
            module.register_forward_pre_hook(lambda _module, _args, name=name: self.use(name))
            for method in _ENTRY_METHODS:
                if callable(getattr(module, method, None)):
                    setattr(module, method, self._entry(name, getattr(module, method)))

    def _entry(self, name: str, method):
        @functools.wraps(method)
        def run(*args, **kwargs):
            self.use(name)
            return method(*args, **kwargs)
        return run

    def use(self, name: str) -> None:
        if self.on_device == name:
            return
        if self.on_device is not None:
            self.modules[self.on_device].to("cpu")
            self.moves.append((self.on_device, "out"))
            self.on_device = None
        if name not in self.resident:
            self.modules[name].to(self.device)
            self.moves.append((name, "in"))
            self.on_device = name


class LayerwiseOffloader:
    """Streams a DiT's blocks: block i is on the device only from shortly before it runs until it ran.

    The small parts of the model (embedders, output head) stay on the device. Each block's tensors
    keep a CPU copy (pinned on CUDA); loading allocates device copies on a side stream and swaps them
    in as the parameters' data, eviction swaps the CPU copies back and frees the device memory.
    """

    def __init__(self, model: nn.Module, device: torch.device, prefetch: int = 1):
        self.device = device
        self.prefetch = prefetch
        self.blocks = [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]
        self.index = {id(block): i for i, block in enumerate(self.blocks)}
        self.moves: list[tuple[str, int]] = []
        self._loaded: dict[int, torch.cuda.Event | None] = {}
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        in_blocks = {id(t) for block in self.blocks for t in self._tensors(block)}
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) not in in_blocks:
                tensor.data = tensor.data.to(device)
        self._storage: list[list[torch.Tensor]] = []
        for block in self.blocks:
            tensors = self._tensors(block)
            cpu = [t.data.to("cpu") for t in tensors]
            if self._cuda:
                cpu = [t.pin_memory() for t in cpu]
            for tensor, stored in zip(tensors, cpu, strict=True):
                tensor.data = stored
            self._storage.append(cpu)
        attach_offloader(model, self)

    @staticmethod
    def _tensors(block: nn.Module) -> list[torch.Tensor]:
        return [*block.parameters(), *block.buffers()]

    @property
    def resident(self) -> list[int]:
        return sorted(self._loaded)

    def _load(self, i: int) -> None:
        if i in self._loaded:
            return
        tensors = self._tensors(self.blocks[i])
        if self._cuda:
            with torch.cuda.stream(self._stream):
                copies = [stored.to(self.device, non_blocking=True) for stored in self._storage[i]]
                ready = torch.cuda.Event()
                ready.record(self._stream)
        else:  # no second memory on a CPU run: a fresh copy keeps the moves observable
            copies, ready = [stored.clone() for stored in self._storage[i]], None
        for tensor, copy in zip(tensors, copies, strict=True):
            tensor.data = copy
        self._loaded[i] = ready
        self.moves.append(("load", i))

    def _evict(self, i: int) -> None:
        self._loaded.pop(i, None)
        for tensor, stored in zip(self._tensors(self.blocks[i]), self._storage[i], strict=True):
            if self._cuda:
                # allocated on the side stream, used on the compute stream: free only after that use
                tensor.data.record_stream(torch.cuda.current_stream(self.device))
            tensor.data = stored
        self.moves.append(("evict", i))

    def evict_all(self) -> None:
        """Every block back to its stored copy (before its weights are changed, e.g. by a merged LoRA)."""
        for i in list(self._loaded):
            self._evict(i)

    def before_block(self, block: nn.Module) -> None:
        i = self.index[id(block)]
        self._load(i)
        for ahead in range(1, self.prefetch + 1):  # wraps around: the next forward starts at block 0
            self._load((i + ahead) % len(self.blocks))
        ready = self._loaded[i]
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)

    def after_block(self, block: nn.Module) -> None:
        self._evict(self.index[id(block)])


def apply_offload(pipeline: Any, mode: str, prefetch: int = 1) -> list[Any]:
    """Set up ``mode`` on a pipeline whose components were loaded on the CPU; returns the offloaders."""
    from diffgen.errors import DiffgenError

    if mode not in OFFLOAD_MODES:
        raise DiffgenError(f"--offload {mode!r} is not supported; choose one of {', '.join(OFFLOAD_MODES)}")
    if mode == "none":
        return []
    components, device = pipeline.components, pipeline.device
    if mode == "model":
        return [ModelOffloader(components, device)]
    dits = tuple(name for name in DIT_COMPONENTS if isinstance(components.get(name), nn.Module))
    offloaders: list[Any] = [ModelOffloader(components, device, resident=dits)]
    offloaders += [LayerwiseOffloader(components[name], device, prefetch) for name in dits]
    return offloaders
