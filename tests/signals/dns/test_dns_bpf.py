"""The DNS TC programs on crafted frames (BPF_PROG_TEST_RUN): exact ring contents.

Every frame is built here byte by byte, so the expected record is what we
put in the frame, and the verdict must always be TC_ACT_UNSPEC (-1): the
programs observe and never decide a packet's fate.
"""

from __future__ import annotations

import socket
import struct
import time

import dns.message
import numpy as np
import pytest

from ebpf_otlp.platform.bpfobj import BpfObject
from ebpf_otlp.platform.layout import constant
from ebpf_otlp.platform.ringbuf import RingBuffer
from ebpf_otlp.signals.dns.decode import event_dtype

pytestmark = pytest.mark.kernel

MAC = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"
C4, S4 = "10.1.2.3", "10.1.2.53"
C6, S6 = "fd00:1::3", "fd00:1::53"
TC_ACT_UNSPEC = -1


def eth(ethertype: int, payload: bytes, vlans: tuple[int, ...] = ()) -> bytes:
    tags = b"".join(struct.pack("!HH", tpid, 100 + i) for i, tpid in enumerate(vlans))
    return MAC + tags + struct.pack("!H", ethertype) + payload


def ipv4(proto: int, payload: bytes, src: str = C4, dst: str = S4, frag: int = 0) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 7, frag, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + payload


def ipv6(nh: int, payload: bytes, src: str = C6, dst: str = S6, ext: bytes = b"") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(payload), nh, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + ext + payload


def udp(sport: int, dport: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack("!HHHH", sport, dport, length or 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int, payload: bytes, prefix: bool = True) -> bytes:
    data = (struct.pack("!H", len(payload)) + payload) if prefix and payload else payload
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x18, 65535, 0, 0) + data


def frame4(l4: bytes, proto: int = 17, **kw) -> bytes:
    return eth(0x0800, ipv4(proto, l4, **kw))


QUERY = dns.message.make_query("svc.example.test", "AAAA").to_wire()


# The packet object (bpf/packet.bpf.c, flows on too) holds the DNS capture: one
# parse per packet for flows and DNS. The tests name programs by role.
OBJECTS = ("packet",)
PACKET_NAMES = {"dns_egress": "packet_tc_egress", "dns_ingress": "packet_tc_ingress"}


class Loaded:
    def __init__(self, head_bytes: int = 256, ports: tuple[int, ...] = (53, 5353),
                 name: str = "packet"):
        self.obj = BpfObject.open_packaged(name)
        self.names = PACKET_NAMES if name == "packet" else {}
        if name == "packet":
            for t in ("flows_a", "flows_b"):
                self.obj.set_max_entries(t, 1024)
        nmax = constant("dns", "DNS_MAX_PORTS")
        self.obj.rodata["dns_ports"] = np.array(list(ports) + [0] * (nmax - len(ports)),
                                                dtype="<u2").tobytes()
        self.obj.rodata["n_dns_ports"] = len(ports)
        self.obj.rodata["head_bytes"] = head_bytes
        self.obj.set_max_entries("dns_events", 1 << 20)
        self.obj.load()
        self.got: list[np.ndarray] = []
        self.dtype = event_dtype(head_bytes)
        self.ring = RingBuffer(self.obj.maps["dns_events"], self.dtype, on_batch=self.got.append,
                               lost_map=self.obj.maps["dns_events_lost"])

    def run(self, frame: bytes, prog: str = "dns_egress") -> np.ndarray:
        """Run once; returns the records the run produced."""
        res = self.obj.programs[self.names.get(prog, prog)].test_run(frame)
        assert res.retval == TC_ACT_UNSPEC
        self.got.clear()
        self.ring.drain()
        return np.concatenate(self.got) if self.got else np.zeros(0, self.dtype)

    def close(self) -> None:
        self.ring.close()
        self.obj.close()


