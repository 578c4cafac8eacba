"""bench/attention.py in its tiny CPU mode: a cuDNN row and a compiled "auto" row per shape (on the CPU both run
SDPA's own kernel; FA4 needs a GPU), each with its error against float32 attention computed head by head."""

from __future__ import annotations

from tests.bench_runs import run_bench


def test_bench_attention_tiny_cpu_mode_runs():
    run = run_bench("attention.py", "--tiny", "--repeats", "2", timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith("| tiny")]
    assert [(row[0], row[1]) for row in rows] == [
        (f"| {shape}", kernel) for shape in ("tiny", "tiny, two rows")
        for kernel in ("cuDNN (SDPA)", "auto, compiled (serve)")]
    assert all(float(row[5].strip(" |")) < 1e-6 for row in rows), rows  # float32 SDPA against float32 attention
