"""Flow table arithmetic in numpy: fold per-CPU slots, project flow keys onto
the attributes the user keeps, aggregate over the dropped ones, and keep the
per-series state that delta and cumulative export need.

Python never loops over packets, and over series only to turn a distinct
attribute value into text once (see :mod:`ebpf_otlp.signals.flows.attrs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...platform.layout import constant, record_dtype

if TYPE_CHECKING:
    from ...platform.maps import Map

KEY_DT = record_dtype("flows", "flow_key")
VAL_DT = record_dtype("flows", "flow_value")
OVF_KEY_DT = record_dtype("flows", "flow_ovf_key")
OVF_VAL_DT = record_dtype("flows", "flow_ovf_value")
FRONT_DT = record_dtype("flows", "flow_front")
FRONT_SLOTS = constant("flows", "FLOWS_FRONT_SLOTS")
# Protocols whose flows have ports: TCP, UDP, SCTP, UDP-Lite.
PORT_PROTOS = (6, 17, 132, 136)
# counters kept per series, in this column order
COLUMNS = ("packets", "bytes", "segments")

# The identity of an exported series: the flow key with the dropped
# attributes zeroed, plus the TCP flags when `network.tcp.flags` is kept.
SERIES_DT = np.dtype({
    "names": ["key", "tcp_flags", "pad"],
    "formats": [KEY_DT, "<u2", ("u1", (6,))],
    "offsets": [0, KEY_DT.itemsize, KEY_DT.itemsize + 2],
    "itemsize": KEY_DT.itemsize + 8,
})

# Which key fields each attribute needs; a field no kept attribute needs is zeroed.
_ATTR_FIELDS = {
    "source.address": ("saddr",),
    "destination.address": ("daddr",),
    "source.port": ("sport",),
    "destination.port": ("dport",),
    "network.transport": ("proto",),
    "network.type": ("ethertype",),
    "network.interface.name": ("ifindex",),
    "network.io.direction": ("direction",),
}
# Presence bits in a projected series' l3 field (see project()).
APPLIES_IP, APPLIES_PORTS, APPLIES_TCP_FLAGS = 1, 2, 4


@dataclass
class Drained:
    """One drain, per-CPU slots folded: one row per kernel flow."""

    keys: np.ndarray        # (n,) KEY_DT
    counts: np.ndarray      # (n, 3) uint64: packets, bytes, segments
    tcp_flags: np.ndarray   # (n,) uint16, OR over CPUs
    first_ns: np.ndarray    # (n,) uint64 monotonic, min over CPUs that saw the flow

    def __len__(self) -> int:
        return len(self.keys)


def drain_front(front: Map, table: int) -> tuple[np.ndarray, np.ndarray]:
    """Take the per-CPU front slots of table ``table`` (0 or 1) out of the
    ``flows_front`` array and zero them: (keys, values) as uint8 rows, in the
    layout ``Map.drain()`` gives for the shared table (one value per key).
    Call only while the programs write the other table."""
    stride = (FRONT_DT.itemsize + 7) & ~7
    zero = bytes(front.value_stride)
    rows = []
    for slot in range(table * FRONT_SLOTS, (table + 1) * FRONT_SLOTS):
        raw = front.lookup(slot)
        if raw is None:
            continue
        per_cpu = np.frombuffer(raw, np.uint8).reshape(front.ncpus, stride)[:, :FRONT_DT.itemsize]
        f = np.ascontiguousarray(per_cpu).view(FRONT_DT).reshape(front.ncpus)
        used = f[f["value"]["packets"] > 0]
        if len(used):
            rows.append(used)
            front.update(slot, zero)
    if not rows:
        return np.zeros((0, KEY_DT.itemsize), np.uint8), np.zeros((0, VAL_DT.itemsize), np.uint8)
    got = np.concatenate(rows)
    keys = np.ascontiguousarray(got["key"]).view(np.uint8).reshape(len(got), KEY_DT.itemsize)
    vals = np.ascontiguousarray(got["value"]).view(np.uint8).reshape(len(got), VAL_DT.itemsize)
    return keys, vals


def fold(keys_u8: np.ndarray, vals_u8: np.ndarray, ncpus: int) -> Drained:
    """Turn ``Map.drain()`` output of a per-CPU flow table into one row per flow."""
    n = len(keys_u8)
    keys = np.ascontiguousarray(keys_u8).view(KEY_DT).reshape(n)
    stride = (VAL_DT.itemsize + 7) & ~7
    raw = np.ascontiguousarray(vals_u8).reshape(n, ncpus, stride)[:, :, :VAL_DT.itemsize]
    vals = np.ascontiguousarray(raw).view(VAL_DT).reshape(n, ncpus)
    counts = np.stack([vals[c].sum(axis=1, dtype=np.uint64) for c in COLUMNS], axis=1)
    first = vals["first_ns"]
    first_min = np.where(first > 0, first, np.iinfo(np.uint64).max).min(axis=1)
    first_min[first_min == np.iinfo(np.uint64).max] = 0
    return Drained(keys=keys, counts=counts.reshape(n, 3),
                   tcp_flags=np.bitwise_or.reduce(vals["tcp_flags"], axis=1).astype(np.uint16),
                   first_ns=first_min)


def project(d: Drained, kept: tuple[str, ...] | set[str]) -> np.ndarray:
    """The series identity of each row: the key with the fields no kept attribute uses zeroed."""
    out = np.zeros(len(d), SERIES_DT)
    out["key"] = d.keys
    needed = {f for a in kept for f in _ATTR_FIELDS.get(a, ())}
    k = out["key"]
    # Which attributes a series carries must follow from its identity alone, or
    # two series could export the same attribute set: in the series, l3 holds
    # presence bits (APPLIES_*) for the attribute groups that are kept.
    kept = set(kept)
    ip = k["l3"] == 1
    bits = np.zeros(len(out), np.uint8)
    if kept & {"source.address", "destination.address", "network.transport"}:
        bits |= np.where(ip, APPLIES_IP, 0).astype(np.uint8)
    if kept & {"source.port", "destination.port"}:
        with_ports = ip & np.isin(k["proto"], list(PORT_PROTOS))
        bits |= np.where(with_ports, APPLIES_PORTS, 0).astype(np.uint8)
    if "network.tcp.flags" in kept:
        bits |= np.where(ip & (k["proto"] == 6), APPLIES_TCP_FLAGS, 0).astype(np.uint8)
    k["l3"] = bits
    for field in KEY_DT.names:
        # l3 carries the presence bits
        if field not in needed and field not in ("l3", "pad"):
            k[field] = 0
    if "network.tcp.flags" in kept:
        out["tcp_flags"] = d.tcp_flags
    return out


def group_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group equal rows of a (n, w) uint8 array, w a multiple of 8.

    Returns (index of one row per group, group of each row). Rows are hashed
    to one uint64 (sorting integers is far cheaper than sorting byte
    strings); a collision is detected by comparing every row with its
    group's representative, and then the exact byte-wise grouping is used.
    """
    n = len(rows)
    if n == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    words = np.ascontiguousarray(rows).view("<u8")
    h = np.full(n, 0x9E3779B97F4A7C15, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):
            h ^= words[:, j]
            h *= np.uint64(0xFF51AFD7ED558CCD)
            h ^= h >> np.uint64(33)
    _, first, inv = np.unique(h, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    if not np.array_equal(words, words[first[inv]]):  # a hash collision: exact path
        flat = np.ascontiguousarray(rows).view(f"V{rows.shape[1]}").reshape(-1)
        _, first, inv = np.unique(flat, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
    return first, inv


def sum_groups(inv: np.ndarray, ngroups: int, counts: np.ndarray) -> np.ndarray:
    """Exact uint64 sums of ``counts`` rows per group."""
    if ngroups == len(inv):  # nothing to merge
        out = np.empty((ngroups, counts.shape[1]), np.uint64)
        out[inv] = counts
        return out
    order = np.argsort(inv, kind="stable")
    sorted_inv = inv[order]
    starts = np.flatnonzero(np.r_[True, sorted_inv[1:] != sorted_inv[:-1]])
    return np.add.reduceat(counts[order], starts, axis=0).astype(np.uint64)


def _series_rows(series: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(series).view(np.uint8).reshape(len(series), SERIES_DT.itemsize)


def aggregate(series: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``counts`` over rows with equal ``series``: (unique series, summed counts)."""
    if len(series) == 0:
        return series[:0].copy(), np.zeros((0, 3), np.uint64)
    first, inv = group_rows(_series_rows(series))
    return series[first], sum_groups(inv, len(first), counts)


class SeriesStore:
    """Series waiting to be exported (delta) or running totals (cumulative).

    Delta: rows are deltas not yet exported; a failed export keeps them for
    the next attempt, merged with new data, so a short collector outage
    loses nothing. Cumulative: rows are totals since ``start_ns`` and are
    exported every interval; they never go down.

    At most ``cap`` rows: beyond that the rows updated longest ago go first
    and are counted (``evicted`` series, ``dropped`` counts for delta).
    """

    def __init__(self, cumulative: bool, cap: int):
        self.cumulative = cumulative
        self.cap = max(1, cap)
        self.series = np.zeros(0, SERIES_DT)
        self.counts = np.zeros((0, 3), np.uint64)
        self.start_ns = np.zeros(0, np.uint64)
        self.touched = np.zeros(0, np.int64)
        self.generation = 0
        self.evicted_series = 0
        self.dropped_points = 0
        self.dropped_counts = np.zeros(3, np.uint64)

    def __len__(self) -> int:
        return len(self.series)

    def merge(self, series: np.ndarray, counts: np.ndarray, start_ns: int) -> None:
        """Add one interval's aggregated rows; ``start_ns`` is when that interval began."""
        self.generation += 1
        if len(series) == 0:
            return
        counts = counts.astype(np.uint64)
        m = len(self.series)
        if m == 0:
            self.series, self.counts = series.copy(), counts.copy()
            self.start_ns = np.full(len(series), start_ns, np.uint64)
            self.touched = np.full(len(series), self.generation, np.int64)
            self._bound()
            return
        allk = np.concatenate([self.series, series])
        first, inv = group_rows(_series_rows(allk))
        g = len(first)
        sums = sum_groups(inv, g, np.concatenate([self.counts, counts]))
        start = np.full(g, start_ns, np.uint64)
        touched = np.full(g, self.generation, np.int64)
        start[inv[:m]] = self.start_ns  # rows already known keep their start
        touched[inv[:m]] = self.touched
        touched[inv[m:]] = self.generation
        self.series, self.counts, self.start_ns, self.touched = allk[first], sums, start, touched
        self._bound()

    def _bound(self) -> None:
        extra = len(self.series) - self.cap
        if extra <= 0:
            return
        victims = np.argsort(self.touched, kind="stable")[:extra]
        keep = np.ones(len(self.series), bool)
        keep[victims] = False
        self.evicted_series += extra
        if not self.cumulative:
            self.dropped_points += extra
            self.dropped_counts += self.counts[victims].sum(axis=0, dtype=np.uint64)
        self.series, self.counts = self.series[keep], self.counts[keep]
        self.start_ns, self.touched = self.start_ns[keep], self.touched[keep]

    def exported(self, delivered: np.ndarray | None = None) -> None:
        """Rows were delivered (all, or where ``delivered`` is True): delta forgets
        them and keeps the rest pending, cumulative keeps every total."""
        if self.cumulative:
            return
        keep = (np.zeros(len(self.series), bool) if delivered is None
                else ~np.asarray(delivered, bool))
        self.series, self.counts = self.series[keep], self.counts[keep]
        self.start_ns, self.touched = self.start_ns[keep], self.touched[keep]