@pytest.fixture(scope="module", params=OBJECTS)
def prog(request):
    p = Loaded(name=request.param)
    yield p
    p.close()


def addr(a: str) -> bytes:
    if ":" in a:
        return socket.inet_pton(socket.AF_INET6, a)
    return b"\0" * 10 + b"\xff\xff" + socket.inet_aton(a)  # IPv4-mapped (bpf/pkt.bpf.h)


def check(r: np.ndarray, *, src: str, dst: str, sport: int, dport: int, proto: int,
          direction: int, msg: bytes, msg_len: int | None = None, seg_len: int | None = None,
          t0: int = 0) -> None:
    assert len(r) == 1, f"expected one record, got {len(r)}"
    e = r[0]
    assert bytes(e["saddr"]) == addr(src) and bytes(e["daddr"]) == addr(dst)
    assert (e["sport"], e["dport"], e["proto"], e["direction"]) == (sport, dport, proto,
                                                                     direction)
    assert e["family"] == (6 if ":" in src else 4)
    assert e["msg_len"] == (len(msg) if msg_len is None else msg_len)
    assert e["head_len"] == len(msg)
    assert e["seg_len"] == (len(msg) if seg_len is None else seg_len)
    assert bytes(e["head"][:e["head_len"]]) == msg
    assert bytes(e["pad"]) == b"\0" * len(e["pad"])
    assert e["ifindex"] == socket.if_nametoindex("lo")  # test runs use the netns's lo
    if t0:
        assert t0 <= e["ts_ns"] <= time.monotonic_ns()


def test_udp_ipv4_query(prog):
    t0 = time.monotonic_ns()
    r = prog.run(frame4(udp(40000, 53, QUERY)))
    check(r, src=C4, dst=S4, sport=40000, dport=53, proto=17, direction=1, msg=QUERY, t0=t0)


def test_udp_ipv6_answer_on_ingress(prog):
    r = prog.run(eth(0x86DD, ipv6(17, udp(53, 41000, QUERY), src=S6, dst=C6)), "dns_ingress")
    check(r, src=S6, dst=C6, sport=53, dport=41000, proto=17, direction=0, msg=QUERY)


def test_tcp_message_after_length_prefix(prog):
    r = prog.run(frame4(tcp(40001, 53, QUERY), proto=6))
    check(r, src=C4, dst=S4, sport=40001, dport=53, proto=6, direction=1, msg=QUERY)
    r = prog.run(eth(0x86DD, ipv6(6, tcp(53, 40001, QUERY), src=S6, dst=C6)))
    check(r, src=S6, dst=C6, sport=53, dport=40001, proto=6, direction=1, msg=QUERY)


def test_tcp_segment_carrying_part_of_a_message(prog):
    # The prefix announces 3000 bytes; this segment carries 1000 of them.
    part = QUERY + b"\x00" * (1000 - len(QUERY))
    seg = struct.pack("!HHIIBBHHH", 40001, 53, 1, 1, 5 << 4, 0x18, 65535, 0, 0)
    r = prog.run(frame4(seg + struct.pack("!H", 3000) + part, proto=6))
    check(r, src=C4, dst=S4, sport=40001, dport=53, proto=6, direction=1, msg=part[:256],
          msg_len=3000, seg_len=1000)


def test_tcp_without_data_is_ignored(prog):
    assert len(prog.run(frame4(tcp(40001, 53, b""), proto=6))) == 0
    assert len(prog.run(frame4(tcp(40001, 53, b"\x00", prefix=False), proto=6))) == 0


def test_vlan_tags_in_frame(prog):
    for tags in ((0x8100,), (0x88A8, 0x8100)):
        r = prog.run(eth(0x0800, ipv4(17, udp(40000, 53, QUERY)), vlans=tags))
        check(r, src=C4, dst=S4, sport=40000, dport=53, proto=17, direction=1, msg=QUERY)


