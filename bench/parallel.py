"""Multi-GPU bench: each parallel mode against the 1-GPU baseline, in one run on one machine.

    python bench/parallel.py            # every visible GPU (2 or 4); ~3 minutes on 2 x H100
    python bench/parallel.py --only flux,flux-graph,qwen   # some rows (--help lists them, in run order)
    python bench/parallel.py --quick    # smaller shapes (21 frames, 512²)
    python bench/parallel.py --tiny --device cpu   # tiny configs on 2 gloo processes (the test suite runs this)

Real model configs with random bf16 weights (meta init, then filled on the GPU with one seed so every
rank holds the same weights; q/k/v projections fused as the loader fuses them); no checkpoint and no
diffusers needed except for the VAE row. One process per GPU (spawned here); the baseline runs on rank 0
while the others wait. Every row is in its own try/except: a failure prints an error row and the rest
still run; rows are printed as they are measured, so a run cut short keeps what it measured.
``rel err`` is ||mode - 1 GPU|| / ||1 GPU|| of the step's output (bf16); the "vs float32" row compares
1 GPU, Ring and Ulysses in bf16 with the same model in float32. A ``host N ms`` note: the host took
that long to enqueue the step, over 80% of its time: the GPU waited on Python (host-bound).
``flux-graph`` replays the FLUX forward from a CUDA graph (collectives included), an experiment that
shows the GPU time without the host's per-kernel cost; the pipelines themselves run eager.
``flux-compile`` compiles each block as the server does by default (``compile_repeated_blocks``; each mode
compiles again in its warm-up), ``flux-compile-graph`` adds the server's CUDA graphs (``install_cuda_graphs``:
each mode's warm-up captures its graph, collectives included).
The FLUX rows also run Ulysses-2 with the text replicated (FLUX before it split its text over the group).
``qwen-mask``: one Qwen-Image forward of two prompts of different lengths (200 and 120 text tokens, the
shorter one padded and masked), 1 GPU against Ulysses-2: the padded-text path on CUDA.

FLUX dp-size 2: each replica is an independent process with its own model running its share of
16 requests (one denoising forward each: throughput, not latency); scheduler overhead is not included.
"""

from __future__ import annotations

import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_name] = _value

import argparse  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS: list[tuple[str, ...]] = []
ROW_KEYS = ("flux", "flux-dp", "flux-graph", "qwen", "qwen-mask", "wan-small", "flux-compile", "flux-compile-graph",
            "ring-accuracy", "t5", "vae", "wan-14b")
HEADER = ("work", "mode", "GPUs", "time (s)", "speed-up", "rel err", "note")


def _log(state_rank: int, *parts: object) -> None:
    if state_rank == 0:
        print(*parts, flush=True)


def random_weights_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministic random weights: N(0, 1/fan_in) matrices, unit norm scales, small biases and tables."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            if p.ndim >= 2 and "table" not in name and "pos_embed" not in name:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in ** -0.5, generator=generator)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return module


def build(model_cls, config, device, dtype):
    """``model_cls(config)`` in ``dtype`` on ``device`` with random weights; float32 where the loader keeps it."""
    from diffgen.layers.linear import fuse_projections

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(default)
    keep = getattr(model, "keep_in_fp32_modules", ())
    for name, module in model.named_modules():
        if name and any(key == name.split(".")[-1] for key in keep):
            module.float()
    model = random_weights_(model.to_empty(device=device)).eval()
    fuse_projections(model)  # as the loader does: one q/k/v matmul per stream
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int):
    """(fastest seconds, host seconds to enqueue that run, output). Enqueue close to the whole time: host-bound."""
    runs, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        queued = time.perf_counter()
        sync(device)
        runs.append((time.perf_counter() - start, queued - start))
    seconds, enqueue = min(runs)
    return seconds, enqueue, out


