"""bench/gelu_epilogue.py in its tiny CPU mode: it prints its rows, and every FLUX single-block layout computes what
the plain one computes (on the CPU the epilogue and the split projection are the plain ops: differences are 0)."""

from __future__ import annotations

import re

from tests.bench_runs import run_bench


def test_bench_gelu_epilogue_tiny_cpu_mode_runs():
    run = run_bench("gelu_epilogue.py", "--tiny", "--repeats", "2", timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sum(line.startswith("| tiny |") for line in run.stdout.splitlines()) == 2  # addmm alone, addmm + GELU
    assert sum(line.startswith("| FLUX single block") for line in run.stdout.splitlines()) == 6
    diffs = re.findall(r"relative diff vs the default before ([0-9.]+e[-+][0-9]+)$", run.stdout, re.MULTILINE)
    assert len(diffs) == 6 and max(float(d) for d in diffs) == 0.0, run.stdout[-3000:]
    errors = re.findall(r"relative error vs float32 ([0-9.]+e[-+][0-9]+)", run.stdout)
    assert errors and max(float(e) for e in errors) < 1e-6, run.stdout[-3000:]
