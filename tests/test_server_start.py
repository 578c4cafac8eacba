"""`diffgen serve` fails fast when there is no model to serve, instead of answering 503 forever."""

from __future__ import annotations

import shutil
import subprocess
import sys

from server_utils import free_port


def _serve(model_path: str, tmp_path, timeout: float = 180) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "diffgen.entrypoints.cli", "serve", "--model-path", model_path, "--device",
               "cpu", "--port", str(free_port()), "--output-dir", str(tmp_path / "out"), "--log-level", "warning"]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_a_missing_model_path_exits_before_serving(tmp_path):
    result = _serve(str(tmp_path / "nope"), tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --model-path") and "not found" in result.stderr
    assert "Uvicorn running" not in result.stderr


def test_a_model_whose_weights_cannot_load_stops_the_server(tiny_flux, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_flux, broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    result = _serve(str(broken), tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "the model cannot be loaded" in result.stderr
