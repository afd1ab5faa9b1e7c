"""What the HTTP signal's plaintext hook costs every other process on the host.

Syscall mode sees plaintext HTTP at every syscall's return (one raw
tracepoint), so each syscall of every process takes the kernel's
syscall-tracing path and runs the program's first instructions, HTTP or not.
Socket mode (the default where the kernel has sock:sock_send_length and
sock_recv_length) runs only inside socket sends and receives.
bench/http_syscall_loop.c makes syscalls and no HTTP (write and read over a
UNIX socket pair, getppid); its CPU time per iteration is measured with no
hook, with socket mode and with syscall mode attached, in rotating order, in
one run.
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


def _attach(mode: str):
    from ebpf_otlp.platform.bpfobj import BpfObject
    from ebpf_otlp.signals.http.capture import unused_programs
    from ebpf_otlp.signals.http.tls import PROGRAMS

    obj = BpfObject.open_packaged("http")
    obj.rodata["self_tgid"] = os.getpid()
    for name in unused_programs(mode):
        obj.programs[name].autoload = False
    obj.load()
    for p in obj.programs.values():
        if p.name not in PROGRAMS and p.autoload:  # the plaintext hooks, not the SSL uprobes
            p.attach()
    return obj


def run(quick: bool = False) -> Result:
    from ebpf_otlp.signals.http.capture import capture_mode

    res = Result(NAME, TITLE, command_for(NAME, quick))
    binary = _build()
    iters, runs, rounds = (50_000, 3, 2) if quick else (300_000, 5, 6)
    modes = ["off", "syscall"]
    if capture_mode("auto") == "socket":
        modes.insert(1, "socket")
    got: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            obj = _attach(mode) if mode != "off" else None
            try:
                got[mode].append(_loop_ns(binary, iters, runs))
            finally:
                if obj is not None:
                    obj.close()
    off = median(got["off"])
    res.raw["rounds"] = got
    for mode in modes[1:]:
        on = median(got[mode])
        what = "socket tracepoints" if mode == "socket" else "syscall exit"
        res.add(Figure.compare(f"CPU per iteration (write + read + getppid), {what}",
                               on, "ns", off, "no hook", higher_is_better=False,
                               note=f"median of {rounds} rotating rounds"))
        res.add(Figure(f"added per syscall of a process that makes no HTTP, {what}",
                       (on - off) / SYSCALLS_PER_ITER, "ns"))
    return res
