"""The guidance seam: a pipeline says *what* one denoising step evaluates, the Denoiser decides *how*.

A pipeline's ``guidance(state, latents, t, step)`` returns a :class:`GuidanceStep`: the model, one
complete set of DiT keyword arguments per branch (conditional first) and the ``combine`` that turns
the branches' predictions into the one the sampler steps with. :func:`run_branches` evaluates them:
in sequence on one process, or one branch per rank of the CFG-parallel group followed by an
all-gather. Because a branch is plain keyword arguments, :func:`run_batched` runs the branches of
several requests as rows of one forward: tensors are concatenated on the batch axis, everything else
(and the tensors a step names ``shared``) must be equal to share a forward, and a text tensor named
in ``text_padding`` may differ in length: it is padded at the end with masked tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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
    #: tensor arguments that are the same for every row (position ids): passed once, never concatenated
    shared: frozenset[str] = frozenset()
    #: text tensor argument -> its (B, T) key-mask argument: rows of different text lengths are padded at
    #: the end and masked (a mask of None means every token counts)
    text_padding: dict[str, str] = field(default_factory=dict)


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


class BatchInputs:
    """What :func:`run_batched` built at the last step, kept while the same tensors come back: the rows'
    text embeddings, masks and ids do not change between steps until a request joins or leaves, so they
    are concatenated (and padded, and compared) once per batch membership; the latents and timesteps,
    new at each step, are concatenated each step. Entries are found by the tensors' identity (held, so an
    id cannot be reused while kept; pipelines never change a branch's tensor in place between steps, and
    inference tensors have no version counter to check); one not used at a step is dropped.
    """

    def __init__(self) -> None:
        self._kept: dict[tuple, tuple[tuple, Any]] = {}
        self._used: dict[tuple, tuple[tuple, Any]] = {}
        self.built: dict[str, int] = {}  # argument name -> how many times it was concatenated (tests, benches)

    def get(self, name: str, tensors: tuple[torch.Tensor | None, ...], build: Callable[[], Any]) -> Any:
        key = (name, *(id(t) if t is not None else None for t in tensors))
        entry = self._used.get(key) or self._kept.get(key)
        if entry is None or any(a is not b for a, b in zip(entry[0], tensors, strict=True)):
            entry = (tensors, build())
            self.built[name] = self.built.get(name, 0) + 1
        self._used[key] = entry
        return entry[1]

    def next_step(self) -> None:
        self._kept, self._used = self._used, {}


def run_batched(steps: list[GuidanceStep], kept: BatchInputs | None = None) -> list[list[torch.Tensor]]:
    """Each step's branch predictions (as :func:`run_branches` gives them), computed with as few forwards as
    possible: every branch of every step that fits the same forward (same model, equal shared arguments,
    equal row shapes up to the padded text length) becomes rows of one batch. ``kept``: the inputs built at
    the previous step, reused where the same tensors come back (then call its ``next_step``).

    Rows are independent in every DiT (per-row timesteps, modulation and attention; padded text keys are
    masked), so a request's prediction equals its prediction alone up to floating-point rounding.
    """
    kept = kept or BatchInputs()
    calls = [(i, kwargs) for i, step in enumerate(steps) for kwargs in step.branches]
    groups: list[list[int]] = []  # indices into calls
    for index, (i, kwargs) in enumerate(calls):
        for group in groups:
            first_step, first = calls[group[0]]
            if _fit_together(steps[first_step], first, steps[i], kwargs, kept):
                group.append(index)
                break
        else:
            groups.append([index])
    outputs: list[torch.Tensor | None] = [None] * len(calls)
    for group in groups:
        step = steps[calls[group[0]][0]]
        members = [calls[index][1] for index in group]
        batched = step.model(**_concatenate(step, members, kept))
        rows = [_rows(kwargs, step) for kwargs in members]
        for index, output in zip(group, batched.split(rows), strict=True):
            outputs[index] = output
    predictions: list[list[torch.Tensor]] = [[] for _ in steps]
    for (i, _), output in zip(calls, outputs, strict=True):
        select = steps[i].select or (lambda x: x)
        predictions[i].append(select(output))
    return predictions


def _rows(kwargs: dict[str, Any], step: GuidanceStep) -> int:
    return next(value.shape[0] for name, value in kwargs.items()
                if isinstance(value, torch.Tensor) and name not in step.shared)


def _fit_together(step_a: GuidanceStep, a: dict[str, Any], step_b: GuidanceStep, b: dict[str, Any],
                  kept: BatchInputs) -> bool:
    if step_a.model is not step_b.model or a.keys() != b.keys() or step_a.shared != step_b.shared:
        return False
    masks = set(step_a.text_padding.values())
    for name, x in a.items():
        y = b[name]
        if name in masks:  # rebuilt when the texts are padded
            continue
        if name in step_a.shared or not isinstance(x, torch.Tensor):
            if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
                return False
            if isinstance(x, torch.Tensor):
                if x.shape != y.shape or x.dtype != y.dtype:
                    return False
                # (torch.equal of GPU tensors waits for the GPU: compared once while the same tensors come back)
                if x is not y and not kept.get(f"equal {name}", (x, y), lambda x=x, y=y: torch.equal(x, y)):
                    return False
            elif x != y:
                return False
            continue
        if not isinstance(y, torch.Tensor) or x.dtype != y.dtype or x.ndim != y.ndim:
            return False
        same_from = 2 if name in step_a.text_padding else 1  # a padded text may differ in length (dim 1)
        if x.shape[same_from:] != y.shape[same_from:]:
            return False
    return True


def _concatenate(step: GuidanceStep, members: list[dict[str, Any]], kept: BatchInputs) -> dict[str, Any]:
    if len(members) == 1:
        return members[0]
    masks = {mask: text for text, mask in step.text_padding.items()}
    batched: dict[str, Any] = {}
    for name, first in members[0].items():
        if name in masks:
            continue
        if name in step.shared or not isinstance(first, torch.Tensor):
            batched[name] = first
        elif name in step.text_padding:
            texts = tuple(kwargs[name] for kwargs in members)
            text_masks = tuple(kwargs.get(step.text_padding[name]) for kwargs in members)
            batched[name], batched[step.text_padding[name]] = kept.get(
                name, texts + text_masks, lambda texts=texts, text_masks=text_masks: _pad_text(texts, text_masks))
        else:
            tensors = tuple(kwargs[name] for kwargs in members)
            batched[name] = kept.get(name, tensors, lambda tensors=tensors: torch.cat(tensors))
    return batched


def _pad_text(texts: tuple[torch.Tensor, ...],
              masks: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Texts (B_i, T_i, ...) padded with zeros to the longest, with their key masks; None when no token is masked."""
    length = max(text.shape[1] for text in texts)
    if all(mask is None for mask in masks) and all(text.shape[1] == length for text in texts):
        return torch.cat(texts), None
    dtype = next((mask.dtype for mask in masks if mask is not None), torch.int64)
    padded, padded_masks = [], []
    for text, mask in zip(texts, masks, strict=True):
        if mask is None:
            mask = torch.ones(text.shape[:2], dtype=dtype, device=text.device)
        extra = length - text.shape[1]
        padded.append(torch.cat([text, text.new_zeros(text.shape[0], extra, *text.shape[2:])], dim=1))
        padded_masks.append(torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1))
    return torch.cat(padded), torch.cat(padded_masks)
