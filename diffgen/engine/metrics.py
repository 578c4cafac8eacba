"""A few counters, gauges and summaries, rendered in the Prometheus text exposition format.

Written by hand (no dependency): the set is small and fixed, and every update is a dict operation
under one lock, cheap enough to call from the scheduler's threads.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

# Histogram buckets in seconds: from one fast denoising step to a long video.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value


class Metrics:
    """Process-wide metrics of the server: requests, queue, steps, stages, worker restarts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._histograms: dict[tuple[str, tuple[tuple[str, str], ...]], _Histogram] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._help: dict[str, tuple[str, str]] = {}

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] += amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._histograms.setdefault(key, _Histogram()).observe(value)

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time (queue depth, readiness)."""
        self._gauges[name] = read

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            counters = dict(self._counters)
            histograms = {k: (list(h.counts), h.total, h.sum) for k, h in self._histograms.items()}
        described: set[str] = set()

        def header(name: str, default_kind: str) -> None:
            if name not in described:
                described.add(name)
                kind, text = self._help.get(name, (default_kind, name))
                lines.append(f"# HELP {name} {text}")
                lines.append(f"# TYPE {name} {kind}")

        for name, read in sorted(self._gauges.items()):
            header(name, "gauge")
            lines.append(f"{name} {_number(read())}")
        for (name, labels), value in sorted(counters.items()):
            header(name, "counter")
            lines.append(f"{name}{_labels(labels)} {_number(value)}")
        for (name, labels), (counts, total, total_sum) in sorted(histograms.items()):
            header(name, "histogram")
            for bound, count in zip(BUCKETS, counts, strict=True):
                lines.append(f"{name}_bucket{_labels(labels + (('le', _number(bound)),))} {count}")
            lines.append(f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {total}")
            lines.append(f"{name}_sum{_labels(labels)} {_number(total_sum)}")
            lines.append(f"{name}_count{_labels(labels)} {total}")
        return "\n".join(lines) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in labels)
    return "{" + ",".join(escaped) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))
