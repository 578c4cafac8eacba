"""Every user-settable option, defined once.

An :class:`Option` carries its name, type, default, help text and bounds or choices. Options live in
groups (model, performance, server, sampling, output, logging); from them come

- the ``diffgen generate`` / ``diffgen serve`` flags (:func:`add_arguments`),
- the config-file keys (``--config``: the same names, dashes or underscores; flags win),
- the HTTP request bounds (:func:`http_field`: pydantic ``Field`` limits of the request bodies),
- the checks of a :class:`~diffgen.engine.request.GenerationRequest` (:func:`check_value`),
- the keyword arguments of ``Engine.from_pretrained`` (:func:`engine_option_names`).

Adding an option is one ``Option(...)`` line in its group; a new group is one ``OptionGroup`` added
to ``GROUPS``. A limit changed here changes everywhere.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass
from typing import Any

from diffgen.errors import InvalidRequestError

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


@dataclass(frozen=True)
class Option:
    """One option. ``low``/``high``: inclusive bounds; ``choices``: the allowed values."""

    name: str
    type: type
    help: str
    default: Any = None
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    #: the flag may be repeated; the value is a list
    repeat: bool = False
    #: None: not settable over HTTP; "all": every generation route; "video": the video route only
    http: str | None = None
    metavar: str | None = None
    #: a bool option that also has a --no-... flag (its default None means "decided at run time")
    negatable: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe_allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.low is not None and self.high is not None:
            return f"{_fmt(self.low)}..{_fmt(self.high)}"
        if self.low is not None:
            return f">= {_fmt(self.low)}"
        return _TYPE_NAMES.get(self.type, self.type.__name__)

    def check(self, value: Any, field: str | None = None) -> Any:
        """``value`` if it has this option's type and bounds; else InvalidRequestError naming ``field``."""
        field = field or self.name
        if self.repeat and isinstance(value, (list, tuple)):
            return [self.check(v, field) for v in value]
        if self.type is bool:
            if not isinstance(value, bool):
                raise InvalidRequestError(field, f"{value!r} is not true or false")
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequestError(field, f"{value!r} is not an integer")
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise InvalidRequestError(field, f"{value!r} is not a number")
        elif not isinstance(value, self.type):
            raise InvalidRequestError(field, f"{value!r} is not {_TYPE_NAMES.get(self.type, self.type.__name__)}")
        if self.choices is not None and value not in self.choices:
            raise InvalidRequestError(field, f"{value!r} is not allowed; {self.describe_allowed()}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise InvalidRequestError(field, f"{value} is out of range; allowed {self.describe_allowed()}")
        return value


def _fmt(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


@dataclass(frozen=True)
class OptionGroup:
    name: str
    title: str
    #: CLI commands that take these options as flags
    commands: tuple[str, ...]
    options: tuple[Option, ...]
    #: the options are keyword arguments of Engine.from_pretrained (and so reach every worker)
    engine: bool = False


MAX_PROMPT_CHARS = 20_000
MAX_SEED = 2**63 - 1
MAX_SIDE = 4096  # pixels per side of an output (and so the largest size any route accepts)
MAX_STEPS = 1000
MAX_OUTPUTS = 10  # outputs per prompt (OpenAI's ``n`` allows at most 10)
MAX_FRAMES = 1025
MAX_GUIDANCE = 100.0
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
CACHE_METHODS = ("none", "first-block", "teacache", "taylorseer")
MAX_CACHE_THRESHOLD = 2.0
MAX_TAYLOR_ORDER = 4
OFFLOAD_MODES = ("none", "model", "layerwise")
#: diffgen.layers.attention's backends ("auto": cuDNN, or FlashAttention-4 in compiled blocks, chosen per call)
ATTENTION_BACKENDS = ("auto", "fa4", "cudnn", "flash", "efficient", "math")
LORA_MODES = ("merged", "dynamic")
LORA_COMPONENTS = ("transformer", "transformer_2")  # the DiTs a LoRA may go on (transformer_2: Wan2.2's 2nd expert)
MAX_LORA_SCALE = 10.0
DTYPE_CHOICES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")

MODEL = OptionGroup("model", "model", ("generate", "serve"), engine=True, options=(
    Option("model_path", str, "required: hub id (org/name) or local diffusers pipeline folder", metavar="PATH"),
    Option("revision", str, "hub revision (branch, tag or commit)"),
    Option("device", str, "cpu, cuda, cuda:N or auto (default: cuda if available)"),
    Option("dtype", str, "model dtype (default auto: bfloat16 on GPU, float32 on CPU)", choices=DTYPE_CHOICES),
    Option("vae_dtype", str, "the VAE's dtype if it should differ from --dtype (e.g. float32 decoding)",
           choices=DTYPE_CHOICES),
))

PERFORMANCE = OptionGroup("performance", "performance", ("generate", "serve"), engine=True, options=(
    Option("attention_backend", str, "attention kernels (default auto: cuDNN, and in compiled blocks on Hopper "
           "FlashAttention-4 for long sequences where flash-attn-4 is installed; fa4: FlashAttention-4 wherever it "
           "applies; cudnn/flash/efficient/math: that SDPA kernel family)", choices=ATTENTION_BACKENDS),
    Option("compile", bool, "torch.compile each DiT block (default: on for serve on CUDA, warmed up at start-up "
           "and cached on disk across restarts; off for a one-shot generate, where it costs more than it saves)",
           negatable=True),
    Option("quantize", str, "fp8: float8 DiT linears (Hopper/Ada tensor cores); numbers differ slightly from bf16",
           choices=("fp8",)),
))

WARM_UP = OptionGroup("warm_up", "warm-up", ("serve",), engine=True, options=(
    Option("warmup_sizes", str, "sizes the compiled DiT is warmed up at before the server takes requests, "
           "WIDTHxHEIGHT[,WIDTHxHEIGHT...] (default: the model's own size); requests at other sizes compile on "
           "first use", metavar="WxH[,WxH...]"),
))

STEP_CACHE = OptionGroup("step_cache", "step cache", ("generate", "serve"), engine=True, options=(
    Option("cache", str, "skip most DiT blocks on steps that change little: first-block (any model), teacache "
           "(FLUX, HunyuanVideo, Wan2.1) or taylorseer (first-block's decision; the skipped blocks' residual is "
           "extrapolated from the last computed steps); default none. The engine's default; requests may choose "
           "their own", choices=CACHE_METHODS, http="all"),
    Option("cache_threshold", float, "higher skips more; 0 never skips (default: the method's published value for "
           "the model)", low=0.0, high=MAX_CACHE_THRESHOLD, http="all"),
    Option("cache_warmup", int, "forwards of each guidance branch (and expert) always computed before the "
           "cache may skip (default: first-block 1, teacache the published value, taylorseer its order + 1)",
           low=0, high=MAX_STEPS),
    Option("cache_order", int, "taylorseer: order of the Taylor extrapolation of the cached residual (default 1; 0 "
           "reuses it unchanged, as first-block does)", low=0, high=MAX_TAYLOR_ORDER),
))

MEMORY = OptionGroup("memory", "memory", ("generate", "serve"), engine=True, options=(
    Option("offload", str, "model: components wait in CPU memory until they run; layerwise: also stream the DiT's "
           "blocks from pinned CPU memory a few at a time (GPUs smaller than the model); default none",
           choices=OFFLOAD_MODES),
))

LORA = OptionGroup("lora", "LoRA", ("generate", "serve"), engine=True, options=(
    Option("lora_path", str, "LoRA safetensors file, optionally with a scale and the DiT it goes on: "
           "style.safetensors:0.7, or low.safetensors:0.7@transformer_2 for Wan2.2's low-noise expert (repeatable)",
           repeat=True, metavar="PATH[:SCALE][@COMPONENT]"),
    Option("lora_mode", str, "merged (default): added into the weights; dynamic: applied in the forward, and each "
           "request may choose LoRAs and scales (the loras field)", choices=LORA_MODES),
))

#: per-request only (HTTP bodies, Python API): no flag, no Engine argument
REQUEST = OptionGroup("request", "request", (), options=(
    Option("loras", dict, "LoRA name -> scale for this request ({} for none; needs --lora-mode dynamic)",
           http="all"),
))

PARALLELISM = OptionGroup("parallelism", "parallelism (docs/parallel.md)", ("generate", "serve"), engine=True, options=(
    Option("num_gpus", int, "processes (GPUs) to run on; alone, it picks the degrees below (printed)", low=1),
    Option("ulysses_degree", int, "sequence parallel by all-to-all (heads <-> tokens); divides the head count",
           low=1),
    Option("ring_degree", int, "sequence parallel by rotating keys/values between ranks", low=1),
    Option("enable_cfg_parallel", bool, "the conditional and unconditional branch on different GPUs"),
    Option("tp_size", int, "tensor-parallel degree of the text encoder (its memory per GPU divides by it)", low=1),
    Option("dp_size", int, "independent replicas of the whole pipeline behind one queue", low=1),
))

SERVER = OptionGroup("server", "server", ("serve",), options=(
    Option("host", str, "address to listen on (0.0.0.0 for all)", default="127.0.0.1"),
    Option("port", int, "port", default=30000, low=0, high=65535),
    Option("output_dir", str, "folder for video files, URL images and the job database", default="outputs/server"),
    Option("max_queue", int, "jobs that may wait for the GPU; more get HTTP 429", default=64, low=1),
    Option("max_batch_size", int, "requests denoised together, one DiT forward per step for all (they join and "
           "leave the batch between steps; 1: one by one)", default=4, low=1, high=64),
    Option("batch_wait_cap", float, "seconds the oldest waiting job lets newer jobs join running batches; then none "
           "joins until it has started (fairness)", default=10.0, low=0.0),
    Option("api_key", str, "require 'Authorization: Bearer <key>' (or set DIFFGEN_API_KEY)"),
    Option("served_model_name", str, "model id reported by /v1/models (default: --model-path)"),
    Option("shutdown_timeout", float, "seconds to let running jobs finish on SIGTERM", default=30.0, low=0.0),
    Option("max_upload_mb", float, "largest multipart request (all uploaded files and fields) in MiB; "
           "larger gets HTTP 413", default=200.0, low=0.001),
    Option("image_ttl", float, "seconds an image made for response_format=url stays downloadable before it is "
           "deleted", default=3600.0, low=0.001),
    Option("public_url", str, "base of the URLs returned for response_format=url, as clients reach the server, "
           "e.g. https://images.example.com (default: the address the server is bound to; never the client's "
           "Host header)", metavar="URL"),
    Option("output_store", str, "where outputs (videos, URL images) are kept: s3://bucket/prefix for an S3-compatible "
           "service (endpoint, region, credentials from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, "
           "AWS_SECRET_ACCESS_KEY; needs boto3), default: --output-dir", metavar="URI"),
    Option("s3_endpoint_url", str, "endpoint of the S3-compatible service of --output-store (default: "
           "AWS_ENDPOINT_URL, else AWS)", metavar="URL"),
    Option("s3_public_url", str, "return <URL>/<object key> for URL images of an S3 --output-store whose bucket is "
           "public (default: presigned URLs, valid --image-ttl seconds)", metavar="URL"),
    Option("job_store", str, "where video jobs are kept: postgresql://user:pass@host:port/db for a database shared "
           "by several replicas (needs psycopg), sqlite:///path, default: <output-dir>/jobs.sqlite3", metavar="URI"),
    Option("job_lease", float, "seconds a replica may go without renewing its lease in the job store before "
           "other replicas fail its unfinished jobs", default=30.0, low=1.0),
    Option("header_timeout", float, "seconds a client may take to send a request's line and headers; then HTTP 408",
           default=10.0, low=0.001),
    Option("body_timeout", float, "seconds a request body may stall without a byte before the connection is closed",
           default=60.0, low=0.001),
    Option("keep_alive_timeout", float, "seconds an idle kept-alive connection stays open", default=5.0, low=0.001),
    Option("max_connections", int, "open connections at most; more are answered HTTP 503 and closed",
           default=1000, low=1),
))

LOGGING = OptionGroup("logging", "logging", ("generate", "serve"), options=(
    Option("log_level", str, "log level of diffgen's messages (generate: warning, serve: info)",
           choices=LOG_LEVELS),
))

SAMPLING = OptionGroup("sampling", "sampling", ("generate",), options=(
    Option("prompt", str, "text prompt"),
    Option("prompt_file", str, "file with one prompt per line"),
    Option("negative_prompt", str, "negative prompt (CFG models; FLUX needs --true-cfg-scale > 1)", http="all"),
    Option("height", int, "output height in pixels (default: the model's)", low=16, high=MAX_SIDE),
    Option("width", int, "output width in pixels (default: the model's)", low=16, high=MAX_SIDE),
    Option("num_inference_steps", int, "denoising steps (default: the model's)", low=1, high=MAX_STEPS, http="all"),
    Option("guidance_scale", float, "guidance scale (default: the model's)", low=0.0, high=MAX_GUIDANCE, http="all"),
    Option("guidance_scale_2", float, "guidance of the low-noise transformer of two-transformer models "
           "(Wan2.2 A14B; default: the model's)", low=0.0, high=MAX_GUIDANCE, http="all"),
    Option("true_cfg_scale", float, "true classifier-free guidance scale (default: the model's)", low=0.0,
           high=MAX_GUIDANCE, http="all"),
    Option("seed", int, "seed; same seed, same picture as diffusers (default: random)", low=0, high=MAX_SEED,
           http="all"),
    Option("num_outputs_per_prompt", int, "outputs per prompt (default 1; HTTP: n)", low=1, high=MAX_OUTPUTS),
    Option("num_frames", int, "video frames; 4k+1 for Wan (the VAE's temporal stride) (default: the model's)",
           low=1, high=MAX_FRAMES, http="video"),
    Option("fps", int, "video frames per second (default: the model's, 16 for Wan2.1, 24 for Wan2.2-TI2V)",
           low=1, high=120, http="video"),
    Option("image_path", str, "input image file or http(s) URL (repeatable)", repeat=True),
    Option("max_sequence_length", int, "text tokens for the DiT (default: the model's)", low=1, high=4096,
           http="all"),
    Option("preview_every", int, "a small preview every N denoising steps, projected from the latents (generate: "
           "PNGs in <output-path>/previews; HTTP: partial images of a stream, previews of video events)",
           low=1, high=MAX_STEPS, http="all"),
))

OUTPUT = OptionGroup("output", "output", ("generate",), options=(
    Option("save_output", bool, "write the outputs to files"),
    Option("output_path", str, "folder for outputs (default ./outputs)"),
    Option("output_file_name", str, "file name stem (default <prompt>-seed<seed>-out<i>; -out<i> added for "
           "several outputs)"),
    Option("output_format", str, "png (default), jpeg, webp for images; mp4 (default), gif, webp, png-frames "
           "for videos", choices=("png", "jpeg", "jpg", "webp", "mp4", "gif", "png-frames")),
    Option("overwrite", bool, "replace existing files (default: a taken generated name gets -2, -3...; a taken "
           "--output-file-name is refused)"),
))

GROUPS: dict[str, OptionGroup] = {g.name: g for g in (MODEL, PERFORMANCE, WARM_UP, PARALLELISM, STEP_CACHE, MEMORY,
                                                      LORA, REQUEST, SERVER, LOGGING, SAMPLING, OUTPUT)}


def all_options() -> dict[str, Option]:
    return {o.name: o for group in GROUPS.values() for o in group.options}


def option(name: str) -> Option:
    return all_options()[name]


def options_for(command: str) -> dict[str, Option]:
    return {o.name: o for g in GROUPS.values() if command in g.commands for o in g.options}


def engine_option_names() -> tuple[str, ...]:
    """Keyword arguments of ``Engine.from_pretrained`` besides ``model_path``."""
    return tuple(o.name for g in GROUPS.values() if g.engine for o in g.options if o.name != "model_path")


def parallel_option_names() -> tuple[str, ...]:
    """The Engine options that choose how many processes run the model (not options of the loader)."""
    return tuple(o.name for o in PARALLELISM.options)


def defaults(group: str) -> dict[str, Any]:
    return {o.name: o.default for o in GROUPS[group].options}


def check_value(name: str, value: Any, field: str | None = None) -> Any:
    return option(name).check(value, field)


# -- argparse ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of ``command``, one argument group per option group; every default is None so
    that config-file values can be told apart from flags (the command fills the real defaults)."""
    for group in GROUPS.values():
        if command not in group.commands:
            continue
        arguments = parser.add_argument_group(group.title)
        for opt in group.options:
            arguments.add_argument(opt.flag, **_argparse_kwargs(opt))
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON file of option values (dashes or underscores); flags win")


def _argparse_kwargs(opt: Option) -> dict[str, Any]:
    help_text = opt.help
    if opt.default is not None and "default" not in help_text:
        help_text += f" (default {_fmt(opt.default) if isinstance(opt.default, float) else opt.default})"
    if opt.type is bool:
        action = argparse.BooleanOptionalAction if opt.negatable else "store_true"
        return {"action": action, "default": None, "help": help_text}
    # Choices are shown in the usage but checked by Option.check (as config-file values are), so
    # that a bad value gets the same one-line error from a flag and from a config file.
    metavar = "{" + ",".join(opt.choices) + "}" if opt.choices is not None else opt.metavar
    kwargs: dict[str, Any] = {"type": opt.type, "default": None, "help": help_text, "metavar": metavar}
    if opt.repeat:
        kwargs["action"] = "append"
    return kwargs


def merge_config(command: str, flags: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Config-file values (keys already snake_case), checked against the options of ``command`` and
    overridden by every flag given on the command line. Unset options are absent or None."""
    known = options_for(command)
    values: dict[str, Any] = {}
    for key, value in config.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidRequestError("config", f"unknown option {key!r}{hint}")
        opt = known[key]
        if value is not None:
            if opt.type is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if opt.repeat and not isinstance(value, list):
                value = [value]
            values[key] = opt.check(value, f"config {key}")
    for key, value in flags.items():
        if value is not None and key in known:
            values[key] = known[key].check(value, known[key].flag)
        elif value is not None:
            values[key] = value
    return values


# -- HTTP ----------------------------------------------------------------------------------------
def http_field(name: str, default: Any = None, **overrides: Any) -> Any:
    """A pydantic ``Field`` with this option's bounds, for the HTTP request bodies."""
    from pydantic import Field

    opt = option(name)
    limits: dict[str, Any] = {}
    if opt.low is not None:
        limits["ge"] = opt.low
    if opt.high is not None:
        limits["le"] = opt.high
    if opt.type is str and name.endswith("prompt"):
        limits["max_length"] = MAX_PROMPT_CHARS
    return Field(default, description=opt.help, **{**limits, **overrides})


def http_options(route: str) -> list[Option]:
    """The options settable in the body of ``route`` ("image" or "video")."""
    return [o for g in GROUPS.values() for o in g.options
            if o.http == "all" or (o.http == "video" and route == "video")]
