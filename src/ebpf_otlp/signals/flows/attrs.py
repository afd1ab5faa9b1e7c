"""Flow series -> OpenTelemetry attributes.

Each attribute column is made unique first (``np.unique``), so text
conversion and protobuf encoding run once per distinct value, not once per
series: 100,000 flows between a few hosts cost a few hundred conversions.
"""

from __future__ import annotations

import socket
from typing import Callable, Iterable

import numpy as np

from ...otlp import sums as pb
from .agg import APPLIES_IP, APPLIES_PORTS, APPLIES_TCP_FLAGS, group_rows

TRANSPORTS = {1: "icmp", 58: "icmp", 6: "tcp", 17: "udp", 132: "sctp", 136: "udplite",
              2: "igmp", 4: "ipip", 41: "ipv6", 47: "gre", 50: "esp", 51: "ah", 33: "dccp",
              89: "ospf", 103: "pim", 112: "vrrp", 115: "l2tp"}
ETHERTYPES = {0x0800: "ipv4", 0x86DD: "ipv6", 0x0806: "arp", 0x8035: "rarp", 0x88CC: "lldp",
              0x8100: "vlan", 0x88A8: "qinq", 0x8847: "mpls", 0x8848: "mpls", 0x8863: "pppoe",
              0x8864: "pppoe", 0x888E: "eapol", 0x88F7: "ptp"}
DIRECTIONS = {0: "receive", 1: "transmit"}
TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")
_V4_PREFIX = bytes(10) + b"\xff\xff"


def address_text(raw: bytes) -> str:
    """16 key bytes -> ``10.0.0.1`` (IPv4-mapped) or ``fd00::1``."""
    if raw[:12] == _V4_PREFIX:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def network_type(ethertype: int) -> str:
    """``ipv4``/``ipv6``, a name for other common EtherTypes, else ``0x88b5``."""
    if ethertype in ETHERTYPES:
        return ETHERTYPES[ethertype]
    if 0 < ethertype < 0x0600:
        return "802.3"  # a length field: LLC/SNAP frames (STP ...)
    return f"0x{ethertype:04x}"


def transport(proto: int) -> str:
    return TRANSPORTS.get(proto, str(proto))


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


# Encoded attribute per (encoder, attribute, raw value), kept across intervals:
# the same hosts and ports come back every interval. Cleared when it grows
# past _CACHE_MAX entries, so memory stays bounded.
_CACHE: dict[tuple, object] = {}
_CACHE_MAX = 1 << 20


def _per_column(series: np.ndarray, kept: Iterable[str], ifnames: dict[int, str],
                encode: Callable[[str, object], object]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each kept attribute: (per-row encoded values as an object array, applies-mask)."""
    out = []
    kept = set(kept)
    if len(_CACHE) > _CACHE_MAX:
        _CACHE.clear()
    for name, col, conv, mask in _columns(series, ifnames):
        if name not in kept or not mask.any():
            continue
        uniq, inv = _unique_rows(col)
        enc = np.empty(len(uniq), object)
        vals = []
        for u in uniq:
            raw = u.tobytes() if col.ndim == 2 else int(u)
            ck = (encode, name, raw)
            e = _CACHE.get(ck)
            if e is None:
                e = _CACHE[ck] = encode(name, conv(u))
            vals.append(e)
        enc[:] = vals
        out.append((enc[inv], mask))
    return out


def encoded(series: np.ndarray, kept: Iterable[str], ifnames: dict[int, str]) -> list[bytes]:
    """Per series, its attributes as encoded ``NumberDataPoint.attributes`` fields."""
    cols = _per_column(series, kept, ifnames, pb.point_attribute)
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
    """Per series, its attributes as a dict (for the SDK path and tests)."""
    cols = _per_column(series, kept, ifnames, lambda name, v: (name, v))
    out = [dict() for _ in range(len(series))]
    for enc, mask in cols:
        for i in np.flatnonzero(mask):
            k, v = enc[i]
            out[i][k] = v
    return out
