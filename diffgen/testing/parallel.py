"""Multi-process parity harness: N gloo processes on the CPU against the single-process output.

Each case names a tiny checkpoint, a request and parallel degrees over the whole world (fill the
rest of the world with ``dp_size`` replicas). All ranks run every case in the same order (group
creation is collective); rank 0 compares its output with the single-process output computed in
the same process and writes ``{case: {"pixels": max abs diff, "latents": ..., "error": ...}}``.
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch


def _entry(rank: int, world_size: int, init_file: str, target: Callable, args: tuple) -> None:
    from diffgen.parallel.state import init_distributed

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    init_distributed(rank, world_size, f"file://{init_file}", torch.device("cpu"))
    try:
        target(rank, world_size, *args)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def spawn(world_size: int, target: Callable, *args: Any) -> None:
    """Run ``target(rank, world_size, *args)`` in ``world_size`` spawned gloo processes; raises if one fails."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "rendezvous")
        mp.start_processes(_entry, args=(world_size, init_file, target, args), nprocs=world_size,
                           join=True, start_method="spawn")


def run_parity_cases(rank: int, world_size: int, cases: list[dict], out_path: str) -> None:
    """Cases: {"name", "model", "request": {...}, "parallel": {ParallelConfig fields}}."""
    from diffgen import Engine
    from diffgen.engine.request import GenerationRequest
    from diffgen.parallel.config import ParallelConfig, make_plan
    from diffgen.parallel.runtime import prepare_pipeline, read_model_facts
    from diffgen.parallel.state import build_state, use_state

    engines: dict[str, Engine] = {}
    references: dict[str, Any] = {}
    results: dict[str, dict] = {}
    for case in cases:
        model = case["model"]
        if model not in engines:
            engines[model] = Engine.from_pretrained(model, device="cpu", dtype="float32")
        engine = engines[model]
        tensor_parallel = case["parallel"].get("tp_size", 1) > 1
        if tensor_parallel:  # sharding changes the text encoder in place: a fresh copy for this case
            engine = Engine.from_pretrained(model, device="cpu", dtype="float32")
        request_kwargs = {**case["request"], "return_tensors": True}
        key = json.dumps([model, case["request"]], sort_keys=True, default=str)
        if rank == 0 and key not in references:
            references[key] = engine.run(GenerationRequest.build(**request_kwargs))
        entry: dict[str, Any] = {}
        try:
            config = ParallelConfig(num_gpus=world_size, **case["parallel"])
            plan = make_plan(config, read_model_facts(model))
            entry["plan"] = plan.describe()
            state = build_state(plan, torch.device("cpu"))
            prepare_pipeline(engine.pipeline, state)
            from diffgen.parallel.tensor import TensorParallelLinear

            entry["tp_linears"] = sum(isinstance(m, TensorParallelLinear) for name in ("text_encoder", "text_encoder_2")
                                      if engine.pipeline.components.get(name) is not None
                                      for m in engine.pipeline.components[name].modules())
            with use_state(state):
                result = engine.run(GenerationRequest.build(**request_kwargs))
            if rank == 0:
                reference = references[key]
                entry["latents"] = (result.latents - reference.latents).abs().max().item()
                entry["pixels"] = (result.pixels - reference.pixels).abs().max().item()
        except Exception:  # report per case; the other cases still run
            entry["error"] = traceback.format_exc()
        results[case["name"]] = entry
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


