"""Start and stop a real ``diffgen serve`` process on 127.0.0.1 for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

START_TIMEOUT = 180.0  # seconds; loading a tiny model takes a few seconds, a slow CI box more


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One ``python -m diffgen.entrypoints.cli serve`` process; its log goes to ``log_path``."""

    def __init__(self, model_path: str, output_dir: Path, *extra: str, env: dict[str, str] | None = None):
        self.model_path = model_path
        self.output_dir = Path(output_dir)
        self.extra = list(extra)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.output_dir.parent / f"server-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        self.launch()
        self.wait_ready()
        return self

    def launch(self) -> ServerProcess:
        """Start the process without waiting for it to be ready (start several, then ``wait_ready`` each)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "diffgen.entrypoints.cli", "serve", "--model-path", self.model_path,
                   "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port),
                   "--output-dir", str(self.output_dir), "--log-level", "info", *self.extra]
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                response = httpx.get(f"{self.url}/health", timeout=5)
                if response.status_code == 200:
                    return response.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 60.0) -> bool:
        """SIGTERM, as an orchestrator would; True when the server shut down gracefully.

        uvicorn re-raises the signal once its graceful shutdown is complete, so the exit status is
        -SIGTERM; the log line "diffgen serve stopped" shows the engine shutdown ran to its end."""
        if self.process is None or self.process.poll() is not None:
            return False
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise
        return code in (0, -signal.SIGTERM) and "diffgen serve stopped" in self.log()

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a power cut would do it: no shutdown code runs."""
        self.process.kill()
        self.process.wait(timeout=30)

    def info(self, api_key: str | None = None) -> dict:
        """/server_info: the details /health leaves out (queue, running jobs, worker PIDs, restarts)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.get(f"{self.url}/server_info", headers=headers, timeout=30).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def client(self, api_key: str = "unused", **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, **kwargs)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; bounded, raises on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s")


def metric(url: str, sample: str) -> float:
    """The value of one Prometheus sample of the server at ``url``, e.g.
    ``diffgen_jobs_total{status="cancelled"}``; 0 when it has not been counted yet."""
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def sse_events(response) -> Iterator[tuple[str, dict]]:
    """The (event, data) pairs of an open httpx streaming response of Server-Sent Events; comments skipped."""
    import json

    event, data = None, []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].strip())
