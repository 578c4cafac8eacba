"""bench/parallel.py in its tiny CPU mode: every row's code path runs (2 gloo processes), and in float32 every
mode's output equals the 1-process output (the GPU run reports the same column in bf16)."""

from __future__ import annotations

from tests.bench_runs import run_bench


def test_bench_parallel_tiny_cpu_mode():
    run = run_bench("parallel.py", "--tiny", "--device", "cpu", timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in run.stdout.splitlines()
            if line.startswith("| tiny")]
    works = {row[0] for row in rows}
    assert works == {"tiny Wan CFG step", "tiny FLUX forward", "tiny FLUX 4 requests x 1 steps",
                     "tiny FLUX forward, compiled", "tiny Qwen true-CFG step",
                     "tiny Qwen forward, 2 prompts, padded text", "tiny T5 encoder", "tiny Wan VAE decode",
                     "tiny Wan forward vs float32"}, run.stdout
    assert not [row for row in rows if row[3] == "error"], run.stdout
    errors = [float(row[5]) for row in rows if row[5] not in ("-", "")]
    assert len(errors) >= 10 and max(errors) <= 1e-5, run.stdout
