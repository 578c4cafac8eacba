"""WorkerGroup: an Engine executor over several processes (one per GPU, gloo processes on the CPU).

Beside the in-process executor (diffgen.engine.executor): ``submit`` runs the request in the caller's
thread and returns a finished Job, with the same progress events, cancellation and errors.

The Engine process holds no model. It starts ``num_gpus`` rank processes (``python -m
diffgen.parallel.worker``; plain subprocesses, so a server worker may own a group too), listens on a
local socket for each replica's rank 0, and hands every request to a free replica. ``run`` is
thread-safe: with ``dp_size`` replicas, that many requests run at once.

Never hanging: while a request runs, the Engine polls for the replica's messages and checks that
every rank process is alive. A rank that dies (or crashes) fails the running requests with
:class:`WorkerGroupError`; the group is then stopped and started again before the next request.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import queue
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Listener
from typing import Any

from diffgen.engine.executor import Executor, ExecutorStatus, Job, JobListener, run_in_caller
from diffgen.errors import DiffgenError
from diffgen.parallel.config import ParallelPlan

logger = logging.getLogger(__name__)
POLL_SECONDS = 0.2
LOAD_TIMEOUT_ENV = "DIFFGEN_GROUP_LOAD_TIMEOUT"  # seconds to wait for every rank to load (default 1800)


class WorkerGroupError(RuntimeError):
    """A rank process died or crashed; the request it was running failed and the group restarts."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerGroup(Executor):
    def __init__(self, model_path: str, options: dict[str, Any], plan: ParallelPlan):
        self.model_path = model_path
        self.options = {k: v for k, v in options.items() if v is not None}
        self.plan = plan
        self.processes: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._free: queue.Queue[int] = queue.Queue()
        self._connections: dict[int, Any] = {}
        self._broken = False
        self._folder = tempfile.TemporaryDirectory(prefix="diffgen-group-")
        self.info: RemotePipeline | None = None
        self._jobs: dict[str, Job] = {}
        self.restarts = 0
        self.lora_mode = self.options.get("lora_mode") or "merged"
        #: the LoRAs every rank must hold once a change was made (None: what the ranks loaded at start)
        self._loras: list[dict[str, Any]] | None = None
        self._lora_lock = threading.Lock()  # one change at a time
        self._start_group()
        self.spec = self.info.spec
        atexit.register(self.close)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """The ranks start (and load) in the constructor: nothing to do here."""

    def _start_group(self) -> None:
        device = self.options.get("device") or ("cuda" if _cuda_available() else "cpu")
        first_gpu = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        authkey = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        spec = {"options": {**self.options, "model_path": self.model_path,
                            "device": "cuda" if device.startswith("cuda") else device},
                "plan": self.plan, "world_size": self.plan.num_gpus, "first_gpu": first_gpu,
                "init_method": f"tcp://127.0.0.1:{_free_port()}", "address": listener.address, "authkey": authkey}
        spec_path = os.path.join(self._folder.name, "group.pkl")
        with open(spec_path, "wb") as f:
            pickle.dump(spec, f)
        env = dict(os.environ, DIFFGEN_GROUP_SPEC=spec_path, NCCL_NVLS_ENABLE="0",
                   TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
        self.processes = [subprocess.Popen([sys.executable, "-m", "diffgen.parallel.worker"],
                                           env=dict(env, DIFFGEN_RANK=str(rank)))
                          for rank in range(self.plan.num_gpus)]
        try:
            self._accept_replicas(listener)
            if self._loras is not None:  # a restart: the ranks loaded the start-up LoRAs, not the current ones
                from diffgen.engine.lora import LoRAChange

                for replica in self._connections:
                    reply = self._lora_reply(replica, LoRAChange.sync(self._loras))
                    if reply[0] != "loras_done":
                        logger.error("diffgen: the restarted group could not take the current LoRAs: %s", reply[1])
        except BaseException:
            self.stop()
            raise
        finally:
            listener.close()
        for replica in self._connections:  # free only now: no request runs before the LoRAs are current
            self._free.put(replica)
        self._broken = False

    def _accept_replicas(self, listener: Listener) -> None:
        deadline = time.monotonic() + float(os.environ.get(LOAD_TIMEOUT_ENV, 1800))
        listener._listener._socket.settimeout(POLL_SECONDS)  # accept() must not block past a dead rank
        self._connections, self._free = {}, queue.Queue()
        while len(self._connections) < self.plan.dp_size:
            self._check_alive("while loading")
            if time.monotonic() > deadline:
                raise WorkerGroupError(f"the {self.plan.num_gpus} ranks did not load within {LOAD_TIMEOUT_ENV}")
            try:
                connection = listener.accept()
            except TimeoutError:
                continue
            message = receive(connection)
            if message[0] == "load_failed":
                raise DiffgenError(f"rank {message[1]} failed to load {self.model_path}: {message[2]}")
            self._connections[message[1]] = connection
            self.info = message[2]

    def _check_alive(self, when: str) -> None:
        for rank, process in enumerate(self.processes):
            code = process.poll()
            if code is not None:
                self._broken = True
                raise WorkerGroupError(f"rank {rank} exited with status {code} {when}")

    def stop(self) -> None:
        for connection in self._connections.values():
            try:
                send(connection, ("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for connection in self._connections.values():
            connection.close()
        self._connections = {}

    def _restart(self) -> None:
        logger.warning("diffgen: restarting the worker group of %d processes", self.plan.num_gpus)
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()
        self._connections = {}
        self.restarts += 1
        self._start_group()

    def close(self) -> None:
        if self.processes:
            self.stop()
            self.processes = []
            self._folder.cleanup()

    def shutdown(self, timeout: float = 30.0, grace: float = 5.0) -> None:
        self.close()

    def status(self) -> ExecutorStatus:
        info = self.info
        return ExecutorStatus(ready=not self._broken, running=len(self._jobs), restarts=self.restarts,
                              worker_pids=[p.pid for p in self.processes], device=info.device if info else None,
                              dit_precision=info.dit_precision if info else None,
                              vae_precision=info.vae_precision if info else None)

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, request, listener: JobListener | None = None, job_id: str | None = None,
               is_cancelled=None) -> Job:
        """Run ``request`` (already resolved) on a free replica; returns the finished Job."""
        return run_in_caller(self.run, request, listener, job_id, is_cancelled, self.cancel, self._jobs)

    def cancel(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        if job is None:
            return False
        job.cancel_requested = True
        return True

    def run(self, request, progress=None, is_cancelled=None):
        """Run ``request`` on a free replica; returns its GenerationResult (from the replica's rank 0)."""
        with self._lock:
            if self._broken:
                self._restart()
        if request.seed is None:  # one seed for every rank
            import dataclasses

            request = dataclasses.replace(request, seed=secrets.randbelow(2**31 - 1))
        replica = self._take_replica()
        connection = self._connections[replica]
        try:
            send(connection, ("run", request))
            cancel_sent = False
            while True:
                if is_cancelled is not None and not cancel_sent and is_cancelled():
                    send(connection, ("cancel",))
                    cancel_sent = True
                if not connection.poll(POLL_SECONDS):
                    self._check_alive("while running a request")
                    continue
                message = receive(connection)
                if message[0] == "progress":
                    if progress is not None:
                        progress(message[1], message[2], message[3])
                elif message[0] == "done":
                    return message[1]
                elif message[0] == "failed":
                    raise message[1]
                elif message[0] == "crashed":
                    self._broken = True
                    raise WorkerGroupError(f"a rank crashed while running the request: {message[1]}")
        except (EOFError, OSError) as error:
            self._broken = True
            raise WorkerGroupError(f"lost the connection to replica {replica}: {error}") from error
        finally:
            if not self._broken:
                self._free.put(replica)

    # -- LoRAs ------------------------------------------------------------------------------------
    def loras(self) -> list[dict[str, Any]]:
        return list(self._loras if self._loras is not None else self.info.loras)

    def change_loras(self, change: Any) -> list[dict[str, Any]]:
        """Make ``change`` on every rank of every replica, each between two requests (all replicas are taken
        first); a replica that refuses it makes it a failure everywhere (the others are set back)."""
        from diffgen.engine.lora import LoRAChange

        with self._lora_lock:
            with self._lock:
                if self._broken:
                    self._restart()
            replicas = [self._take_replica() for _ in range(self.plan.dp_size)]
            before = self.loras()
            try:
                replies = {replica: self._lora_reply(replica, change) for replica in replicas}
                refused = [reply for reply in replies.values() if reply[0] == "loras_failed"]
                if refused:
                    for replica, reply in replies.items():
                        if reply[0] == "loras_done":
                            self._lora_reply(replica, LoRAChange.sync(before))
                    raise refused[0][1]
                self._loras = list(replies[replicas[0]][1])
                return list(self._loras)
            finally:
                if not self._broken:
                    for replica in replicas:
                        self._free.put(replica)

    def _lora_reply(self, replica: int, change: Any) -> tuple:
        """Send a LoRA change to a replica (free, taken by the caller) and wait for its answer."""
        connection = self._connections[replica]
        try:
            send(connection, ("loras", change))
            while not connection.poll(POLL_SECONDS):
                self._check_alive("while changing LoRAs")
            reply = receive(connection)
        except (EOFError, OSError) as error:
            self._broken = True
            raise WorkerGroupError(f"lost the connection to replica {replica}: {error}") from error
        if reply[0] == "crashed":
            self._broken = True
            raise WorkerGroupError(f"a rank crashed while changing LoRAs: {reply[1]}")
        return reply

    def _take_replica(self) -> int:
        while True:
            try:
                return self._free.get(timeout=POLL_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._broken:
                        self._restart()


@dataclass
class RemotePipeline:
    """What the Engine process knows of the pipeline its ranks hold (sent by replica 0's root once loaded)."""

    model_path: str
    spec: Any  # engine.spec.ModelSpec: defaults, output kind, inputs; requests are resolved against it here
    output_kind: str
    pipeline_class: type
    device: str
    loras: list = field(default_factory=list)  # the LoRAs the ranks loaded at start (LoRAManager.describe rows)
    dit_precision: str = "float32"  # the ranks' DiT dtype (what --dtype auto chose)
    vae_precision: str = "float32"

    @property
    def defaults(self) -> Any:
        return self.spec.defaults

    @property
    def accepts_images(self) -> bool:
        return self.spec.accepts_images


def send(connection, message: Any) -> None:
    """Plain pickle over the socket: torch's multiprocessing pickler would pass tensors as shared file handles."""
    connection.send_bytes(pickle.dumps(message))


def receive(connection) -> Any:
    return pickle.loads(connection.recv_bytes())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _package_root() -> str:
    import diffgen

    return os.path.dirname(os.path.dirname(os.path.abspath(diffgen.__file__)))
