"""Shared fixtures: tiny checkpoints written once per test session, offline."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# diffgen's cache (fitted preview projections, compile caches) goes to a folder of this test session, never the
# user's home: servers and workers started by the tests inherit it.
os.environ.setdefault("DIFFGEN_CACHE_DIR", tempfile.mkdtemp(prefix="diffgen-test-cache-"))


def _quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


_quiet()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Returns a function family -> path of that tiny checkpoint (written on first use)."""
    from diffgen.testing import write_tiny_checkpoint

    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = str(write_tiny_checkpoint(family, tmp_path_factory.mktemp(family) / "ckpt"))
        return cache[family]

    return get


@pytest.fixture
def triton_interpreter():
    """Returns a function script -> its stdout lines, the script run in a fresh Python under Triton's CPU
    interpreter (TRITON_INTERPRET must be set before Triton is imported). Skips where Triton is not installed."""
    import subprocess
    import sys

    pytest.importorskip("triton", reason="Triton is not installed here (it comes with CUDA builds of torch)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))

    def run(script: str, timeout: float = 300) -> list[str]:
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()

    return run


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    """Returns a function family -> an in-process float32 CPU Engine on that tiny checkpoint (one per module)."""
    from diffgen import Engine

    made: dict[str, Engine] = {}

    def get(family: str) -> Engine:
        if family not in made:
            made[family] = Engine.from_pretrained(tiny_checkpoint(family), device="cpu", dtype="float32")
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_flux(tiny_checkpoint) -> str:
    return tiny_checkpoint("flux")


@pytest.fixture(scope="session")
def tiny_flux_schnell(tiny_checkpoint) -> str:
    return tiny_checkpoint("flux-schnell")
