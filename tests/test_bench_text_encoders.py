"""bench/text_encoders.py in its tiny CPU mode: the import table and the encode table run, and diffgen's encoders
give transformers' outputs exactly (float32, same weights)."""

from __future__ import annotations

from tests.bench_runs import run_bench


def test_bench_text_encoders_tiny_cpu_mode():
    run = run_bench("text_encoders.py", "--tiny", "--rounds", "1", timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| ")}
    for label in ("transformers' T5 + CLIP modeling", "diffgen's T5 + CLIP", "torch._dynamo alone"):
        assert label in rows, run.stdout
    encodes = [line for label, line in rows.items() if label.startswith(("T5-XXL (tiny)", "CLIP-L (tiny)"))]
    assert len(encodes) == 2 and all(line.rstrip().endswith("| 0.00e+00 |") for line in encodes), encodes