def run_vae_cases(rank: int, world_size: int, vae_folders: dict[str, str], out_path: str) -> None:
    """Split decodes of random latents vs the whole decode, for each VAE folder, through diffusers' decoder and
    diffgen's: split along the rows and along the columns (lengths the degree does not divide), with the
    default per-block halos and (diffgen's decoder) with the old scheme (the first block's halo kept to the end).
    Also with a halo of 1 at the first up block and one pixel short at the last, which must differ: the comparison
    sees the seams, and the last block really gets its own (smaller) halo. (One pixel short at the first block
    changes the output by ~1e-6 only: its farthest pixel reaches the output through the corner taps of ~25 random
    convolutions.)"""
    import diffusers

    from diffgen.models.vaes.wan import use_native_decoder
    from diffgen.parallel.config import ParallelPlan
    from diffgen.parallel.state import build_state
    from diffgen.parallel.vae import decode_split, stage_halos

    state = build_state(ParallelPlan(num_gpus=world_size, ring_degree=world_size), torch.device("cpu"))
    results = {}
    for name, folder in vae_folders.items():
        config = json.loads(open(os.path.join(folder, "config.json")).read())
        vae = getattr(diffusers, config["_class_name"]).from_pretrained(folder, dtype=torch.float32).eval()
        halos = stage_halos(vae)
        first_thin = [1, *halos[1:]]
        last_short = [*halos[:-1], halos[-1] - 1]
        uniform = [halos[0] * 2**k for k in range(len(halos))]  # the first block's halo, never cut down
        length = 4 * halos[0] + 3  # uneven pieces
        generator = torch.Generator().manual_seed(0)
        shapes = {"rows": (length, 6), "columns": (5, length)}
        latents = {axis: torch.randn(1, vae.config.z_dim, 2, *shape, generator=generator)
                   for axis, shape in shapes.items()}
        entry = results[name] = {"length": length, "halos": halos}
        for decoder in ("diffusers", "native"):
            if decoder == "native":  # as it runs on CUDA: channels-last, biases folded into the next passes
                native = use_native_decoder(vae)
                native.channels_last, native.fold_biases = True, True
            for axis, z in latents.items():
                dim = -2 if axis == "rows" else -1
                with torch.inference_mode():
                    whole = vae.decode(z, return_dict=False)[0]
                    key = f"{decoder}/{axis}"
                    variants = [("", None), ("/first halo 1", first_thin), ("/last short", last_short)]
                    if decoder == "native":  # the old halos (the bench's "before" rows), once
                        variants.append(("/uniform", uniform))
                    for variant, variant_halos in variants:
                        split = decode_split(vae, vae.decode, z, state.replica, dim=dim, halos=variant_halos)
                        assert split.shape == whole.shape, (split.shape, whole.shape)
                        entry[key + variant] = (split - whole).abs().max().item()
        with torch.inference_mode():  # the default axis: the longer one (here the columns)
            z = latents["columns"]
            entry["default axis"] = (decode_split(vae, vae.decode, z, state.replica)
                                     - vae.decode(z, return_dict=False)[0]).abs().max().item()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


ATTENTION_LAYOUTS = {"ulysses-2": dict(ulysses_degree=2, ring_degree=1, dp_size=2),
                     "ring-2": dict(ulysses_degree=1, ring_degree=2, dp_size=2),
                     "usp-2x2": dict(ulysses_degree=2, ring_degree=2, dp_size=1)}
#: replicated text, or split over the group with the tokens (shard_tokens(text_length=...)); "even": 16 tokens and
#: 8 text tokens, which every degree divides (no padding to cut)
ATTENTION_TEXTS = ("none", "text", "text+mask", "split-text", "split-text+mask", "split-text-even")


