"""The guidance seam: a pipeline says *what* one denoising step evaluates, the Denoiser decides *how*.

A pipeline's ``guidance(state, latents, t, step)`` returns a :class:`GuidanceStep`: the model, one
complete set of DiT keyword arguments per branch (conditional first) and the ``combine`` that turns
the branches' predictions into the one the sampler steps with. :func:`run_branches` evaluates them:
in sequence on one process, or one branch per rank of the CFG-parallel group followed by an
all-gather. Because a branch is plain keyword arguments, running branches (or several requests) as
rows of one batch, or skipping a step from a cache, are further strategies of the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from diffgen.parallel import state as parallel_state

Combine = Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass
class GuidanceStep:
    model: Callable[..., torch.Tensor]
    branches: list[dict[str, Any]]  # DiT keyword arguments per branch; [cond] or [cond, uncond]
    combine: Combine
    #: applied to each branch's output before combining (and before the CFG all-gather), e.g. dropping
    #: the edit-input tokens that are not denoised
    select: Callable[[torch.Tensor], torch.Tensor] | None = None


def only_branch(predictions: list[torch.Tensor]) -> torch.Tensor:
    return predictions[0]


def cfg(scale: float) -> Combine:
    """Classifier-free guidance uncond + s * (cond - uncond) (FLUX true CFG, Wan; per expert for Wan2.2)."""
    def combine(predictions: list[torch.Tensor]) -> torch.Tensor:
        if len(predictions) == 1:
            return predictions[0]
        cond, uncond = predictions
        return uncond + scale * (cond - uncond)
    return combine


def norm_preserving_cfg(scale: float) -> Combine:
    """Qwen-Image's true CFG: the combined prediction rescaled per token to the conditional one's norm."""
    plain = cfg(scale)

    def combine(predictions: list[torch.Tensor]) -> torch.Tensor:
        if len(predictions) == 1:
            return predictions[0]
        cond, combined = predictions[0], plain(predictions)
        return combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    return combine


def run_branches(step: GuidanceStep) -> list[torch.Tensor]:
    """Each branch's prediction, in branch order, on every rank.

    With a CFG-parallel group whose size equals the number of branches, rank i of the group runs
    branch i and the results are all-gathered; otherwise the branches run one after another.
    """
    select = step.select or (lambda x: x)
    state = parallel_state.current()
    group = state.cfg if state is not None else None
    if group is None or group.size == 1 or len(step.branches) != group.size:
        return [select(step.model(**kwargs)) for kwargs in step.branches]
    mine = select(step.model(**step.branches[group.rank])).contiguous()
    predictions = [torch.empty_like(mine) for _ in range(group.size)]
    dist.all_gather(predictions, mine, group=group.group)
    return predictions
