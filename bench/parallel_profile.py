"""Where sequence parallelism's time goes on 2 GPUs, and how far Ring's bf16 output is from float32.

    python bench/parallel_profile.py                      # every section, 2 GPUs, ~2 minutes
    python bench/parallel_profile.py --only comm,flux     # some sections
    python bench/parallel_profile.py --legacy-sequence OLD_SEQUENCE.py   # also time an older sequence.py

Sections:
- comm: one all-to-all of FLUX's q (2048 tokens x 24 heads x 128, bf16) and larger ones: host time to
  issue it, and time until done; a fixed cost per collective shows here.
- flux / qwen: one DiT forward (FLUX.1-dev 1024², Qwen-Image 1024² with 200 text tokens) on 1 GPU and
  Ulysses-2 (median of 5), the host time to enqueue one forward (close to the whole time: host-bound),
  and a torch.profiler table of one Ulysses-2 forward on rank 0 (trace saved under $OUT when set).
  qwen also times a padded text mask (the last 60 of 200 text tokens) given to the kernel vs packed.
- ring: Wan2.1-1.3B 480x832x21, one forward: 1 GPU bf16, Ring-2 bf16 and Ulysses-2 bf16 each against the
  same model in float32 on 1 GPU (which of them is closer to float32).

Random bf16 weights as in bench/parallel.py. Keep NCCL_NVLS_ENABLE=0 etc. (set here before torch loads).
"""

from __future__ import annotations

import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_name] = _value

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.parallel import build, flux_inputs, relative_error  # noqa: E402

SECTIONS = ("comm", "flux", "qwen", "ring")


def log(rank: int, *parts: object) -> None:
    if rank == 0:
        print(*parts, flush=True)


def measure(step, device, repeats: int = 5) -> tuple[float, float, object]:
    """(median seconds, median host seconds to enqueue, last output) of ``step``."""
    totals, enqueues, out = [], [], None
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = step()
        queued = time.perf_counter()
        torch.cuda.synchronize(device)
        totals.append(time.perf_counter() - start)
        enqueues.append(queued - start)
    return statistics.median(totals), statistics.median(enqueues), out


