"""One rank of a WorkerGroup (``python -m diffgen.parallel.worker``), or of a ``torchrun`` launch.

Every rank loads the whole pipeline on its own device and joins the process groups of the plan.
Rank 0 of each replica talks to the Engine over a local socket: it receives a request, broadcasts
it to its replica, and after the run (all ranks compute) sends the result back. Cancellation is
agreed on by all ranks of the replica at every check (an all-reduce of one flag), so every rank
leaves the loop at the same step. A failure that may differ between ranks (anything but a request
error or a cancellation) ends the process: the Engine sees a rank gone, fails the request and
restarts the group, instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import sys
import threading
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def load_rank(options: dict[str, Any], plan, rank: int, world_size: int, init_method: str, local_rank: int):
    """Join the process group, build this rank's parallel state and load the pipeline: -> (pipeline, state)."""
    from diffgen.engine.loading import load_model
    from diffgen.parallel.runtime import prepare_pipeline, rank_device
    from diffgen.parallel.state import build_state, init_distributed, nvlink_safe_environment, set_state

    nvlink_safe_environment()
    device = rank_device(options.get("device"), local_rank)
    init_distributed(rank, world_size, init_method, device)
    state = build_state(plan, device)
    set_state(state)
    engine_options = {k: v for k, v in options.items() if k not in ("model_path", "device") and v is not None}
    pipeline = load_model(options["model_path"], device=str(device), **engine_options)
    prepare_pipeline(pipeline, state)
    return pipeline, state


def agreed(flag: bool, state) -> bool:
    """True on every rank of the replica if ``flag`` is true on any of them (collective)."""
    if state.replica.group is None:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=state.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=state.replica.group)
    return bool(value.item())


def broadcast_from_replica_root(message: Any, state) -> Any:
    if state.replica.group is None:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=state.replica.ranks[0], group=state.replica.group)
    return box[0]


def serve_rank(pipeline, state, connection) -> None:
    """The request loop of one rank; ``connection`` is the Engine's socket on replica roots, else None."""
    from diffgen.errors import CancelledError, DiffgenError
    from diffgen.parallel.worker_group import receive, send

    inbox: queue.Queue = queue.Queue()
    cancel_requested = threading.Event()
    if connection is not None:
        def listen() -> None:
            while True:
                try:
                    message = receive(connection)
                except (EOFError, OSError):  # the Engine is gone
                    os._exit(0)
                if message[0] == "cancel":
                    cancel_requested.set()
                else:
                    if message[0] == "run":
                        # Cleared here, not when the loop takes the request: a cancel follows its request on the
                        # socket and may arrive while the loop still waits for the other ranks to take it.
                        cancel_requested.clear()
                    inbox.put(message)
        threading.Thread(target=listen, daemon=True).start()

    while True:
        message = inbox.get() if connection is not None else None
        message = broadcast_from_replica_root(message, state)
        if message[0] == "stop":
            return
        if message[0] == "loras":
            _change_loras(pipeline, state, message[1], connection)
            continue
        _, request = message

        def progress(step: int, total: int, preview=None) -> None:
            if connection is not None:
                send(connection, ("progress", step, total, preview))

        def is_cancelled() -> bool:
            return agreed(cancel_requested.is_set(), state)

        try:
            result = pipeline.run(request, progress=progress, is_cancelled=is_cancelled)
        except (DiffgenError, CancelledError) as error:  # the same on every rank: report and go on
            if connection is not None:
                send(connection, ("failed", error))
            continue
        except BaseException as error:
            if connection is not None:
                send(connection, ("crashed", f"{type(error).__name__}: {error}"))
            logger.exception("rank %d failed", state.rank)
            sys.stderr.flush()
            os._exit(1)
        if connection is not None:
            if result.latents is not None:
                result.latents = result.latents.cpu()
            if result.pixels is not None:
                result.pixels = result.pixels.cpu()
            send(connection, ("done", result))


def _change_loras(pipeline, state, change, connection) -> None:
    """Every rank of the replica makes the LoRA change between requests. The ranks agree on the outcome: when
    one refuses it, the others set theirs back, so the replica's ranks never hold different weights."""
    from diffgen.engine.lora import LoRAChange, apply_lora_change, describe_loras
    from diffgen.errors import DiffgenError
    from diffgen.parallel.worker_group import send

    before = describe_loras(pipeline)
    error = None
    try:
        loras = apply_lora_change(pipeline, change)
    except DiffgenError as e:  # a bad file: the same on every rank, nothing changed
        error = e
    if agreed(error is not None, state) and error is None:
        apply_lora_change(pipeline, LoRAChange.sync(before))
        error = DiffgenError("another rank of the group could not make the LoRA change; nothing changed")
    if connection is not None:
        send(connection, ("loras_failed", error) if error is not None else ("loras_done", loras))


def main() -> None:
    from multiprocessing.connection import Client

    from diffgen.parallel.worker_group import send

    logging.basicConfig(level=os.environ.get("DIFFGEN_LOG_LEVEL", "WARNING"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffgen.engine.loading import quiet_libraries
    from diffgen.engine.optimize import release_cuda_graphs

    quiet_libraries()
    with open(os.environ["DIFFGEN_GROUP_SPEC"], "rb") as f:
        spec = pickle.load(f)
    rank = int(os.environ["DIFFGEN_RANK"])
    connection = None
    try:
        pipeline, state = load_rank(spec["options"], spec["plan"], rank, spec["world_size"], spec["init_method"],
                                  local_rank=spec["first_gpu"] + rank)
    except BaseException as error:
        if rank % spec["plan"].replica_size == 0:
            connection = Client(spec["address"], authkey=spec["authkey"])
            send(connection, ("load_failed", rank, f"{type(error).__name__}: {error}"))
        raise
    if state.is_output_rank:
        from diffgen.engine.lora import describe_loras
        from diffgen.parallel.worker_group import RemotePipeline

        info = RemotePipeline(model_path=spec["options"]["model_path"], spec=pipeline.spec,
                              output_kind=pipeline.output_kind, pipeline_class=type(pipeline),
                              device=f"{pipeline.device} x {spec['world_size']}", loras=describe_loras(pipeline),
                              dit_precision=str(pipeline.dtype).removeprefix("torch."),
                              vae_precision=str(pipeline.vae.dtype).removeprefix("torch."))
        connection = Client(spec["address"], authkey=spec["authkey"])
        send(connection, ("ready", state.dp.rank, info))
    serve_rank(pipeline, state, connection)
    release_cuda_graphs(pipeline.components)  # before the communicator goes (a bench process hung there with them)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
