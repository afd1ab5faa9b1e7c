"""tracefs and bpffs: mount them when absent, or say how."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

TRACEFS = "/sys/kernel/tracing"
BPFFS = "/sys/fs/bpf"


class MountError(RuntimeError):
    pass


def _mounted(path: str, fstype: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == path and line.split()[2] == fstype for line in f)
    except OSError:
        return False


def _mount(fstype: str, path: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mount(fstype.encode(), path.encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise MountError(
            f"{fstype} is not mounted at {path} and mounting it failed ({os.strerror(err)}); "
            f"mount it as root: mount -t {fstype} {fstype} {path}")


def ensure_tracefs() -> str:
    """Tracepoint ids come from tracefs; mount it if the host has not."""
    if os.path.isdir(os.path.join(TRACEFS, "events")):
        return TRACEFS
    if os.path.isdir("/sys/kernel/debug/tracing/events"):
        return "/sys/kernel/debug/tracing"
    if not _mounted(TRACEFS, "tracefs"):
        _mount("tracefs", TRACEFS)
    return TRACEFS


def ensure_bpffs() -> str:
    if not _mounted(BPFFS, "bpf"):
        _mount("bpf", BPFFS)
    return BPFFS
