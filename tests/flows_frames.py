"""Hand-built Ethernet frames for the flows tests (no third-party packet library)."""

from __future__ import annotations

import ipaddress
import struct

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


def eth(ethertype: int, payload: bytes, vlans: tuple[tuple[int, int], ...] = ()) -> bytes:
    """``vlans``: (tpid, vid) outermost first."""
    tags = b"".join(struct.pack("!HH", tpid, vid) for tpid, vid in vlans)
    return MAC_B + MAC_A + tags + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, options: bytes = b"",
         frag_offset: int = 0, more_fragments: bool = False) -> bytes:
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    flags_frag = (0x2000 if more_fragments else 0) | (frag_offset // 8)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + len(payload), 1,
                      flags_frag, 64, proto, 0, ipaddress.IPv4Address(src).packed,
                      ipaddress.IPv4Address(dst).packed)
    return hdr + options + payload


def ipv6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), next_header, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
                       ) + payload


def ext_opts(next_header: int, length_units: int = 0) -> bytes:
    """Hop-by-hop / destination options / routing header of (length_units+1)*8 bytes."""
    body = bytes([next_header, length_units]) + bytes(6 + 8 * length_units)
    return body


def ext_fragment(next_header: int, offset: int, more: bool) -> bytes:
    return struct.pack("!BBHI", next_header, 0, (offset // 8) << 3 | int(more), 0x1234)


def ext_ah(next_header: int, payload_len_words: int = 4) -> bytes:
    """AH: (payload_len_words + 2) * 4 bytes."""
    return bytes([next_header, payload_len_words]) + bytes((payload_len_words + 2) * 4 - 2)


def tcp(sport: int, dport: int, flags: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(type_: int, code: int, payload: bytes = b"") -> bytes:
    return struct.pack("!BBHI", type_, code, 0, 0) + payload
