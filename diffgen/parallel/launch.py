"""``diffgen generate`` under ``torchrun``: the launcher starts the ranks (on one or several machines).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; every process parses the
same command line, joins the process group (``env://``), loads the pipeline on its local GPU and
runs the request; rank 0 prints and saves the outputs. ``--num-gpus`` defaults to the world size.
"""

from __future__ import annotations

import os
from typing import Any


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_engine(model_path: str, engine_options: dict[str, Any]):
    """This rank's in-process Engine inside the torchrun world; returns (engine, parallel state)."""
    from diffgen.engine.engine import Engine
    from diffgen.engine.executor import InProcessExecutor
    from diffgen.errors import DiffgenError
    from diffgen.parallel.config import FIELDS, ParallelConfig
    from diffgen.parallel.runtime import plan_for_model
    from diffgen.parallel.worker import load_rank

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    options = dict(engine_options)
    if options.get("num_gpus") not in (None, world):
        raise DiffgenError(f"--num-gpus {options['num_gpus']} differs from torchrun's world size {world}")
    options["num_gpus"] = world
    plan = plan_for_model(ParallelConfig.from_options(options), model_path, options.get("revision"))
    load_options = {k: v for k, v in options.items() if k not in FIELDS}
    load_options["model_path"] = model_path
    pipeline, state = load_rank(load_options, plan, rank, world, "env://", int(os.environ.get("LOCAL_RANK", "0")))
    return Engine(InProcessExecutor(pipeline), model_path, options.get("revision")), state


def shared_seed(seed: int | None) -> int:
    """Rank 0's seed (drawn there when none is given) on every rank."""
    import secrets

    import torch.distributed as dist

    box = [seed if seed is not None else secrets.randbelow(2**31 - 1)]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish() -> None:
    """Wait for every rank (rank 0 saves the outputs first), then leave the process group."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
