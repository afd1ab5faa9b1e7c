"""The TCP signal's in-kernel counters, drained once per interval.

Programs add to one of two tables (``bpf/tcp.bpf.c``: ``counters_a``,
``counters_b``); the signal flips them and drains the idle one with
lookup-and-delete, so each drained value is the delta of one interval and
no increment races a delete. Values are u64 with wrap-around: the
``active`` gauge's -1 arrives as 2**64 - 1, so deltas are read as int64.
"""

from __future__ import annotations

import numpy as np

from ...platform.layout import constant
from .records import CKEY

CNT_RETRANS = constant("tcp", "TCP_CNT_RETRANS_SEGS")
CNT_RESET_TX = constant("tcp", "TCP_CNT_RESET_TX")
CNT_RESET_RX = constant("tcp", "TCP_CNT_RESET_RX")
CNT_OPENED = constant("tcp", "TCP_CNT_OPENED")
CNT_ACTIVE = constant("tcp", "TCP_CNT_ACTIVE")
KINDS = (CNT_RETRANS, CNT_RESET_TX, CNT_RESET_RX, CNT_OPENED, CNT_ACTIVE)
_KIND_OFF = CKEY.fields["kind"][1]


def fold(keys: np.ndarray, vals: np.ndarray) -> list[tuple[bytes, int, int]]:
    """(key bytes with ``kind`` zeroed, kind, delta) per drained entry, summed
    over entries that differ only in padding. Zero deltas are left out except
    for the ``active`` gauge, where they say the series exists (opened and
    closed within the interval).

    ``keys`` is (n, CKEY.itemsize) uint8, ``vals`` (n, stride) uint8 whose
    first 8 bytes are the value.
    """
    n = len(keys)
    if not n:
        return []
    keys = np.ascontiguousarray(keys[:, :CKEY.itemsize]).copy()
    kinds = keys[:, _KIND_OFF].astype(np.int64)
    keys[:, _KIND_OFF] = 0
    pad_dt, pad_off = CKEY.fields["pad"][:2]
    keys[:, pad_off:pad_off + pad_dt.itemsize] = 0  # only the padding: fields follow it
    delta = np.ascontiguousarray(vals[:, :8]).view("<i8").reshape(n)
    rows = np.concatenate([keys, kinds.astype(np.uint8).reshape(n, 1)], axis=1)
    uniq, inv = np.unique(rows.view(np.dtype((np.void, rows.shape[1]))).ravel(),
                          return_inverse=True)
    sums = np.zeros(len(uniq), np.int64)
    np.add.at(sums, inv.reshape(-1), delta)
    out = []
    for row, d in zip(uniq.tolist(), sums.tolist()):
        b = bytes(row)
        if d or b[-1] == CNT_ACTIVE:
            out.append((b[:-1], b[-1], int(d)))
    return out
