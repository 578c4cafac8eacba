"""Time to the first picture: a whole one-shot process, from `python` to the image, diffgen vs diffusers.

    python bench/oneshot.py                 # FLUX.1-dev at its real config, random bf16 weights, 28 steps
    python bench/oneshot.py --model wan     # Wan2.1-T2V-1.3B, 480x832x81, 50 steps, CFG
    python bench/oneshot.py --model qwen --small-text-encoder   # Qwen-Image 1024², 50 steps, true CFG; see --help
    python bench/oneshot.py --tiny          # a tiny checkpoint on CPU, to check the script itself
    python bench/oneshot.py --baseline ../diffgen-before   # also time another diffgen source tree
    python bench/oneshot.py --env DIFFGEN_NATIVE_TEXT_ENCODERS=0   # also time this tree with a switch set
    python bench/oneshot.py --env DIFFGEN_NATIVE_VAE=0,DIFFGEN_NATIVE_SCHEDULER=0   # several switches, one variant

Writes a random-weight checkpoint in diffusers format once (FLUX.1-dev ~32 GB with made-up tokenizers of the real
sizes; Wan2.1-T2V-1.3B ~14 GB and Qwen-Image ~58 GB, or ~46 GB with a 2-layer stand-in text encoder, with small
made-up tokenizers; diffgen.testing's tiny checkpoints with --tiny),
reads it once so that it sits in the page cache (as on a machine that ran it before), then:

1. a timeline of one ``diffgen generate`` process per diffgen tree (``-X importtime`` and marks at the
   stages: spec, each component's load, each pipeline stage, save, main's exit, process end);
2. the load of the whole pipeline in a process that has already imported everything: seconds and GB/s;
3. each command as a fresh process, wall clock, all commands in turn, for ``--rounds`` rounds:
   ``python -m diffgen.entrypoints.cli generate`` (what the ``diffgen`` script runs) per tree, optionally
   with ``--compile``, and a plain diffusers script:
   ``FluxPipeline`` (``WanPipeline``, ``QwenImagePipeline``) ``.from_pretrained(..., torch_dtype=bf16).to("cuda")``
   + one call + saving its output (PNG, or MP4 with diffusers' export_to_video), as diffgen saves its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench.common and diffgen.testing from this tree

# One `diffgen generate` with marks: argv[1] is the parent's time.time() at the spawn, then the CLI's arguments.
# Wraps what exists in the tree it runs (the stage names changed over time); prints "MARK <s> <thread> <what>".
TIMELINE_DRIVER = r"""
import sys, threading, time
T0 = float(sys.argv[1])
marks = []
def mark(what):
    marks.append((time.time() - T0, threading.current_thread().name, what))
mark("python running the driver")
import gc, os
from diffgen.entrypoints import cli  # argparse and diffgen's options: no torch yet
pause_gc = bool(getattr(cli, "PAUSE_GC_ENV", None)) and os.environ.get(cli.PAUSE_GC_ENV, "1") != "0"
if pause_gc:
    gc.disable()  # as the console script's main does before it imports torch (it resumes the collector after the load)
try:  # trees with the early CUDA context: started here, as the CLI starts it, before torch is imported
    from diffgen.entrypoints import cuda_context
except ImportError:
    cuda_context = None
if cuda_context is not None:
    retain = cuda_context.retain_primary_context
    def timed_retain(ordinal):
        mark("CUDA context (driver API) begins")
        made = retain(ordinal)
        mark(f"CUDA context (driver API) ends: {made}")
        return made
    cuda_context.retain_primary_context = timed_retain
    cuda_context.start({"device": sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else None})
    os.environ[cuda_context.EARLY_CUDA_CONTEXT_ENV] = "0"  # cli.main below: started already
import diffgen.engine, diffgen.engine.engine, diffgen.loader.components, diffgen.pipelines.base, diffgen.engine.request
mark("torch and diffgen's engine imported")
def wrap(owner, attr, label):
    original = getattr(owner, attr, None)
    if original is None:
        return
    def wrapped(*args, **kwargs):
        what = label(*args) if callable(label) else label
        mark(what + " begins")
        try:
            return original(*args, **kwargs)
        finally:
            mark(what + " ends")
    setattr(owner, attr, wrapped)
