"""What the HTTP signal's syscall hook costs every other process on the host.

Plaintext HTTP is seen at every syscall's return (one raw tracepoint), so each
syscall of every process takes the kernel's syscall-tracing path and runs the
program's first instructions, HTTP or not. bench/http_syscall_loop.c makes
syscalls and no HTTP (write and read over a UNIX socket pair, getppid); its CPU
time per iteration is measured with and without the http object attached,
alternating, in one run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .common import WORK, Figure, Result, command_for, median

NAME = "http_syscalls"
TITLE = "Syscall cost for other processes with the HTTP hook attached"
SRC = Path(__file__).with_name("http_syscall_loop.c")
SYSCALLS_PER_ITER = 3


def _build() -> str:
    if not shutil.which("gcc"):
        raise RuntimeError("gcc not installed")
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / "http_syscall_loop"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(SRC)], check=True)
    return str(out)


def _loop_ns(binary: str, iters: int, runs: int) -> float:
    return median([float(subprocess.run([binary, str(iters)], capture_output=True, text=True,
                                        check=True).stdout) for _ in range(runs)])


def run(quick: bool = False) -> Result:
    from ebpf_otlp.platform.bpfobj import BpfObject
    from ebpf_otlp.signals.http.tls import PROGRAMS

    res = Result(NAME, TITLE, command_for(NAME, quick))
    binary = _build()
    iters, runs, rounds = (50_000, 3, 2) if quick else (300_000, 5, 6)
    got: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(rounds):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            obj = None
            if mode == "on":
                obj = BpfObject.open_packaged("http")
                obj.rodata["self_tgid"] = os.getpid()
                obj.load()
                for p in obj.programs.values():
                    if p.name not in PROGRAMS:  # the syscall hook, not the SSL uprobes
                        p.attach()
            try:
                got[mode].append(_loop_ns(binary, iters, runs))
            finally:
                if obj is not None:
                    obj.close()
    off, on = median(got["off"]), median(got["on"])
    res.raw["rounds"] = got
    res.add(Figure.compare("CPU per iteration (write + read + getppid), http hook attached",
                           on, "ns", off, "no hook", higher_is_better=False,
                           note=f"median of {rounds} alternating rounds"))
    res.add(Figure("added per syscall of a process that makes no HTTP",
                   (on - off) / SYSCALLS_PER_ITER, "ns"))
    return res
