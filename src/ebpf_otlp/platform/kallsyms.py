"""Kernel text addresses to function names, from ``/proc/kallsyms``.

Drop locations are few (the kernel has a few hundred drop sites), so
addresses are resolved lazily: every address not yet known is looked up in
one scan of the file, and the answers are cached (bounded).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterable

import numpy as np

log = logging.getLogger(__name__)

KALLSYMS = "/proc/kallsyms"
TEXT_TYPES = (b"t", b"T", b"w", b"W")


def hex_address(addr: int) -> str:
    return f"0x{addr:x}"


class KernelSymbols:
    """Resolve addresses to the kernel function that contains them.

    Falls back to the hexadecimal address when kallsyms is unreadable or
    hides addresses (``kptr_restrict``), or when no symbol covers one.
    """

    def __init__(self, path: str = KALLSYMS, max_cache: int = 4096):
        self.path = path
        self.max_cache = max_cache
        self._cache: OrderedDict[int, str] = OrderedDict()
        self.readable = True
        self.scans = 0

    def _scan(self) -> tuple[np.ndarray, list[bytes]] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            log.warning("cannot read %s (%s): drop locations stay addresses", self.path, e)
            self.readable = False
            return None
        addrs, names = [], []
        for line in data.split(b"\n"):
            parts = line.split(None, 3)
            if len(parts) < 3 or parts[1] not in TEXT_TYPES:
                continue
            try:
                addrs.append(int(parts[0], 16))
            except ValueError:
                continue
            names.append(parts[2])
        self.scans += 1
        arr = np.array(addrs, dtype=np.uint64)
        if not arr.size or not arr.any():  # kptr_restrict shows every address as 0
            log.warning("%s hides addresses: drop locations stay addresses", self.path)
            self.readable = False
            return None
        return arr, names

    def resolve(self, addrs: Iterable[int]) -> None:
        """Make sure every address in ``addrs`` is cached (one scan at most)."""
        todo = sorted({int(a) for a in addrs if a and int(a) not in self._cache})
        if not todo:
            return
        table = self._scan() if self.readable else None
        for addr in todo:
            name = hex_address(addr)
            if table is not None:
                arr, names = table
                below = np.where(arr <= np.uint64(addr), arr, np.uint64(0))
                i = int(below.argmax())
                if below[i]:
                    name = names[i].decode(errors="replace")
            self._remember(addr, name)

    def _remember(self, addr: int, name: str) -> None:
        self._cache[addr] = name
        while len(self._cache) > self.max_cache:
            self._cache.popitem(last=False)

    def name(self, addr: int) -> str:
        """The function containing ``addr`` (after :meth:`resolve`), else its hex form."""
        addr = int(addr)
        name = self._cache.get(addr)
        if name is None:
            return hex_address(addr)
        self._cache.move_to_end(addr)
        return name
