"""A real OTLP/HTTP receiver and a real agent, each a process inside a test
namespace, talking over that namespace's loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from netns import Topology

PY = sys.executable


class ReceiverProc:
    """``ebpf-otlp receive --output FILE`` running in namespace ``ns``."""

    def __init__(self, topo: Topology, ns: str, port: int = 4318):
        self.topo, self.ns, self.port = topo, ns, port
        self.dir = tempfile.mkdtemp(prefix="eo-rx-")
        self.path = Path(self.dir) / "otlp.jsonl"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ReceiverProc:
        self.proc = self.topo.popen(self.ns, PY, "-m", "ebpf_otlp", "receive", "--listen",
                                    f"127.0.0.1:{self.port}", "--output", str(self.path),
                                    stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        if "receiving" not in line:
            raise RuntimeError(f"receiver did not start: {line}{self.proc.stderr.read()}")
        return self

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if line.endswith("}"):
                out.append(json.loads(line))
        return out

    def metrics(self, name: str, **attrs: object) -> list[dict]:
        return [r for r in self.records() if r["type"] == "metric" and r["name"] == name
                and all(r["attributes"].get(k) == v for k, v in attrs.items())]

    def spans(self, **attrs: object) -> list[dict]:
        return [r for r in self.records() if r["type"] == "span"
                and all(r["attributes"].get(k) == v for k, v in attrs.items())]

    def wait_for(self, pred: Callable[[], object], timeout: float = 20.0,
                 what: str = "condition") -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()


def metric_total(points: list[dict]) -> float:
    """The total a counter reached: sum of deltas, or the last value of each
    cumulative series summed over series."""
    total = 0.0
    last: dict[tuple, tuple[int, float]] = {}
    for p in points:
        if p.get("temporality") == "cumulative":
            key = tuple(sorted(p["attributes"].items()))
            if key not in last or p["time_ns"] >= last[key][0]:
                last[key] = (p["time_ns"], p["value"])
        else:
            total += p["value"] if "value" in p else p["count"]
    return total + sum(v for _, v in last.values())


def by_attrs(points: list[dict], *keys: str) -> dict[tuple, float]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        groups[tuple(p["attributes"].get(k) for k in keys)].append(p)
    return {k: metric_total(v) for k, v in groups.items()}


class AgentProc:
    """``ebpf-otlp run`` in namespace ``ns`` exporting to ``receiver``."""

    def __init__(self, topo: Topology, ns: str, receiver: ReceiverProc, *args: str,
                 interval: float = 1.0, env: dict[str, str] | None = None,
                 temporality: str = "delta"):
        self.topo, self.ns = topo, ns
        self.args = ["--endpoint", receiver.endpoint, "--interval", str(interval), *args]
        self.env = dict(os.environ, OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=temporality,
                        **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(receiver.dir) / "agent.log"
        self.returncode: int | None = None

    def __enter__(self) -> AgentProc:
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = self.topo.popen(self.ns, PY, "-m", "ebpf_otlp", "run", *self.args,
                                    stderr=self._log, stdout=self._log, env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "ebpf-otlp running" in self.log_path.read_text():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"agent did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None:
            return self.returncode or 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        self.proc = None
        self._log.close()
        return self.returncode

    def __exit__(self, *exc: object) -> None:
        self.stop()
