"""The ``diffgen`` command: generate, serve, tiny-checkpoint."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from diffgen.errors import DiffgenError

# Options shared by every command that loads a model (generate, serve).
MODEL_OPTIONS = ("model_path", "device", "dtype", "revision", "attention_backend", "compile", "quantize", "vae_dtype")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from diffgen.layers.attention import ATTENTION_BACKENDS

    group = parser.add_argument_group("model")
    group.add_argument("--model-path", help="hub id (org/name) or local diffusers pipeline folder")
    group.add_argument("--revision", help="hub revision (branch, tag or commit)")
    group.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    group.add_argument("--dtype", help="float32, bfloat16, float16 or auto (default: bfloat16 on GPU, float32 on CPU)")
    group.add_argument("--vae-dtype", help="the VAE's dtype if it should differ from --dtype (e.g. float32 decoding)")
    group.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                       help="SDPA kernel family (default auto: cuDNN on CUDA)")
    group.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile each DiT block (first request per shape compiles; later steps faster)")
    group.add_argument("--quantize", choices=("fp8",),
                       help="fp8: float8 DiT linears (Hopper/Ada tensor cores); numbers differ slightly from bf16")
    parser.add_argument("--config", help="YAML or JSON file of option values; flags on the command line win")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--prompt", help="text prompt")
    group.add_argument("--prompt-file", help="file with one prompt per line")
    group.add_argument("--negative-prompt", help="negative prompt (CFG models; FLUX needs --true-cfg-scale > 1)")
    group.add_argument("--height", type=int, help="output height in pixels (default: model's)")
    group.add_argument("--width", type=int, help="output width in pixels (default: model's)")
    group.add_argument("--num-inference-steps", type=int, help="denoising steps (default: model's)")
    group.add_argument("--guidance-scale", type=float, help="guidance scale (default: model's)")
    group.add_argument("--guidance-scale-2", type=float,
                       help="guidance of the low-noise transformer of two-transformer models (Wan2.2 A14B)")
    group.add_argument("--true-cfg-scale", type=float, help="true classifier-free guidance scale")
    group.add_argument("--seed", type=int, help="seed; same seed, same picture as diffusers (default: random)")
    group.add_argument("--num-outputs-per-prompt", type=int, help="outputs per prompt (default 1)")
    group.add_argument("--num-frames", type=int, help="video frames (video models)")
    group.add_argument("--fps", type=int, help="video frames per second (video models)")
    group.add_argument("--image-path", action="append", help="input image file or http(s) URL (repeatable)")
    group.add_argument("--max-sequence-length", type=int, help="text tokens for the DiT (default: model's)")
    out = parser.add_argument_group("output")
    out.add_argument("--save-output", action="store_true", default=None, help="write the outputs to files")
    out.add_argument("--output-path", help="folder for outputs (default ./outputs)")
    out.add_argument("--output-file-name", help="file name stem (index suffix added for several outputs)")
    out.add_argument("--output-format",
                     help="png, jpeg, webp for images; mp4 (default), gif, webp, png-frames for videos")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffgen", description="Inference and serving for diffusion transformers")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    gen = sub.add_parser("generate", help="generate images or videos from the command line",
                         argument_default=None)
    add_model_arguments(gen)
    add_sampling_arguments(gen)

    tiny = sub.add_parser("tiny-checkpoint", help="write a tiny random checkpoint in diffusers format (offline)")
    from diffgen.testing.tiny import TINY_FAMILIES

    tiny.add_argument("family", choices=sorted(TINY_FAMILIES))
    tiny.add_argument("path")

    try:
        from diffgen.entrypoints.serve import add_serve_parser
    except ImportError:
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    return parser


def merge_config(args: argparse.Namespace) -> dict[str, Any]:
    """Config-file values, overridden by every flag given on the command line."""
    from diffgen.inputs import read_config_file

    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    known = set(vars(args))
    unknown = sorted(set(values) - known)
    if unknown:
        raise DiffgenError(f"--config: unknown option(s) {', '.join(unknown)}")
    for key, value in vars(args).items():
        if value is not None:
            values[key] = value
    return values


def run_generate(options: dict[str, Any]) -> int:
    from tqdm import tqdm

    from diffgen.engine.engine import Engine
    from diffgen.inputs import load_image, read_prompt_file

    if not options.get("model_path"):
        raise DiffgenError("--model-path is required (a hub id like black-forest-labs/FLUX.1-dev or a folder)")
    if options.get("prompt") and options.get("prompt_file"):
        raise DiffgenError("--prompt and --prompt-file: give one, not both")
    if options.get("prompt_file"):
        prompts = read_prompt_file(options["prompt_file"])
    elif options.get("prompt") is not None:
        prompts = [options["prompt"]]
    else:
        raise DiffgenError("--prompt is required (or --prompt-file)")
    images = [load_image(p, "--image-path") for p in options.get("image_path") or []]
    params = {k: options[k] for k in ("negative_prompt", "height", "width", "num_inference_steps",
                                      "guidance_scale", "guidance_scale_2", "true_cfg_scale", "seed", "num_frames",
                                      "fps", "max_sequence_length") if options.get(k) is not None}
    outputs = options.get("num_outputs_per_prompt")
    params["num_outputs_per_prompt"] = 1 if outputs is None else outputs
    if images:
        params["images"] = images
    from diffgen.engine.request import GenerationRequest

    GenerationRequest.build(prompts, **params)  # reject bad input before loading a model

    engine_options = {k: options[k] for k in MODEL_OPTIONS if k != "model_path" and options.get(k) is not None}
    engine = Engine.from_pretrained(options["model_path"], **engine_options)
    bars: list[tqdm] = []

    def progress(step: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="denoising", unit="step", file=sys.stderr))
        bars[0].update(step - bars[0].n)

    result = engine.generate(prompts, progress=progress, **params)
    for bar in bars:
        bar.close()
    save = options.get("save_output") or options.get("output_path") or options.get("output_file_name")
    if save:
        paths = result.save(options.get("output_path") or "outputs", options.get("output_file_name"),
                            options.get("output_format"))
        for path in paths:
            print(f"saved {path}")
    else:
        print("outputs not saved (pass --save-output to write them)")
    print(f"seed {result.seed}")
    for stage, seconds in result.timings.items():
        print(f"  {stage:<18} {seconds * 1000:10.1f} ms")
    print(f"  {'total':<18} {sum(result.timings.values()) * 1000:10.1f} ms")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DIFFGEN_LOG_LEVEL", "WARNING"))
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from diffgen import __version__

        print(f"diffgen {__version__}")
        return 0
    try:
        if args.command == "generate":
            return run_generate(merge_config(args))
        if args.command == "tiny-checkpoint":
            from diffgen.testing import write_tiny_checkpoint

            path = write_tiny_checkpoint(args.family, args.path)
            print(f"wrote tiny {args.family} checkpoint to {path}")
            return 0
        if args.command == "serve":
            from diffgen.entrypoints.serve import run_serve

            return run_serve(merge_config(args))
        parser.print_help()
        return 2
    except DiffgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # logging tweaks only
        pass


if __name__ == "__main__":
    sys.exit(main())