def graphed(step, device):
    """``step`` captured in one CUDA graph (collectives included); the result replays it: no host work per kernel."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay():
        graph.replay()
        return out

    return replay


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).norm() / reference.float().norm().clamp(min=1e-12)).item()


def _graphed_everywhere(step, device):
    """:func:`graphed` on every rank, or an error on every rank (a rank replaying collectives alone would hang)."""
    try:
        replay, error = graphed(step, device), None
    except Exception as caught:  # noqa: BLE001
        replay, error = None, caught
        traceback.print_exc()
    captured = torch.tensor([0 if error else 1], device=device)
    dist.all_reduce(captured, op=dist.ReduceOp.MIN)
    if not captured.item():
        raise RuntimeError(f"CUDA graph capture failed on a rank: {error}")
    return replay


def compare_modes(title, rank, world, device, modes, step, warm, repeats, facts, cuda_graph=False):
    """Baseline on rank 0 alone, then each mode (a ParallelConfig kwargs dict) over the whole world.

    ``cuda_graph``: the baseline and each mode replayed from a CUDA graph instead (GPU time without the
    host's per-kernel cost; an experiment: the pipelines run eager)."""
    from diffgen.parallel.config import ParallelConfig, make_plan
    from diffgen.parallel.state import build_state, use_state

    def host_note(enqueue, seconds):
        return f"host {enqueue * 1e3:.0f} ms" if device.type == "cuda" and enqueue > 0.8 * seconds else ""

    baseline = reference = None
    try:
        if rank == 0:
            with use_state(None):
                warm()
                baseline, enqueue, reference = timed(step, device, repeats)
            reference = reference.cpu()
            if cuda_graph and device.type == "cuda":
                with use_state(None):
                    baseline, enqueue, out = timed(graphed(step, device), device, repeats)
                err = f"{relative_error(out.cpu(), reference):.1e}"  # the graph against the eager run
            ROWS.append((title, "1 GPU, CUDA graph" if cuda_graph else "1 GPU", "1", f"{baseline:.3f}", "1.00x",
                         err if cuda_graph else "-", host_note(enqueue, baseline)))
    except Exception as error:  # noqa: BLE001
        ROWS.append((title, "1 GPU", "1", "error", "", "", _short(error)))
        traceback.print_exc()
    dist.barrier()
    for name, degrees, *context in modes:  # context: an optional context manager factory the mode runs in
        try:
            plan = make_plan(ParallelConfig(num_gpus=world, **degrees), facts)
            state = build_state(plan, device)
            variants = [(name, step)]
            with use_state(state), (context[0]() if context else contextlib.nullcontext()):
                warm()
                if cuda_graph and device.type == "cuda":
                    variants = [(f"{name}, CUDA graph", _graphed_everywhere(step, device))]
                for label, fn in variants:
                    seconds, enqueue, out = timed(fn, device, repeats)
                    flag = torch.tensor([seconds], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    seconds = flag.item()
                    if rank == 0:
                        err = relative_error(out.cpu(), reference) if reference is not None else float("nan")
                        speed = f"{baseline / seconds:.2f}x" if baseline else "-"
                        note = ", ".join(filter(None, [plan.describe().split(": ", 1)[1], host_note(enqueue, seconds)]))
                        ROWS.append((title, label, str(plan.num_gpus // plan.dp_size), f"{seconds:.3f}", speed,
                                     f"{err:.1e}", note))
        except Exception as error:  # noqa: BLE001
            if rank == 0:
                ROWS.append((title, name, str(world), "error", "", "", _short(error)))
            traceback.print_exc()
        dist.barrier()


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")[:120]


def mode_list(world: int, heads: int, cfg: bool):
    modes = []
    if world >= 2:
        dp = world // 2
        if cfg:  # first: the automatic plan's choice for two-branch models
            modes.append(("CFG-parallel-2", dict(ulysses_degree=1, ring_degree=1, enable_cfg_parallel=True,
                                                 dp_size=dp)))
        modes += [("Ulysses-2", dict(ulysses_degree=2, ring_degree=1, enable_cfg_parallel=False, dp_size=dp)),
                  ("Ring-2", dict(ulysses_degree=1, ring_degree=2, enable_cfg_parallel=False, dp_size=dp))]
    if world >= 4:
        modes.append((f"Ulysses-{4 if heads % 4 == 0 else 2}" + ("" if heads % 4 == 0 else " x Ring-2"),
                      dict(ulysses_degree=4, ring_degree=1, enable_cfg_parallel=False) if heads % 4 == 0 else
                      dict(ulysses_degree=2, ring_degree=2, enable_cfg_parallel=False)))
        if cfg:
            modes.append(("CFG-2 x Ulysses-2", dict(ulysses_degree=2, ring_degree=1, enable_cfg_parallel=True)))
        modes.append(("auto (4)", {}))
    return modes


# -- rows ---------------------------------------------------------------------------------------------------


def wan_step_row(title, rank, world, device, dtype, config, frames, height, width, repeats, text_len=512):
    from diffgen.models.dits.wan import WanTransformer
    from diffgen.parallel.config import ModelFacts
    from diffgen.pipelines.guidance import GuidanceStep, cfg, run_branches

    model = build(WanTransformer, config, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    latent_frames = (frames - 1) // 4 + 1
    x = torch.randn(1, config.in_channels, latent_frames, height // 8, width // 8, device=device, generator=gen,
                    dtype=dtype)
    texts = [torch.randn(1, text_len, config.text_dim, device=device, generator=gen, dtype=dtype) for _ in range(2)]
    timestep = torch.tensor([900.0], device=device)

    def step():
        guidance = GuidanceStep(model, [{"hidden_states": x, "timestep": timestep, "encoder_hidden_states": t}
                                        for t in texts], cfg(5.0))
        with torch.inference_mode():
            return guidance.combine(run_branches(guidance))

    small = x[:, :, :1, :16, :16].contiguous()

    def warm():
        with torch.inference_mode():
            model(small, timestep, texts[0])

    facts = ModelFacts(title, config.num_attention_heads, 2)
    compare_modes(title, rank, world, device, mode_list(world, config.num_attention_heads, True), step, warm,
                  repeats, facts)


@contextlib.contextmanager
def flux_text_replicated():
    """FLUX as it was before it split its text over the group: every rank runs the whole text."""
    import diffgen.models.dits.flux as flux
    from diffgen.parallel import sequence

    flux.shard_tokens = lambda length, text_length=0: sequence.shard_tokens(length)
    try:
        yield
    finally:
        flux.shard_tokens = sequence.shard_tokens


def flux_inputs(config, device, dtype, size: int = 1024, text_len: int = 512) -> dict:
    """One FLUX DiT forward's inputs at ``size``² with ``text_len`` text tokens (seeded, random)."""
    gen = torch.Generator(device=device).manual_seed(1)
    grid = size // 16
    return dict(
        hidden_states=torch.randn(1, grid * grid, config.in_channels, device=device, generator=gen, dtype=dtype),
        timestep=torch.tensor([0.9], device=device), guidance=torch.tensor([3.5], device=device),
        encoder_hidden_states=torch.randn(1, text_len, config.joint_attention_dim, device=device, generator=gen,
                                          dtype=dtype),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, device=device, generator=gen, dtype=dtype),
        txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1, dtype=torch.long), torch.arange(grid), torch.arange(grid),
                                           indexing="ij"), -1).reshape(-1, 3).to(device, dtype))


