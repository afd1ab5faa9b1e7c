"""Decoding of the TCP signal's kernel records into OpenTelemetry attributes.

Everything here is pure (no kernel, no SDK) so it is unit-tested on crafted
arrays. The record layouts come from ``bpf/tcp.h``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from ...otlp.semconv import address_text, address_type
from ...platform.layout import constant, record_dtype

EVENT = record_dtype("tcp", "tcp_event")
CKEY = record_dtype("tcp", "tcp_ckey")

EV_OPEN = constant("tcp", "TCP_EV_OPEN")
EV_CLOSE = constant("tcp", "TCP_EV_CLOSE")
EV_FAIL = constant("tcp", "TCP_EV_FAIL")
EV_RTT = constant("tcp", "TCP_EV_RTT")

F_TRACKED = constant("tcp", "TCP_F_TRACKED")
F_RST_RX = constant("tcp", "TCP_F_RST_RX")
F_ROLE_GUESSED = constant("tcp", "TCP_F_ROLE_GUESSED")

CNT_RETRANS = constant("tcp", "TCP_CNT_RETRANS_SEGS")
CNT_RESET_TX = constant("tcp", "TCP_CNT_RESET_TX")
CNT_RESET_RX = constant("tcp", "TCP_CNT_RESET_RX")

ROLES = {constant("tcp", "TCP_ROLE_CLIENT"): "client", constant("tcp", "TCP_ROLE_SERVER"): "server"}

# Attributes a connection metric may keep (config.tcp_attributes picks).
CONN_ATTRIBUTES = ("server.address", "server.port", "client.address", "client.port",
                   "process.pid", "process.executable.name")

_ERRNO_CAUSE = {111: "refused", 110: "timeout", 104: "reset"}  # ECONNREFUSED, ETIMEDOUT, ECONNRESET
@functools.lru_cache(maxsize=65536)
def address(raw: bytes) -> tuple[str, str]:
    """(text, network.type) of a 16-byte address; v4-mapped prints as IPv4 (cached:
    the same peers repeat)."""
    return address_text(raw), address_type(raw)


def failure_cause(err: int, flags: int) -> str:
    """``error.type`` of a failed client handshake.

    A reset that answered the SYN means refused, whatever errno the socket
    ended with; otherwise the socket's error decides (ETIMEDOUT when SYN
    retries ran out, ...); a handshake abandoned without error is ``other``.
    """
    if flags & F_RST_RX or err == 111:
        return "refused"
    return _ERRNO_CAUSE.get(err, "other")


def comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class AttributeMapper:
    """Builds attribute tuples from records, keeping what the user chose."""

    def __init__(self, keep: Iterable[str]):
        keep = tuple(keep)
        unknown = set(keep) - set(CONN_ATTRIBUTES)
        if unknown:
            raise ValueError(f"unknown tcp attributes {sorted(unknown)}; "
                             f"choose from {', '.join(CONN_ATTRIBUTES)}")
        self.keep = frozenset(keep)
        self._rows: dict[bytes, dict] = {}
        # (cgroup id, netns inode) -> resource attributes added to every group
        # (signals/attribution.py); None: no attribution
        self.resource: Callable[[int, int], dict] | None = None

    def base(self, role: int, saddr: bytes, caddr: bytes, sport: int, cport: int
             ) -> tuple[tuple[str, object], ...]:
        """Attributes common to every TCP metric point of one connection key."""
        s_text, ntype = address(saddr)
        out: list[tuple[str, object]] = [
            ("network.tcp.handshake.role", ROLES.get(role, "unknown")),
            ("network.transport", "tcp"),
            ("network.type", ntype),
        ]
        if "server.address" in self.keep:
            out.append(("server.address", s_text))
        if "server.port" in self.keep:
            out.append(("server.port", int(sport)))
        if "client.address" in self.keep:
            out.append(("client.address", address(caddr)[0]))
        if "client.port" in self.keep:
            out.append(("client.port", int(cport)))
        return tuple(out)

    def groups(self, recs: np.ndarray, process: bool, extra: np.ndarray | None = None
               ) -> tuple[np.ndarray, list[dict], list[int]]:
        """Group records by the attributes they export.

        Returns ``inverse`` (group index per record), one attribute dict per
        group and the group's ``extra`` byte (e.g. a failure cause). Fields
        the user does not keep are zeroed before grouping, so records that
        differ only there share a group; one dict per group, not per record.
        """
        n = len(recs)
        keep = self.keep
        proc = process and bool(keep & {"process.pid", "process.executable.name"})
        res = self.resource is not None
        z = np.zeros((n, 16), np.uint8)

        def col(name: str, width: int, on: bool) -> np.ndarray:
            if not on:
                return z[:, :width]
            return np.ascontiguousarray(recs[name]).view(np.uint8).reshape(n, width)

        mat = np.concatenate([
            recs["role"].astype(np.uint8).reshape(n, 1),
            col("saddr", 16, True),  # also decides network.type
            col("caddr", 16, "client.address" in keep),
            col("sport", 2, "server.port" in keep),
            col("cport", 2, "client.port" in keep),
            col("pid", 4, proc),
            col("comm", 16, proc and "process.executable.name" in keep),
            col("cgroup_id", 8, res),
            col("netns", 4, res),
            (extra.astype(np.uint8).reshape(n, 1) if extra is not None else z[:, :1]),
        ], axis=1)
        rows, inverse = np.unique(mat.view(np.dtype((np.void, mat.shape[1]))).ravel(),
                                  return_inverse=True)
        attrs, extras = [], []
        for row in rows.tolist():
            a = self._from_row(bytes(row))
            attrs.append(a)
            extras.append(row[-1])
        return inverse.reshape(-1), attrs, extras

    def _from_row(self, row: bytes) -> dict:
        hit = self._rows.get(row)
        if hit is not None:
            return hit
        a = dict(self.base(row[0], row[1:17], row[17:33], int.from_bytes(row[33:35], "little"),
                           int.from_bytes(row[35:37], "little")))
        pid = int.from_bytes(row[37:41], "little")
        if pid and "process.pid" in self.keep:
            a["process.pid"] = pid
        if pid and "process.executable.name" in self.keep:
            a["process.executable.name"] = comm(row[41:57])
        if self.resource is not None:
            a.update(self.resource(int.from_bytes(row[57:65], "little"),
                                   int.from_bytes(row[65:69], "little")))
        if len(self._rows) >= 65536:  # bounded: addresses churn
            self._rows.clear()
        self._rows[row] = a
        return a

    def span(self, rec: np.void) -> dict[str, object]:
        """Every attribute we know, for one connection's span."""
        s_text, ntype = address(rec["saddr"].tobytes())
        attrs: dict[str, object] = {
            "network.tcp.handshake.role": ROLES.get(int(rec["role"]), "unknown"),
            "network.transport": "tcp", "network.type": ntype,
            "server.address": s_text, "server.port": int(rec["sport"]),
            "client.address": address(rec["caddr"].tobytes())[0],
            "client.port": int(rec["cport"]),
        }
        if int(rec["pid"]):
            attrs["process.pid"] = int(rec["pid"])
            attrs["process.executable.name"] = comm(rec["comm"].tobytes())
        return attrs


def counter_deltas(keys: np.ndarray, values: Sequence[int], last: dict[bytes, int]
                   ) -> list[tuple[bytes, int]]:
    """Deltas of cumulative kernel counters since the previous drain.

    ``last`` is updated in place. A value below the last one means the key
    was evicted and re-created: the whole value is new.
    """
    out = []
    for k, v in zip(keys, values):
        kb = k.tobytes()
        v = int(v)
        prev = last.get(kb, 0)
        d = v - prev if v >= prev else v
        last[kb] = v
        if d:
            out.append((kb, d))
    return out
