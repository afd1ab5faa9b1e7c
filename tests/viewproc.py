"""``ebpf-otlp observe`` and ``top`` as processes inside a test namespace, and
the program ids a process holds (to show its hooks are gone after it exits)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from netns import Topology

PY = sys.executable


class ObserveProc:
    """``ebpf-otlp observe -o json ARGS`` in namespace ``ns``; events parsed from its output."""

    def __init__(self, topo: Topology, ns: str, *args: str):
        self.topo, self.ns, self.args = topo, ns, args
        self.dir = Path(tempfile.mkdtemp(prefix="eo-observe-"))
        self.out = self.dir / "out.jsonl"
        self.err = self.dir / "err.txt"
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self) -> ObserveProc:
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = self.topo.popen(self.ns, PY, "-m", "ebpf_otlp", "observe", "-o", "json",
                                        *self.args, stdout=out, stderr=err)
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "observing" in self.err.read_text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"observe exited {self.proc.returncode}: "
                                   f"{self.err.read_text()}")
            time.sleep(0.1)
        raise RuntimeError(f"observe did not start: {self.err.read_text()}")

    def events(self) -> list[dict]:
        out = []
        for line in self.out.read_text().splitlines():
            if line.endswith("}"):
                out.append(json.loads(line))
        return out

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.returncode = self.proc.returncode
        return self.returncode if self.returncode is not None else -1

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def held_programs(pid: int) -> set[int]:
    """Ids of the BPF programs process ``pid`` holds a descriptor of."""
    ids = set()
    for fdinfo in Path(f"/proc/{pid}/fdinfo").glob("*"):
        try:
            text = fdinfo.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


def loaded_programs() -> set[int]:
    """Ids of every BPF program loaded on the host (bpftool)."""
    res = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         timeout=60, check=True)
    return {p["id"] for p in json.loads(res.stdout or "[]")}


def wait_until(pred, timeout: float = 30.0, what: str = "condition"):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
