"""bench/oneshot.py in its tiny CPU mode: the timeline (marks and import summary), the whole-pipeline load
and the timed one-shot process all run."""

from __future__ import annotations

import pytest

from tests.bench_runs import run_bench


def test_bench_oneshot_tiny_cpu_mode(tmp_path):
    run = run_bench("oneshot.py", "--tiny", "--rounds", "1", "--skip-diffusers", "--folder", str(tmp_path / "ckpt"),
                    "--env", "DIFFGEN_NATIVE_TEXT_ENCODERS=0",
                    "--env", "DIFFGEN_NATIVE_VAE=0,DIFFGEN_NATIVE_SCHEDULER=0", timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    timeline = out.split("### timeline: this tree")[1].split("###")[0]
    for mark in ("torch and diffgen's engine imported", "read the spec ends", "read transformer ends",
                 "build text_encoder_2 ends", "Engine.from_pretrained ends", "request ends", "save ends",
                 "main exits", "process ended"):
        assert mark in timeline, (mark, timeline)
    assert "import diffgen.engine" in timeline  # the -X importtime summary
    assert "### timeline: this tree, DIFFGEN_NATIVE_TEXT_ENCODERS=0" in out  # a variant of this tree (--env)
    both = out.split("### timeline: this tree, DIFFGEN_NATIVE_VAE=0,DIFFGEN_NATIVE_SCHEDULER=0")[1].split("###")[0]
    assert "import diffusers" in both and "import diffusers" not in timeline  # the switches reached that process
    assert out.count("\nLOAD ") == 3
    rows = [line for line in out.splitlines() if line.startswith("| diffgen generate")]
    assert len(rows) == 3 and all(row.endswith("| ok |") for row in rows), rows


@pytest.mark.parametrize("model, options, suffix", [
    ("wan", [], ".mp4"), ("wan", ["--video-format", "png-frames", "--skip-load"], ""), ("qwen", [], ".png")])
def test_bench_oneshot_tiny_other_models(tmp_path, model, options, suffix):
    """``--model wan|qwen``: the tiny checkpoint (diffgen.testing's), the whole-pipeline load, and one round of
    ``diffgen generate`` against the model's plain diffusers script (WanPipeline / QwenImagePipeline), each
    process writing its output."""
    run = run_bench("oneshot.py", "--tiny", "--model", model, "--rounds", "1", "--skip-timelines", "--folder",
                    str(tmp_path / "ckpt"), *options, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("\nLOAD ") == (0 if "--skip-load" in options else 1)  # the whole-pipeline load
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| diffgen generate", "| diffusers script"))]
    assert len(rows) == 2 and all(row.endswith("| ok |") for row in rows), rows
    written = list((tmp_path / "diffgen-oneshot-out").iterdir())
    assert [path.suffix for path in written] == [suffix]
    assert (tmp_path / f"diffusers-oneshot-out{suffix}").exists()
    if not suffix:  # png-frames: a folder of one PNG per frame on both sides (9 frames)
        for folder in (written[0], tmp_path / "diffusers-oneshot-out"):
            assert sorted(path.name for path in folder.iterdir()) == [f"frame_{i:05d}.png" for i in range(9)]


def test_bench_oneshot_variant_args_time_generate_with_extra_flags(tmp_path):
    """``--variant-args ARGS``: one more `generate` process per value, with those flags (here two: a flag that works
    and one that generate refuses, so the row's status shows the flags really reached the command line)."""
    run = run_bench("oneshot.py", "--tiny", "--rounds", "1", "--skip-diffusers", "--skip-load", "--skip-timelines",
                    "--folder", str(tmp_path / "ckpt"), "--variant-args=--attention-backend math",
                    "--variant-args=--attention-backend fastest", timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| diffgen generate")]
    assert len(rows) == 3, rows
    assert any(row.startswith("| diffgen generate --attention-backend math (this tree), round 1") and
               row.endswith("| ok |") for row in rows), rows
    assert any(row.startswith("| diffgen generate --attention-backend fastest (this tree), round 1") and
               row.endswith("| exit 2 |") for row in rows), rows


def test_bench_oneshot_refuses_a_stand_in_text_encoder_outside_qwen():
    run = run_bench("oneshot.py", "--model", "wan", "--small-text-encoder", timeout=120)
    assert run.returncode == 2 and "--small-text-encoder: only with --model qwen" in run.stderr, run.stderr
