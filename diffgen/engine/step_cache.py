"""Step caching: skip most of the DiT's blocks on steps where their output barely changes.

Three training-free methods, each replaying a cached residual (blocks' output minus their input) of
the last computed steps:

- ``first-block`` (First Block Cache, ParaAttention; DBCache with one compute block): always run the
  first block; when its residual differs from the one of the last computed step by less than
  ``threshold`` (mean absolute difference / mean absolute value), skip the remaining blocks.
- ``teacache`` (TeaCache): before any block, accumulate the relative L1 change of a timestep-modulated
  input, rescaled by a polynomial fitted per model and published with the method; while the sum
  stays under ``threshold`` skip every block, else compute and reset the sum. Only models with
  published coefficients (FLUX.1, HunyuanVideo, Wan2.1 T2V 1.3B/14B and I2V 14B) accept it.
- ``taylorseer`` (TaylorSeer, "From Reusing to Forecasting", Liu et al. 2025, as cache-dit pairs it with
  DBCache): first-block's decision, but a skipped step replays the residual *forecast* by a Taylor
  expansion in the step index, whose derivatives are finite differences of the residuals of the last
  computed steps (order ``order``; 0 replays the last residual unchanged: first-block exactly).

A :class:`StepCacheSession` belongs to one request. It keeps one state per (DiT, guidance branch):
the conditional and unconditional passes never share residuals, and Wan2.2's second expert starts
its own cache. The first ``warmup_steps`` forwards of every state and the last ``final_steps``
steps of the request always run all blocks.

Why not the ``cache-dit`` library: it patches diffusers transformer classes by forward signature
(keyword ``hidden_states`` / ``encoder_hidden_states`` blocks) and drives its context from the
diffusers pipeline's ``__call__``; diffgen's blocks take positional tensors and its loop is its own,
so adapting it would take more code than the two methods themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from diffgen.errors import InvalidRequestError
from diffgen.layers.block_loop import BlockRunner, Hidden
from diffgen.options import CACHE_METHODS, MAX_CACHE_THRESHOLD, check_value  # noqa: F401 (re-exported)

#: taylorseer: the order when none is given (TaylorSeer's and cache-dit's default)
TAYLOR_ORDER = 1

#: first-block threshold when none is given (ParaAttention's FLUX value)
FIRST_BLOCK_THRESHOLD = 0.08


@dataclass(frozen=True)
class StepCacheConfig:
    """How one request caches. ``None`` fields take the method's / model's published default."""

    method: str
    threshold: float | None = None
    warmup_steps: int | None = None  # forwards of each (DiT, branch) state always computed first
    final_steps: int = 1  # the request's last steps always computed
    head_blocks: int = 1  # first-block: the blocks always run whose residual decides
    coefficients: tuple[float, ...] | None = None  # teacache: rescaling polynomial, highest power first
    #: a fixed schedule instead of a threshold: reuse exactly at these step indices (all branches)
    reuse_steps: frozenset[int] | None = None
    order: int | None = None  # taylorseer: the Taylor expansion's order

    def __post_init__(self) -> None:
        check_cache_options(self.method, self.threshold, self.warmup_steps, self.order)
        if self.method == "none":
            raise InvalidRequestError("cache", "StepCacheConfig needs a method other than 'none'")


def check_cache_options(method: str | None, threshold: float | None, warmup_steps: int | None = None,
                        order: int | None = None) -> None:
    """The cache knobs against their options (diffgen.options: one definition for CLI, config, API, HTTP)."""
    if method is not None:
        check_value("cache", method)
    if threshold is not None:
        check_value("cache_threshold", threshold)
    if warmup_steps is not None:
        check_value("cache_warmup", warmup_steps)
    if order is not None:
        check_value("cache_order", order)
        if method != "taylorseer":
            raise InvalidRequestError("cache_order", f"only --cache taylorseer extrapolates; --cache {method} has no "
                                      "order")


# -- TeaCache's published per-model data --------------------------------------------------------------


@dataclass(frozen=True)
class TeaCacheProfile:
    coefficients: tuple[float, ...]
    threshold: float
    warmup_steps: int


# TeaCache4FLUX (ali-vilab/TeaCache): 0.25 -> ~1.5x, 0.4 -> ~1.8x, 0.6 (its default) -> ~2.0x.
_FLUX = TeaCacheProfile((4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01), 0.6, 1)
# TeaCache4Wan2.1, "use_ret_steps" mode (the modulation table as input, first 5 steps computed); thresholds: the
# fastest of its recommended low/medium/high values (1.3B 0.05/0.07/0.08, 14B 0.14/0.15/0.20, I2V 480P
# 0.13/0.19/0.26, I2V 720P 0.18/0.20/0.30), the ones its example commands use.
_WAN_T2V_1_3B = TeaCacheProfile(
    (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02), 0.08, 5)
_WAN_T2V_14B = TeaCacheProfile(
    (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01), 0.2, 5)
_WAN_I2V_480P = TeaCacheProfile(
    (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01), 0.26, 5)
_WAN_I2V_720P = TeaCacheProfile(
    (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02), 0.3, 5)


# TeaCache4HunyuanVideo: 0.1 -> ~1.6x, 0.15 (its default) -> ~2.1x.
_HUNYUAN_VIDEO = TeaCacheProfile(
    (7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02), 0.15, 1)


def teacache_profile(model_name: str, inner_dim: int) -> TeaCacheProfile | None:
    """Published coefficients for a model (``ModelDefaults.name`` and the DiT width), or None."""
    if model_name.startswith("FLUX.1"):
        return _FLUX
    if model_name == "HunyuanVideo":
        return _HUNYUAN_VIDEO
    if model_name in ("Wan2.1-T2V", "Wan2.2-T2V-A14B"):  # TeaCache4Wan2.2 reuses the Wan2.1-14B fit
        return {1536: _WAN_T2V_1_3B, 5120: _WAN_T2V_14B}.get(inner_dim)
    return {"Wan2.1-I2V-480P": _WAN_I2V_480P, "Wan2.1-I2V-720P": _WAN_I2V_720P}.get(model_name)


def _flux_signal(runner: BlockRunner, hidden: Hidden, conditioning: torch.Tensor) -> torch.Tensor:
    """TeaCache4FLUX's (and 4HunyuanVideo's) input: the first double block's AdaLN-modulated image tokens."""
    from diffgen.layers.modulation import modulate

    norm = runner.block(0).norm1
    shift, scale = norm(conditioning)[:2]
    return modulate(norm.norm(hidden[0]), shift, scale)


