"""Parallel degrees: what the user asks (``ParallelConfig``), checked and completed into a ``ParallelPlan``.

The options (diffgen/options.py, group "parallelism") are spelled as SGLang Diffusion spells them
(--num-gpus --ulysses-degree --ring-degree --enable-cfg-parallel --tp-size --dp-size) so its users
can switch without rewriting scripts.

Ranks of one replica are laid out as (cfg, ring, ulysses), ulysses fastest: the ranks of a Ulysses
group are neighbours (their all-to-all is the heaviest traffic) and the sequence chunks of one ring
step are contiguous. Replicas (dp) are the outermost axis; the text encoder's tensor-parallel groups
are ``tp_size`` consecutive ranks of a replica.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffgen.errors import DiffgenError


class ParallelConfigError(DiffgenError):
    """An inconsistent combination of parallel degrees, reported before any model loads."""


@dataclass(frozen=True)
class ParallelConfig:
    """The degrees as given; None means "choose for me" (see :func:`make_plan`)."""

    num_gpus: int = 1
    ulysses_degree: int | None = None
    ring_degree: int | None = None
    enable_cfg_parallel: bool | None = None
    tp_size: int | None = None
    dp_size: int = 1

    @classmethod
    def from_options(cls, options: dict) -> ParallelConfig:
        """Pick the parallel keys out of an options dict (CLI, config file or Engine kwargs)."""
        values = {name: options[name] for name in FIELDS if options.get(name) is not None}
        return cls(**values)

    @property
    def is_parallel(self) -> bool:
        return self.num_gpus > 1


#: the option names (their flags and help: the "parallelism" group of diffgen/options.py)
FIELDS = ("num_gpus", "ulysses_degree", "ring_degree", "enable_cfg_parallel", "tp_size", "dp_size")


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs to know about a model, read from its config files before loading."""

    name: str
    heads: int  # attention heads of the DiT
    guidance_branches: int  # 2 when the model runs CFG by default (cond + uncond), else 1
    sequence_parallel: bool = True  # False: its DiT does not shard its tokens (Ulysses / Ring unavailable)


@dataclass(frozen=True)
class ParallelPlan:
    """Every degree decided; ``num_gpus == dp_size * cfg_degree * ring_degree * ulysses_degree``."""

    num_gpus: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_degree: int = 1
    tp_size: int = 1
    dp_size: int = 1
    automatic: bool = False

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def replica_size(self) -> int:
        return self.cfg_degree * self.sp_degree

    def describe(self) -> str:
        parts = [f"{self.num_gpus} GPU(s)"]
        if self.dp_size > 1:
            parts.append(f"{self.dp_size} replicas")
        if self.cfg_degree > 1:
            parts.append("CFG parallel")
        if self.ulysses_degree > 1:
            parts.append(f"Ulysses {self.ulysses_degree}")
        if self.ring_degree > 1:
            parts.append(f"Ring {self.ring_degree}")
        if self.tp_size > 1:
            parts.append(f"text-encoder TP {self.tp_size}")
        how = "automatic plan" if self.automatic else "parallel plan"
        return f"{how}: " + ", ".join(parts)


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ParallelConfigError(f"--{name.replace('_', '-')}: {value!r} is not a positive integer")


def make_plan(config: ParallelConfig, model: ModelFacts) -> ParallelPlan:
    """Check ``config`` against ``model`` and fill every degree left open.

    Automatic choices, per replica of ``num_gpus / dp_size`` GPUs: CFG parallel when the model runs
    two guidance branches; then Ulysses up to what the head count allows (its all-to-all moves
    less than a ring and keeps one attention kernel per layer); Ring for the rest.
    """
    for name in FIELDS:
        if name != "enable_cfg_parallel":
            _positive(name, getattr(config, name))
    n, dp = config.num_gpus, config.dp_size
    if n % dp:
        raise ParallelConfigError(f"--dp-size {dp} does not divide --num-gpus {n}")
    per_replica = n // dp
    if config.enable_cfg_parallel and model.guidance_branches < 2:
        raise ParallelConfigError(
            f"--enable-cfg-parallel: {model.name} runs one guidance branch (no classifier-free guidance), "
            "so there is nothing to run in parallel; use --ulysses-degree / --ring-degree instead")
    if config.ulysses_degree is not None and model.heads % config.ulysses_degree:
        raise ParallelConfigError(
            f"--ulysses-degree {config.ulysses_degree} does not divide {model.name}'s {model.heads} attention "
            f"heads; allowed: {', '.join(str(d) for d in _divisors(model.heads))} (use --ring-degree for the rest)")

    if not model.sequence_parallel:
        for name in ("ulysses_degree", "ring_degree"):
            if (getattr(config, name) or 1) > 1:
                raise ParallelConfigError(f"--{name.replace('_', '-')}: {model.name} does not support sequence "
                                          "parallelism yet; use --dp-size (replicas) instead")
    given = (2 if config.enable_cfg_parallel else 1) * (config.ulysses_degree or 1) * (config.ring_degree or 1)
    if per_replica % given:
        raise ParallelConfigError(_product_message(config, per_replica))
    rest = per_replica // given
    cfg = 2 if config.enable_cfg_parallel else 1
    if config.enable_cfg_parallel is None and model.guidance_branches == 2 and rest % 2 == 0:
        cfg, rest = 2, rest // 2
    ulysses = config.ulysses_degree
    if ulysses is None and not model.sequence_parallel:
        ulysses = 1
    if config.ring_degree is None and not model.sequence_parallel:
        if rest != 1:
            raise ParallelConfigError(
                f"--num-gpus {n}: {model.name} does not support sequence parallelism yet, so {per_replica} GPU(s) "
                f"per replica cannot be used; use --dp-size {n} (replicas) instead")
    if ulysses is None:
        ulysses = max(d for d in _divisors(rest) if model.heads % d == 0)
        rest //= ulysses
    ring = config.ring_degree
    if ring is None:
        ring, rest = rest, 1
    if rest != 1:
        raise ParallelConfigError(_product_message(config, per_replica))
    tp = config.tp_size or 1
    if per_replica % tp:
        raise ParallelConfigError(f"--tp-size {tp} does not divide the {per_replica} GPU(s) of a replica "
                                  f"(--num-gpus {n} / --dp-size {dp})")
    automatic = n > 1 and None in (config.ulysses_degree, config.ring_degree, config.enable_cfg_parallel)
    return ParallelPlan(num_gpus=n, ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg, tp_size=tp,
                        dp_size=dp, automatic=automatic)


def _product_message(config: ParallelConfig, per_replica: int) -> str:
    terms = []
    if config.dp_size > 1:
        terms.append(f"--dp-size {config.dp_size}")
    if config.enable_cfg_parallel:
        terms.append("2 (--enable-cfg-parallel)")
    if config.ulysses_degree:
        terms.append(f"--ulysses-degree {config.ulysses_degree}")
    if config.ring_degree:
        terms.append(f"--ring-degree {config.ring_degree}")
    product = " x ".join(terms) or "1"
    return (f"--num-gpus {config.num_gpus}: the degrees do not multiply to it ({product}; each replica of "
            f"{per_replica} GPU(s) must equal cfg x ulysses x ring)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