def flux_row(title, rank, world, device, dtype, config, size, repeats, text_len=512, cuda_graph=False,
             compiled=None):
    """``compiled``: "inductor" compiles the blocks as the server does; another torch.compile backend
    (the CPU test: "aot_eager", which traces the collectives without a C++ compiler) compiles them with it."""
    from diffgen.engine.optimize import compile_repeated_blocks
    from diffgen.models.dits.flux import FluxTransformer
    from diffgen.parallel.config import ModelFacts

    model = build(FluxTransformer, config, device, dtype)
    if compiled == "inductor":
        compile_repeated_blocks(model)
    elif compiled:
        for block in (*model.transformer_blocks, *model.single_transformer_blocks):
            block.compile(backend=compiled)
    served_graphs = None
    if compiled and cuda_graph and device.type == "cuda":  # the server's graphs (diffgen/engine/cuda_graphs.py)
        from diffgen.engine.cuda_graphs import install_cuda_graphs
        from diffgen.engine.optimize import release_cuda_graphs

        served_graphs, cuda_graph = install_cuda_graphs(model), False
    inputs = flux_inputs(config, device, dtype, size, text_len)

    def step():
        with torch.inference_mode():
            return model(**inputs)

    def warm():
        if served_graphs is not None:  # each mode captures its own graph (the text-replicated mode has the same
            served_graphs.drop_graphs()  # signature as the text-split one)
        step()
        if compiled:
            step()  # compiled: its second forward (served graphs: captured there)

    facts = ModelFacts(title, config.num_attention_heads, 1)
    modes = [m for m in mode_list(world, config.num_attention_heads, False) if "Ring" not in m[0] or world == 2]
    if cuda_graph or compiled:
        modes = [m for m in modes if m[0].startswith("Ulysses")]
    if world == 2:  # right after Ulysses-2: placed after Ring-2 it once took as long as Ring-2 (cause not found)
        modes.insert(1, ("Ulysses-2, text replicated (before)", modes[0][1], flux_text_replicated))
    compare_modes(title, rank, world, device, modes, step, warm, repeats, facts, cuda_graph=cuda_graph)
    if served_graphs is not None:
        if rank == 0:
            ROWS.append((title, "(served graphs)", str(world), "-", "-", "-",
                         f"replays {served_graphs.replays}, failed captures {len(served_graphs.failed)}"))
        # graphs holding collectives outlived by the process group: its destruction hung at exit (2 x H200)
        release_cuda_graphs({"transformer": model})
    return None if cuda_graph or compiled else (model, inputs)