components = diffgen.loader.components
wrap(diffgen.engine, "read_model_spec", "read the spec")
wrap(diffgen.engine.engine.Engine, "from_pretrained", "Engine.from_pretrained")
wrap(components, "load_component", lambda folder, *a: "library load " + folder.name)
wrap(components, "_timed_read", lambda read, folder, *a: "read " + folder.name)
if not hasattr(components, "_timed_read"):  # the loader before the start-up work
    wrap(components, "read_native_checkpoint", lambda cls, folder, *a: "read " + folder.name)
    wrap(components, "build_native_model", lambda cls, folder, *a: "build " + folder.name)
wrap(components, "_build_around", lambda state, folder, *a: "build " + folder.name)
wrap(components, "_load_gpu_libraries", "load cuBLAS/attention libraries")
wrap(cli, "_resume_gc", "resume the garbage collector (frozen)")
wrap(diffgen.pipelines.base.ComposedPipeline, "run", "request")
wrap(diffgen.engine.request.GenerationResult, "save", "save")
def print_marks():
    for t, thread, what in marks:
        print(f"MARK {t:.3f} {thread} {what}", file=sys.stderr)
    sys.stderr.flush()
exit_now = getattr(cli, "exit_now", None)
if exit_now is not None:  # the console script's path: main ends the process itself once the outputs are saved
    def exit_printing_marks(code):
        mark("main exits")
        print_marks()
        exit_now(code)
    cli.exit_now = exit_printing_marks
    if pause_gc:
        gc.enable()  # main pauses it again at once, and owns its resumption after the load
    cli.main(sys.argv[2:], exit_after_generate=True)
else:
    code = cli.main(sys.argv[2:])
    mark("main exits")
    print_marks()
    sys.exit(code)
"""

# The whole pipeline's load in a process that has imported everything it needs and started CUDA.
LOAD_SCRIPT = r"""
import sys, time
from pathlib import Path
import torch, transformers, diffusers
{imports}
from diffgen.loader.components import load_pipeline
folder, device = sys.argv[1], sys.argv[2]
torch.zeros(1, device=device)
begin = time.perf_counter()
pipeline = load_pipeline(folder, device=device)
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - begin
size = sum(path.stat().st_size for path in Path(folder).rglob("*.safetensors")) / 1e9
print(f"LOAD {{seconds:.3f}} s for {{size:.2f}} GB of safetensors: {{size / seconds:.1f}} GB/s")
"""
#: what each model's load imports, done before the timed load
LOAD_IMPORTS = {
    "flux": "from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler\n"
            "from transformers import CLIPTextModel, T5EncoderModel",
    "wan": "from diffusers import AutoencoderKLWan, UniPCMultistepScheduler\nfrom transformers import UMT5EncoderModel",
    "qwen": "from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler\n"
            "from transformers import Qwen2_5_VLForConditionalGeneration",
}

# A plain diffusers script per model, as the model cards write it: the pipeline class's from_pretrained in bf16, .to,
# one call, the output saved (argv: folder, device, steps, height, width, frames, output stem, video format).
DIFFUSERS_SCRIPT = """
import sys, time, torch
t0 = time.perf_counter()
from diffusers import {pipeline}
t1 = time.perf_counter()
pipe = {pipeline}.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16).to(sys.argv[2])
pipe.set_progress_bar_config(disable=True)
t2 = time.perf_counter()
steps, height, width, frames, out = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
{call}
t3 = time.perf_counter()
print(f"import {{t1 - t0:.2f}} s, load {{t2 - t1:.2f}} s, generate {{t3 - t2:.2f}} s")
"""
CALLS = {
    "flux": """pipe("a photo of a raccoon", num_inference_steps=steps, height=height, width=width, guidance_scale=3.5,
     generator=torch.Generator("cpu").manual_seed(0)).images[0].save(out + ".png")""",
    "qwen": """pipe("a photo of a raccoon", negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=steps,
     height=height, width=width, generator=torch.Generator("cpu").manual_seed(0)).images[0].save(out + ".png")""",
    "wan": """frames = pipe("a photo of a raccoon", negative_prompt="blurry, static", num_inference_steps=steps,
              height=height, width=width, num_frames=frames, guidance_scale=5.0,
              generator=torch.Generator("cpu").manual_seed(0)).frames[0]
