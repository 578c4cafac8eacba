"""The served DiT forward replayed from CUDA graphs: one graph per input signature, captured on second sight.

``install_cuda_graphs(model)`` puts a :class:`GraphedForward` in front of the model's forward. A call's
signature (each tensor argument's shape, dtype and device, every other argument's value, the grad
mode) names a graph: the first time a signature is seen the forward runs as it is (the compiled
blocks compile there); the second time its graph is captured over static input buffers; from then on
the call copies its inputs into those buffers, replays the graph (one launch for the whole forward:
embeddings, RoPE tables, every block, the output layer) and returns a copy of the output. The server's
warm-up runs at least two steps at each warmed size, so warmed sizes are captured before the first
request; a size or batch size first seen later is captured on its second forward (continuous batching
meets a few batch sizes over and over), up to ``MAX_GRAPHS`` per model. All graphs of a model share one
memory pool (they never run at the same time and each output is copied out at once).

Why explicit ``torch.cuda.CUDAGraph`` rather than ``torch.compile(mode="reduce-overhead")``: one graph
spans the whole forward instead of one per compiled block, and the decisions below are ours and
visible. The forward runs without a graph (and gives the same numbers) where a graph cannot be right:

- a step cache is active (it decides on the host between blocks which blocks run),
- the model streams its weights in (layerwise offload) or is not on a CUDA device,
- the sequence-parallel group passes keys/values around a ring (Ring/USP: point-to-point sends are not
  captured here); Ulysses, CFG-parallel and tensor-parallel ranks capture their forward, collectives
  included. The ranks of a sequence-parallel group agree on each capture (one all-reduce when it is
  made): a graph is kept on all of them or on none, since a rank replaying collectives alone would hang,
- an argument is a key mask (``*_mask`` or bool): the attention reads it on the host to pick kernels,
- an argument cannot name a graph (an unhashable value, a tensor on another device), gradients are on,
- the capture failed once for that signature (logged once; e.g. an operation that waits for the GPU).

``DIFFGEN_CUDA_GRAPHS=0`` turns graphs off (the compiled blocks still run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

DISABLE_ENV = "DIFFGEN_CUDA_GRAPHS"
#: most graphs kept per model (warmed sizes x batch sizes seen); a signature beyond runs without a graph
MAX_GRAPHS = 16
#: a signature is captured on this sighting (the first runs plainly: compilation, kernel autotuning)
CAPTURE_ON_SIGHTING = 2

Signature = tuple


def cuda_graphs_enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") not in ("0", "false", "no")


class _CapturedForward:
    """One signature's graph: static inputs it reads, static outputs it writes."""

    def __init__(self, inputs: dict[str, torch.Tensor], replay: Callable[[], None], outputs: Any):
        self.inputs, self.replay, self.outputs = inputs, replay, outputs

    def __call__(self, tensors: dict[str, torch.Tensor]) -> Any:
        for name, value in tensors.items():
            self.inputs[name].copy_(value)
        self.replay()
        return _map_tensors(self.outputs, torch.Tensor.clone)  # the next replay overwrites the static outputs


