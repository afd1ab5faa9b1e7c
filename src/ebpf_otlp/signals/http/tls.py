"""Finding the TLS libraries processes use, and attaching the SSL uprobes once per file.

A uprobe belongs to a file (its inode), not to a process: attaching to
``libssl.so.3`` once covers every process that maps that file, including
those started later. Containers bring their own copies, so every process's
``/proc/PID/maps`` is read for ``libssl.so*`` and each path is opened through
``/proc/PID/root`` (the process's own mount namespace); files are told apart
by (device, inode). A thread re-scans every few seconds to pick up new files.
Binaries that link OpenSSL statically are named by the user (``--tls-lib``).
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Iterable

from ...platform.bpfobj import BpfObject
from ...platform.libbpf import BpfError
from .placement import Elf, Probe, plan

log = logging.getLogger(__name__)

# (symbol, entry program, return program). SSL_read/SSL_write: nginx, curl;
# SSL_read_ex/SSL_write_ex: CPython's ssl module (KERNEL.md).
PROBES = (
    ("SSL_write", "ssl_write_enter", "ssl_exit_int"),
    ("SSL_read", "ssl_read_enter", "ssl_exit_int"),
    ("SSL_write_ex", "ssl_write_ex_enter", "ssl_exit_ex"),
    ("SSL_read_ex", "ssl_read_ex_enter", "ssl_exit_ex"),
)
PROGRAMS = tuple(sorted({p for _, a, b in PROBES for p in (a, b)} | {"ssl_set_fd"}))
# Where each probe goes in a file is placement.plan's choice.


def is_tls_library(path: str) -> bool:
    return Path(path).name.startswith("libssl.so")


def mapped_tls_libraries(proc: str = "/proc") -> dict[tuple[int, int], str]:
    """{(st_dev, st_ino): a path that opens it} for every libssl mapped by a process."""
    out: dict[tuple[int, int], str] = {}
    me = os.getpid()
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"{proc}/{entry.name}/maps", "rb") as f:
                data = f.read()
        except OSError:
            continue  # gone, or a kernel thread
        if b"libssl.so" not in data:
            continue
        for line in data.splitlines():
            if b"libssl.so" not in line:
                continue
            parts = line.split(None, 5)
            if len(parts) < 6:
                continue
            path = parts[5].decode(errors="replace").strip()
            if path.endswith(" (deleted)") or not is_tls_library(path):
                continue
            full = f"{proc}/{entry.name}/root{path}"
            try:
                st = os.stat(full)
            except OSError:
                continue
            out.setdefault((st.st_dev, st.st_ino), full)
    return out


def system_tls_library() -> str | None:
    """The libssl the dynamic linker would give a new process here, if any."""
    name = ctypes.util.find_library("ssl")
    if not name:
        return None
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
              "/usr/lib", "/lib/x86_64-linux-gnu", "/lib64", "/lib"):
        p = Path(d, name)
        if p.exists():
            return str(p)
    return None


class TlsAttacher:
    """Attaches the SSL uprobes of ``obj`` to each TLS library file once."""

    def __init__(self, obj: BpfObject, static_paths: Iterable[str] = (),
                 interval_s: float = 2.0, relocate: bool = True):
        self.obj = obj
        self.relocate = relocate  # False: every probe at its symbol's offset 0 (as before)
        self.probes: dict[str, list[Probe]] = {}  # attached, by path
        self.static_paths = list(static_paths)
        self.interval_s = interval_s
        self.files: dict[tuple[int, int], str] = {}  # attached
        self.failed: dict[tuple[int, int], str] = {}  # tried, no usable symbol
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach_path(self, path: str, required: bool = False) -> bool:
        """Attach to ``path`` unless that file already is; True when newly attached."""
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            if key in self.files or key in self.failed:
                return False
            try:
                elf = Elf.read(path)
            except OSError:
                elf = None
            done: list[Probe] = []
            for probe in plan(elf, self.relocate):
                enter = None
                try:
                    enter = self.obj.programs[probe.enter].attach_uprobe(
                        path, probe.symbol, offset=probe.offset)
                    if probe.ret:
                        self.obj.programs[probe.ret].attach_uprobe(
                            path, probe.symbol, offset=probe.offset, retprobe=True)
                    done.append(probe)
                except BpfError as e:
                    if enter is not None:
                        self.obj.detach(enter)  # never an entry without its return
                    log.debug("uprobe %s: %s not attached: %s", path, probe.describe(), e)
            if not [p for p in done if p.ret]:  # SSL_set_fd alone traces nothing
                self.failed[key] = path
                self.errors["no_symbols"] += 1
                if required:
                    raise BpfError(2, f"no SSL_read/SSL_write symbols in {path}")
                log.warning("TLS library %s: no SSL_read/SSL_write to attach to", path)
                return False
            self.files[key] = path
            self.probes[path] = done
        log.info("TLS uprobes on %s: %s", path, "; ".join(p.describe() for p in done))
        return True

    def scan(self) -> int:
        """Attach to TLS libraries newly mapped by any process; returns how many."""
        n = 0
        for key, path in mapped_tls_libraries().items():
            if key in self.files or key in self.failed:
                continue
            try:
                n += self.attach_path(path)
            except OSError as e:
                self.errors["attach"] += 1
                log.warning("TLS uprobes on %s failed: %s", path, e)
        return n

    def start(self) -> None:
        for p in self.static_paths:
            self.attach_path(p, required=True)  # the user named it: say if it cannot work
        sys_lib = system_tls_library()
        if sys_lib is not None:
            try:
                self.attach_path(sys_lib)
            except OSError as e:
                log.warning("TLS uprobes on %s failed: %s", sys_lib, e)
        self.scan()
        self._thread = threading.Thread(target=self._run, name="http-tls-scan", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.scan()
            except Exception:  # a scan bug must not end TLS discovery for good
                self.errors["scan"] += 1
                log.exception("TLS library scan failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
