"""Batching on one GPU: whole requests through the worker's own loop, batching on (continuous, up to
--max-batch-size rows) vs off (one request after another, as before).

    python bench/batching.py                        # real FLUX.1-dev and Wan2.1-1.3B configs, random bf16, CUDA
    python bench/batching.py --tiny --device cpu    # tiny configs, float32 (the test suite runs this)

The worker loop (diffgen.engine.worker.serve_pipeline) runs in a thread over in-process queues, exactly
as in a ``diffgen serve`` worker; HTTP and the process boundary are left out. Weights are random at the
real configs (CLIP-L + T5-XXL + FLUX DiT + FLUX VAE), so the numbers are speed only.

0. Profile: one denoising step of n FLUX requests as rows of one forward (n = 1, 2, 3, 4, 8, 16): where
   the GPU saturates, i.e. what each row added to a forward costs the requests already in it.
1. Throughput: 16 concurrent clients (closed loop: each sends its next request when the last returns),
   512x512 FLUX.1-dev requests with different prompts and seeds: requests/s, p50 / p95 latency. Batching
   off; on with every running request in every forward and encode/decode between steps (the policy
   before StepPolicy); on with StepPolicy and encode/decode overlapped.
2. Short requests in a stream: clients keep 50-step requests coming; 4-step requests arrive one at a
   time meanwhile. p50 / p95 latency of the 4-step requests against their latency alone (idle worker),
   for the same worker settings, and where a short request's time went (waiting to start, encoding and
   joining, its steps, decoding).
3. Wan2.1-1.3B 320x576, 33 frames: one CFG denoising step of the DiT per request, alone (cond and
   uncond as two forwards, today's single-request path) vs N requests as rows of one forward.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import threading
import time
import uuid

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import print_table, time_call  # noqa: E402

#: worker settings (--throughput-modes, --stream-modes): batching capacity (0: --max-batch-size), step
#: policy ("every": every running request in every forward, the policy before StepPolicy), overlap
MODES = {"off": (1, "every", False), "every": (0, "every", False), "policy": (0, "policy", False),
         "policy+overlap": (0, "policy", True)}
MODE_LABELS = {"off": "batching off", "every": "on: every request each step, encode/decode between steps",
               "policy": "on: StepPolicy, encode/decode between steps (serve default)",
               "policy+overlap": "on: StepPolicy + encode/decode overlapped"}


class InProcessWorker:
    """A worker's main loop in a thread: submit(request) -> latency in seconds when it completes."""

    def __init__(self, pipe, capacity: int, policy=None, overlap: bool = False):
        from diffgen.engine.batching import EVERY_REQUEST
        from diffgen.engine.worker import serve_pipeline

        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self._waiting: dict[str, tuple[threading.Event, dict]] = {}
        self._lock = threading.Lock()
        self.failures: list[str] = []
        self.shared: list[float] = []  # per finished request: the most requests that shared one of its forwards
        self.images: dict = {}  # seed -> its image
        self._loop = threading.Thread(target=serve_pipeline, args=(pipe, capacity, self.inbox, set(), self.outbox,
                                                                   False, policy or EVERY_REQUEST, overlap),
                                      daemon=True)
        self._router = threading.Thread(target=self._route, daemon=True)
        self._loop.start()
        self._router.start()

    def _route(self) -> None:
        from diffgen.engine.messages import Done, Failed, Progress, Started

        while True:
            message = self.outbox.get()
            if message is None:
                return
            now = time.perf_counter()
            if isinstance(message, (Started, Progress)):
                with self._lock:
                    times = self._waiting[message.job_id][1]
                if isinstance(message, Started):
                    times["started"] = now
                else:
                    times.setdefault("first_step", now)
                    times["last_step"] = now
            elif isinstance(message, (Done, Failed)):
                with self._lock:
                    event, times = self._waiting.pop(message.job_id)
                if isinstance(message, Failed):
                    self.failures.append(message.message)
                else:
                    self.shared.append(message.result.timings.get("batched_requests", 1.0))
                    self.images[message.result.seed] = message.result.images[0]
                times["done"] = now
                event.set()

    def submit(self, request) -> float:
        return self.submit_timed(request)["latency"]

    def submit_timed(self, request) -> dict[str, float]:
        """Latency and its phases: wait (until its preparation started), encode+join (until its first step
        was done), steps (first to last step), decode (last step to the result)."""
        from diffgen.engine.messages import QueuedRequest, RunBatch

        job_id, event, times = uuid.uuid4().hex, threading.Event(), {}
        with self._lock:
            self._waiting[job_id] = (event, times)
        start = time.perf_counter()
        self.inbox.put(RunBatch(uuid.uuid4().hex, (QueuedRequest(job_id, request),)))
        event.wait()
        return {"latency": times["done"] - start, "wait": times["started"] - start,
                "encode+join": times["first_step"] - times["started"], "steps": times["last_step"] - times[
                    "first_step"], "decode": times["done"] - times["last_step"]}

    def stop(self) -> None:
        from diffgen.engine.messages import Stop

        self.inbox.put(Stop())
        self._loop.join()
        self.outbox.put(None)
        self._router.join()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def flux_request(cfg: dict, index: int, steps: int):
    from diffgen.engine.request import GenerationRequest

    return GenerationRequest.build(f"request {index}: a photo of object number {index} on a table", seed=index,
                                   height=cfg["height"], width=cfg["width"], num_inference_steps=steps,
                                   guidance_scale=3.5, max_sequence_length=cfg["text_len"])


