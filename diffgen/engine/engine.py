"""Engine: the only front door. Every entry point (CLI, Python, HTTP) submits its requests here.

The Engine resolves a request against the model's spec (a pure function, before any work) and hands
it to its executor: in-process (``Engine.from_pretrained``: the CLI and Python default) or worker
processes behind a bounded queue (``Engine.with_workers``: what ``diffgen serve`` runs).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from diffgen.engine.executor import Executor, ExecutorStatus, InProcessExecutor, Job, JobListener
from diffgen.engine.metrics import Metrics
from diffgen.engine.request import GenerationRequest, GenerationResult
from diffgen.engine.spec import ModelSpec, resolve

logger = logging.getLogger(__name__)

ProgressFn = Any  # (step, total) -> None
PreviewFn = Any  # (step, total, previews: (B, F, h, w, 3) uint8 numpy) -> None


class Engine:
    """Load a diffusers-format checkpoint once; generate many times.

    >>> engine = Engine.from_pretrained("black-forest-labs/FLUX.1-dev", device="cuda", dtype="bfloat16")
    >>> result = engine.generate(prompt="a raccoon", seed=0)
    >>> result.images[0].save("raccoon.png")
    """

    def __init__(self, executor: Executor, model_path: str, revision: str | None = None):
        self.executor = executor
        self.model_path = model_path
        self.revision = revision
        #: the executor's counters and histograms (a process executor fills them; /metrics renders them)
        self.metrics = getattr(executor, "metrics", None) or Metrics()

    @classmethod
    def from_pretrained(cls, model_path: str, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, revision: str | None = None,
                        attention_backend: str | None = None, compile: bool | None = None,
                        quantize: str | None = None, vae_dtype: str | torch.dtype | None = None,
                        cache: str | None = None, cache_threshold: float | None = None,
                        cache_warmup: int | None = None, cache_order: int | None = None,
                        offload: str | None = None, lora_path: list[str] | None = None,
                        lora_mode: str | None = None, serving: bool = False, num_gpus: int | None = None,
                        ulysses_degree: int | None = None, ring_degree: int | None = None,
                        enable_cfg_parallel: bool | None = None, tp_size: int | None = None,
                        dp_size: int | None = None, warmup_sizes: str | list[tuple[int, int]] | None = None) -> Engine:
        """Load the model into this process. ``model_path``: a hub id (``org/name``) or a local folder.

        ``compile``: torch.compile each DiT block (slower first request per shape, faster steps).
        None (the default) decides by use: compiled on CUDA when ``serving``, eager otherwise.
        ``serving``: the engine will answer many requests: with compilation on, it warms up at the
        model's default size (or at each of ``warmup_sizes``, "1024x1024,1344x768": WIDTHxHEIGHT) before
        returning, so no request waits for the compiler.
        ``quantize``: "fp8" stores the DiT's large linears in float8 with per-channel scales (fp8
        tensor-core matmuls on Hopper/Ada; changes the numbers slightly, so no longer bit-equal to diffusers).
        ``vae_dtype``: the VAE's dtype when it should differ from ``dtype`` (Wan's model cards decode in float32).
        ``cache`` / ``cache_threshold``: the step cache of every request that does not choose its own
        ("first-block", "teacache" or "taylorseer"; threshold None: the method's published default for the
        model); ``cache_warmup``: forwards always computed first; ``cache_order``: taylorseer's order.
        ``offload``: "model" keeps components on the CPU until they run; "layerwise" also streams the DiT's
        blocks from CPU memory a few at a time (for GPUs smaller than the model).
        ``lora_path``: LoRA files to load, each ``PATH[:SCALE][@COMPONENT]`` (``@transformer_2``: Wan2.2's
        low-noise expert); ``lora_mode``: "merged" (default: added into the weights) or "dynamic" (applied in
        the forward; requests may pick their own LoRAs; runs eager: ``compile=True`` with it is refused).
        ``num_gpus`` > 1 (or any degree above 1): one process per GPU (gloo processes with ``device="cpu"``),
        degrees as the CLI flags (docs/parallel.md); the plan is checked against the checkpoint before
        anything loads (ParallelConfigError). Call ``close()`` to stop the processes.
        """
        from diffgen.engine.loading import load_model
        from diffgen.engine.optimize import check_compile_options
        from diffgen.parallel.config import ParallelConfig

        check_compile_options(compile, lora_mode)  # before any process starts
        parallel = ParallelConfig(num_gpus=num_gpus or 1, ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                                  enable_cfg_parallel=enable_cfg_parallel, tp_size=tp_size, dp_size=dp_size or 1)
        given = (num_gpus, ulysses_degree, ring_degree, enable_cfg_parallel, tp_size, dp_size)
        plan = None
        if any(value is not None for value in given):  # checked even for one GPU: "--ulysses-degree 2" alone is wrong
            from diffgen.parallel.runtime import plan_for_model

            plan = plan_for_model(parallel, model_path, revision)
        if plan is not None and plan.num_gpus > 1:
            from diffgen.parallel.worker_group import WorkerGroup

            options = dict(device=None if device is None else str(device), dtype=_dtype_name(dtype),
                           revision=revision, attention_backend=attention_backend, compile=compile,
                           quantize=quantize, vae_dtype=_dtype_name(vae_dtype), cache=cache,
                           cache_threshold=cache_threshold, cache_warmup=cache_warmup,
                           cache_order=cache_order, offload=offload, lora_path=lora_path, lora_mode=lora_mode,
                           serving=serving, warmup_sizes=warmup_sizes)
            return cls(WorkerGroup(str(model_path), options, plan), str(model_path), revision)
        pipeline = load_model(model_path, device=device, dtype=dtype, revision=revision,
                              attention_backend=attention_backend, compile=compile, quantize=quantize,
                              vae_dtype=vae_dtype, cache=cache, cache_threshold=cache_threshold,
                              cache_warmup=cache_warmup, cache_order=cache_order, offload=offload,
                              lora_path=lora_path, lora_mode=lora_mode, serving=serving, warmup_sizes=warmup_sizes)
        return cls(InProcessExecutor(pipeline), str(model_path), revision)

    # -- LoRAs: changed in every process that holds the model, between requests ------------------
    def load_lora(self, path: str, name: str | None = None, scale: float = 1.0,
                  component: str = "transformer") -> str:
        """Load a LoRA safetensors file into the DiT (``component="transformer_2"``: Wan2.2's low-noise
        expert); returns its name (default: the file's stem). Merged or dynamic as the engine's ``lora_mode``.
        A bad file raises InvalidRequestError naming what does not match, and changes nothing.

        With worker processes the change reaches every worker (every rank of a group) after the requests
        it is running, never in the middle of one; it returns once all have made it.
        """
        from diffgen.engine.lora import LoRAChange

        change = LoRAChange.load(path, name, scale, component)
        self.executor.change_loras(change)
        return change.name

    def set_lora_scales(self, scales: dict[str, float]) -> None:
        """New scales for loaded LoRAs, by name (merged: the weights are recomputed from the originals)."""
        from diffgen.engine.lora import LoRAChange

        self.executor.change_loras(LoRAChange.set_scales(scales))

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (all without a name); the last one out restores the exact original weights."""
        from diffgen.engine.lora import LoRAChange

        self.executor.change_loras(LoRAChange.unload(name))

    @property
    def loras(self) -> list[dict[str, Any]]:
        """The loaded LoRAs, in load order: name, path, scale, component, number of layers."""
        return self.executor.loras()

    @property
    def lora_mode(self) -> str:
        """How LoRAs are applied: "merged" or "dynamic" (``lora_mode`` of from_pretrained / with_workers)."""
        return self.executor.lora_mode

    def warm_up(self, sizes: list[tuple[int, int]] | None = None) -> None:
        """Run a short request at each (height, width), by default the model's own size (see loading.warm_up)."""
        from diffgen.engine.loading import warm_up

        warm_up(self.pipeline, sizes, run=self.run)

    def set_step_cache(self, method: str | None, threshold: float | None = None, warmup_steps: int | None = None,
                       order: int | None = None) -> None:
        """The default step cache of later requests (None or "none": off); checked against the model now."""
        from diffgen.engine.loading import set_step_cache

        set_step_cache(self.pipeline, method, threshold, warmup_steps, order)

    @classmethod
    def with_workers(cls, model_path: str, *, max_queue: int | None = None, max_batch_size: int | None = None,
                     num_workers: int = 1, metrics: Metrics | None = None, max_restarts: int | None = None,
                     restart_window: float = 600.0, batch_wait_cap: float | None = None,
                     **model_options: Any) -> Engine:
        """An Engine whose model runs in worker processes behind a bounded queue (call ``start()``).

        ``model_options``: the keyword arguments of ``from_pretrained``, passed to every worker.
        ``max_queue`` / ``max_batch_size`` / ``batch_wait_cap``: None takes the ``diffgen serve`` defaults
        (diffgen.options).
        ``max_restarts`` within ``restart_window`` seconds: how often dying workers are restarted.
        Parallelism options (``num_gpus``, ``dp_size``, degrees): one worker per replica (``dp_size``), each
        a group of ``num_gpus / dp_size`` processes when that is more than one.
        """
        from diffgen.engine.loading import parse_warmup_sizes
        from diffgen.engine.optimize import check_compile_options
        from diffgen.engine.scheduler import ProcessExecutor
        from diffgen.options import parallel_option_names

        check_compile_options(model_options.get("compile"), model_options.get("lora_mode"))
        parse_warmup_sizes(model_options.get("warmup_sizes"))  # a bad value fails here, before any worker starts

        if any(model_options.get(name) is not None for name in parallel_option_names()):
            # Checked once here, before any worker starts: each worker is one replica (``dp_size`` of them),
            # a group of num_gpus / dp_size processes when that is more than one.
            from diffgen.parallel.config import ParallelConfig
            from diffgen.parallel.runtime import plan_for_model

            plan = plan_for_model(ParallelConfig.from_options(model_options), str(model_path),
                                  model_options.get("revision"))
            num_workers = plan.dp_size
        executor = ProcessExecutor({"model_path": str(model_path), "engine_options": model_options},
                                   max_queue=max_queue, max_batch_size=max_batch_size, num_workers=num_workers,
                                   max_restarts=max_restarts, restart_window=restart_window, metrics=metrics,
                                   batch_wait_cap=batch_wait_cap)
        return cls(executor, str(model_path), model_options.get("revision"))

    # -- lifecycle (worker processes) -------------------------------------------------------------
    def start(self) -> None:
        """Read the model's spec from the checkpoint (ModelLoadError for a bad path, before any worker
        starts), then start the workers. Returns while they load; a no-op for an in-process Engine."""
        if self.executor.spec is None:
            from diffgen.loader.components import read_model_spec

            self.executor.spec = read_model_spec(self.model_path, self.revision)
        self.executor.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until a worker has loaded the model (True) or none can (False)."""
        return self.executor.wait_loaded(timeout)

    def shutdown(self, timeout: float = 30.0, grace: float = 5.0) -> None:
        self.executor.shutdown(timeout, grace)

    def close(self) -> None:
        """After ``shutdown``: release the executor's resources (worker queues)."""
        self.executor.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def status(self) -> ExecutorStatus:
        return self.executor.status()

    # -- the model -------------------------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        if self.executor.spec is None:
            raise RuntimeError("the model's spec is not known before Engine.start()")
        return self.executor.spec

    @property
    def defaults(self):
        return self.spec.defaults

    @property
    def pipeline(self):
        """The loaded pipeline of an in-process Engine (worker processes hold theirs)."""
        if not isinstance(self.executor, InProcessExecutor):
            raise AttributeError("this Engine runs its model in worker processes; it holds no pipeline")
        return self.executor.pipeline

    # -- requests --------------------------------------------------------------------------------
    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` checked against the model's spec, with its defaults filled in (InvalidRequestError)."""
        return resolve(request, self.spec)

    def submit(self, request: GenerationRequest, listener: JobListener | None = None,
               job_id: str | None = None, **executor_options: Any) -> Job:
        """Resolve ``request`` and queue it (a process executor) or run it (in-process); returns its Job.

        Raises InvalidRequestError before anything is queued; a process executor raises
        QueueFullError / NotReadyError when it cannot take the job.
        """
        return self.executor.submit(self.resolve(request), listener=listener, job_id=job_id, **executor_options)

    def submit_many(self, requests: list[GenerationRequest], listener: JobListener | None = None) -> list[Job]:
        """Resolve every request (InvalidRequestError before any runs), then submit them together: an in-process
        Engine runs compatible ones as one batch (one DiT forward per step for all) and returns finished Jobs;
        worker processes batch them as they batch any concurrent jobs. Each Job's ``result()`` is its own."""
        resolved = [self.resolve(request) for request in requests]
        return self.executor.submit_many(resolved, listener=listener)

    def cancel(self, job_id: str) -> bool:
        return self.executor.cancel(job_id)

    def generate(self, prompt: str | list[str], *, progress: ProgressFn | None = None,
                 is_cancelled=None, preview: PreviewFn | None = None, **params: Any) -> GenerationResult:
        """Generate for one prompt or a list of prompts; blocks until the result is there.

        ``progress(step, total)`` is called after every denoising step; ``is_cancelled()`` (in-process
        Engines; with worker processes use ``submit(...).cancel()``) is polled between steps;
        ``preview(step, total, images)`` gets the latent previews that ``preview_every=N`` asks for:
        (B, F, h, w, 3) uint8 arrays at the latent grid's size (B outputs, F latent frames).

        ``params``: negative_prompt, height, width, num_inference_steps, guidance_scale, guidance_scale_2,
        true_cfg_scale, seed, num_outputs_per_prompt, num_frames, fps, images, max_sequence_length, return_tensors,
        cache ("none", "first-block", "teacache", "taylorseer"), cache_threshold, loras ({name: scale}, dynamic
        LoRA mode).
        """
        request = GenerationRequest.build(prompt, **params)
        return self.run(request, progress=progress, is_cancelled=is_cancelled, preview=preview)

    def run(self, request: GenerationRequest, progress: ProgressFn | None = None,
            is_cancelled=None, preview: PreviewFn | None = None) -> GenerationResult:
        listener = None
        if progress is not None or preview is not None:
            def listener(event: str, job: Job) -> None:
                if event != "progress":
                    return
                if progress is not None:
                    progress(job.step, job.total_steps)
                if preview is not None and job.preview is not None and job.preview_step == job.step:
                    preview(job.step, job.total_steps, job.preview)
        options = {"is_cancelled": is_cancelled} if is_cancelled is not None else {}
        return self.submit(request, listener=listener, **options).result()


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None
