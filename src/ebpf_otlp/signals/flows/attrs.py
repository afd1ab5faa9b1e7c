"""Flow series -> OpenTelemetry attributes.

Each attribute column is made unique first (``np.unique``), so text
conversion and protobuf encoding run once per distinct value, not once per
series: 100,000 flows between a few hosts cost a few hundred conversions.
"""

from __future__ import annotations

import socket
from typing import Callable, Iterable

import numpy as np

from ...otlp.semconv import DIRECTIONS, address_text, network_type, transport
from ...otlp.sums import point_attribute
from .agg import APPLIES_IP, APPLIES_PORTS, APPLIES_TCP_FLAGS, group_rows

TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")


def tcp_flags_text(flags: int) -> str:
    return "|".join(n for i, n in enumerate(TCP_FLAG_NAMES) if flags >> i & 1) or "none"


def _columns(series: np.ndarray, ifnames: dict[int, str]
             ) -> list[tuple[str, np.ndarray, Callable[[object], object], np.ndarray]]:
    """(attribute, raw column, value converter, row mask where it applies)."""
    k = series["key"]
    ip = (k["l3"] & APPLIES_IP) != 0  # presence bits, see flows_agg.project
    ports = (k["l3"] & APPLIES_PORTS) != 0
    tcp = (k["l3"] & APPLIES_TCP_FLAGS) != 0
    everywhere = np.ones(len(series), bool)

    def ifname(i: object) -> str:
        i = int(i)
        if i in ifnames:
            return ifnames[i]
        try:
            return socket.if_indextoname(i)
        except OSError:
            return str(i)

    return [
        ("source.address", k["saddr"], lambda v: address_text(bytes(v)), ip),
        ("source.port", k["sport"], int, ports),
        ("destination.address", k["daddr"], lambda v: address_text(bytes(v)), ip),
        ("destination.port", k["dport"], int, ports),
        ("network.transport", k["proto"], lambda v: transport(int(v)), ip),
        ("network.type", k["ethertype"], lambda v: network_type(int(v)), everywhere),
        ("network.interface.name", k["ifindex"], ifname, everywhere),
        ("network.io.direction", k["direction"], lambda v: DIRECTIONS.get(int(v), str(v)),
         everywhere),
        ("network.tcp.flags", series["tcp_flags"], lambda v: tcp_flags_text(int(v)), tcp),
    ]


def _unique_rows(col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(one value per distinct value, index of each row's value)."""
    if col.ndim == 2:  # addresses: (n, 16) bytes
        first, inv = group_rows(col)
        return col[first], inv
    uniq, inv = np.unique(col, return_inverse=True)
    return uniq, inv.reshape(-1)


class _Generations:
    """Encoded attribute per (attribute, raw value), kept while in use: the values
    of the last two exports (the same hosts and ports come back every interval),
    so it holds what the live series hold, not every ephemeral port ever seen.
    A flat cache bounded only by a size filled with ephemeral ports for minutes:
    the flows agent's RSS growth in bench/soak.py."""

    def __init__(self, max_entries: int = 1 << 17):
        self.cur: dict[tuple, bytes] = {}
        self.prev: dict[tuple, bytes] = {}
        self.max_entries = max_entries

    def rotate(self) -> None:
        self.prev, self.cur = self.cur, {}

    def get(self, key: tuple) -> bytes | None:
        v = self.cur.get(key)
        if v is None:
            v = self.prev.get(key)
            if v is not None:
                self.cur[key] = v
        return v

    def put(self, key: tuple, value: bytes) -> None:
        if len(self.cur) >= self.max_entries:  # one export of more distinct values
            self.rotate()
        self.cur[key] = value

    def __len__(self) -> int:
        return len(self.cur) + len(self.prev)


_ENCODED = _Generations()


def _per_column(series: np.ndarray, kept: Iterable[str], ifnames: dict[int, str],
                encode: Callable[[str, object], object],
                cache: _Generations | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each kept attribute: (per-row encoded values as an object array, applies-mask)."""
    out = []
    kept = set(kept)
    for name, col, conv, mask in _columns(series, ifnames):
        if name not in kept or not mask.any():
            continue
        uniq, inv = _unique_rows(col)
        enc = np.empty(len(uniq), object)
        vals = []
        for u in uniq:
            if cache is None:
                vals.append(encode(name, conv(u)))
                continue
            raw = u.tobytes() if col.ndim == 2 else int(u)
            # an interface's name may change under the same index (rename, reuse)
            ck = (name, raw, ifnames.get(raw)) if name == "network.interface.name" else (
                name, raw)
            e = cache.get(ck)
            if e is None:
                e = encode(name, conv(u))
                cache.put(ck, e)
            vals.append(e)
        enc[:] = vals
        out.append((enc[inv], mask))
    return out


def encoded(series: np.ndarray, kept: Iterable[str], ifnames: dict[int, str]) -> list[bytes]:
    """Per series, its attributes as encoded ``NumberDataPoint.attributes`` fields
    (one call per export: values unused in two exports leave the cache)."""
    _ENCODED.rotate()
    cols = _per_column(series, kept, ifnames, point_attribute, _ENCODED)
    if not cols:
        return [b""] * len(series)
    parts = []
    for enc, mask in cols:
        if not mask.all():
            enc = enc.copy()
            enc[~mask] = b""
        parts.append(enc)
    return [b"".join(t) for t in zip(*parts)]


def dicts(series: np.ndarray, kept: Iterable[str], ifnames: dict[int, str]) -> list[dict]:
    """Per series, its attributes as a dict (tests and the live views)."""
    cols = _per_column(series, kept, ifnames, lambda name, v: (name, v))
    out = [dict() for _ in range(len(series))]
    for enc, mask in cols:
        for i in np.flatnonzero(mask):
            k, v = enc[i]
            out[i][k] = v
    return out