if sys.argv[8] == "mp4":
    from diffusers.utils import export_to_video
    export_to_video(frames, out + ".mp4", fps=16)
else:  # png-frames: one PNG per frame with Pillow, as diffgen's --output-format png-frames
    import os, PIL.Image
    os.makedirs(out, exist_ok=True)
    for index, frame in enumerate(frames):
        PIL.Image.fromarray((frame * 255).round().astype("uint8")).save(f"{out}/frame_{index:05d}.png")""",
}
PIPELINES = {"flux": "FluxPipeline", "qwen": "QwenImagePipeline", "wan": "WanPipeline"}
#: model -> (steps, height, width, frames) of one request: the real defaults; tiny sizes with --tiny
SIZES = {"flux": ((28, 1024, 1024, 1), (2, 64, 64, 1)), "qwen": ((50, 1024, 1024, 1), (2, 64, 64, 1)),
         "wan": ((50, 480, 832, 81), (2, 48, 80, 9))}
TINY_FAMILIES = {"wan": "wan-t2v", "qwen": "qwen-image"}


def diffusers_script(model: str) -> str:
    return DIFFUSERS_SCRIPT.format(pipeline=PIPELINES[model], call=CALLS[model])


def write_flux(folder: Path, tiny: bool) -> None:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from bench.common import random_init_
    from diffgen.testing.tiny import _use_hub_class_names
    from diffgen.testing.tokenizers import clip_tokenizer, t5_tokenizer

    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=1 if tiny else 19, num_single_layers=1 if tiny else 38,
                attention_head_dim=16 if tiny else 128, num_attention_heads=2 if tiny else 24,
                joint_attention_dim=32 if tiny else 4096, pooled_projection_dim=32 if tiny else 768,
                guidance_embeds=True, axes_dims_rope=(4, 4, 8) if tiny else (16, 56, 56))
            clip = CLIPTextModel(CLIPTextConfig(
                vocab_size=1000 if tiny else 49408, hidden_size=32 if tiny else 768,
                intermediate_size=37 if tiny else 3072, num_hidden_layers=2 if tiny else 12,
                num_attention_heads=4 if tiny else 12, max_position_embeddings=77, projection_dim=32 if tiny else 768,
                hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1))
            t5 = T5EncoderModel(T5Config(
                vocab_size=256 if tiny else 32128, d_model=32 if tiny else 4096, d_kv=8 if tiny else 64,
                d_ff=64 if tiny else 10240, num_layers=2 if tiny else 24, num_heads=4 if tiny else 64,
                relative_attention_num_buckets=8 if tiny else 32, feed_forward_proj="gated-gelu", pad_token_id=0,
                eos_token_id=1, decoder_start_token_id=0))
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=16,
                block_out_channels=(8, 8, 16, 16) if tiny else (128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1 if tiny else 2, norm_num_groups=4 if tiny else 32, use_quant_conv=False,
                use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    finally:
        torch.set_default_dtype(previous)
    for module in (transformer, clip, t5, vae):
        random_init_(module)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    _use_hub_class_names(folder)


def write_wan(folder: Path) -> None:
    """Wan2.1-T2V-1.3B: the DiT and VAE at their real configs, UMT5-XXL's encoder (~11 GB bf16), random bf16
    weights; the tokenizer is a made-up small T5 one (the real one has 256k pieces)."""
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    from bench.common import random_init_
    from bench.speed import WAN, default_dtype, umt5_encoder
    from diffgen.testing.tiny import _use_hub_class_names
    from diffgen.testing.tiny_wan import unipc_scheduler
    from diffgen.testing.tokenizers import t5_tokenizer

    cfg = WAN["real"]
    with torch.device("cuda"), default_dtype(torch.bfloat16):
        transformer = random_init_(WanTransformer3DModel(**cfg["dit"]))
        vae = random_init_(AutoencoderKLWan(**cfg["vae"]))
    pipe = WanPipeline(tokenizer=t5_tokenizer(), text_encoder=umt5_encoder(False, "cuda", torch.bfloat16), vae=vae,
                       scheduler=unipc_scheduler(3.0), transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    _use_hub_class_names(folder)


def write_qwen(folder: Path, small_text_encoder: bool = False) -> None:
    """Qwen-Image: the 20B DiT (~41 GB bf16) and the VAE at their real configs, Qwen2.5-VL-7B (~16.6 GB; with
    ``small_text_encoder`` a 2-layer stand-in of its width, 2.2B parameters, ~4.5 GB), random bf16 weights, a
    byte-level tokenizer."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from bench.common import random_init_
    from bench.speed import QWEN, WAN, default_dtype, qwen25_vl_encoder
    from diffgen.testing.tiny import _use_hub_class_names
    from diffgen.testing.tiny_qwen import QWEN_IMAGE_SCHEDULER, qwen2_tokenizer

    tokenizer = qwen2_tokenizer()
    with torch.device("cuda"), default_dtype(torch.bfloat16):
        transformer = random_init_(QwenImageTransformer2DModel(**QWEN["real"]["dit"]))
        vae = random_init_(AutoencoderKLQwenImage(**WAN["real"]["vae"]))
    text_encoder = qwen25_vl_encoder(tokenizer, False, small_text_encoder, "cuda", torch.bfloat16)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
    _use_hub_class_names(folder)