def capture_cuda_graph(forward: Callable[[], Any], device: torch.device, pool: Any) -> tuple[Callable[[], None], Any]:
    """Capture ``forward()`` on ``device`` into a graph drawing on ``pool``; returns (replay, static outputs)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # cuBLAS/cuDNN workspaces and lazy state for a non-default stream, outside capture
        forward()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads of the server (encoding, decoding) may use the GPU during a capture
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        outputs = forward()
    return graph.replay, outputs


class GraphedForward:
    """A model's forward with CUDA-graph replay per call signature (see the module docstring).

    ``capture(forward, device, pool)`` is :func:`capture_cuda_graph`; tests pass a stand-in that records
    the call instead, to check everything around the graph on the CPU.
    """

    def __init__(self, model: nn.Module, forward: Callable[..., Any],
                 capture: Callable[..., tuple[Callable[[], None], Any]] | None = None,
                 max_graphs: int = MAX_GRAPHS):
        self.model, self.forward, self.capture, self.max_graphs = model, forward, capture, max_graphs
        self.parameter_names = _parameter_names(forward)
        self.graphs: dict[Signature, _CapturedForward] = {}
        self.sightings: dict[Signature, int] = {}
        self.failed: set[Signature] = set()
        self.replays = 0  # forwards served from a graph (tests, metrics)
        self.pool = None
        self._lock = threading.Lock()

    def drop_graphs(self) -> None:
        """Forget every graph and sighting (the next forwards capture anew). The memory pool goes with them:
        PyTorch's allocator asserts when a new capture names a pool whose graphs were all destroyed. Signatures
        whose capture failed stay failed (they run without a graph)."""
        with self._lock:
            self.graphs.clear()
            self.sightings.clear()
            self.pool = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:  # name positional arguments so that the signature and the static buffers are keyed by name
            kwargs = {**dict(zip(self.parameter_names, args, strict=False)), **kwargs}
        signature = self.signature(kwargs)
        if signature is None:
            return self.forward(**kwargs)
        graph = self.graphs.get(signature)
        if graph is None:
            graph = self._maybe_capture(signature, kwargs)
            if graph is None:
                return self.forward(**kwargs)
        self.replays += 1
        return graph({name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)})

    def signature(self, kwargs: dict[str, Any]) -> Signature | None:
        """The graph this call would replay; None when it must run without one (the module docstring's list)."""
        from diffgen.layers.block_loop import active_block_hook, is_offloaded
        from diffgen.parallel import state as parallel_state

        if not cuda_graphs_enabled() or torch.is_grad_enabled() or active_block_hook.get() is not None:
            return None
        state = parallel_state.current()
        if is_offloaded(self.model) or (state is not None and state.ring.size > 1):
            return None
        device = _device_of(self.model)
        # a graph holds the collectives of its process groups: a forward under another plan or another state (the
        # groups it was built with; a server builds one per process, the bench one per mode) is another graph
        parts: list[Any] = [(torch.is_inference_mode_enabled(), None if state is None else (state.plan, id(state)))]
        for name in sorted(kwargs):
            value = kwargs[name]
            if isinstance(value, torch.Tensor):
                if value.device != device or value.dtype == torch.bool or name.endswith("_mask"):
                    return None
                parts.append((name, tuple(value.shape), value.dtype))
            else:
                if name.endswith("_mask") and value is not None:
                    return None
                value = _frozen(value)
                try:
                    hash(value)
                except TypeError:
                    return None
                parts.append((name, value))
        return tuple(parts)

    def _maybe_capture(self, signature: Signature, kwargs: dict[str, Any]) -> _CapturedForward | None:
        with self._lock:
            if signature in self.failed or len(self.graphs) >= self.max_graphs:
                return None
            self.sightings[signature] = self.sightings.get(signature, 0) + 1
            if self.sightings[signature] < CAPTURE_ON_SIGHTING:
                return None
            device = _device_of(self.model)
            try:  # everything that can fail before the ranks agree sits inside (each rank reaches the agreement)
                inputs = {name: torch.empty(value.shape, dtype=value.dtype, device=value.device).copy_(value)
                          for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
                call = {**kwargs, **inputs}
                if self.pool is None and device.type == "cuda":
                    self.pool = torch.cuda.graph_pool_handle()
                replay, outputs = (self.capture or capture_cuda_graph)(lambda: self.forward(**call), device, self.pool)
                error = None
            except Exception as caught:  # any failure: this signature runs without a graph from now on
                error = caught
            if not _captured_on_every_rank(error is None, device) and error is None:
                error = RuntimeError("the capture failed on another rank of the sequence-parallel group")
            if error is not None:
                self.failed.add(signature)
                logger.warning("diffgen: no CUDA graph for the DiT forward at %s (it runs without one): %s: %s",
                               _describe(signature), type(error).__name__, error)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return None
            graph = _CapturedForward(inputs, replay, outputs)
            self.graphs[signature] = graph
            logger.info("diffgen: captured a CUDA graph of the DiT forward at %s (%d kept)", _describe(signature),
                        len(self.graphs))
            return graph


def _captured_on_every_rank(captured: bool, device: torch.device) -> bool:
    """Whether every rank of this rank's sequence-parallel group captured (collective over that group; True
    without one). Their forwards run the same collectives, so they capture together or not at all."""
    from diffgen.parallel import state as parallel_state

    state = parallel_state.current()
    if state is None or state.sp.group is None:
        return captured
    import torch.distributed as dist

    flag = torch.tensor([1 if captured else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=state.sp.group)
    return bool(flag.item())


def install_cuda_graphs(model: nn.Module, **options: Any) -> GraphedForward:
    """Put a :class:`GraphedForward` in front of ``model``'s forward (idempotent); returns it."""
    current = model.__dict__.get("forward")
    if isinstance(current, GraphedForward):
        return current
    graphed = GraphedForward(model, model.forward, **options)
    model.forward = graphed  # nn.Module.__call__ looks the instance attribute up first
    return graphed


def uninstall_cuda_graphs(model: nn.Module) -> None:
    if isinstance(model.__dict__.get("forward"), GraphedForward):
        del model.forward


def graphed_forward(model: Any) -> GraphedForward | None:
    forward = getattr(model, "__dict__", {}).get("forward")
    return forward if isinstance(forward, GraphedForward) else None


@contextlib.contextmanager
def graphs_disabled() -> Iterator[None]:
    """Run the block without graphs (a timing or a check of the plain forward)."""
    previous = os.environ.get(DISABLE_ENV)
    os.environ[DISABLE_ENV] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DISABLE_ENV, None)
        else:
            os.environ[DISABLE_ENV] = previous


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _parameter_names(forward: Callable[..., Any]) -> list[str]:
    import inspect

    return [name for name, p in inspect.signature(forward).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, _frozen(item)) for key, item in value.items()))
    return value


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, fn) for item in value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, fn) for key, item in value.items()}
    return value


def _describe(signature: Signature) -> str:
    return ", ".join(f"{part[0]}={list(part[1]) if isinstance(part[1], tuple) else part[1]}"
                     for part in signature[1:] if isinstance(part, tuple) and len(part) >= 2)
