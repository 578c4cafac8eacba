"""bench/norm_rope.py in its tiny CPU mode: it prints a row per variant and shape, each with its agreement with the
plain ops (on the CPU only the plain and Inductor-compiled rows run: no Triton)."""

from __future__ import annotations

from tests.bench_runs import run_bench


def test_bench_norm_rope_tiny_cpu_mode_runs():
    run = run_bench("norm_rope.py", "--tiny", "--repeats", "2", timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith("| tiny ")]
    assert [(row[0], row[1]) for row in rows] == [
        (f"| tiny {kind}", variant) for kind in ("per head", "across heads")
        for variant in ("plain PyTorch ops", "plain ops compiled by Inductor")], run.stdout
    plain = [row for row in rows if row[1] == "plain PyTorch ops"]
    assert all(row[4].startswith("0.0e+00, 0.00% differ") for row in plain)  # the reference against itself
    assert all(float(row[4].split(",")[0]) < 1e-6 for row in rows)  # float32: Inductor only regroups the ops
