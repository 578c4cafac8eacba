"""Planning a parallel run from a checkpoint (before loading it) and setting up one rank."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from diffgen.parallel.config import ModelFacts, ParallelConfig, ParallelPlan, make_plan

logger = logging.getLogger(__name__)


def read_model_facts(model_path: str, revision: str | None = None) -> ModelFacts:
    """Heads and guidance branches of a checkpoint, from its JSON files only (no weights)."""
    from diffgen.loader.components import checkpoint_pipeline_class, read_checkpoint_info

    checkpoint = read_checkpoint_info(model_path, revision)
    pipeline_cls = checkpoint_pipeline_class(checkpoint)
    heads = int(checkpoint.config("transformer").get("num_attention_heads", 1))
    return ModelFacts(name=Path(str(model_path)).name, heads=heads,
                      guidance_branches=pipeline_cls.default_guidance_branches(checkpoint),
                      sequence_parallel=pipeline_cls.sequence_parallel)


def plan_for_model(config: ParallelConfig, model_path: str, revision: str | None = None) -> ParallelPlan:
    """The checked plan (one clear ParallelConfigError otherwise); logs it when it was chosen automatically."""
    plan = make_plan(config, read_model_facts(model_path, revision))
    if plan.automatic:
        logger.warning("diffgen: %s", plan.describe())
    return plan


def prepare_pipeline(pipeline, state) -> None:
    """Make a loaded pipeline use this rank's groups beyond the DiT: tensor-parallel text encoders and the
    split VAE decode (which follows whatever parallel state is current when it runs)."""
    from diffgen.parallel.vae import install_parallel_decode

    if state.tp.size > 1:
        from diffgen.parallel.tensor import shard_text_encoders

        shard_text_encoders(pipeline, state.tp)
    if pipeline.components.get("vae") is not None:
        install_parallel_decode(pipeline.components["vae"])


def rank_device(device: str | None, local_rank: int) -> torch.device:
    """This rank's device: cuda:<local rank> on GPUs, the CPU otherwise."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    return torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")
