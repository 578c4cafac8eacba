"""The ``diffgen`` command: generate, serve, tiny-checkpoint."""

from __future__ import annotations

import argparse
import difflib
import gc
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from diffgen.errors import DiffgenError
from diffgen.options import SAMPLING, add_arguments, engine_option_names

#: "0": Python's garbage collector runs during a one-shot generate's imports and model load. By default the console
#: script pauses it there: its passes over the few hundred thousand objects that importing torch creates took ~20%
#: of the import time on the CPU machine (0.84-0.89 s instead of 1.09-1.12 s for torch + diffgen's engine).
PAUSE_GC_ENV = "DIFFGEN_PAUSE_GC"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with short errors: one line naming the problem (and the close flag for a misspelt
    one) and a pointer to --help, instead of the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' to see all options.\n")

    def parse_args(self, args: list[str] | None = None, namespace: argparse.Namespace | None = None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._command_parser(parsed)
            command.error(unrecognized_message(extras, command))
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The sub-command's parser (``generate``...) when one was named, else this parser."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None):
                return action.choices[getattr(parsed, action.dest)]
        return self


def unrecognized_message(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """'unrecognized arguments: --steps 4 (--steps: did you mean --num-inference-steps?)'"""
    flags = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    hints = []
    for extra in extras:
        if not extra.startswith("--"):
            continue
        given = extra.split("=", 1)[0]
        # Flags holding every word given (--steps, --num-steps -> --num-inference-steps), else spelling.
        words = [word for word in given.lstrip("-").split("-") if word]
        close = [flag for flag in flags
                 if words and all(any(part.startswith(word) for part in flag.lstrip("-").split("-")) for word in words)]
        close = close[:2] or difflib.get_close_matches(given, flags, n=2, cutoff=0.6)
        if close:
            hints.append(f"{given}: did you mean {' or '.join(close)}?")
    message = f"unrecognized arguments: {' '.join(extras)}"
    return f"{message} ({'; '.join(hints)})" if hints else message


class TinyFamilies:
    """The tiny-checkpoint families as argparse choices, read (which imports torch) only when argparse
    looks at them: when the tiny-checkpoint command is given or its help shown."""

    @staticmethod
    def _names() -> list[str]:
        from diffgen.testing.tiny import TINY_FAMILIES

        return sorted(TINY_FAMILIES)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="diffgen", description="Inference and serving for diffusion transformers")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    gen = sub.add_parser("generate", help="generate images or videos from the command line",
                         usage="%(prog)s --model-path PATH (--prompt TEXT | --prompt-file FILE) [options]",
                         argument_default=None)
    add_arguments(gen, "generate")

    tiny = sub.add_parser("tiny-checkpoint", help="write a tiny random checkpoint in diffusers format (offline)")
    tiny.add_argument("family", choices=TinyFamilies(), metavar="FAMILY", help="which tiny pipeline: %(choices)s")
    tiny.add_argument("path")
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at PATH")

    try:
        from diffgen.entrypoints.serve import add_serve_parser
    except ImportError:
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    return parser


def merge_config(args: argparse.Namespace) -> dict[str, Any]:
    """Config-file values, overridden by every flag given on the command line; both checked against
    the options' types, bounds and choices (diffgen.options)."""
    from diffgen.inputs import read_config_file
    from diffgen.options import merge_config as merge

    config = read_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "version")}
    return merge(args.command, flags, config)


