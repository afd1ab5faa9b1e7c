"""Namespaces, the agent, a receiver and iperf3 for the datapath benchmarks.

The topology is the tests' (tests/netns.py): namespaces a and b joined by a
veth pair, 10.201.0.1 <-> 10.201.0.2. The agent watches veth-a in a and
exports to ``ebpf-otlp receive`` on a's loopback.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
from netns import Topology  # tests/ is on sys.path (see common)

from .common import PY, WORK, env, stop_process

__all__ = ["Topology", "Receiver", "Agent", "iperf_server", "iperf_json"]


class Receiver:
    """``python -m ebpf_otlp receive`` in a namespace, output discarded."""

    def __init__(self, topo: Topology, ns: str, port: int = 4318):
        self.topo, self.ns, self.port = topo, ns, port
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Receiver:
        self.proc = self.topo.popen(self.ns, PY, "-m", "ebpf_otlp", "receive", "--listen",
                                    f"127.0.0.1:{self.port}", stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, env=env())
        line = self.proc.stderr.readline()
        if "receiving" not in line:
            raise RuntimeError(f"receiver did not start: {line}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            stop_process(self.proc, 5)
            self.proc.stderr.close()


class Agent:
    """``python -m ebpf_otlp run`` in a namespace; ``.cpu_s()`` is its CPU time so far."""

    def __init__(self, topo: Topology, ns: str, *args: str, log_name: str = "agent.log",
                 extra_env: dict[str, str] | None = None):
        self.topo, self.ns, self.args = topo, ns, list(args)
        self.extra_env = extra_env or {}
        WORK.mkdir(parents=True, exist_ok=True)
        self.log_path = WORK / log_name
        self.proc: subprocess.Popen | None = None
        self.ps: psutil.Process | None = None
        self.signals = ""

    def __enter__(self) -> Agent:
        log = open(self.log_path, "w")  # noqa: SIM115 (closed in __exit__)
        self._log = log
        # `ip netns exec` execs the command, so the pid is the agent's own.
        self.proc = self.topo.popen(self.ns, PY, "-m", "ebpf_otlp", "run", *self.args,
                                    stdout=log, stderr=log, env={**env(), **self.extra_env})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = self.log_path.read_text()
            if "ebpf-otlp running" in text:
                line = next(ln for ln in text.splitlines() if "ebpf-otlp running" in ln)
                self.signals = line.split("signals=")[1].split()[0] if "signals=" in line else ""
                self.ps = psutil.Process(self.proc.pid)
                return self
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"agent exited {self.proc.returncode}: {text[-2000:]}")
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("agent did not start within 90 s")

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss_bytes(self) -> int:
        return self.ps.memory_info().rss

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, 30)
            self.proc = None
            self._log.close()


def iperf_server(topo: Topology, ns: str, port: int = 5201) -> subprocess.Popen:
    proc = topo.popen(ns, "iperf3", "-s", "-p", str(port), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc


def iperf_json(topo: Topology, ns: str, cmd: list[str], seconds: float) -> dict:
    """Run an iperf3 client command (with -J) in ``ns``; its JSON report. Retried:
    the server may still be finishing the previous test."""
    for _attempt in range(3):
        res = topo.run(ns, *cmd, check=False, timeout=seconds + 30)
        try:
            doc = json.loads(res.stdout)
        except ValueError:
            doc = {"error": res.stderr or res.stdout}
        if "error" not in doc:
            return doc
        time.sleep(0.5)
    raise RuntimeError(f"iperf3 failed: {doc.get('error')}")


def agent_args(receiver: Receiver, iface: str, signals: str | None) -> list[str]:
    args = ["--iface", iface, "--endpoint", receiver.endpoint, "--interval", "1"]
    if signals:
        args += ["--signals", signals]
    return args


def start_agent_best_effort(topo: Topology, ns: str, receiver: Receiver, iface: str,
                            log_name: str = "agent.log") -> tuple[Agent, str]:
    """All signals strictly; if one cannot start, whichever start (and say which)."""
    try:
        a = Agent(topo, ns, *agent_args(receiver, iface, "flows,tcp,dns,drops"),
                  log_name=log_name).__enter__()
        return a, ""
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else str(e)
    a = Agent(topo, ns, *agent_args(receiver, iface, None), log_name=log_name).__enter__()
    return a, f"not every signal could start ({first}); ran with {a.signals}"


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class NullReceiver:
    """bench/nullrx.py in a namespace (or here with ``topo=None``); ``stop()`` -> its counts."""

    def __init__(self, topo: Topology | None = None, ns: str | None = None):
        self.topo, self.ns = topo, ns
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.final: dict = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> NullReceiver:
        cmd = [PY, "-m", "bench.nullrx"]
        kw = dict(stdout=subprocess.PIPE, text=True, env=env())
        self.proc = self.topo.popen(self.ns, *cmd, **kw) if self.topo else subprocess.Popen(
            cmd, **kw)
        line = self.proc.stdout.readline()
        if not line.startswith("listening"):
            raise RuntimeError(f"null receiver did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> dict:
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=30)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            self.final = json.loads(lines[-1]) if lines else {}
            self.proc = None
        return self.final

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- BPF programs of a tool, from bpftool (kernel run-time statistics) -------------
def _progs() -> list[dict]:
    try:
        out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True,
                             timeout=30).stdout
        return json.loads(out or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []


def prog_ids() -> set[int]:
    return {p["id"] for p in _progs()}


def new_programs(before: set[int], prefixes: tuple[str, ...]) -> set[int]:
    """Programs loaded since ``before`` whose name starts with one of ``prefixes``.

    bpftool here cannot name a program's owner pid (no BPF iterators on this
    kernel), so a tool's programs are those that appeared when it started.
    """
    return {p["id"] for p in _progs()
            if p["id"] not in before and p.get("name", "").startswith(prefixes)}


def prog_stats(ids: set[int]) -> tuple[int, int, int]:
    """(run_time_ns, run_cnt, programs) summed over the programs ``ids``."""
    per = per_program(ids)
    return (sum(v[0] for v in per.values()), sum(v[1] for v in per.values()), len(per))


def per_program(ids: set[int]) -> dict[str, tuple[int, int]]:
    """name -> (run_time_ns, run_cnt) of the programs ``ids`` (kernel BPF stats must be on)."""
    out: dict[str, tuple[int, int]] = {}
    for p in _progs():
        if p["id"] in ids:
            ns, cnt = out.get(p.get("name", "?"), (0, 0))
            out[p.get("name", "?")] = (ns + p.get("run_time_ns", 0), cnt + p.get("run_cnt", 0))
    return out
