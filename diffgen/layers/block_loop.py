"""The one loop over a DiT's repeated blocks, where step caching and layerwise offload hook in.

A DiT describes its blocks as segments: a block list, how one block maps the hidden state (a tuple
of tensors, e.g. ``(image, text)``) and, for a segment after the first, how the hidden state changes
form on entering it (FLUX joins text and image into one sequence for its single-stream blocks).
Every DiT calls :func:`run_blocks` instead of writing its own loop, so a feature that needs "the
blocks" (skip the tail and reuse a residual, stream weights in ahead of use) exists once here.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

Hidden = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class BlockSegment:
    blocks: nn.ModuleList
    #: (block, hidden) -> hidden
    run: Callable[[nn.Module, Hidden], Hidden]
    #: hidden of the previous segment -> hidden of this one (None: same form)
    enter: Callable[[Hidden], Hidden] | None = None


class BlockRunner:
    """The blocks of one DiT forward, flattened: run any range, convert a hidden state to the final form.

    A hidden state "at position p" is the output of block p - 1 (the loop input at p = 0), in the
    form of that block's segment.
    """

    def __init__(self, model: nn.Module, segments: Sequence[BlockSegment]):
        self.model = model
        self.blocks: list[tuple[nn.Module, BlockSegment]] = []
        self._entered_at: dict[int, BlockSegment] = {}
        for segment in segments:
            if self.blocks and segment.enter is not None:
                self._entered_at[len(self.blocks)] = segment
            self.blocks.extend((block, segment) for block in segment.blocks)
        self.offloader = _OFFLOADERS.get(model)

    def __len__(self) -> int:
        return len(self.blocks)

    def block(self, index: int) -> nn.Module:
        return self.blocks[index][0]

    def run(self, hidden: Hidden, start: int = 0, stop: int | None = None) -> Hidden:
        stop = len(self.blocks) if stop is None else stop
        for index in range(start, stop):
            block, segment = self.blocks[index]
            if index in self._entered_at:
                hidden = segment.enter(hidden)
            if self.offloader is not None:
                self.offloader.before_block(block)
            hidden = segment.run(block, hidden)
            if self.offloader is not None:
                self.offloader.after_block(block)
        return hidden

    def to_final_form(self, hidden: Hidden, position: int) -> Hidden:
        """The hidden state at ``position`` in the form of the loop's output (exact: only joins/splits)."""
        for index, segment in sorted(self._entered_at.items()):
            if index >= position:
                hidden = segment.enter(hidden)
        return hidden


class BlockLoopHook(Protocol):
    """Replaces the plain run of all blocks (step caching)."""

    def run_blocks(self, runner: BlockRunner, hidden: Hidden, conditioning: torch.Tensor | None) -> Hidden: ...


class BlockOffloader(Protocol):
    """Moves a block's weights in before it runs and out after (layerwise offload)."""

    def before_block(self, block: nn.Module) -> None: ...

    def after_block(self, block: nn.Module) -> None: ...


#: The step cache of the request being denoised in this thread (set by the denoising loop).
active_block_hook: contextvars.ContextVar[BlockLoopHook | None] = contextvars.ContextVar(
    "diffgen_block_hook", default=None)
_OFFLOADERS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def attach_offloader(model: nn.Module, offloader: BlockOffloader | None) -> None:
    """Make every :func:`run_blocks` of ``model`` call ``offloader`` around each block (None detaches)."""
    if offloader is None:
        _OFFLOADERS.pop(model, None)
    else:
        _OFFLOADERS[model] = offloader


def is_offloaded(model: nn.Module) -> bool:
    """Whether ``model``'s blocks stream their weights in as they run (layerwise offload)."""
    return model in _OFFLOADERS


def run_blocks(model: nn.Module, hidden: Hidden, segments: Sequence[BlockSegment],
               conditioning: torch.Tensor | None = None) -> Hidden:
    """Run all blocks of ``model`` over ``hidden``; returns the hidden state in the last segment's form.

    ``conditioning``: the per-step conditioning the blocks are modulated by (timestep embedding or
    modulation table); step caches that decide from it (TeaCache) read it here.
    """
    runner = BlockRunner(model, segments)
    hook = active_block_hook.get()
    if hook is None:
        return runner.run(hidden)
    return hook.run_blocks(runner, hidden, conditioning)