def test_ipv6_extension_headers(prog):
    hop = struct.pack("!BB6s", 60, 0, b"\x01\x04\0\0\0\0")  # hop-by-hop -> dest opts
    dst = struct.pack("!BB6s", 17, 0, b"\x01\x04\0\0\0\0")  # dest opts -> UDP
    r = prog.run(eth(0x86DD, ipv6(0, udp(40000, 53, QUERY), ext=hop + dst)))
    check(r, src=C6, dst=S6, sport=40000, dport=53, proto=17, direction=1, msg=QUERY)


def test_ports_are_configurable_and_others_ignored(prog):
    r = prog.run(frame4(udp(40000, 5353, QUERY)))
    check(r, src=C4, dst=S4, sport=40000, dport=5353, proto=17, direction=1, msg=QUERY)
    assert len(prog.run(frame4(udp(40000, 54, QUERY)))) == 0
    assert len(prog.run(frame4(tcp(40000, 80, QUERY), proto=6))) == 0


def test_fragments(prog):
    first = frame4(udp(40000, 53, QUERY[:20], length=8 + len(QUERY)), frag=0x2000)
    check(prog.run(first), src=C4, dst=S4, sport=40000, dport=53, proto=17, direction=1,
          msg=QUERY[:20], msg_len=len(QUERY))
    later = frame4(udp(40000, 53, QUERY), frag=0x2000 | 10)
    assert len(prog.run(later)) == 0


@pytest.mark.parametrize("name", OBJECTS)
def test_head_is_bounded_by_head_bytes(name: str):
    big = QUERY + b"\xab" * 700
    p = Loaded(head_bytes=100, name=name)
    try:
        r = p.run(eth(0x86DD, ipv6(17, udp(40000, 53, big))))
        check(r, src=C6, dst=S6, sport=40000, dport=53, proto=17, direction=1, msg=big[:100],
              msg_len=len(big), seg_len=len(big))
        assert p.dtype.itemsize == 64 + 104  # the record itself is sized by head_bytes
        assert p.ring.received == 1  # (so the drain saw exactly that size)
    finally:
        p.close()
    p = Loaded(head_bytes=constant("dns", "DNS_HEAD_MAX"), name=name)
    try:
        r = p.run(eth(0x86DD, ipv6(17, udp(40000, 53, big))))
        assert r[0]["head_len"] == 512 and bytes(r[0]["head"]) == big[:512]
    finally:
        p.close()


def test_garbage_is_copied_for_user_space_to_judge(prog):
    check(prog.run(frame4(udp(40000, 53, b""))), src=C4, dst=S4, sport=40000, dport=53,
          proto=17, direction=1, msg=b"")
    check(prog.run(frame4(udp(40000, 53, b"\xff\x00\x13"))), src=C4, dst=S4, sport=40000,
          dport=53, proto=17, direction=1, msg=b"\xff\x00\x13")
    # A UDP length that claims more than the packet has: we copy what is there.
    r = prog.run(frame4(udp(40000, 53, QUERY, length=1000)))
    check(r, src=C4, dst=S4, sport=40000, dport=53, proto=17, direction=1, msg=QUERY,
          msg_len=992)


@pytest.mark.parametrize("frame", [
    MAC + b"\x08\x06" + b"\0" * 28,  # ARP
    # (Frames shorter than their IP header are refused by the test-run itself.)
    eth(0x0800, b"\x43" + ipv4(17, udp(40000, 53, QUERY))[1:]),  # IHL < 5
    eth(0x86DD, ipv6(17, b"")),  # no UDP header after IPv6
    eth(0x86DD, ipv6(0, udp(40000, 53, QUERY), ext=b"\x11\xff")),  # ext header past the end
    frame4(udp(40000, 53, b"")[:5]),  # UDP header cut short
    MAC + b"\x81\x00\x00\x01",  # VLAN tag and nothing after
])
def test_odd_frames_pass_untouched(prog, frame):
    assert len(prog.run(frame)) == 0
    assert len(prog.run(frame, "dns_ingress")) == 0
