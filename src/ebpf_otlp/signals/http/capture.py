"""Which kernel programs capture plaintext HTTP.

Socket mode hooks ``sock:sock_send_length``/``sock_recv_length`` (Linux 6.3+):
they fire only inside socket sends and receives. Syscall mode hooks every
syscall's exit, which puts every process on the host on the kernel's
syscall-tracing slow path (bench/http_syscalls.py measures both)."""
from __future__ import annotations

from ...config import ConfigError
from ...platform.btf import kernel_tracepoints

SOCKET_TRACEPOINTS = ("sock_send_length", "sock_recv_length")
SOCKET_PROGRAMS = ("http_sock_send", "http_sock_recv")
SYSCALL_PROGRAMS = ("http_sys_exit",)
MODES = ("auto", "socket", "syscall")


def capture_mode(wanted: str) -> str:
    """``socket`` or ``syscall`` for ``--http-capture wanted``."""
    if wanted not in MODES:
        raise ConfigError(f"--http-capture must be one of {', '.join(MODES)}")
    if wanted == "syscall":
        return wanted
    have = kernel_tracepoints(set(SOCKET_TRACEPOINTS)) == set(SOCKET_TRACEPOINTS)
    if wanted == "socket" and not have:
        raise ConfigError("--http-capture socket: this kernel has no sock:sock_send_length/"
                          "sock_recv_length tracepoints (Linux 6.3+); use auto or syscall")
    return "socket" if have else "syscall"


def unused_programs(mode: str) -> tuple[str, ...]:
    """The plaintext programs ``mode`` does not load."""
    return SYSCALL_PROGRAMS if mode == "socket" else SOCKET_PROGRAMS
