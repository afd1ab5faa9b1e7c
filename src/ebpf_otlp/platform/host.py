"""Facts about the host that several signals need, found in one place."""

from __future__ import annotations

import os
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
    ``/sys/fs/cgroup/unified`` on a hybrid one), from the mount table.

    The table also lists mounts that a later one hides (``ip netns exec``
    remounts /sys; containers overmount /sys/fs/cgroup): the last one that is
    really reachable wins."""
    found = []
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    found.append(left.split()[4].replace("\\040", " "))
    except OSError:
        return None
    for path in reversed(found):
        if os.path.exists(os.path.join(path, "cgroup.controllers")):
            return path
    return None


def in_initial_pid_namespace() -> bool:
    """Whether /proc here shows the kernel's own pids (what BPF helpers report):
    ``NSpid`` lists one pid per nested pid namespace."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return len(line.split()) == 2
    except OSError:
        pass
    return False