#: DiT class name -> the tensor TeaCache watches (Wan: the timestep modulation table, "e0")
_TEACACHE_SIGNALS: dict[str, Callable[[BlockRunner, Hidden, torch.Tensor], torch.Tensor]] = {
    "FluxTransformer": _flux_signal,
    "HunyuanVideoTransformer": _flux_signal,
    "WanTransformer": lambda runner, hidden, conditioning: conditioning,
}


def resolve_step_cache(default: StepCacheConfig | None, method: str | None, threshold: float | None,
                       model_name: str, inner_dim: int) -> StepCacheConfig | None:
    """A request's cache: its own ``method`` / ``threshold`` over the engine's default; None when off.

    Fills the model's published defaults and rejects TeaCache for models without coefficients.
    """
    check_cache_options(method, threshold)
    if method == "none" or (method is None and default is None):
        return None
    config = default if method is None or (default is not None and default.method == method) else None
    config = config or StepCacheConfig(method=method)
    if threshold is not None:
        config = replace(config, threshold=threshold)
    if config.method == "teacache":
        profile = teacache_profile(model_name, inner_dim)
        if profile is None and config.coefficients is None:
            raise InvalidRequestError("cache", f"teacache has no published coefficients for {model_name}; "
                                      "use first-block")
        if profile is not None:
            config = replace(config, coefficients=config.coefficients or profile.coefficients,
                             threshold=profile.threshold if config.threshold is None else config.threshold,
                             warmup_steps=profile.warmup_steps if config.warmup_steps is None else config.warmup_steps)
    if config.method == "taylorseer":
        order = TAYLOR_ORDER if config.order is None else config.order
        # warm-up: enough computed forwards that the first forecast has every derivative of its order
        config = replace(config, order=order, warmup_steps=order + 1 if config.warmup_steps is None
                         else config.warmup_steps)
    return replace(config, threshold=FIRST_BLOCK_THRESHOLD if config.threshold is None else config.threshold,
                   warmup_steps=1 if config.warmup_steps is None else config.warmup_steps)


