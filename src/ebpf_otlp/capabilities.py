"""Which Linux capabilities a configuration needs, and one message when some are missing.

Every signal loads BPF programs (CAP_BPF) that read kernel memory through
tracepoints or ring buffers (CAP_PERFMON). TC/XDP filters (flows, dns) and
the sock_ops cgroup attachment (tcp) need CAP_NET_ADMIN. CAP_SYS_ADMIN is
needed only to mount what the host has not mounted (tracefs for the
tracepoints of tcp and drops, cgroup2 for tcp) and for the kernel's BPF
run-time statistics (``--bpf-stats``, which is then switched off with a
warning instead). CAP_SYS_ADMIN also stands in for CAP_BPF and CAP_PERFMON,
as the kernel treats it. A non-root user also needs CAP_DAC_READ_SEARCH to
read tracepoint ids from tracefs (mode 0700, root's).

CAP_SYS_PTRACE is not needed to run, but without it the agent sees less:
the kernel lets a process read ``/proc/PID/ns/net``, ``/proc/PID/root`` and
(without CAP_PERFMON) ``/proc/PID/maps`` of another user's process only with
it (ptrace access mode; CAP_DAC_READ_SEARCH does not stand in, uid 0 neither:
tests/app/test_capabilities.py). Workload attribution finds a pod's or
container's network namespace through ``/proc/PID/ns/net`` and the http
signal finds containers' TLS libraries through ``/proc/PID/root``; the
processes of pods and containers usually run as other users (Kubernetes'
pause process as 65535). Missing, it is one warning line at start
(:func:`degraded`), and ``doctor`` says the same.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .config import AgentConfig
from .platform.host import cgroup2_mount

# CAP_* bit numbers from linux/capability.h
BITS = {"CAP_DAC_READ_SEARCH": 2, "CAP_NET_ADMIN": 12, "CAP_SYS_PTRACE": 19,
        "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}

# What each capability is for (doctor, README's table)
NEEDED_FOR = {
    "CAP_BPF": "every signal: BPF programs and maps",
    "CAP_PERFMON": "every signal: tracepoints, uprobes, kernel memory reads",
    "CAP_NET_ADMIN": "flows and dns (TC/XDP on --iface), tcp (sock_ops on the cgroup)",
    "CAP_DAC_READ_SEARCH": "tcp and drops when not uid 0: tracepoint ids in tracefs "
                           "(root-only)",
    "CAP_SYS_PTRACE": "workload attribution (/proc/PID/ns/net) and http TLS in containers "
                      "(/proc/PID/root) of processes of other users; without it those go "
                      "unattributed or unseen",
    "CAP_SYS_ADMIN": "only to mount tracefs or cgroup2 where the host has not, and "
                     "--bpf-stats",
}


class MissingCapabilities(PermissionError):
    """The agent cannot run with this process's capabilities: exit status 1."""


def effective(status: str = "/proc/self/status") -> set[str]:
    """Names of the capabilities in :data:`BITS` this process holds."""
    try:
        for line in Path(status).read_text().splitlines():
            if line.startswith("CapEff:"):
                mask = int(line.split()[1], 16)
                return {name for name, bit in BITS.items() if mask >> bit & 1}
    except OSError:
        pass
    return set()


TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def _tracefs_state() -> str:
    """``readable``, ``unreadable`` (mounted, root-only, we are not root) or ``absent``."""
    if any(os.path.isdir(f"{p}/events") for p in TRACEFS_DIRS):
        return "readable"
    try:
        with open("/proc/self/mounts") as f:
            mounted = any(line.split()[2] == "tracefs" for line in f)
    except OSError:
        mounted = False
    return "unreadable" if mounted else "absent"


def required(cfg: AgentConfig) -> dict[str, list[str]]:
    """Capability -> what needs it, for the signals ``cfg`` asks for on this host."""
    need: dict[str, list[str]] = {}

    def add(cap: str, why: str) -> None:
        need.setdefault(cap, []).append(why)

    sigs = set(cfg.signals)
    if sigs:
        add("CAP_BPF", "load BPF programs and maps")
        add("CAP_PERFMON", "tracepoints, uprobes and kernel memory reads")
    tc = sorted(sigs & {"flows", "dns"})
    if tc:
        add("CAP_NET_ADMIN", f"TC/XDP hooks on --iface ({', '.join(tc)})")
    if "tcp" in sigs:
        add("CAP_NET_ADMIN", "sock_ops on the cgroup (tcp)")
        if not (cfg.cgroup_path or cgroup2_mount()):
            add("CAP_SYS_ADMIN", "mount cgroup2, which this host has not mounted (tcp)")
    traced = sorted(sigs & {"tcp", "drops"})  # http: a raw tracepoint and uprobes, no tracefs
    state = _tracefs_state() if traced else "readable"
    if state == "absent":
        add("CAP_SYS_ADMIN", f"mount tracefs, which this host has not mounted "
                             f"({', '.join(traced)})")
    elif state == "unreadable":
        add("CAP_DAC_READ_SEARCH", f"read tracepoint ids from tracefs, which is root-only, "
                                   f"as a non-root user ({', '.join(traced)})")
    return need


def degraded(cfg: AgentConfig, have: set[str] | None = None) -> dict[str, list[str]]:
    """Capabilities the agent runs without, but then sees less: -> what goes missing."""
    have = effective() if have is None else have
    out: dict[str, list[str]] = {}
    if "CAP_SYS_PTRACE" in have:
        return out
    sigs = set(cfg.signals)
    if sigs and getattr(cfg, "attribution", "none") != "none":
        out.setdefault("CAP_SYS_PTRACE", []).append(
            "workload attribution cannot read /proc/PID/ns/net of other users' processes, "
            "so their pods and containers go unattributed")
    if "http" in sigs and getattr(cfg, "http_tls", False):
        out.setdefault("CAP_SYS_PTRACE", []).append(
            "http cannot find TLS libraries of other users' processes (containers) "
            "through /proc/PID/root")
    return out


def warn_degraded(cfg: AgentConfig, log: logging.Logger,
                  have: set[str] | None = None) -> dict[str, list[str]]:
    """One warning line per capability :func:`degraded` finds missing."""
    out = degraded(cfg, have)
    for cap, why in out.items():
        log.warning("%s missing: %s (grant it, or --attribution none%s to run without "
                    "these)", cap, "; ".join(why), ", --no-http-tls" if "http" in
                    set(cfg.signals) else "")
    return out


def missing(cfg: AgentConfig, have: set[str] | None = None) -> dict[str, list[str]]:
    have = effective() if have is None else have
    out = {}
    for cap, why in required(cfg).items():
        covered = cap in have or (cap in ("CAP_BPF", "CAP_PERFMON") and "CAP_SYS_ADMIN" in have)
        if not covered:
            out[cap] = why
    return out


def check(cfg: AgentConfig, have: set[str] | None = None) -> None:
    """Raise :class:`MissingCapabilities` naming every capability missing for ``cfg``."""
    gone = missing(cfg, have)
    if not gone:
        return
    parts = [f"{cap} ({'; '.join(why)})" for cap, why in gone.items()]
    raise MissingCapabilities(
        "missing capabilities: " + ", ".join(parts) + ". Run as root, or grant them "
        "(systemd AmbientCapabilities=, Kubernetes securityContext.capabilities.add, "
        "setcap on the interpreter); CAP_SYS_ADMIN is needed only where named.")


def stats_allowed(have: set[str] | None = None) -> bool:
    """Whether the kernel will turn on BPF run-time statistics for us."""
    return "CAP_SYS_ADMIN" in (effective() if have is None else have)