def flux_dp_row(name, rank, world, device, model, inputs, requests, steps):
    """Throughput of ``requests`` requests (``steps`` forwards each): one GPU, then one replica per GPU."""
    def serve(count):
        with torch.inference_mode():
            for _ in range(count * steps):
                model(**inputs)

    title = f"{name} {requests} requests x {steps} steps"
    one = None
    if rank == 0:
        sync(device)
        start = time.perf_counter()
        serve(requests)
        sync(device)
        one = time.perf_counter() - start
        ROWS.append((title, "1 replica", "1", f"{one:.2f}", "1.00x", "-", f"{requests / one:.2f} req/s"))
    dist.barrier()
    sync(device)
    start = time.perf_counter()
    serve(requests // world)
    sync(device)
    seconds = torch.tensor([time.perf_counter() - start], device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    if rank == 0:
        total = seconds.item()
        ROWS.append((title, f"--dp-size {world}", str(world), f"{total:.2f}", f"{one / total:.2f}x", "-",
                     f"{requests / total:.2f} req/s"))


def qwen_row(title, rank, world, device, dtype, config, size, repeats):
    from diffgen.models.dits.qwen_image import QwenImageTransformer
    from diffgen.parallel.config import ModelFacts
    from diffgen.pipelines.guidance import GuidanceStep, norm_preserving_cfg, run_branches

    model = build(QwenImageTransformer, config, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    grid = size // 16
    x = torch.randn(1, grid * grid, config.in_channels, device=device, generator=gen, dtype=dtype)
    texts = [torch.randn(1, length, config.joint_attention_dim, device=device, generator=gen, dtype=dtype)
             for length in (200, 12)]
    shared = {"hidden_states": x, "timestep": torch.tensor([0.9], device=device), "image_shapes": [(1, grid, grid)]}

    def step():
        guidance = GuidanceStep(model, [{**shared, "encoder_hidden_states": t} for t in texts],
                                norm_preserving_cfg(4.0))
        with torch.inference_mode():
            return guidance.combine(run_branches(guidance))

    def warm():
        step()

    facts = ModelFacts(title, config.num_attention_heads, 2)
    compare_modes(title, rank, world, device, mode_list(world, config.num_attention_heads, True), step, warm,
                  repeats, facts)


def qwen_mask_row(title, rank, world, device, dtype, config, size, repeats, lengths=(200, 120)):
    """One Qwen-Image forward of two prompts of different text lengths (the shorter padded, masked)."""
    from diffgen.models.dits.qwen_image import QwenImageTransformer
    from diffgen.parallel.config import ModelFacts

    model = build(QwenImageTransformer, config, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    grid = size // 16
    longest = max(lengths)
    mask = torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    inputs = dict(hidden_states=torch.randn(len(lengths), grid * grid, config.in_channels, device=device,
                                            generator=gen, dtype=dtype),
                  timestep=torch.full((len(lengths),), 0.9, device=device),
                  encoder_hidden_states=torch.randn(len(lengths), longest, config.joint_attention_dim, device=device,
                                                    generator=gen, dtype=dtype),
                  image_shapes=[(1, grid, grid)], encoder_hidden_states_mask=mask.long())

    def step():
        with torch.inference_mode():
            return model(**inputs)

    def warm():
        step()

    facts = ModelFacts(title, config.num_attention_heads, 1)
    modes = [m for m in mode_list(world, config.num_attention_heads, False) if m[0] == "Ulysses-2"]
    compare_modes(title, rank, world, device, modes, step, warm, repeats, facts)


def t5_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random T5 weights scaled as T5's own init: queries by 1/sqrt(d_kv), since T5 attention has no
    1/sqrt(d) scale. Plain N(0, 1/fan_in) weights make every softmax near-argmax, so a last-bit difference
    flips it and two bf16 runs of one model disagree completely (rel err ~1): chaos, not a TP error."""
    random_weights_(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".q.weight"):
                p.mul_(model.config.d_kv ** -0.5)
    return model


def text_encoder_tp_row(title, rank, world, device, dtype, config, check_float32=False):
    """Memory per GPU and output of a T5-XXL-sized encoder, whole on each GPU vs tensor-parallel over all;
    with ``check_float32`` also the same comparison with float32 weights."""
    from transformers import T5EncoderModel

    from diffgen.parallel.config import ParallelPlan
    from diffgen.parallel.state import build_state
    from diffgen.parallel.tensor import shard_encoder

    ids = torch.randint(0, config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0)).to(device)
    state = build_state(ParallelPlan(num_gpus=world, tp_size=world, cfg_degree=1, ulysses_degree=1, ring_degree=world),
                        device)
    for run_dtype in (dtype, torch.float32) if check_float32 and dtype != torch.float32 else (dtype,):
        torch.cuda.empty_cache() if device.type == "cuda" else None
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        with torch.device("meta"):
            model = T5EncoderModel(config)
        model = t5_weights_(model.to_empty(device=device)).to(run_dtype).eval()
        whole = (torch.cuda.memory_allocated(device) - before) / 2**30 if device.type == "cuda" else float("nan")
        with torch.inference_mode():
            reference = model(ids).last_hidden_state.float().cpu()
        shard_encoder(model, state.tp)
        torch.cuda.empty_cache() if device.type == "cuda" else None
        sharded = (torch.cuda.memory_allocated(device) - before) / 2**30 if device.type == "cuda" else float("nan")
        with torch.inference_mode():
            out = model(ids).last_hidden_state.float().cpu()
        if rank == 0:
            kind = str(run_dtype).removeprefix("torch.")
            ROWS.append((title, f"1 GPU (whole, {kind})", "1", "-", "-", "-", f"{whole:.2f} GiB per GPU"))
            ROWS.append((title, f"TP-{world} ({kind})", str(world), "-", "-", f"{relative_error(out, reference):.1e}",
                         f"{sharded:.2f} GiB per GPU"))
        del model


def ring_accuracy_row(title, rank, world, device, dtype, config, frames, height, width, text_len=512):
    """One Wan forward in ``dtype`` on 1 GPU, Ring and Ulysses over all GPUs, each against float32 on 1 GPU:
    which mode is closer to float32 (the rel err column compares two bf16 runs with each other)."""
    import copy

    from diffgen.models.dits.wan import WanTransformer
    from diffgen.parallel.config import ParallelPlan
    from diffgen.parallel.state import build_state, use_state

    model = build(WanTransformer, config, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, config.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8, device=device,
                    generator=gen)
    text = torch.randn(1, text_len, config.text_dim, device=device, generator=gen)
    timestep = torch.tensor([900.0], device=device)

    def forward(net, run_dtype):
        with torch.inference_mode():
            return net(x.to(run_dtype), timestep, text.to(run_dtype)).float()

    float32 = one_gpu = None
    if rank == 0:
        with use_state(None):
            float32 = forward(copy.deepcopy(model).float(), torch.float32)
            one_gpu = forward(model, dtype)
        ROWS.append((title, "1 GPU", "1", "-", "-", f"{relative_error(one_gpu, float32):.1e}", "vs float32 on 1 GPU"))
    for name, degrees in ((f"Ring-{world}", dict(ring_degree=world)), (f"Ulysses-{world}", dict(ulysses_degree=world))):
        plan = ParallelPlan(num_gpus=world, **{"ulysses_degree": 1, "ring_degree": 1, **degrees})
        state = build_state(plan, device)
        with use_state(state):
            out = forward(model, dtype)
        if rank == 0:
            kind = str(dtype).removeprefix("torch.")
            ROWS.append((title, name, str(world), "-", "-", f"{relative_error(out, float32):.1e}",
                         f"vs float32 on 1 GPU ({relative_error(out, one_gpu):.1e} vs 1 GPU {kind})"))


def vae_row(title, rank, world, device, frames, height, width, vae_config):
    """The Wan VAE decode on one GPU, then with each frame split over every GPU (diffgen/parallel/vae.py): through
    diffusers' frame-by-frame decoder and through diffgen's, each with the split of before (latent rows, the first
    up block's halo kept to the end) and the split of now (the longer axis, each up block's own halo)."""
    from diffusers import AutoencoderKLWan

    from diffgen.models.vaes.wan import channels_last_conv3d, use_native_decoder
    from diffgen.parallel.config import ParallelPlan
    from diffgen.parallel.state import build_state
    from diffgen.parallel.vae import decode_split, stage_halos

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = random_weights_(AutoencoderKLWan(**vae_config).to(device, dtype).eval())
    gen = torch.Generator(device=device).manual_seed(2)
    latents = torch.randn(1, vae.config.z_dim, (frames - 1) // 4 + 1, height // 8, width // 8, device=device,
                          dtype=dtype, generator=gen)
    small = latents[:, :, :2, :24, :24].contiguous()
    state = build_state(ParallelPlan(num_gpus=world, ring_degree=world), device)
    halos = stage_halos(vae)
    before = [halos[0] * 2**k for k in range(len(halos))]
    longer = -1 if latents.shape[-1] > latents.shape[-2] else -2
    splits = (("rows split, first halo throughout (before)", dict(dim=-2, halos=before)),
              ("rows split, per-block halos", dict(dim=-2)),
              (f"{'columns' if longer == -1 else 'rows'} split, per-block halos (now)", dict(dim=longer)))
    halo_note = f"halos {'/'.join(map(str, halos))} px at each up block's input; {tuple(latents.shape[-2:])} latent"
    repeats = 1 if device.type == "cpu" else 2
    for decoder in ("diffusers", "diffgen"):
        if decoder == "diffgen":
            if device.type == "cuda":
                channels_last_conv3d(vae)
            use_native_decoder(vae)
        repeats_here = 1 if decoder == "diffusers" else repeats  # diffusers' decode: seconds per call
        reference = baseline = None
        with torch.inference_mode():
            if rank == 0:
                vae.decode(small)
                baseline, _, reference = timed(lambda: vae.decode(latents, return_dict=False)[0], device,
                                               repeats_here)
                reference = reference.cpu()
                ROWS.append((title, f"{decoder} decoder, 1 GPU", "1", f"{baseline:.3f}", "1.00x", "-", ""))
            dist.barrier()
            for name, split in splits:
                decode_split(vae, vae.decode, small, state.replica, **split)
                seconds, _, out = timed(lambda split=split: decode_split(vae, vae.decode, latents, state.replica,
                                                                         **split), device, repeats_here)
                slowest = torch.tensor([seconds], device=device)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                if rank == 0:
                    ROWS.append((title, f"{decoder} decoder, {name}", str(world), f"{slowest.item():.3f}",
                                 f"{baseline / slowest.item():.2f}x", f"{relative_error(out.cpu(), reference):.1e}",
                                 halo_note if "now" in name else ""))
                del out
        if device.type == "cuda":
            torch.cuda.empty_cache()


# -- driver ---------------------------------------------------------------------------------------------------


def rank_main(rank: int, world: int, init: str, args) -> None:
    from transformers import T5Config

    from diffgen.models.dits.flux import FluxConfig
    from diffgen.models.dits.qwen_image import QwenImageConfig
    from diffgen.models.dits.wan import WanConfig

    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init, rank=rank,
                            world_size=world)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_grad_enabled(False)
    started = time.perf_counter()

    printed = 0

    def print_new_rows() -> None:
        """Each row as soon as it is measured: a run stopped by a time limit keeps what it measured."""
        nonlocal printed
        if rank == 0:
            for r in ROWS[printed:]:
                print("| " + " | ".join(r) + " |", flush=True)
            printed = len(ROWS)

    def row(name, fn, *fn_args):
        _log(rank, f"[{time.perf_counter() - started:6.1f}s] {name}")
        try:
            return fn(*fn_args)
        except Exception as error:  # noqa: BLE001
            if rank == 0:
                ROWS.append((name, "-", str(world), "error", "", "", _short(error)))
            traceback.print_exc()
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print_new_rows()
        return None

    def run_rows(rows) -> None:
        """``rows``: (key, title, fn, args); with --only, the keys it names, in this order."""
        results = {}
        for key, title, fn, fn_args in rows:
            if args.only and key not in args.only:
                continue
            if key == "flux-dp":  # the replicas serve the model and inputs of the flux row (then freed)
                if results.get("flux") is None:
                    continue
                fn_args = (*results.pop("flux"), *fn_args)
            results[key] = row(title, fn, title, rank, world, device, *fn_args)
            if key == "flux" and args.only and "flux-dp" not in args.only:
                results.pop("flux")

    if args.tiny:  # every row's code path on tiny configs (the CPU test)
        wan = WanConfig(num_attention_heads=4, attention_head_dim=12, ffn_dim=64, num_layers=2, text_dim=32,
                        freq_dim=32)
        flux = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                          joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), in_channels=16,
                          guidance_embeds=True)
        qwen = QwenImageConfig(num_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                               axes_dims_rope=(4, 6, 6), in_channels=16, out_channels=4)
        t5 = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
        run_rows([
            ("flux", "tiny FLUX forward", flux_row, (dtype, flux, 80, 1, 8)),
            ("flux-dp", "tiny FLUX", flux_dp_row, (4, 1)),
            ("flux-compile", "tiny FLUX forward, compiled", flux_row, (dtype, flux, 80, 1, 8, False, "aot_eager")),
            ("qwen", "tiny Qwen true-CFG step", qwen_row, (dtype, qwen, 80, 1)),
            ("qwen-mask", "tiny Qwen forward, 2 prompts, padded text", qwen_mask_row, (dtype, qwen, 80, 1, (7, 4))),
            ("wan-small", "tiny Wan CFG step", wan_step_row, (dtype, wan, 9, 48, 80, 1, 16)),
            ("ring-accuracy", "tiny Wan forward vs float32", ring_accuracy_row, (dtype, wan, 9, 48, 80, 16)),
            ("t5", "tiny T5 encoder", text_encoder_tp_row, (dtype, t5, True)),
            ("vae", "tiny Wan VAE decode", vae_row,
             (5, 48, 256, dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True]))),
        ])
    else:
        quick = args.quick
        frames = 21 if quick else 81
        size = 512 if quick else 1024
        xxl = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                   is_encoder_decoder=False)
        wan_1_3b = WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30)
        flux = FluxConfig(guidance_embeds=True)
        run_rows([  # in this order: a run cut short by a time limit keeps the first rows
            ("flux", f"FLUX.1-dev {size}² forward", flux_row, (dtype, flux, size, 3)),
            ("flux-dp", "FLUX.1-dev", flux_dp_row, (8 if quick else 16, 1)),
            ("flux-graph", f"FLUX.1-dev {size}² forward", flux_row, (dtype, flux, size, 3, 512, True)),
            ("qwen", f"Qwen-Image {size}² true-CFG step", qwen_row, (dtype, QwenImageConfig(), size, 2)),
            ("qwen-mask", f"Qwen-Image {size}² forward, 2 prompts (200 / 120 text tokens)", qwen_mask_row,
             (dtype, QwenImageConfig(), size, 3)),
            ("wan-small", f"Wan2.1-T2V-1.3B 480x832x{frames} CFG step", wan_step_row,
             (dtype, wan_1_3b, frames, 480, 832, 2)),
            ("flux-compile", f"FLUX.1-dev {size}² forward, compiled", flux_row,
             (dtype, flux, size, 3, 512, False, "inductor")),
            ("flux-compile-graph", f"FLUX.1-dev {size}² forward, compiled, served CUDA graphs", flux_row,
             (dtype, flux, size, 3, 512, True, "inductor")),
            ("ring-accuracy", "Wan2.1-T2V-1.3B 480x832x9 forward vs float32", ring_accuracy_row,
             (dtype, wan_1_3b, 9, 480, 832)),
            ("t5", "T5-XXL encoder", text_encoder_tp_row, (dtype, T5Config(vocab_size=32128, **xxl), True)),
            ("t5", "UMT5-XXL-sized encoder (T5 layers, 256k vocab)", text_encoder_tp_row,
             (dtype, T5Config(vocab_size=256384, **xxl))),
            ("vae", f"Wan VAE decode {frames} frames 720p", vae_row, (frames, 720, 1280, {})),
            ("wan-14b", f"Wan2.1-T2V-14B 720x1280x{frames} CFG step", wan_step_row,
             (dtype, WanConfig(), frames, 720, 1280, 1)),
        ])
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n## bench/parallel.py: {world} x {name}, torch {torch.__version__}, "
              f"{time.perf_counter() - started:.0f} s")
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        for r in ROWS:
            print("| " + " | ".join(r) + " |")
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes (21 frames, 512²)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (with --device cpu: the CPU test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-gpus", type=int, default=None, help="processes (default: all visible GPUs, max 4)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated rows, in the bench's order: {', '.join(ROW_KEYS)} (default: all)")
    args = parser.parse_args()
    if args.only:
        args.only = args.only.split(",")
        unknown = sorted(set(args.only) - set(ROW_KEYS))
        if unknown:
            parser.error(f"--only: {', '.join(unknown)} not among {', '.join(ROW_KEYS)}")
    world = args.num_gpus or (min(torch.cuda.device_count(), 4) if args.device == "cuda" else 2)
    if world < 2:
        raise SystemExit("bench/parallel.py needs at least 2 GPUs (or --device cpu)")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(rank_main, args=(world, f"file://{folder}/rendezvous", args), nprocs=world,
                           start_method="spawn", join=True)


if __name__ == "__main__":
    main()
