"""Running a bench script as its own process, as a user runs it, with this tree importable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """``python bench/<script> <args>`` from the repository root; its output captured as text."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
