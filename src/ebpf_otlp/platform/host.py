"""Facts about the host that several signals need, found in one place."""

from __future__ import annotations

import time
from pathlib import Path


def epoch_offset_ns() -> int:
    """Add to a BPF timestamp (``CLOCK_MONOTONIC``) to get unix ns; read once per batch."""
    return time.time_ns() - time.monotonic_ns()


def libc_path() -> str | None:
    """The libc file this process runs on (the one other processes share)."""
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6 and Path(parts[5]).name.startswith("libc.so"):
                return parts[5]
    except OSError:
        pass
    return None


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where cgroup v2 is mounted (``/sys/fs/cgroup`` on a pure v2 host,
    ``/sys/fs/cgroup/unified`` on a hybrid one), from the mount table."""
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        pass
    return None