def write_checkpoint(folder: Path, model: str, tiny: bool, small_text_encoder: bool = False) -> None:
    """A random checkpoint of ``model`` in diffusers format: real configs, or diffgen.testing's tiny ones."""
    if model == "flux":
        return write_flux(folder, tiny)
    if tiny:
        from diffgen.testing.tiny import write_tiny_checkpoint

        write_tiny_checkpoint(TINY_FAMILIES[model], folder)
    elif model == "wan":
        write_wan(folder)
    else:
        write_qwen(folder, small_text_encoder)


def use_real_size_tokenizers(folder: Path) -> None:
    """FLUX.1-dev's tokenizer folders at their real sizes (CLIP: 49408 tokens in vocab.json + merges.txt; T5: 32100
    pieces in tokenizer.json), replacing the tiny ones once: loading them is part of a one-shot process."""
    from diffgen.testing.tokenizers import real_size_clip_folder, real_size_t5_folder

    if (folder / "tokenizer" / "vocab.json").is_file():
        return
    for name, write in (("tokenizer", real_size_clip_folder), ("tokenizer_2", real_size_t5_folder)):
        shutil.rmtree(folder / name)
        write(folder / name)


def warm_page_cache(folder: Path) -> float:
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(64 * 2**20):
                    total += len(chunk)
    return total / 1e9


def run(command: list[str], env: dict, timeout: float, cwd: Path = ROOT) -> tuple[float, str, str]:
    """Wall seconds, status and output (stderr then stdout) of one fresh process, started in ``cwd`` (first
    on ``python -c`` / ``-m``'s module path: the diffgen tree to run)."""
    begin = time.perf_counter()
    try:
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        status = "ok" if out.returncode == 0 else f"exit {out.returncode}"
        return time.perf_counter() - begin, status, out.stderr + out.stdout
    except subprocess.TimeoutExpired:
        return time.perf_counter() - begin, "timeout", ""


