"""What a one-shot ``generate`` does to start sooner. The early CUDA context (diffgen/entrypoints/cuda_context.py):
started only for one in-process GPU, harmless without a GPU, and on a GPU the very context torch then uses. The
garbage collector paused during the imports and the load, by the console script only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffgen.entrypoints.cli import PAUSE_GC_ENV
from diffgen.entrypoints.cuda_context import EARLY_CUDA_CONTEXT_ENV, device_ordinal

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("options, ordinal", [
    ({}, 0), ({"device": "auto"}, 0), ({"device": "cuda"}, 0), ({"device": "cuda:3"}, 3), ({"device": "cpu"}, None),
    ({"device": "mps"}, None), ({"num_gpus": 1, "enable_cfg_parallel": False}, 0), ({"num_gpus": 2}, None),
    ({"ulysses_degree": 2}, None), ({"ring_degree": 2}, None), ({"enable_cfg_parallel": True}, None),
    ({"tp_size": 2}, None), ({"dp_size": 2}, None),
])
def test_only_a_one_gpu_in_process_generate_starts_it(options, ordinal):
    assert device_ordinal(options) == ordinal


def test_not_under_torchrun_nor_with_the_switch_off(monkeypatch):
    monkeypatch.setenv(EARLY_CUDA_CONTEXT_ENV, "0")
    assert device_ordinal({"device": "cuda"}) is None
    monkeypatch.delenv(EARLY_CUDA_CONTEXT_ENV)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert device_ordinal({"device": "cuda"}) is None  # each rank uses its local rank's device


def _run(script: str) -> str:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_thread_needs_no_torch_and_does_nothing_without_a_gpu():
    """Started before torch is imported (it overlaps that import), it imports nothing heavy; without a CUDA driver
    or device it ends having done nothing, and a CPU generate goes on as before (tests/test_oneshot_imports.py)."""
    stdout = _run("import sys\n"
                  "from diffgen.entrypoints import cuda_context\n"
                  "thread = cuda_context.start({'device': 'auto'})\n"
                  "thread.join()\n"
                  "print('torch' in sys.modules, thread.name)\n")
    assert stdout.split() == ["False", "diffgen-cuda-context"]
    if not torch.cuda.is_available():
        assert _run("from diffgen.entrypoints.cuda_context import retain_primary_context\n"
                    "print(retain_primary_context(0))\n").strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_torch_uses_the_context_made_before_it_was_imported():
    stdout = _run(
        "import ctypes\n"
        "from diffgen.entrypoints import cuda_context\n"
        "cuda_context.start({'device': 'cuda'}).join()\n"
        "driver = ctypes.CDLL('libcuda.so.1')\n"
        "device, flags, active, primary, current = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int(), "
        "ctypes.c_void_p(), ctypes.c_void_p()\n"
        "assert driver.cuDeviceGet(ctypes.byref(device), 0) == 0\n"
        "assert driver.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active)) == 0\n"
        "print('active before torch', active.value)\n"
        "import torch\n"
        "x = torch.ones(4, device='cuda') * 2\n"
        "print('sum', x.sum().item())\n"
        "assert driver.cuCtxGetCurrent(ctypes.byref(current)) == 0\n"
        "assert driver.cuDevicePrimaryCtxRetain(ctypes.byref(primary), device) == 0\n"
        "print('same context', current.value == primary.value)\n")
    assert "active before torch 1" in stdout and "sum 8.0" in stdout and "same context True" in stdout


GC_PROBE = """
import gc, json, os, sys
from diffgen.engine.engine import Engine
from diffgen.entrypoints.cli import main
seen = {"before main": gc.isenabled()}
frozen_at_start = gc.get_freeze_count()  # some Pythons start with objects frozen already
load = Engine.from_pretrained
def recording_load(*args, **kwargs):
    seen["during the load"] = gc.isenabled()
    return load(*args, **kwargs)
Engine.from_pretrained = recording_load
real_exit = os._exit
def exit_reporting(code):
    seen["at the exit"], seen["frozen"] = gc.isenabled(), gc.get_freeze_count() > frozen_at_start
    print("GC " + json.dumps(seen), flush=True)
    real_exit(code)
os._exit = exit_reporting
main(sys.argv[1:], exit_after_generate=bool(int(os.environ["EXIT_AFTER"])))
print("GC " + json.dumps({**seen, "at the exit": gc.isenabled(), "frozen": gc.get_freeze_count() > frozen_at_start}),
      flush=True)
"""


@pytest.mark.parametrize("exit_after, switch, paused", [("1", None, True), ("1", "0", False), ("0", None, False)])
def test_the_console_script_pauses_the_garbage_collector_until_the_model_is_loaded(tiny_flux, tmp_path, exit_after,
                                                                                    switch, paused):
    """Paused (then frozen and running again for the request) only where the process ends after the generate (the
    console script), and not with DIFFGEN_PAUSE_GC=0; a main() called in-process (exit_after_generate False)
    leaves the collector alone."""
    import json
    import os

    env = {**os.environ, "EXIT_AFTER": exit_after}
    env.pop(PAUSE_GC_ENV, None)
    if switch is not None:
        env[PAUSE_GC_ENV] = switch
    argv = ["generate", "--model-path", tiny_flux, "--prompt", "a fox", "--height", "32", "--width", "32",
            "--num-inference-steps", "1", "--device", "cpu", "--output-path", str(tmp_path)]
    out = subprocess.run([sys.executable, "-c", GC_PROBE, *argv], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    seen = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("GC ")).removeprefix("GC "))
    assert seen == {"before main": True, "during the load": not paused, "at the exit": True, "frozen": paused}
