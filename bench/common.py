"""Shared pieces of the benchmarks: paths, the result record, the machine
description and small process helpers.

Every benchmark module exposes ``NAME``, ``TITLE`` and ``run(quick) -> Result``.
A figure is an absolute number plus, where one exists, the baseline measured
in the same run and the ratio to it: these machines are noisy, ratios are
what carry over between runs.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
TESTS = REPO / "tests"
OBJ_DIR = SRC / "ebpf_otlp" / "bpf"
PY = sys.executable
WORK = Path(os.environ.get("EBPF_OTLP_BENCH_TMP", "/tmp/ebpf-otlp-bench"))

for _p in (str(SRC), str(TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def env() -> dict[str, str]:
    """Environment for child Pythons (agent, receiver): finds the package from the tree."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), str(REPO), e.get("PYTHONPATH")]))
    return e


@dataclass
class Figure:
    """One measured number; ``baseline``/``ratio`` when it is compared to something."""

    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""

    @classmethod
    def compare(cls, name: str, value: float | None, unit: str, baseline: float | None,
                baseline_name: str,
                target: float | None = None, higher_is_better: bool = True,
                note: str = "") -> Figure:
        ratio = value / baseline if value is not None and baseline else None
        met = None
        tgt = ""
        if target is not None and ratio is not None:
            met = ratio >= target if higher_is_better else ratio <= target
            tgt = f"ratio {'>=' if higher_is_better else '<='} {target:g}"
        return cls(name, value, unit, baseline, baseline_name, ratio, tgt, met, note)


@dataclass
class Result:
    name: str
    title: str
    command: str
    status: str = "ok"  # ok | partial | skipped | error
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        return fig

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def command_for(name: str, quick: bool) -> str:
    return f"sudo make bench  # or: .venv/bin/python -m bench --only {name}" + (
        " --quick" if quick else "")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu_model, mhz, flags = "", "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            k, v = k.strip(), v.strip()
            if k == "model name" and not cpu_model:
                cpu_model = v
            elif k == "cpu MHz" and not mhz:
                mhz = v
            elif k == "flags" and not flags:
                flags = v
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    try:
        from ebpf_otlp.platform import libbpf

        libbpf_version = libbpf.version()
    except Exception as e:  # the description must not fail the run
        libbpf_version = f"unknown ({e})"
    try:
        clocksource = Path("/sys/devices/system/clocksource/clocksource0/"
                           "current_clocksource").read_text().strip()
    except OSError:
        clocksource = ""
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "uname": " ".join(platform.uname()),
        "cpu_model": cpu_model,
        "cpu_mhz": mhz,
        "cpus": os.cpu_count(),
        "hypervisor": "hypervisor" in flags.split(),
        "mem_gib": round(mem_kb / 1048576, 1),
        "clocksource": clocksource,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "python": platform.python_version(),
        "libbpf": libbpf_version,
        "opentelemetry_sdk": _dist_version("opentelemetry-sdk"),
        "iperf3": _first_line(["iperf3", "--version"]),
        "bpftrace": _first_line(["bpftrace", "--version"]),
    }


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "not installed"


def have_root() -> bool:
    return os.geteuid() == 0


def wait_until(pred: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGTERM (the agent flushes and detaches on it), SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