def run_attention_cases(rank: int, world_size: int, out_path: str) -> None:
    """attention() over a shard of 15 random tokens and 5 text tokens (no degree divides them) vs over the whole
    sequence, for each layout and text case; writes ``{"layout/text": max abs diff}`` (text output included where
    there is text)."""
    from diffgen.layers.attention import attention
    from diffgen.parallel.config import ParallelPlan
    from diffgen.parallel.sequence import shard_tokens
    from diffgen.parallel.state import build_state, use_state

    generator = torch.Generator().manual_seed(0)
    batch, heads, dim = 2, 4, 8
    results = {}
    for layout, degrees in ATTENTION_LAYOUTS.items():
        state = build_state(ParallelPlan(num_gpus=world_size, cfg_degree=1, **degrees), torch.device("cpu"))
        for text_case in ATTENTION_TEXTS:
            tokens, text_len = (16, 8) if text_case.endswith("even") else (15, 5)
            q, k, v = (torch.randn(batch, tokens, heads, dim, generator=generator) for _ in range(3))
            text = tuple(torch.randn(batch, text_len, heads, dim, generator=generator) for _ in range(3))
            mask = torch.ones(batch, text_len, dtype=torch.bool)
            mask[1, 3:] = False
            replicated = None if text_case == "none" else text
            key_mask = mask if text_case.endswith("+mask") else None
            split_text = text_case.startswith("split")
            expected = attention(q, k, v, replicated=replicated, mask=key_mask)
            with use_state(state):
                shard = shard_tokens(tokens, text_length=text_len if split_text else 0)
                if split_text:
                    replicated = tuple(shard.split_text(t) for t in text)
                got = attention(shard.split(q), shard.split(k), shard.split(v), replicated=replicated, mask=key_mask)
                if replicated is None:
                    got, expected = (shard.gather(got),), (expected,)
                else:
                    text_out = shard.gather_text(got[1])
                    got = (shard.gather(got[0]), text_out)
            diffs = [(a - b).abs().max().item() for a, b in zip(got, expected, strict=True)]
            results[f"{layout}/{text_case}"] = max(diffs)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def run_graph_cases(rank: int, world_size: int, out_path: str) -> None:
    """A tiny FLUX DiT behind GraphedForward under Ulysses-2, with a stand-in for the CUDA graph (the capture runs
    the forward, a replay runs it again into the same static output): 3 forwards, then again with the capture
    failing on the last rank only. Writes each case's graphs and replays per rank and its max abs diff from the
    single-process forward."""
    import torch.distributed as dist

    from diffgen.engine.cuda_graphs import install_cuda_graphs, uninstall_cuda_graphs
    from diffgen.models.dits.flux import FluxConfig, FluxTransformer
    from diffgen.parallel.config import ParallelPlan
    from diffgen.parallel.state import build_state, use_state

    def standin(forward, device, pool):
        outputs = forward()
        return (lambda: outputs.copy_(forward())), outputs

    def failing_here(forward, device, pool):
        if rank == world_size - 1:
            forward()  # its collectives ran, as the other ranks' did
            raise RuntimeError("capture failed on this rank only")
        return standin(forward, device, pool)

    torch.manual_seed(0)
    model = FluxTransformer(FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                       axes_dims_rope=(4, 6, 6), in_channels=16, guidance_embeds=True)).eval()
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(5.0), indexing="ij"), -1)
    inputs = dict(hidden_states=torch.randn(1, 15, 16), timestep=torch.tensor([0.9]), guidance=torch.tensor([3.5]),
                  encoder_hidden_states=torch.randn(1, 7, 32), pooled_projections=torch.randn(1, 32),
                  txt_ids=torch.zeros(7, 3), img_ids=grid.reshape(-1, 3))
    with torch.inference_mode():
        reference = model(**inputs)
    state = build_state(ParallelPlan(num_gpus=world_size, ulysses_degree=world_size), torch.device("cpu"))
    results: dict[str, Any] = {}
    for case, capture in (("captured", standin), ("failed_on_one", failing_here)):
        forward = install_cuda_graphs(model, capture=capture)
        with use_state(state), torch.inference_mode():
            outputs = [model(**inputs) for _ in range(3)]
        uninstall_cuda_graphs(model)
        counts = [None] * world_size
        dist.all_gather_object(counts, (len(forward.graphs), forward.replays))
        results[case] = {"graphs": [c[0] for c in counts], "replays": [c[1] for c in counts]}
        results[f"{case}_diff"] = max((out - reference).abs().max().item() for out in outputs)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
