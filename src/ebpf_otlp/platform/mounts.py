"""tracefs, bpffs and cgroup2: mount them when absent, or say how."""

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


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(fstype: str, path: str) -> None:
    """``mount -t fstype fstype path`` (needs CAP_SYS_ADMIN)."""
    if _libc().mount(fstype.encode(), path.encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise MountError(
            f"{fstype} is not mounted at {path} and mounting it failed ({os.strerror(err)}); "
            f"mount it as root: mount -t {fstype} {fstype} {path}")


def unmount(path: str) -> None:
    """Lazy unmount (MNT_DETACH): gone from the tree now, freed when unused."""
    _libc().umount2(path.encode(), 2)


def ensure_tracefs() -> str:
    """Tracepoint ids come from tracefs; mount it if the host has not."""
    if os.path.isdir(os.path.join(TRACEFS, "events")):
        return TRACEFS
    if os.path.isdir("/sys/kernel/debug/tracing/events"):
        return "/sys/kernel/debug/tracing"
    if not _mounted(TRACEFS, "tracefs"):
        mount("tracefs", TRACEFS)
    return TRACEFS