def closed_loop(worker: InProcessWorker, clients: int, per_client: int, make) -> tuple[float, list[float]]:
    """``clients`` threads each sending ``per_client`` requests one after another; (wall seconds, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(per_client):
            latency = worker.submit(make(c * per_client + i))
            with lock:
                latencies.append(latency)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies


def worker(pipe, mode: str, args) -> InProcessWorker:
    from diffgen.engine.batching import EVERY_REQUEST, StepPolicy

    capacity, policy, overlap = MODES[mode]
    return InProcessWorker(pipe, capacity or args.max_batch_size,
                           EVERY_REQUEST if policy == "every" else StepPolicy(), overlap)


def forward_profile(pipe, cfg: dict, args, rows: list) -> None:
    """One denoising step of n prepared requests as rows of one forward (the Denoiser's batched path)."""
    from diffgen.pipelines.denoiser import Denoiser

    device = pipe.device
    denoiser = Denoiser(pipe)
    sizes = [n for n in args.profile_rows if n <= args.max_batch_size]
    states = []
    for i in range(max(sizes)):
        state = pipe.new_state(flux_request(cfg, 50_000 + i, 50))
        pipe.prepare(state)
        states.append(state)
    row_list = [denoiser.start(state) for state in states]
    base = None
    with torch.inference_mode():
        for n in sizes:
            denoiser.step(row_list[:n])  # warm-up (a new batch size)
            seconds = statistics.median(time_call(lambda n=n: denoiser.step(row_list[:n]), device) for _ in range(2))
            base = base or seconds
            rows.append((f"FLUX {cfg['height']}x{cfg['width']} denoising step", f"{n} request(s), 1 forward",
                         f"{n}", "", f"{seconds * 1000:.1f} ms", f"{seconds / n * 1000:.1f} ms/request",
                         f"{seconds / base:.2f}x one"))


def throughput(pipe, cfg: dict, args, rows: list) -> None:
    results = {}
    for mode in args.throughput_modes:
        running = worker(pipe, mode, args)
        running.submit(flux_request(cfg, 10_000, args.steps))  # warm-up
        wall, latencies = closed_loop(running, args.clients, args.per_client,
                                      lambda i: flux_request(cfg, i, args.steps))
        running.stop()
        assert not running.failures, running.failures
        results[mode] = len(latencies) / wall
        gain = f" ({results[mode] / results['off']:.2f}x off)" if mode != "off" and "off" in results else ""
        label = MODE_LABELS[mode].replace("on:", f"on (max {args.max_batch_size}):")
        rows.append((f"FLUX {cfg['height']}x{cfg['width']} {args.steps} steps, {args.clients} clients", label,
                     f"{len(latencies)}", f"{results[mode]:.3f}{gain}",
                     f"{statistics.median(latencies):.2f}", f"{percentile(latencies, 95):.2f}",
                     f"{max(running.shared):.0f}"))


def short_in_stream(pipe, cfg: dict, args, rows: list, phases: list) -> None:
    short, long = args.short_steps, args.long_steps
    alone, images = {}, {}
    for mode in ("off", "policy+overlap"):  # an idle worker, with the settings before and after
        running = worker(pipe, mode, args)
        running.submit(flux_request(cfg, 20_000, short))  # warm-up
        alone[mode] = [running.submit_timed(flux_request(cfg, 20_001 + i, short)) for i in range(args.shorts)]
        running.stop()
        images[mode] = running.images
        latencies = [timed["latency"] for timed in alone[mode]]
        rows.append((f"FLUX {short}-step requests", f"alone (idle worker), {MODE_LABELS[mode]}", f"{len(latencies)}",
                     "", f"{statistics.median(latencies):.2f}", f"{percentile(latencies, 95):.2f}", "1"))
        phases.append((f"alone, {MODE_LABELS[mode]}", *_phase_medians(alone[mode])))
    alone_p95 = percentile([timed["latency"] for timed in alone["off"]], 95)
    # Encoding and decoding on the stage thread's stream must not change a pixel of a request run alone.
    differences = [int(np.abs(np.asarray(images["off"][seed], np.int16) - np.asarray(image, np.int16)).max())
                   for seed, image in images["policy+overlap"].items()]
    print(f"alone, overlapped vs not: largest pixel difference {max(differences)} over {len(differences)} images")
    for mode in args.stream_modes:
        running = worker(pipe, mode, args)
        stop = threading.Event()
        streams = [threading.Thread(target=_stream, args=(running, stop, cfg, c, long))
                   for c in range(args.stream_clients)]
        for thread in streams:
            thread.start()
        time.sleep(args.stream_lead)  # the stream is running when the short requests come
        timed = []
        for i in range(args.shorts):
            timed.append(running.submit_timed(flux_request(cfg, 40_000 + i, short)))
            time.sleep(args.short_gap)
        stop.set()
        for thread in streams:
            thread.join()
        running.stop()
        assert not running.failures, running.failures
        latencies = [t["latency"] for t in timed]
        p95 = percentile(latencies, 95)
        rows.append((f"FLUX {short}-step requests during {args.stream_clients} streams of {long}-step ones",
                     MODE_LABELS[mode], f"{len(latencies)}", "", f"{statistics.median(latencies):.2f}",
                     f"{p95:.2f} ({p95 / alone_p95:.2f}x alone)", f"{max(running.shared):.0f}"))
        phases.append((f"during the streams, {MODE_LABELS[mode]}", *_phase_medians(timed)))


def _phase_medians(timed: list[dict[str, float]]) -> tuple[str, ...]:
    return tuple(f"{statistics.median(t[phase] for t in timed) * 1000:.0f}"
                 for phase in ("latency", "wait", "encode+join", "steps", "decode"))


def _stream(worker: InProcessWorker, stop: threading.Event, cfg: dict, client: int, steps: int) -> None:
    """One client of the stream: a ``steps``-step request after another until ``stop``."""
    i = 0
    while not stop.is_set():
        worker.submit(flux_request(cfg, 30_000 + 1000 * client + i, steps))
        i += 1


def wan_batch_gain(cfg: dict, device: torch.device, dtype: torch.dtype, args, rows: list) -> None:
    from bench.wan import build_native_dit, latent_shape

    model = build_native_dit(cfg, device, dtype)
    g = torch.Generator(device).manual_seed(0)

    def inputs(batch: int) -> dict:
        return dict(hidden_states=torch.randn(latent_shape(cfg, batch), device=device, dtype=dtype, generator=g),
                    timestep=torch.full((batch,), 500.0, device=device),
                    encoder_hidden_states=torch.randn(batch, cfg["text_len"], cfg["dit"]["text_dim"], device=device,
                                                      dtype=dtype, generator=g))

    alone = inputs(1)
    variants = {"alone: cond + uncond, 2 forwards of 1 row": (1, lambda: (model(**alone), model(**alone)))}
    for n in args.wan_batches:
        batched = inputs(2 * n)
        variants[f"{n} request(s): 1 forward of {2 * n} rows"] = (n, lambda b=batched: model(**b))
    with torch.inference_mode():
        for _, fn in variants.values():
            fn()
        timings = {name: statistics.median(time_call(fn, device) for _ in range(args.repeats))
                   for name, (_, fn) in variants.items()}
    base = timings[next(iter(timings))]
    for name, (n, _) in variants.items():
        per_request = timings[name] / n
        rows.append((f"Wan2.1-1.3B {cfg['height']}x{cfg['width']}x{cfg['frames']} CFG step", name, f"{n}", "",
                     f"{timings[name] * 1000:.1f} ms", f"{per_request * 1000:.1f} ms/request",
                     f"{base / per_request:.2f}x"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU, float32): checks the script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--short-steps", type=int, default=4)
    parser.add_argument("--long-steps", type=int, default=50)
    parser.add_argument("--stream-clients", type=int, default=2)
    parser.add_argument("--shorts", type=int, default=8)
    parser.add_argument("--short-gap", type=float, default=0.5, help="seconds between two short requests")
    parser.add_argument("--stream-lead", type=float, default=2.0)
    parser.add_argument("--wan-batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile-rows", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16])
    parser.add_argument("--throughput-modes", nargs="+", choices=list(MODES), default=["off", "every",
                                                                                         "policy+overlap"])
    parser.add_argument("--stream-modes", nargs="+", choices=list(MODES), default=["every", "policy",
                                                                                  "policy+overlap"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["profile", "throughput", "stream", "wan"])
    args = parser.parse_args()

    from bench import flux as flux_bench
    from bench import wan as wan_bench

    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    flux_cfg = dict(flux_bench.TINY if args.tiny else flux_bench.REAL)
    wan_cfg = dict(wan_bench.TINY if args.tiny else wan_bench.REAL)
    if args.tiny:
        args.clients, args.per_client, args.steps, args.long_steps, args.shorts = 3, 1, 2, 4, 1
        args.short_steps, args.short_gap, args.stream_lead, args.max_batch_size, args.repeats = 2, 0.0, 0.1, 4, 1
        args.stream_clients, args.wan_batches, args.profile_rows = 1, [2], [1, 2]
        flux_cfg.update(height=32, width=32)
    else:
        flux_cfg.update(height=512, width=512)
        wan_cfg.update(height=320, width=576, frames=33)
    torch.manual_seed(0)
    rows: list[tuple[str, ...]] = []
    header = ("work", "mode", "requests", "requests/s", "p50 (s)", "p95 (s)", "max shared")
    if {"profile", "throughput", "stream"} - set(args.skip):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from diffgen.pipelines.flux import FluxPipeline
        from diffgen.testing.tokenizers import clip_tokenizer, t5_tokenizer

        _, native, clip, t5, vae = flux_bench.build_models(flux_cfg, device, dtype)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        pipe = FluxPipeline(dict(transformer=native, scheduler=scheduler, vae=vae, text_encoder=clip,
                                 tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer()),
                            "random", device, dtype)
        phases: list[tuple[str, ...]] = []
        if "profile" not in args.skip:
            forward_profile(pipe, flux_cfg, args, rows)
        if "throughput" not in args.skip:
            throughput(pipe, flux_cfg, args, rows)
        if "stream" not in args.skip:
            short_in_stream(pipe, flux_cfg, args, rows, phases)
        print_table("FLUX.1-dev requests through the worker loop", rows, header)
        if phases:
            print_table(f"Where a {args.short_steps}-step request's time went (medians, ms)", phases,
                        ("case", "latency", "wait to start", "encode + join + first step", "other steps",
                         "decode + result"))
        del pipe, native, clip, t5, vae
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "wan" not in args.skip:
        wan_rows: list[tuple[str, ...]] = []
        wan_batch_gain(wan_cfg, device, dtype, args, wan_rows)
        print_table("Wan2.1-1.3B DiT: requests as rows of one forward", wan_rows,
                    ("work", "mode", "requests", "", "time", "per request", "gain"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
