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


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    """Returns a function triton_available -> the list of every graph Dynamo captures from then on, the CPU standing
    in for CUDA: DIFFGEN_DISABLE_TRITON unset, Triton reported available or not, compiled graphs calling the ops'
    plain implementation on "cpu", and Module.compile (compile_repeated_blocks) given one recording backend (blocks
    of a kind share a graph) that runs each graph through AOT autograd (functionalisation, the ops' fake
    implementations) without building C++ kernels. Afterwards the real settings and a fresh Dynamo."""
    import torch
    from torch._dynamo import lookup_backend

    from diffgen.layers import fused

    def stand_in(triton_available: bool) -> list:
        graphs: list = []

        def backend(gm, inputs):
            graphs.append(gm)
            return lookup_backend("aot_eager")(gm, inputs)
        monkeypatch.delenv("DIFFGEN_DISABLE_TRITON", raising=False)
        monkeypatch.setattr(fused, "_triton_available", lambda: triton_available)
        monkeypatch.setattr(fused, "_GRAPH_DEVICE", "cpu")
        compile_module = torch.nn.Module.compile
        monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(
            self, **{**kw, "backend": backend, "options": None}))
        torch._dynamo.reset()
        return graphs

    yield stand_in
    monkeypatch.undo()
    fused.set_fused_kernels(None)  # the real Triton check again
    torch._dynamo.reset()
