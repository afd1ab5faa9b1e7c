"""Network interfaces of this namespace by name, and ``--iface`` globs.

``veth*``, ``cali*``, ``lxc*``: container interfaces come and go, so a
pattern is matched again and again (:class:`InterfaceWatcher`); a plain name
must exist when the agent starts. An interface deleted and created again
under the same name comes back with a new index: the watcher reports it as
changed, so it is attached again.
"""

from __future__ import annotations

import fnmatch
import os

SYS_NET = "/sys/class/net"


def is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def interfaces(sys_net: str = SYS_NET) -> dict[str, int]:
    """name -> ifindex of every interface of this network namespace."""
    out = {}
    try:
        names = os.listdir(sys_net)
    except OSError:
        return out
    for name in names:
        try:
            with open(f"{sys_net}/{name}/ifindex") as f:
                out[name] = int(f.read())
        except (OSError, ValueError):
            continue  # gone between the listing and the read
    return out


def match(patterns: list[str], present: dict[str, int]) -> dict[str, int]:
    """The present interfaces that a name or glob of ``patterns`` selects."""
    return {n: i for n, i in present.items()
            if any(n == p or (is_pattern(p) and fnmatch.fnmatchcase(n, p)) for p in patterns)}


class InterfaceWatcher:
    """Reports interfaces that started matching, came back with a new index, or left."""

    def __init__(self, patterns: list[str], sys_net: str = SYS_NET):
        self.patterns = list(patterns)
        self.sys_net = sys_net
        self.known: dict[str, int] = {}

    def poll(self) -> tuple[dict[str, int], dict[str, int]]:
        """(name -> ifindex of new or re-created interfaces, name -> old ifindex of gone ones)."""
        now = match(self.patterns, interfaces(self.sys_net))
        added = {n: i for n, i in now.items() if self.known.get(n) != i}
        gone = {n: i for n, i in self.known.items() if n not in now}
        self.known = now
        return added, gone
