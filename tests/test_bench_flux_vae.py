"""bench/flux_vae.py in its tiny CPU mode: the decode section times both VAEs and finds them bit-equal in float32
(the line compares the two sides' real outputs, so a broken native decode shows here)."""

from __future__ import annotations

from tests.bench_runs import run_bench


def test_bench_flux_vae_tiny_decode_section():
    run = run_bench("flux_vae.py", "--tiny", "--sections", "decode", "--repeats", "2", timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "diffgen vs diffusers at torch.float32: relative diff 0.00e+00, bit-equal True" in run.stdout, run.stdout
    for variant in ("diffusers AutoencoderKL.decode", "diffgen AutoencoderKL.decode"):
        assert f"| FLUX VAE decode 64x64 (tiny, float32) | {variant} |" in run.stdout, run.stdout