def engine_options(options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of Engine.from_pretrained among ``options`` (model_path apart)."""
    return {k: options[k] for k in engine_option_names() if options.get(k) is not None}


def require_model_path(options: dict[str, Any]) -> str:
    if not options.get("model_path"):
        raise DiffgenError("--model-path is required (a hub id like black-forest-labs/FLUX.1-dev or a folder)")
    return options["model_path"]


def run_generate(options: dict[str, Any], after_load: Callable[[], None] = lambda: None) -> int:
    """Check, load, generate, report; ``after_load()`` runs once the model is loaded."""
    from diffgen.engine import Engine, GenerationRequest, read_model_spec, resolve
    from diffgen.inputs import load_image, read_prompt_file

    model_path = require_model_path(options)
    if options.get("prompt") and options.get("prompt_file"):
        raise DiffgenError("--prompt and --prompt-file: give one, not both")
    if options.get("prompt_file"):
        prompts = read_prompt_file(options["prompt_file"])
    elif options.get("prompt") is not None:
        prompts = [options["prompt"]]
    else:
        raise DiffgenError("--prompt is required (or --prompt-file)")
    images = [load_image(p, "--image-path") for p in options.get("image_path") or []]
    params = {o.name: options[o.name] for o in SAMPLING.options
              if o.name not in ("prompt", "prompt_file", "image_path") and options.get(o.name) is not None}
    if images:
        params["images"] = images
    # Reject bad input before loading a model: the request, checked against the model's spec (read from
    # the checkpoint's JSON files, no weights), then the files it would write.
    spec = read_model_spec(model_path, options.get("revision"))
    request = resolve(GenerationRequest.build(prompts, **params), spec)
    save = any(options.get(k) for k in ("save_output", "output_path", "output_file_name", "output_format"))
    output_format = check_planned_outputs(options, request, spec.output_kind) if save else None

    from diffgen.parallel.launch import under_torchrun

    if under_torchrun():  # this process is one rank; torchrun started the others (docs/parallel.md)
        from diffgen.parallel.launch import finish, shared_seed, torchrun_engine

        engine, state = torchrun_engine(model_path, engine_options(options))
        after_load()
        params["seed"] = shared_seed(params.get("seed"))
        if state.rank != 0:  # every rank computes; rank 0 reports and saves
            engine.generate(prompts, **params)
            finish()
            return 0
        try:
            return _report(engine.generate(prompts, progress=DenoisingBar(), preview=_preview_writer(options, request),
                                           **params), options, save, output_format)
        finally:
            finish()
    began = time.perf_counter()
    with Engine.from_pretrained(model_path, **engine_options(options)) as engine:  # closing stops rank processes
        print(f"model loaded in {time.perf_counter() - began:.2f} s", file=sys.stderr)
        after_load()
        result = engine.generate(prompts, progress=DenoisingBar(), preview=_preview_writer(options, request), **params)
    return _report(result, options, save, output_format)


def _preview_writer(options: dict[str, Any], request):
    """With --preview-every: a preview callback writing <output-path>/previews/<prompt>-out<i>-step<k>.png
    (for a video, its middle latent frame); each run overwrites the previews of the last."""
    if not options.get("preview_every"):
        return None
    from PIL import Image

    from diffgen.outputs import safe_stem

    folder = Path(options.get("output_path") or "outputs") / "previews"
    per_prompt = request.num_outputs_per_prompt
    stems = [f"{safe_stem(request.prompt[i // per_prompt])}-out{i}" for i in range(request.batch_size)]

    def write(step: int, total: int, previews) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for stem, frames in zip(stems, previews, strict=True):
            Image.fromarray(frames[len(frames) // 2]).save(folder / f"{stem}-step{step:03d}.png")

    return write


def _report(result, options: dict[str, Any], save: bool, output_format: str | None) -> int:
    """Save (or not) the outputs and print where they went, the seed and the stage timings."""
    if save:
        paths = result.save(options.get("output_path") or "outputs", options.get("output_file_name"), output_format,
                            overwrite=bool(options.get("overwrite")))
        for path in paths:
            print(f"saved {path}")
    else:
        print("outputs not saved (pass --save-output to write them)")
    print(f"seed {result.seed}")
    from diffgen.engine.request import stage_seconds

    seconds = stage_seconds(result.timings)
    for stage, value in seconds.items():
        print(f"  {stage:<18} {value * 1000:10.1f} ms")
    print(f"  {'total':<18} {sum(seconds.values()) * 1000:10.1f} ms")
    if "cache_forwards_reused" in result.timings:
        print(f"  step cache: {int(result.timings['cache_forwards_computed'])} DiT forwards computed, "
              f"{int(result.timings['cache_forwards_reused'])} reused")
    return 0


def check_planned_outputs(options: dict[str, Any], request, kind: str) -> str:
    """The output format, checked against the model's output kind ("image" or "video"); a taken
    --output-file-name is refused unless --overwrite."""
    from diffgen.outputs import check_output_format, output_names, output_paths, refuse_existing

    output_format = check_output_format(options.get("output_format"), kind)
    if options.get("output_file_name") and not options.get("overwrite"):
        stems = output_names(request.prompt, request.num_outputs_per_prompt, 0, options["output_file_name"])
        refuse_existing(output_paths(Path(options.get("output_path") or "outputs"), stems, output_format))
    return output_format


class DenoisingBar:
    """A tqdm bar over the denoising steps, closed at the last step (before decoding starts)."""

    def __init__(self):
        self.bar = None

    def __call__(self, step: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)
        self.bar.update(step - self.bar.n)
        if step >= total:
            self.bar.close()
            self.bar = None


def _quiet_libraries() -> None:
    from diffgen.engine.loading import quiet_libraries  # imports torch (diffgen.engine): only once arguments are good

    quiet_libraries()


def _resume_gc() -> None:
    """After the load: what the imports and the load made is frozen (later collections skip it; the process ends
    after this generate, so nothing frozen needed freeing), and the collector runs again for the request."""
    gc.freeze()
    gc.enable()


def main(argv: list[str] | None = None, exit_after_generate: bool = False) -> int:
    """The ``diffgen`` command. ``exit_after_generate``: end the process as soon as a ``generate`` has saved
    and printed its outputs (the console script; see :func:`exit_now`)."""
    logging.basicConfig(level=os.environ.get("DIFFGEN_LOG_LEVEL", "WARNING"))
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and flag errors end here, before torch or any model library is imported
    if args.version:
        from diffgen import __version__

        print(f"diffgen {__version__}")
        return 0
    try:
        if args.command == "generate":
            options = merge_config(args)  # bad values end here, still without torch
            if options.get("log_level"):
                logging.getLogger("diffgen").setLevel(options["log_level"].upper())
            from diffgen.entrypoints import cuda_context

            cuda_context.start(options)  # the GPU's context is made while torch and diffgen import
            pause_gc = exit_after_generate and os.environ.get(PAUSE_GC_ENV, "1") != "0" and gc.isenabled()
            if pause_gc:  # until the model is loaded; this process ends after the generate
                gc.disable()
            _quiet_libraries()
            code = run_generate(options, after_load=_resume_gc) if pause_gc else run_generate(options)
            if exit_after_generate:
                exit_now(code)
            return code
        if args.command == "tiny-checkpoint":
            from diffgen.testing import write_tiny_checkpoint

            path = write_tiny_checkpoint(args.family, args.path, overwrite=args.overwrite)
            print(f"wrote tiny {args.family} checkpoint to {path}")
            return 0
        if args.command == "serve":
            from diffgen.entrypoints.serve import run_serve

            options = merge_config(args)
            _quiet_libraries()
            return run_serve(options)
        parser.print_help()
        return 2
    except DiffgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown: outputs are written and the streams flushed,
    and what is left (freeing the model's GPU memory allocation by allocation, unloading torch's modules,
    pinned host buffers) is what the operating system reclaims at once anyway. Any worker processes were
    stopped by the engine's ``close`` before this."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> NoReturn:
    """The ``diffgen`` console script."""
    sys.exit(main(exit_after_generate=True))


if __name__ == "__main__":
    entry()
