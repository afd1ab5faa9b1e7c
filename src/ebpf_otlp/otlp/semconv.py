"""Semantic-convention values shared by every signal: one table each, so the
same protocol, address or direction reads the same in flows, drops, TCP and DNS."""

from __future__ import annotations

import socket

SCOPE = "ebpf_otlp"

# Semantic-convention advice for durations in seconds, extended below 5 ms
# because RTTs and handshakes on a LAN live there.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075,
                    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

# IANA protocol numbers -> `network.transport`; others keep their number as text.
TRANSPORTS = {1: "icmp", 58: "icmp", 6: "tcp", 17: "udp", 132: "sctp", 136: "udplite",
              2: "igmp", 4: "ipip", 41: "ipv6", 47: "gre", 50: "esp", 51: "ah", 33: "dccp",
              89: "ospf", 103: "pim", 112: "vrrp", 115: "l2tp"}
# Protocols whose first four L4 bytes are source and destination ports.
PORT_PROTOS = frozenset((6, 17, 132, 136))
ETHERTYPES = {0x0800: "ipv4", 0x86DD: "ipv6", 0x0806: "arp", 0x8035: "rarp", 0x88CC: "lldp",
              0x8100: "vlan", 0x88A8: "qinq", 0x8847: "mpls", 0x8848: "mpls", 0x8863: "pppoe",
              0x8864: "pppoe", 0x888E: "eapol", 0x88F7: "ptp"}
FAMILIES = {4: "ipv4", 6: "ipv6", socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
DIRECTIONS = {0: "receive", 1: "transmit"}
_V4_PREFIX = bytes(10) + b"\xff\xff"


def transport(proto: int) -> str:
    return TRANSPORTS.get(proto, str(proto))


def network_type(ethertype: int) -> str:
    """``ipv4``/``ipv6``, a name for other common EtherTypes, else ``0x88b5``."""
    if ethertype in ETHERTYPES:
        return ETHERTYPES[ethertype]
    if 0 < ethertype < 0x0600:
        return "802.3"  # a length field: LLC/SNAP frames (STP ...)
    return f"0x{ethertype:04x}"


def address_text(raw: bytes) -> str:
    """A 16-byte record address as text: ``10.0.0.1`` (IPv4-mapped, the one
    convention of every record header, bpf/pkt.bpf.h) or ``fd00::1``."""
    if raw[:12] == _V4_PREFIX:
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, raw)


def address_type(raw: bytes) -> str:
    """``network.type`` of a 16-byte (IPv4-mapped or IPv6) address."""
    return "ipv4" if raw[:12] == _V4_PREFIX else "ipv6"


class AddressCache:
    """Text form of addresses, cached and bounded: the same peers repeat."""

    def __init__(self, size: int = 65536):
        self.size = size
        self._cache: dict[bytes, str] = {}
        self.evictions = 0

    def text(self, raw: bytes) -> str:
        key = raw
        s = self._cache.get(key)
        if s is None:
            s = address_text(raw)
            if len(self._cache) >= self.size:
                self.evictions += len(self._cache)
                self._cache.clear()
            self._cache[key] = s
        return s