def slowest(seconds: float, device) -> float:
    t = torch.tensor([seconds], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class Variants:
    """The sequence-parallel attention under test: the current one, or an older sequence.py's."""

    def __init__(self, legacy_path: str | None):
        import diffgen.parallel.sequence as current

        self.module = current
        self.current = current.sequence_parallel_attention
        self.legacy = None
        if legacy_path:
            spec = importlib.util.spec_from_file_location("legacy_sequence", legacy_path)
            legacy = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(legacy)
            self.legacy = legacy.sequence_parallel_attention

    def names(self):
        return ["current"] + (["legacy"] if self.legacy else [])

    def use(self, name: str) -> None:
        self.module.sequence_parallel_attention = self.current if name == "current" else self.legacy


def ulysses_state(world, device):
    from diffgen.parallel.config import ParallelPlan
    from diffgen.parallel.state import build_state

    return build_state(ParallelPlan(num_gpus=world, ulysses_degree=world, ring_degree=1, cfg_degree=1), device)


def ring_state(world, device):
    from diffgen.parallel.config import ParallelPlan
    from diffgen.parallel.state import build_state

    return build_state(ParallelPlan(num_gpus=world, ulysses_degree=1, ring_degree=world, cfg_degree=1), device)


def profile_table(rank, step, device, name: str) -> None:
    """torch.profiler over one call on every rank; rank 0 prints where the GPU and host time went."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    if rank != 0:
        return
    averages = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in averages)
    nccl_us = sum(e.self_device_time_total for e in averages if "nccl" in e.key.lower())
    print(f"\n### profile {name}: wall {wall * 1e3:.1f} ms (profiled), GPU kernel time {kernel_us / 1e3:.1f} ms "
          f"of which NCCL kernels {nccl_us / 1e3:.1f} ms")
    print(averages.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    out = os.environ.get("OUT")
    if out:
        prof.export_chrome_trace(os.path.join(out, f"trace-{name}.json.gz"))


# -- sections ----------------------------------------------------------------------------------------------


def section_comm(rank, world, device):
    state = ulysses_state(world, device)
    group = state.ulysses.group
    for label, shape in (("FLUX q 2048x24x128", (world, 2048 // world * 24 * 128)),
                         ("FLUX qkv fused", (world, 3 * 2048 // world * 24 * 128)),
                         ("Wan-1.3B 480p q", (world, 16380 // world * 12 * 128 * 2)),
                         ("64 MiB", (world, 32 * 2**20 // world))):
        send = torch.randn(shape, device=device, dtype=torch.bfloat16)
        recv = torch.empty_like(send)
        for _ in range(3):
            dist.all_to_all_single(recv, send, group=group)
        torch.cuda.synchronize(device)
        dist.barrier()
        count = 50
        start = time.perf_counter()
        for _ in range(count):
            dist.all_to_all_single(recv, send, group=group)
        issued = time.perf_counter()
        torch.cuda.synchronize(device)
        done = time.perf_counter()
        per_call = slowest((done - start) / count, device)
        mib = send.numel() * 2 / 2**20
        log(rank, f"comm {label}: {mib:.1f} MiB per rank, issue {(issued - start) / count * 1e6:.0f} us/call, "
                  f"done {per_call * 1e6:.0f} us/call, {mib * (world - 1) / world / 2**10 / per_call:.0f} GiB/s out")


def compare_forward(rank, world, device, name, step, variants, profile_variant="current"):
    from diffgen.parallel.state import use_state

    baseline = reference = None
    if rank == 0:
        with use_state(None):
            step()
            baseline, enqueue, reference = measure(step, device)
        log(rank, f"{name}: 1 GPU {baseline * 1e3:.1f} ms (host enqueue {enqueue * 1e3:.1f} ms)")
    dist.barrier()
    state = ulysses_state(world, device)
    for variant in variants.names():
        variants.use(variant)
        with use_state(state):
            step()
            seconds, enqueue, out = measure(step, device)
            seconds = slowest(seconds, device)
            if rank == 0:
                log(rank, f"{name}: Ulysses-{world} [{variant}] {seconds * 1e3:.1f} ms = {baseline / seconds:.2f}x "
                          f"(host enqueue {enqueue * 1e3:.1f} ms), rel err vs 1 GPU "
                          f"{relative_error(out, reference):.1e}")
            if variant == profile_variant:
                profile_table(rank, step, device, f"{name.split()[0]}-ulysses-{variant}")
    variants.use("current")


def section_flux(rank, world, device, variants):
    from diffgen.models.dits.flux import FluxConfig, FluxTransformer

    config = FluxConfig(guidance_embeds=True)
    model = build(FluxTransformer, config, device, torch.bfloat16)
    inputs = flux_inputs(config, device, torch.bfloat16)

    def step():
        with torch.inference_mode():
            return model(**inputs)

    compare_forward(rank, world, device, "FLUX.1-dev 1024² forward", step, variants)


def section_qwen(rank, world, device, variants):
    import diffgen.layers.attention as attention_module
    from diffgen.models.dits.qwen_image import QwenImageConfig, QwenImageTransformer
    from diffgen.parallel.state import use_state

    config = QwenImageConfig()
    model = build(QwenImageTransformer, config, device, torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(1)
    grid = 1024 // 16
    x = torch.randn(1, grid * grid, config.in_channels, device=device, generator=gen, dtype=torch.bfloat16)
    text = torch.randn(1, 200, config.joint_attention_dim, device=device, generator=gen, dtype=torch.bfloat16)
    timestep = torch.tensor([0.9], device=device)
    mask = torch.ones(1, 200, device=device, dtype=torch.long)
    mask[:, 140:] = 0

    def step(text_mask=None):
        with torch.inference_mode():
            return model(x, timestep, text, [(1, grid, grid)], text_mask)

    compare_forward(rank, world, device, "Qwen-Image 1024² forward", step, variants)
    if rank == 0:
        packed_lengths = attention_module._text_lengths
        with use_state(None):
            results = {}
            for label, lengths in (("packed", packed_lengths), ("mask to SDPA", lambda mask: None)):
                attention_module._text_lengths = lengths
                step(mask)
                results[label] = measure(lambda: step(mask), device)
            attention_module._text_lengths = packed_lengths
        (packed, _, packed_out), (masked, _, masked_out) = results["packed"], results["mask to SDPA"]
        difference = relative_error(packed_out, masked_out)
        log(rank, f"Qwen-Image padded text (140 of 200), 1 GPU: mask to SDPA {masked * 1e3:.1f} ms, packed "
                  f"{packed * 1e3:.1f} ms = {masked / packed:.2f}x, rel diff {difference:.1e}")
    dist.barrier()


def section_ring(rank, world, device):
    from diffgen.models.dits.wan import WanConfig, WanTransformer
    from diffgen.parallel.state import use_state

    config = WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30)
    model = build(WanTransformer, config, device, torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, config.in_channels, 6, 60, 104, device=device, generator=gen)
    text = torch.randn(1, 512, config.text_dim, device=device, generator=gen)
    timestep = torch.tensor([900.0], device=device)

    def step(net, dtype):
        with torch.inference_mode():
            return net(x.to(dtype), timestep, text.to(dtype)).float()

    reference = bf16_one = None
    if rank == 0:
        full = copy.deepcopy(model).float()
        with use_state(None):
            reference = step(full, torch.float32)
            del full
            torch.cuda.empty_cache()
            bf16_one = step(model, torch.bfloat16)
        log(rank, f"Wan2.1-1.3B 480x832x21 forward: 1 GPU bf16 vs fp32 {relative_error(bf16_one, reference):.2e}")
    dist.barrier()
    for label, make in (("Ring", ring_state), ("Ulysses", ulysses_state)):
        state = make(world, device)
        with use_state(state):
            out = step(model, torch.bfloat16)
        if rank == 0:
            log(rank, f"  {label}-{world} bf16 vs fp32 {relative_error(out, reference):.2e}, "
                      f"vs 1 GPU bf16 {relative_error(out, bf16_one):.2e}")
        dist.barrier()
    del model
    torch.cuda.empty_cache()


def rank_main(rank: int, world: int, init: str, args) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world, device_id=device)
    torch.set_grad_enabled(False)
    variants = Variants(args.legacy_sequence)
    if rank == 0:
        print(f"## bench/parallel_profile.py: {world} x {torch.cuda.get_device_name(device)}, torch "
              f"{torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}", flush=True)
    chosen = args.only.split(",") if args.only else SECTIONS
    for name in chosen:
        started = time.perf_counter()
        try:
            if name == "comm":
                section_comm(rank, world, device)
            elif name == "flux":
                section_flux(rank, world, device, variants)
            elif name == "qwen":
                section_qwen(rank, world, device, variants)
            elif name == "ring":
                section_ring(rank, world, device)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        torch.cuda.empty_cache()
        log(rank, f"[{name}: {time.perf_counter() - started:.0f} s]")
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--legacy-sequence", default=None, help="an older diffgen/parallel/sequence.py to time too")
    parser.add_argument("--num-gpus", type=int, default=2)
    args = parser.parse_args()
    if args.only and set(args.only.split(",")) - set(SECTIONS):
        raise SystemExit(f"--only: {args.only!r}: sections are {', '.join(SECTIONS)}")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(rank_main, args=(args.num_gpus, f"file://{folder}/rendezvous", args),
                           nprocs=args.num_gpus, start_method="spawn", join=True)


if __name__ == "__main__":
    main()