def taylor_factors(residual: Hidden, previous: list[Hidden] | None, distance: int, order: int) -> list[Hidden]:
    """TaylorSeer's derivative estimates at a computed step: the residual, then each order's finite difference
    of the previous order's estimate over the ``distance`` steps since the last computed step (as far as the
    previous step's estimates reach, and up to ``order``)."""
    factors = [residual]
    for i in range(min(order, len(previous or ()))):
        factors.append(tuple((new - old) / distance for new, old in zip(factors[i], previous[i], strict=True)))
    return factors


def taylor_forecast(factors: list[Hidden], distance: int) -> Hidden:
    """The residual ``distance`` steps after the computed step: sum_i factors[i] * distance^i / i!, evaluated in
    TaylorSeer's order (``1 / i! * factor * distance^i``); with one factor, the factor itself."""
    forecast = factors[0]
    for i in range(1, len(factors)):
        forecast = tuple(f + (1 / math.factorial(i)) * d * (distance ** i)
                         for f, d in zip(forecast, factors[i], strict=True))
    return forecast


# -- the per-request state ----------------------------------------------------------------------------


@dataclass
class _BranchState:
    forwards: int = 0
    residual: Hidden | None = None  # blocks' output minus input (final form) of the last computed step
    previous: torch.Tensor | None = None  # first-block: head residual; teacache: the watched input
    accumulated: float = 0.0  # teacache
    factors: list[Hidden] | None = None  # taylorseer: the residual's derivative estimates at computed_step
    computed_step: int = 0  # the request step of the last computed forward


def _sequence_parallel_group():
    """The sequence-parallel group of this rank (None when there is none): every rank of it holds a shard of
    the tokens and must take the same decision, or the ranks' collectives inside attention would diverge."""
    try:
        from diffgen.parallel import state as parallel_state
    except ImportError:
        return None
    current = parallel_state.current()
    return current.sp.group if current is not None and current.sp.size > 1 else None


