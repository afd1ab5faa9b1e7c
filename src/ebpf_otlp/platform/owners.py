"""Which processes hold a BPF program: how a TC filter left by a crashed run
is told apart from one a running agent still owns.

A TC filter keeps its program loaded after the process that attached it is
gone; a running agent also holds the program through a file descriptor. So a
filter whose program no process holds is stale, and one whose program a live
process holds is that process's, whatever its handle and priority.

Found by reading ``/proc/<pid>/fdinfo`` of ``anon_inode:bpf-prog`` descriptors,
so only processes visible in this PID namespace count (a containerised
agent needs the host's PID namespace to see a host agent).
"""

from __future__ import annotations

import os


def prog_holders(prog_ids: set[int], proc: str = "/proc") -> dict[int, set[int]]:
    """Program id -> pids holding a file descriptor of it, for ``prog_ids``."""
    out: dict[int, set[int]] = {}
    if not prog_ids:
        return out
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:bpf-prog":
                    continue
                with open(f"{proc}/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("prog_id:"):
                            pid_prog = int(line.split()[1])
                            if pid_prog in prog_ids:
                                out.setdefault(pid_prog, set()).add(int(pid))
                            break
            except (OSError, ValueError):
                continue
    return out
