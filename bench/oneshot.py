"""Time to the first picture: a whole one-shot process, from `python` to the image, diffgen vs diffusers.

    python bench/oneshot.py                 # FLUX.1-dev at its real config, random bf16 weights, 28 steps
    python bench/oneshot.py --tiny          # a tiny checkpoint on CPU, to check the script itself

Writes a random-weight FLUX.1-dev checkpoint in diffusers format once (~32 GB; tiny tokenizers),
reads it once so that it sits in the page cache (as on a machine that ran it before), then times
each command as a fresh process, wall clock, all commands in turn, for ``--rounds`` rounds:

- ``diffgen generate`` with its defaults (eager, Triton norm+RoPE, the parallel pinned loader);
- the same with ``DIFFGEN_FAST_LOAD=0`` (safetensors' own reader: the loader before this work);
- ``diffgen generate --compile`` (round 1 with the compile cache as found, round 2 warm);
- a plain diffusers script: ``FluxPipeline.from_pretrained(..., torch_dtype=bf16).to("cuda")`` + one call.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DIFFUSERS_SCRIPT = """
import sys, time, torch
t0 = time.perf_counter()
from diffusers import FluxPipeline
t1 = time.perf_counter()
pipe = FluxPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16).to(sys.argv[2])
pipe.set_progress_bar_config(disable=True)
t2 = time.perf_counter()
image = pipe("a photo of a raccoon", num_inference_steps=int(sys.argv[3]), height=int(sys.argv[4]),
             width=int(sys.argv[4]), guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(0)).images[0]
t3 = time.perf_counter()
print(f"import {t1 - t0:.2f} s, load {t2 - t1:.2f} s, generate {t3 - t2:.2f} s")
"""


def write_checkpoint(folder: Path, tiny: bool) -> None:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    sys.path.insert(0, str(ROOT))
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


def warm_page_cache(folder: Path) -> float:
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(64 * 2**20):
                    total += len(chunk)
    return total / 1e9


def timed(name: str, command: list[str], env: dict, rows: list, timeout: float) -> None:
    begin = time.perf_counter()
    try:
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - begin
        tail = (out.stderr + out.stdout).strip().splitlines()[-12:]
        status = "ok" if out.returncode == 0 else f"exit {out.returncode}"
    except subprocess.TimeoutExpired:
        wall, tail, status = time.perf_counter() - begin, [], "timeout"
    rows.append((name, f"{wall:.1f} s", status))
    print(f"\n### {name}: {wall:.1f} s ({status})", flush=True)
    print("\n".join(tail), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="checkpoint folder (written if missing)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per process")
    parser.add_argument("--rounds", type=int, default=2, help="run every command this many times, in turn")
    args = parser.parse_args()
    folder = Path(args.folder or ("/tmp/diffgen-oneshot-tiny" if args.tiny else "/tmp/diffgen-oneshot-flux"))
    steps = args.steps or (2 if args.tiny else 28)
    size = 64 if args.tiny else 1024
    device = "cpu" if args.tiny else "cuda"
    if not (folder / "model_index.json").exists():
        begin = time.perf_counter()
        write_checkpoint(folder, args.tiny)
        print(f"wrote {folder} in {time.perf_counter() - begin:.0f} s", flush=True)
    print(f"read {warm_page_cache(folder):.1f} GB into the page cache", flush=True)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    generate = [sys.executable, "-c", "import sys; from diffgen.entrypoints.cli import main; sys.exit(main())",
                "generate", "--model-path", str(folder), "--prompt", "a photo of a raccoon", "--seed", "0",
                "--num-inference-steps", str(steps), "--height", str(size), "--width", str(size),
                "--device", device]
    commands = {"diffgen generate (defaults)": (generate, env),
                "diffgen generate, safetensors' reader (DIFFGEN_FAST_LOAD=0)": (generate,
                                                                                {**env, "DIFFGEN_FAST_LOAD": "0"})}
    if not args.skip_diffusers:
        commands["diffusers script (from_pretrained + .to + call)"] = (
            [sys.executable, "-c", DIFFUSERS_SCRIPT, str(folder), device, str(steps), str(size)], env)
    if not args.skip_compile:
        commands["diffgen generate --compile"] = ([*generate, "--compile"], env)
    rows: list = []
    # Round 1 pays each first-process cost (bytecode, Triton's and Inductor's caches, the driver's
    # caches); later rounds are what a user sees from the second run on. Orders alternate by round.
    for round_index in range(args.rounds):
        for name, (command, command_env) in commands.items():
            timed(f"{name}, round {round_index + 1}", command, command_env, rows, args.timeout)
    print("\n| one-shot process, whole wall time | seconds | status |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
