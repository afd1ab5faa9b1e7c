"""Per-batch aggregation helpers of the TCP signal (pure numpy, no kernel, no SDK).

A ring batch is grouped once by the attributes it exports
(:meth:`records.AttributeMapper.groups`); values are then split per group
with one sort, and counter totals are summed per group with
``np.bincount``. Sums wait in :class:`Sums` until the export thread hands
them to the SDK: one ``add`` per series per interval, whatever the rate.
"""

from __future__ import annotations

import threading

import numpy as np

from ..batch import split  # noqa: F401 (re-exported for the signal)
from .records import F_RST_RX

# error.type of failed handshakes, by code (see records.failure_cause)
CAUSES = ("refused", "timeout", "reset", "other")
_ECONNREFUSED, _ETIMEDOUT, _ECONNRESET = 111, 110, 104


def failure_causes(err: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Index into :data:`CAUSES` per record; the vector form of ``failure_cause``."""
    out = np.full(len(err), 3, np.uint8)
    out[err == _ECONNRESET] = 2
    out[err == _ETIMEDOUT] = 1
    out[((flags & F_RST_RX) != 0) | (err == _ECONNREFUSED)] = 0
    return out


class Sums:
    """Counter totals per (series key) gathered over an interval, thread-safe.

    ``add`` takes one batch's per-group totals; ``take`` returns and resets
    everything (attributes, total) for one SDK ``add`` each.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vals: dict[object, list] = {}

    def add(self, keys: list, attrs: list[dict], totals: list[int]) -> None:
        with self._lock:
            vals = self._vals
            for k, a, t in zip(keys, attrs, totals):
                if not t:
                    continue
                cur = vals.get(k)
                if cur is None:
                    vals[k] = [a, t]
                else:
                    cur[1] += t

    def take(self) -> list[tuple[dict, int]]:
        with self._lock:
            vals, self._vals = self._vals, {}
        return [(a, t) for a, t in vals.values()]