def tree_env(tree: Path, extra: dict[str, str] | None = None) -> dict:
    """The environment of a process running ``tree``: first on PYTHONPATH, INFO logs; ``extra`` wins (also over
    PYTHONPATH: a variant without an optional package)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]),
            "DIFFGEN_LOG_LEVEL": "INFO", **(extra or {})}


def import_summary(importtime: list[str], threshold_ms: float = 30.0) -> list[str]:
    """Top-level imports (``-X importtime`` lines without indentation) of at least ``threshold_ms``, in order."""
    rows = []
    for line in importtime:
        _, self_us, cumulative_us, name = (part for part in line.replace("import time:", "|", 1).split("|"))
        if name.startswith("  ") or not cumulative_us.strip().isdigit():
            continue
        if int(cumulative_us) / 1000 >= threshold_ms:
            rows.append(f"    import {name.strip():<50} {int(cumulative_us) / 1e6:6.2f} s")
    return rows


def timeline(label: str, tree: Path, arguments: list[str], timeout: float, extra: dict[str, str]) -> None:
    spawn = time.time()
    wall, status, output = run([sys.executable, "-X", "importtime", "-c", TIMELINE_DRIVER, str(spawn), *arguments],
                               tree_env(tree, extra), timeout, cwd=tree)
    lines = output.splitlines()
    print(f"\n### timeline: {label} ({tree}), -X importtime, {wall:.2f} s ({status})", flush=True)
    print("\n".join(import_summary([line for line in lines if line.startswith("import time:")])))
    for line in lines:
        if line.startswith("MARK "):
            _, t, thread, what = line.split(" ", 3)
            print(f"  {float(t):7.3f} s  {thread:<24} {what}")
    print(f"  {wall:7.3f} s  {'(parent)':<24} process ended")
    print("\n".join(line for line in lines if not line.startswith(("import time:", "MARK "))
                    and "denoising:" not in line)[-3000:], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="checkpoint folder (written if missing)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--baseline", default=None, help="another diffgen source tree to time beside this one")
    parser.add_argument("--with-compile", action="store_true", help="also time `generate --compile`")
    parser.add_argument("--variant-args", action="append", default=[], metavar="ARGS",
                        help="also time this tree's `generate` with these extra flags (repeatable: one variant each), "
                        "e.g. --variant-args='--attention-backend fa4'")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--skip-load", action="store_true", help="no whole-pipeline load in an imported process")
    parser.add_argument("--skip-timelines", action="store_true", help="no -X importtime timeline per tree")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per process")
    parser.add_argument("--rounds", type=int, default=2, help="run every command this many times, in turn")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="also time this tree with this environment variable set (repeatable: one variant each; "
                        "KEY=VALUE,KEY2=VALUE2 sets several in one variant)")
    parser.add_argument("--model", choices=sorted(PIPELINES), default="flux",
                        help="flux: FLUX.1-dev (~32 GB written); wan: Wan2.1-T2V-1.3B (~14 GB); qwen: Qwen-Image "
                        "(~58 GB: the 41 GB DiT and the 16.6 GB Qwen2.5-VL-7B text encoder; on the device's 64 GiB "
                        "disk with its other files that does not fit: pass --small-text-encoder there, and remove "
                        "another model's folder first: FLUX's 34 GB and Qwen-Image's 46 GB together do not fit either)")
    parser.add_argument("--small-text-encoder", action="store_true",
                        help="qwen: a 2-layer stand-in of Qwen2.5-VL-7B's width (~4.5 GB: its 152k-token embedding "
                        "and head; the output says so)")
    parser.add_argument("--video-format", choices=("mp4", "png-frames"), default="mp4",
                        help="wan: how both sides save the video (mp4 needs imageio-ffmpeg, which the device image "
                        "lacks: png-frames there, Pillow on both sides)")
    args = parser.parse_args()
    if args.small_text_encoder and args.model != "qwen":
        parser.error("--small-text-encoder: only with --model qwen")
    name = args.model + ("-small-text-encoder" if args.small_text_encoder else "") + ("-tiny" if args.tiny else "")
    folder = Path(args.folder or f"/tmp/diffgen-oneshot-{name}")
    real, tiny = SIZES[args.model]
    steps, height, width, frames = tiny if args.tiny else real
    steps = args.steps or steps
    device = "cpu" if args.tiny else "cuda"
    if not (folder / "model_index.json").exists():
        begin = time.perf_counter()
        write_checkpoint(folder, args.model, args.tiny, args.small_text_encoder)
        print(f"wrote {folder} in {time.perf_counter() - begin:.0f} s", flush=True)
    if args.model == "flux" and not args.tiny:
        use_real_size_tokenizers(folder)
    if args.model == "qwen" and not args.tiny:
        layers = json.loads((folder / "text_encoder" / "config.json").read_text())["text_config"]["num_hidden_layers"]
        print(f"text encoder: Qwen2.5-VL with {layers} layers" + (" (a STAND-IN for the real 28-layer 7B model)"
                                                                  if layers != 28 else ""), flush=True)
    print(f"read {warm_page_cache(folder):.1f} GB into the page cache", flush=True)

    trees = {"this tree": (ROOT, {})}  # label -> (diffgen source tree, extra environment)
    if args.baseline:
        trees["baseline"] = (Path(args.baseline).resolve(), {})
    for setting in args.env:  # one variant per --env; "A=0,B=0" sets both in that variant
        trees[f"this tree, {setting}"] = (ROOT, dict(pair.partition("=")[::2] for pair in setting.split(",")))
    arguments = ["generate", "--model-path", str(folder), "--prompt", "a photo of a raccoon", "--seed", "0",
                 "--num-inference-steps", str(steps), "--height", str(height), "--width", str(width),
                 "--device", device, "--save-output", "--output-path", str(folder.parent / "diffgen-oneshot-out"),
                 "--overwrite"]
    arguments += {"flux": [], "qwen": ["--negative-prompt", " ", "--true-cfg-scale", "4.0"],
                  "wan": ["--negative-prompt", "blurry, static", "--guidance-scale", "5.0", "--num-frames",
                          str(frames), "--output-format", args.video_format]}[args.model]
    print(f"{args.model}: {steps} steps, {height}x{width}" + (f"x{frames}" if args.model == "wan" else ""), flush=True)

    for label, (tree, extra) in ({} if args.skip_timelines else trees).items():
        timeline(label, tree, arguments, args.timeout, extra)
    for label, (tree, extra) in ({} if args.skip_load else trees).items():
        load = LOAD_SCRIPT.format(imports=LOAD_IMPORTS[args.model])
        wall, status, output = run([sys.executable, "-c", load, str(folder), device], tree_env(tree, extra),
                                   args.timeout, cwd=tree)
        loads = [line for line in output.splitlines() if line.startswith("LOAD") or "diffgen: read" in line]
        print(f"\n### whole-pipeline load, imports done: {label} ({status})\n" + "\n".join(loads), flush=True)

    commands = {f"diffgen generate ({label})": ([sys.executable, "-m", "diffgen.entrypoints.cli", *arguments], tree,
                                                 extra)
                for label, (tree, extra) in trees.items()}
    for extra_args in args.variant_args + (["--compile"] if args.with_compile else []):
        commands[f"diffgen generate {extra_args} (this tree)"] = (
            [sys.executable, "-m", "diffgen.entrypoints.cli", *arguments, *shlex.split(extra_args)], ROOT, {})
    if not args.skip_diffusers:
        commands["diffusers script (from_pretrained + .to + call)"] = (
            [sys.executable, "-c", diffusers_script(args.model), str(folder), device, str(steps), str(height),
             str(width), str(frames), str(folder.parent / "diffusers-oneshot-out"), args.video_format], ROOT, {})
    rows: list = []
    # Round 1 pays each first-process cost (bytecode, Triton's and Inductor's caches, the driver's
    # caches); later rounds are what a user sees from the second run on. Orders alternate by round.
    for round_index in range(args.rounds):
        order = list(commands.items())
        for name, (command, tree, extra) in order if round_index % 2 == 0 else order[::-1]:
            wall, status, output = run(command, tree_env(tree, extra), args.timeout, cwd=tree)
            rows.append((f"{name}, round {round_index + 1}", f"{wall:.2f} s", status))
            kept = [line for line in output.splitlines() if "denoising:" not in line]
            print(f"\n### {name}, round {round_index + 1}: {wall:.2f} s ({status})", flush=True)
            print("\n".join(kept[-16:]), flush=True)
    print("\n| one-shot process, whole wall time | seconds | status |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
