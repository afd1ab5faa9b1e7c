"""Two kernel tables written alternately, for exact drains.

A batch lookup-and-delete races with programs updating the same entry: an
increment between the copy and the delete is lost. So programs write the
table a ``.bss`` index selects; once per interval user space flips the index,
waits for programs already running (they run for microseconds, under RCU) and
drains the table nobody writes any more.
"""

from __future__ import annotations

import time

from .bpfobj import BpfObject
from .maps import Map

GRACE_S = 0.01


class AlternatingTables:
    def __init__(self, obj: BpfObject, index_var: str, names: tuple[str, str],
                 grace_s: float = GRACE_S):
        self.obj = obj
        self.index_var = index_var
        self.names = names
        self.grace_s = grace_s
        self.active = 0

    def set_max_entries(self, n: int) -> None:
        """Size both tables (before load)."""
        for name in self.names:
            self.obj.set_max_entries(name, n)

    def swap(self) -> Map:
        """Point the programs at the other table; return the one now idle."""
        idle = self.active
        self.active ^= 1
        self.obj.bss[self.index_var] = self.active
        time.sleep(self.grace_s)
        return self.obj.maps[self.names[idle]]

    def both(self) -> list[Map]:
        """Both tables, the idle one first (for the last drain, after detaching)."""
        return [self.obj.maps[self.names[self.active ^ 1]],
                self.obj.maps[self.names[self.active]]]
