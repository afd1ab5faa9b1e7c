"""Decoding of the TCP signal's kernel records into OpenTelemetry attributes.

Everything here is pure (no kernel, no SDK) so it is unit-tested on crafted
arrays. The record layouts come from ``bpf/tcp.h``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

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
_V4_MAPPED = np.frombuffer(b"\0" * 10 + b"\xff\xff", np.uint8)  # IPv4 as the tracepoints store it


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
        self._rows: dict[tuple[bytes, bool], dict] = {}
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
               ) -> tuple[np.ndarray, list[dict], list[int], list[bytes]]:
        """Group records by the attributes they export.

        Returns ``inverse`` (group index per record), one attribute dict per
        group, the group's ``extra`` byte (e.g. a failure cause) and the
        group's key bytes (stable across batches). Only the columns the user
        keeps take part, so records that differ elsewhere share a group; one
        dict per group (cached), not per record.
        """
        n = len(recs)
        keep = self.keep
        proc = process and bool(keep & {"process.pid", "process.executable.name"})

        def col(name: str, width: int) -> np.ndarray:
            return np.ascontiguousarray(recs[name]).view(np.uint8).reshape(n, width)

        saddr = col("saddr", 16)
        cols = [recs["role"].astype(np.uint8).reshape(n, 1),
                (extra.astype(np.uint8).reshape(n, 1) if extra is not None
                 else np.zeros((n, 1), np.uint8))]
        if "server.address" in keep:
            cols.append(saddr)
        else:  # only network.type: v4-mapped or not
            cols.append((saddr[:, :12] == _V4_MAPPED).all(
                axis=1).astype(np.uint8).reshape(n, 1))
        if "client.address" in keep:
            cols.append(col("caddr", 16))
        if "server.port" in keep:
            cols.append(col("sport", 2))
        if "client.port" in keep:
            cols.append(col("cport", 2))
        if proc:
            cols.append(col("pid", 4))
            if "process.executable.name" in keep:
                cols.append(col("comm", 16))
        if self.resource is not None:  # one group per socket cgroup and namespace too
            cols.append(col("cgroup_id", 8))
            cols.append(col("netns", 4))
        mat = np.concatenate(cols, axis=1)
        rows, first, inverse = np.unique(mat.view(np.dtype((np.void, mat.shape[1]))).ravel(),
                                         return_index=True, return_inverse=True)
        attrs, extras, keys = [], [], []
        for row, i in zip(rows.tolist(), first.tolist()):
            b = bytes(row)
            attrs.append(self._from_row(b, recs[i], proc))
            extras.append(b[1])
            keys.append(b)
        return inverse.reshape(-1), attrs, extras, keys

    def _from_row(self, row: bytes, rec: np.void, proc: bool) -> dict:
        """The attributes of group ``row``, from ``rec``, its first record (which
        carries every value; cached: once per group)."""
        key = (row, proc)
        hit = self._rows.get(key)
        if hit is not None:
            return hit
        a = dict(self.base(int(rec["role"]), rec["saddr"].tobytes(), rec["caddr"].tobytes(),
                           int(rec["sport"]), int(rec["cport"])))
        pid = int(rec["pid"]) if proc else 0
        if pid and "process.pid" in self.keep:
            a["process.pid"] = pid
        if pid and "process.executable.name" in self.keep:
            a["process.executable.name"] = comm(rec["comm"].tobytes())
        if self.resource is not None:
            a.update(self.resource(int(rec["cgroup_id"]), int(rec["netns"])))
        if len(self._rows) >= 65536:  # bounded: addresses churn
            self._rows.clear()
        self._rows[key] = a
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