def _relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean |current - previous| / mean |previous|, over all shards of a sequence-parallel run."""
    group = _sequence_parallel_group()
    if group is None:
        return ((current - previous).abs().mean() / previous.abs().mean()).item()
    import torch.distributed as dist

    sums = torch.stack([(current - previous).abs().float().sum(), previous.abs().float().sum()])
    dist.all_reduce(sums, group=group)
    return (sums[0] / sums[1]).item()


def _residual(output: Hidden, start: Hidden) -> Hidden:
    return tuple(o - s for o, s in zip(output, start, strict=True))


def _replay(start: Hidden, residual: Hidden) -> Hidden:
    return tuple(s + r for s, r in zip(start, residual, strict=True))


def _fits(residual: Hidden | None, start: Hidden) -> bool:
    return residual is not None and all(r.shape == s.shape for r, s in zip(residual, start, strict=True))


@dataclass
class StepCacheSession:
    """One request's step cache; the denoising loop makes it the active block-loop hook."""

    config: StepCacheConfig
    total_steps: int
    step: int = 0
    computed: int = 0
    reused: int = 0
    _states: dict[tuple[int, str], _BranchState] = field(default_factory=dict)
    _calls: dict[int, int] = field(default_factory=dict)
    _branch: str | None = None

    def begin_step(self, step: int) -> None:
        self.step = step
        self._calls.clear()

    def set_branch(self, name: str | None) -> None:
        """Name the guidance branch of the next forwards (else the n-th forward of a step is branch n)."""
        self._branch = name

    def timings(self) -> dict[str, float]:
        return {"cache_forwards_computed": float(self.computed), "cache_forwards_reused": float(self.reused)}

    def _state(self, model: torch.nn.Module) -> _BranchState:
        call = self._calls.get(id(model), 0)
        self._calls[id(model)] = call + 1
        branch = self._branch if self._branch is not None else str(call)
        return self._states.setdefault((id(model), branch), _BranchState())

    def _must_compute(self, state: _BranchState) -> bool:
        return state.forwards < self.config.warmup_steps or self.step >= self.total_steps - self.config.final_steps

    def run_blocks(self, runner: BlockRunner, hidden: Hidden, conditioning: torch.Tensor | None) -> Hidden:
        state = self._state(runner.model)
        if self.config.method == "teacache":
            out, reused = self._teacache(state, runner, hidden, conditioning)
        else:
            out, reused = self._first_block(state, runner, hidden)
        state.forwards += 1
        if reused:
            self.reused += 1
        else:
            self.computed += 1
        return out

    def _scheduled(self, state: _BranchState, start: Hidden) -> bool | None:
        """The fixed schedule's decision (None without one)."""
        if self.config.reuse_steps is None:
            return None
        return self.step in self.config.reuse_steps and _fits(state.residual, start)

    def _first_block(self, state: _BranchState, runner: BlockRunner, hidden: Hidden) -> tuple[Hidden, bool]:
        head = min(self.config.head_blocks, len(runner))
        after_head = runner.run(hidden, 0, head)
        head_residual = after_head[0] - hidden[0]
        start = runner.to_final_form(after_head, head)
        reuse = self._scheduled(state, start)
        if reuse is None:
            reuse = (not self._must_compute(state) and _fits(state.residual, start)
                     and state.previous is not None and state.previous.shape == head_residual.shape
                     and _relative_l1(head_residual, state.previous) < self.config.threshold)
        if reuse:
            if self.config.method == "taylorseer":
                return _replay(start, taylor_forecast(state.factors, self.step - state.computed_step)), True
            return _replay(start, state.residual), True
        out = runner.run(after_head, head)
        state.residual = _residual(out, start)
        if self.config.method == "taylorseer":
            state.factors = taylor_factors(state.residual, state.factors, self.step - state.computed_step,
                                           self.config.order)
        state.computed_step = self.step
        state.previous = head_residual  # compared against the last *computed* step, as ParaAttention does
        return out, False

    def _teacache(self, state: _BranchState, runner: BlockRunner, hidden: Hidden,
                  conditioning: torch.Tensor | None) -> tuple[Hidden, bool]:
        signal_fn = _TEACACHE_SIGNALS.get(type(runner.model).__name__)
        if signal_fn is None or conditioning is None:
            raise InvalidRequestError("cache", f"teacache does not support {type(runner.model).__name__}")
        signal = signal_fn(runner, hidden, conditioning)
        start = runner.to_final_form(hidden, 0)
        reuse = self._scheduled(state, start)
        if reuse is None:
            reuse = False
            if not self._must_compute(state) and state.previous is not None and _fits(state.residual, start):
                change = _relative_l1(signal, state.previous)
                state.accumulated += sum(c * change**p for p, c in enumerate(reversed(self.config.coefficients)))
                reuse = state.accumulated < self.config.threshold
        state.previous = signal
        if reuse:
            return _replay(start, state.residual), True
        state.accumulated = 0.0
        out = runner.run(hidden)
        state.residual = _residual(out, start)
        return out, False
