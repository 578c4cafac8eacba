"""The Engine's public API: everything a front end (CLI, HTTP server, Python user) needs.

Front ends import from here only, never from the executor's internals (scheduler, worker) or the
pipelines: Engine -> executor -> worker -> pipeline is one direction.
"""

from diffgen.engine.engine import Engine
from diffgen.engine.executor import (
    Executor,
    ExecutorStatus,
    InProcessExecutor,
    Job,
    JobError,
    JobListener,
    NotReadyError,
    QueueFullError,
)
from diffgen.engine.metrics import Metrics
from diffgen.engine.request import GenerationRequest, GenerationResult, generation_metadata
from diffgen.engine.spec import ModelSpec, resolve


def read_model_spec(model_path: str, revision: str | None = None) -> ModelSpec:
    """A checkpoint's ModelSpec from its JSON files, without loading weights (ModelLoadError if unusable)."""
    from diffgen.loader.components import read_model_spec as read

    return read(model_path, revision)


__all__ = ["Engine", "Executor", "ExecutorStatus", "GenerationRequest", "GenerationResult", "InProcessExecutor",
           "Job", "JobError", "JobListener", "Metrics", "ModelSpec", "NotReadyError", "QueueFullError",
           "generation_metadata", "read_model_spec", "resolve"]
