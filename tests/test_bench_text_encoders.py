"""bench/text_encoders.py in its tiny CPU mode: the import table and the encode table run, and diffgen's encoders
give transformers' outputs exactly (float32, same weights)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_text_encoders_tiny_cpu_mode():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "text_encoders.py"), "--tiny", "--rounds", "1"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| ")}
    for label in ("transformers' T5 + CLIP modeling", "diffgen's T5 + CLIP", "torch._dynamo alone"):
        assert label in rows, run.stdout
    encodes = [line for label, line in rows.items() if label.startswith(("T5-XXL (tiny)", "CLIP-L (tiny)"))]
    assert len(encodes) == 2 and all(line.rstrip().endswith("| 0.00e+00 |") for line in encodes), encodes
