"""The process executor's LoRA changes with scripted workers (threads speaking the worker messages): a change
that one worker refuses is set back on the workers that made it, so no two workers hold different LoRAs.

(The real workers refuse a bad file alike, so this can only be provoked with workers that disagree: the
end-to-end behaviour over real workers is in tests/test_server_loras.py.)
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from server_utils import wait_until

from diffgen.engine import messages as m
from diffgen.engine.lora import LoRAChange
from diffgen.engine.scheduler import ProcessExecutor, WorkerHandle
from diffgen.errors import InvalidRequestError


class _Thread:
    """The part of a multiprocessing.Process the executor uses, over a thread."""

    def __init__(self, target, args):
        self._thread = threading.Thread(target=target, args=args, daemon=True)
        self.pid, self.exitcode = None, None

    def start(self):
        self._thread.start()

    def is_alive(self):
        return self._thread.is_alive()

    def kill(self):
        pass

    def join(self, timeout=None):
        self._thread.join(timeout)


def _scripted_worker(index: int, inbox, outbox, seen: list) -> None:
    """Loads LoRAs by name only; worker 1 refuses names that start with "bad"."""
    loras: list[dict] = []
    outbox.put(m.Ready(spec=SimpleNamespace(name="scripted"), device="cpu"))
    while True:
        message = inbox.get()
        if isinstance(message, m.Stop):
            return
        change = message.change
        seen.append((index, change))
        if change.action == "load" and index == 1 and change.name.startswith("bad"):
            outbox.put(m.LoRAsChanged(message.change_id, tuple(loras), f"{change.path} does not match", "lora_path"))
            continue
        if change.action == "load":
            loras.append({"name": change.name, "path": change.path, "scale": change.scale,
                          "component": change.component, "layers": 1})
        elif change.action == "sync":
            loras = [dict(row) for row in change.adapters]
        outbox.put(m.LoRAsChanged(message.change_id, tuple(loras)))


def test_a_change_refused_by_one_worker_is_set_back_on_the_others():
    seen: list = []

    class ScriptedWorker(WorkerHandle):
        def spawn(self, ctx, options):
            return [_Thread(_scripted_worker, (self.index, self.inbox, self.outbox, seen))]

    executor = ProcessExecutor({"model_path": "scripted", "engine_options": {}}, num_workers=2,
                               worker_factory=ScriptedWorker)
    executor.start()
    try:
        wait_until(lambda: executor.status().ready and all(w.ready for w in executor._workers), timeout=30,
                   what="two ready workers")
        loaded = executor.change_loras(LoRAChange.load("good.safetensors"))
        assert [row["name"] for row in loaded] == ["good"]
        with pytest.raises(InvalidRequestError, match="lora_path: .*bad.safetensors does not match"):
            executor.change_loras(LoRAChange.load("bad.safetensors"))
        # worker 0 made it, worker 1 refused it: worker 0 is set back to what it held before
        wait_until(lambda: [row["name"] for row in executor._workers[0].loras] == ["good"], timeout=30,
                   what="worker 0 set back")
        set_back = [change for index, change in seen if index == 0 and change.action == "sync"]
        assert len(set_back) == 1 and [dict(row)["name"] for row in set_back[0].adapters] == ["good"]
        assert [row["name"] for row in executor.loras()] == ["good"]
        assert [row["name"] for row in executor._workers[1].loras] == ["good"]
    finally:
        executor.shutdown(timeout=5, grace=5)
        executor.close()
