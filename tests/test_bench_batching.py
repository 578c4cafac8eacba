"""bench/batching.py in its tiny CPU mode: every row's code path runs through the worker loop, and the
batched rows really shared forwards (the "max shared" column)."""

from __future__ import annotations

from tests.bench_runs import run_bench


def test_bench_batching_tiny_cpu_mode():
    run = run_bench("batching.py", "--tiny", "--device", "cpu", timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in run.stdout.splitlines()
            if line.startswith("| FLUX") or line.startswith("| Wan")]
    modes = {(row[0].split(",")[0].split(" during")[0], row[1]) for row in rows}
    every = "on (max 4): every request each step, encode/decode between steps"
    assert ("FLUX 32x32 2 steps", "batching off") in modes and ("FLUX 32x32 2 steps", every) in modes
    assert ("FLUX 32x32 2 steps", "on (max 4): StepPolicy + encode/decode overlapped") in modes
    assert ("FLUX 2-step requests", "alone (idle worker), batching off") in modes
    assert {"1 request(s), 1 forward", "2 request(s), 1 forward"} <= {mode for _, mode in modes}
    shared = {row[1]: row[6] for row in rows if row[0].startswith("FLUX 32x32 2 steps")}
    assert shared["batching off"] == "1" and int(shared[every]) > 1, run.stdout
    assert "| during the streams, on: StepPolicy + encode/decode overlapped" in run.stdout  # the phases table
    assert any(row[1] == "2 request(s): 1 forward of 4 rows" for row in rows if row[0].startswith("Wan")), run.stdout
