"""Process groups of one rank and the parallel state the shared seams read.

Every rank runs the same pipeline code; the seams ask :func:`current` what to do:
the attention entry point and the token-shard helper read the sequence-parallel groups, the
Denoiser the CFG group, the text encoders' linears the TP group, the VAE the replica group.
``current()`` is None in an ordinary single-process run, so that path is untouched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffgen.parallel.config import ParallelPlan


@dataclass
class Axis:
    """One parallel axis as seen by this rank: its group (None when the degree is 1), size and rank."""

    group: dist.ProcessGroup | None = None
    size: int = 1
    rank: int = 0
    ranks: tuple[int, ...] = ()  # global ranks of the group, in axis order


@dataclass
class ParallelState:
    plan: ParallelPlan
    rank: int
    world_size: int
    device: torch.device
    dp: Axis
    replica: Axis  # all ranks of this rank's replica (parallel VAE decode)
    cfg: Axis
    sp: Axis  # ring x ulysses, chunk index = ring_rank * ulysses + ulysses_rank
    ring: Axis
    ulysses: Axis
    tp: Axis

    @property
    def is_output_rank(self) -> bool:
        """Rank 0 of each replica returns results; the others compute alongside it."""
        return self.replica.rank == 0


_current: ParallelState | None = None


def current() -> ParallelState | None:
    return _current


@contextlib.contextmanager
def use_state(state: ParallelState | None) -> Iterator[None]:
    """Run a block under ``state`` (tests switch between plans within one process group)."""
    global _current
    previous, _current = _current, state
    try:
        yield
    finally:
        _current = previous


def set_state(state: ParallelState | None) -> None:
    global _current
    _current = state


def init_distributed(rank: int, world_size: int, init_method: str, device: torch.device) -> None:
    """Join the default process group: NCCL on CUDA, gloo on CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            device_id=device if device.type == "cuda" else None)


def nvlink_safe_environment() -> None:
    """NVLink multicast can take shared GPUs out of service on these hosts: keep it off in every process."""
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")


def build_state(plan: ParallelPlan, device: torch.device) -> ParallelState:
    """Create this rank's groups for ``plan`` over the whole default group (collective: every rank calls it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if plan.num_gpus != world:
        raise ValueError(f"plan of {plan.num_gpus} ranks in a process group of {world}")
    rank_offset = 0
    u, r, c, dp = plan.ulysses_degree, plan.ring_degree, plan.cfg_degree, plan.dp_size
    replica_size = plan.replica_size

    def coords(index: int) -> tuple[int, int, int, int]:  # (dp, cfg, ring, ulysses) of a plan-local rank
        replica, within = divmod(index, replica_size)
        cfg, sp = divmod(within, r * u)
        ring, uly = divmod(sp, u)
        return replica, cfg, ring, uly

    def index_of(replica: int, cfg: int, ring: int, uly: int) -> int:
        return replica * replica_size + cfg * r * u + ring * u + uly

    def axis(groups: list[list[int]]) -> Axis:
        """Create every group of one axis (collective), return the one holding this rank."""
        mine = Axis()
        for members in groups:
            ranks = [rank_offset + m for m in members]
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                mine = Axis(group=group, size=len(ranks), rank=ranks.index(rank), ranks=tuple(ranks))
        return mine

    everyone = range(plan.num_gpus)
    all_coords = [coords(i) for i in everyone]
    replica_groups = [[i for i in everyone if all_coords[i][0] == d] for d in range(dp)]
    dp_groups = [[index_of(d, *coords(j)[1:]) for d in range(dp)] for j in range(replica_size)]
    cfg_groups = [[index_of(d, k, g, q) for k in range(c)] for d in range(dp) for g in range(r) for q in range(u)]
    sp_groups = [[index_of(d, k, g, q) for g in range(r) for q in range(u)] for d in range(dp) for k in range(c)]
    ring_groups = [[index_of(d, k, g, q) for g in range(r)] for d in range(dp) for k in range(c) for q in range(u)]
    uly_groups = [[index_of(d, k, g, q) for q in range(u)] for d in range(dp) for k in range(c) for g in range(r)]
    tp = plan.tp_size
    tp_groups = [[d * replica_size + s + i for i in range(tp)] for d in range(dp) for s in range(0, replica_size, tp)]

    return ParallelState(
        plan=plan, rank=rank, world_size=plan.num_gpus, device=device,
        dp=axis(dp_groups), replica=axis(replica_groups), cfg=axis(cfg_groups), sp=axis(sp_groups),
        ring=axis(ring_groups), ulysses=axis(uly_groups), tp=axis(tp_groups))
