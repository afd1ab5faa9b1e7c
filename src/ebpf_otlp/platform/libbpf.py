"""cffi binding (ABI mode) over the system ``libbpf.so.1``.

Only the API in ``libbpf_api.h`` is declared. libbpf's own log lines are
captured per thread so that a failing call can carry them (the verifier log
on a failed load) in its :class:`BpfError`.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cffi import FFI

log = logging.getLogger(__name__)

MIN_VERSION = (1, 0)
INSTALL_HINT = ("install libbpf 1.x (Debian/Ubuntu: apt-get install libbpf1; "
                "Fedora: dnf install libbpf)")

ffi = FFI()
ffi.cdef((Path(__file__).with_name("libbpf_api.h")).read_text())
ffi.cdef("int vsnprintf(char *str, size_t size, const char *format, void *ap);")


class LibbpfMissing(ImportError):
    """libbpf.so.1 is absent or older than :data:`MIN_VERSION`."""


def _open() -> object:
    try:
        lib = ffi.dlopen("libbpf.so.1")
    except OSError as e:
        reason = str(e).split("  Additionally")[0]
        raise LibbpfMissing(f"cannot load libbpf.so.1 ({reason}): {INSTALL_HINT}") from None
    have = (lib.libbpf_major_version(), lib.libbpf_minor_version())
    if have < MIN_VERSION:
        raise LibbpfMissing(
            f"libbpf {have[0]}.{have[1]} is too old, ebpf-otlp needs >= "
            f"{MIN_VERSION[0]}.{MIN_VERSION[1]}: {INSTALL_HINT}"
        )
    return lib


lib = _open()
_libc = ffi.dlopen(None)

# --- libbpf log capture -----------------------------------------------------

_tls = threading.local()
_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
_PRINT_BUF = 1 << 20


@ffi.callback("int(enum libbpf_print_level, const char *, void *)")
def _print_cb(level: int, fmt: object, ap: object) -> int:
    # libbpf prints a whole verifier log in one call, its verdict at the end:
    # a 4 KiB buffer cut that off. One 1 MiB buffer per thread, reused.
    buf = getattr(_tls, "printbuf", None)
    if buf is None:
        buf = _tls.printbuf = ffi.new("char[]", _PRINT_BUF)
    _libc.vsnprintf(buf, _PRINT_BUF, fmt, ap)
    text = ffi.string(buf).decode("utf-8", "replace")
    sink = getattr(_tls, "sink", None)
    if sink is not None and level <= 1:
        sink.extend(line for line in text.splitlines() if line.strip())
    # Captured lines travel in the BpfError; only uncaptured warnings are logged.
    lvl = _LEVELS.get(level, logging.DEBUG) if sink is None else logging.DEBUG
    log.log(lvl, "%s", text.rstrip())
    return 0


lib.libbpf_set_print(_print_cb)


@contextmanager
def capture_log() -> Iterator[list[str]]:
    """Collect libbpf's warning and info lines emitted by this thread."""
    outer = getattr(_tls, "sink", None)
    lines: list[str] = []
    _tls.sink = lines
    try:
        yield lines
    finally:
        _tls.sink = outer
        if outer is not None:
            outer.extend(lines)


def version() -> str:
    return ffi.string(lib.libbpf_version_string()).decode()


def num_possible_cpus() -> int:
    n = lib.libbpf_num_possible_cpus()
    if n < 0:
        raise BpfError(-n, "libbpf_num_possible_cpus")
    return n


# --- errors -------------------------------------------------------------------

# CAP_* bit numbers from linux/capability.h.
CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


def effective_caps() -> set[str]:
    """Names of the capabilities in :data:`CAPS` that this process holds."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                mask = int(line.split()[1], 16)
                return {name for name, bit in CAPS.items() if mask >> bit & 1}
    except OSError:
        pass
    return set()


def missing_caps_hint(operation: str) -> str:
    need = ["CAP_BPF", "CAP_PERFMON"]
    if any(w in operation for w in ("tc", "xdp", "netlink")):
        need.append("CAP_NET_ADMIN")
    have = effective_caps()
    missing = [c for c in need if c not in have and "CAP_SYS_ADMIN" not in have]
    if missing:
        return "missing capability " + ", ".join(missing)
    return ("capabilities are present; the kernel refuses this (program type unsupported, "
            "lockdown, or kernel.unprivileged_bpf_disabled)")


class BpfError(OSError):
    """A failed libbpf or bpf() call.

    Attributes:
        errno: the positive errno value.
        operation: what was attempted, e.g. ``"load object flows"``.
        log: libbpf's log lines for that operation (the verifier log when a
            program failed to load).
    """

    def __init__(self, err: int, operation: str, log_lines: list[str] | None = None):
        err = abs(err)
        msg = os.strerror(err) if err < 4096 else f"error {err}"
        if err == 524:
            msg = "operation not supported by this kernel (ENOTSUPP)"
        super().__init__(err, msg)
        self.operation = operation
        self.log = list(log_lines or [])
        self.hint = missing_caps_hint(operation) if err == _errno.EPERM else ""

    def __str__(self) -> str:
        text = f"{self.operation}: {self.strerror} [errno {self.errno}]"
        if self.hint:
            text += f" ({self.hint})"
        if self.log:
            tail = self.log[-40:]
            text += "\n  libbpf: " + "\n  libbpf: ".join(tail)
        return text


def check(ret: int, operation: str, log_lines: list[str] | None = None) -> int:
    """Raise :class:`BpfError` for libbpf's ``-errno`` convention."""
    if ret < 0:
        raise BpfError(-ret, operation, log_lines)
    return ret


def check_ptr(ptr: object, operation: str, log_lines: list[str] | None = None) -> object:
    """Raise :class:`BpfError` for a NULL result, with errno as libbpf set it."""
    if ptr == ffi.NULL:
        raise BpfError(ffi.errno or _errno.EINVAL, operation, log_lines)
    return ptr


BPF_STATS_RUN_TIME = 0


def enable_run_time_stats() -> int:
    """Turn on the kernel's run-time statistics of every BPF program while the
    returned fd is open (-1 when the kernel refuses: run time then reads 0)."""
    return lib.bpf_enable_stats(BPF_STATS_RUN_TIME)
