"""FLUX's text encoders, diffgen's own vs transformers': import time and one encode.

    python bench/text_encoders.py           # T5-XXL (24 blocks, 512 tokens) and CLIP-L (77 tokens), bf16, GPU
    python bench/text_encoders.py --tiny    # small widths on CPU, to check the script itself

1. Import: each in fresh processes that have already imported torch and transformers' tokenizers (what a
   FLUX run imports anyway): transformers' T5 + CLIP model modules (they import torch._dynamo) vs diffgen's;
   the median of ``--rounds`` processes each.
2. Encode: transformers' model built at the real config with random bf16 weights, diffgen's built around the
   very same tensors; CUDA events, the median of 10 after 3 warm-ups; relative error of diffgen's output to
   transformers' (both bf16, same weights).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PRELUDE = ("import torch; from transformers import CLIPTokenizer, T5TokenizerFast; import time; "
           "t = time.perf_counter(); ")
IMPORTS = {
    "transformers' T5 + CLIP modeling":
        "import transformers.models.t5.modeling_t5, transformers.models.clip.modeling_clip",
    "diffgen's T5 + CLIP": "import diffgen.models.encoders.t5, diffgen.models.encoders.clip",
    "torch._dynamo alone": "import torch._dynamo",
}


def import_seconds(statement: str, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        out = subprocess.run([sys.executable, "-c", PRELUDE + statement + "; print(time.perf_counter() - t)"],
                             capture_output=True, text=True, cwd=ROOT, check=True)
        times.append(float(out.stdout.split()[-1]))
    return statistics.median(times)


def build_pair(which: str, tiny: bool, device: str, dtype: torch.dtype):
    """(transformers' model, diffgen's model sharing its tensors, token ids)."""
    import transformers

    from diffgen.models.encoders.clip import CLIPTextConfig, CLIPTextModel
    from diffgen.models.encoders.t5 import T5Encoder, T5EncoderConfig

    if which == "t5":
        fields = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu")
        if tiny:
            fields.update(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
        library = transformers.T5EncoderModel(transformers.T5Config(**fields, decoder_start_token_id=0))
        native_cls, config, tokens = T5Encoder, T5EncoderConfig(**fields), 512
    else:
        fields = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, hidden_act="quick_gelu", eos_token_id=2)
        if tiny:
            fields.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        library = transformers.CLIPTextModel(transformers.CLIPTextConfig(**fields, bos_token_id=0, pad_token_id=1))
        native_cls, config, tokens = CLIPTextModel, CLIPTextConfig(**fields), 77
    library = library.eval().requires_grad_(False)
    state = library.state_dict()
    names = native_cls.checkpoint_names(list(state))
    state = {names.get(key, key): tensor for key, tensor in state.items() if names.get(key, key) is not None}
    with torch.device("meta"):
        native = native_cls(config)
    native.load_state_dict(state, strict=True, assign=True)
    ids = torch.randint(2, fields["vocab_size"] - 1, (1, tokens), generator=torch.Generator().manual_seed(0),
                        device="cpu")  # the caller builds under torch.device(cuda): the generator is a CPU one
    return library, native.eval(), ids.to(device)


def time_encode(model, ids: torch.Tensor, repeats: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of one forward."""
    with torch.no_grad():
        for _ in range(warmup):
            model(ids)
        times = []
        for _ in range(repeats):
            if ids.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(ids)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                model(ids)
                times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per import measurement")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16

    print("| import, after torch + tokenizers | seconds (median of fresh processes) |\n|---|---|")
    for label, statement in IMPORTS.items():
        print(f"| {label} | {import_seconds(statement, args.rounds):.2f} |", flush=True)

    print("\n| encode | transformers | diffgen | diffgen vs transformers (max rel. error) |\n|---|---|---|---|")
    for which in ("t5", "clip"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                library, native, ids = build_pair(which, args.tiny, device, dtype)
        finally:
            torch.set_default_dtype(previous)
        with torch.no_grad():
            expected, got = library(ids), native(ids)
        field = "last_hidden_state" if which == "t5" else "pooler_output"
        a, b = getattr(expected, field).float(), getattr(got, field).float()
        error = ((a - b).abs().max() / a.abs().max()).item()
        name = f"{'T5-XXL' if which == 't5' else 'CLIP-L'}{' (tiny)' if args.tiny else ''}, {ids.shape[1]} tokens"
        print(f"| {name} | {time_encode(library, ids):.2f} ms | {time_encode(native, ids):.2f} ms | {error:.2e} |",
              flush=True)
        del library, native
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
