"""Drops, user-space side, without a kernel: reason naming, decoding of
drained entries, symbol resolution and first-drop logs."""

from __future__ import annotations

import socket

import numpy as np

from ebpf_otlp.platform.kallsyms import KernelSymbols
from ebpf_otlp.signals.drops.decode import DropDecoder, key_dtype, value_dtype
from ebpf_otlp.signals.drops.logs import FirstDropLogger, describe
from ebpf_otlp.signals.drops.reasons import NEVER, REASON_UNKNOWN, DropReasons

# A made-up kernel: renumbered values, a reason no kernel has yet, the
# sentinels, and a mask that BTF hands back as a signed number.
ENUM = {0: "SKB_NOT_DROPPED_YET", 1: "SKB_CONSUMED", 2: "SKB_DROP_REASON_NOT_SPECIFIED",
        7: "SKB_DROP_REASON_NETFILTER_DROP", 9: "SKB_DROP_REASON_NO_SOCKET",
        10: "SKB_DROP_REASON_SKB_CSUM", 11: "SKB_DROP_REASON_BRAND_NEW", 12: "SKB_DROP_REASON_MAX",
        -65536: "SKB_DROP_REASON_SUBSYS_MASK"}
SUBSYS = {0: "SKB_DROP_REASON_SUBSYS_CORE", 1: "SKB_DROP_REASON_SUBSYS_MAC80211_UNUSABLE",
          2: "SKB_DROP_REASON_SUBSYS_NUM"}


def reasons() -> DropReasons:
    return DropReasons.from_enum(ENUM, SUBSYS)


def test_reason_names_come_from_the_enum() -> None:
    r = reasons()
    assert r.names == {0: "NOT_DROPPED_YET", 1: "CONSUMED", 2: "NOT_SPECIFIED",
                       7: "NETFILTER_DROP", 9: "NO_SOCKET", 10: "SKB_CSUM", 11: "BRAND_NEW"}
    assert (r.consumed, r.not_specified) == (1, 2)
    assert r.name(11) == "BRAND_NEW"
    assert r.name(REASON_UNKNOWN) == "UNKNOWN"
    assert r.name(99) == "UNKNOWN_99"
    assert r.name((1 << 16) | 5) == "MAC80211_UNUSABLE_5"


def test_a_kernel_without_the_enum_filters_nothing() -> None:
    r = DropReasons.from_enum({})
    assert r.consumed == r.not_specified == NEVER
    assert r.name(3) == "UNKNOWN_3" and r.name(REASON_UNKNOWN) == "UNKNOWN"


def key(**fields) -> np.ndarray:
    k = np.zeros(1, key_dtype())
    for name, value in fields.items():
        k[name] = value
    return k


def ip_bytes(text: str) -> np.ndarray:
    if ":" in text:
        return np.frombuffer(socket.inet_pton(socket.AF_INET6, text), np.uint8)
    mapped = b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, text)  # bpf/pkt.bpf.h
    return np.frombuffer(mapped, np.uint8)


def drained(*keys: np.ndarray, packets: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    ks = np.concatenate(keys)
    vs = np.zeros(len(ks), value_dtype())
    vs["packets"] = packets or (1,) * len(ks)
    return ks.view(np.uint8).reshape(len(ks), -1), vs.view(np.uint8).reshape(len(ks), -1)


ALL = ("source.address", "source.port", "destination.address", "destination.port",
       "network.transport", "network.type", "network.interface.name")


def test_decoder_builds_flow_attributes() -> None:
    v4 = key(reason=7, family=4, l4proto=17, sport=4000, dport=53, l3proto=0x800,
             saddr=ip_bytes("10.0.0.1"), daddr=ip_bytes("10.0.0.2"),
             ifname=np.frombuffer(b"eth0".ljust(16, b"\0"), np.uint8), location=0x1234)
    v6 = key(reason=9, family=6, l4proto=58, saddr=ip_bytes("fd00::1"),
             daddr=ip_bytes("fd00::2"))
    arp = key(reason=2, l3proto=0x806)
    dec = DropDecoder(reasons(), ALL, location_name=lambda a: f"fn_{a:x}", netns=1)
    rows = list(dec.rows(*drained(v4, v6, arp, packets=(5, 2, 1))))
    assert rows[0].attributes == {
        "network.drop.reason": "NETFILTER_DROP", "network.drop.location": "fn_1234",
        "network.type": "ipv4", "network.transport": "udp", "source.address": "10.0.0.1",
        "destination.address": "10.0.0.2", "source.port": 4000, "destination.port": 53,
        "network.interface.name": "eth0"}
    assert rows[0].packets == 5
    # ICMPv6 has no ports; a non-IP drop keeps only its reason.
    assert rows[1].attributes == {
        "network.drop.reason": "NO_SOCKET", "network.type": "ipv6", "network.transport": "icmp",
        "source.address": "fd00::1", "destination.address": "fd00::2"}
    assert rows[2].attributes == {"network.drop.reason": "NOT_SPECIFIED"}


def test_decoder_keeps_only_the_chosen_attributes() -> None:
    k = key(reason=7, family=4, l4proto=6, sport=1, dport=2, saddr=ip_bytes("10.0.0.1"),
            daddr=ip_bytes("10.0.0.2"), location=0x99)
    dec = DropDecoder(reasons(), ("destination.address", "network.transport"), netns=1)
    (row,) = dec.rows(*drained(k))
    assert row.attributes == {"network.drop.reason": "NETFILTER_DROP",
                              "destination.address": "10.0.0.2", "network.transport": "tcp"}


def test_interface_index_is_resolved_only_in_our_namespace() -> None:
    lo = socket.if_nametoindex("lo")
    ours = key(reason=7, ifindex=lo, netns=111)
    theirs = key(reason=7, ifindex=lo, netns=222)
    dec = DropDecoder(reasons(), ALL, netns=111)
    a, b = dec.rows(*drained(ours, theirs))
    assert a.attributes["network.interface.name"] == "lo"
    assert "network.interface.name" not in b.attributes


def test_kallsyms_resolution_and_fallbacks(tmp_path) -> None:
    f = tmp_path / "kallsyms"
    f.write_text("ffffffff81000000 T _stext\nffffffff81000100 t nf_hook_slow\n"
                 "ffffffff81000180 D some_data\nffffffff81000200 T nft_do_chain\n")
    syms = KernelSymbols(str(f))
    syms.resolve([0xFFFFFFFF81000150, 0xFFFFFFFF81000250, 0xFFFFFFFF81000100])
    assert syms.name(0xFFFFFFFF81000150) == "nf_hook_slow"  # data symbols are skipped
    assert syms.name(0xFFFFFFFF81000250) == "nft_do_chain"
    assert syms.name(0xFFFFFFFF81000100) == "nf_hook_slow"
    assert syms.scans == 1
    syms.resolve([0xFFFFFFFF81000150])
    assert syms.scans == 1  # cached
    hidden = tmp_path / "hidden"
    hidden.write_text("0000000000000000 T _stext\n0000000000000000 t nf_hook_slow\n")
    h = KernelSymbols(str(hidden))
    h.resolve([0xFFFFFFFF81000150])
    assert h.name(0xFFFFFFFF81000150) == "0xffffffff81000150" and not h.readable
    missing = KernelSymbols(str(tmp_path / "nope"))
    missing.resolve([0x10])
    assert missing.name(0x10) == "0x10"


class FakeLogger:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def emit(self, **kw) -> None:
        self.records.append(kw)


def rows_for(*ports: int):
    ks = [key(reason=7, family=4, l4proto=17, sport=9, dport=p, saddr=ip_bytes("10.0.0.1"),
              daddr=ip_bytes("10.0.0.2")) for p in ports]
    return list(DropDecoder(reasons(), ALL, netns=1).rows(*drained(*ks)))


def test_first_drop_logs_are_once_per_pair_and_rate_limited() -> None:
    now = [0.0]
    fake = FakeLogger()
    logs = FirstDropLogger(fake, max_pairs=100, rate=1.0, burst=3, clock=lambda: now[0])
    for row in rows_for(1, 2, 1, 2):
        logs.offer(row, 1000)
    assert len(fake.records) == 2 and logs.suppressed == 0
    assert fake.records[0]["body"] == "packet dropped: NETFILTER_DROP udp 10.0.0.1:9 -> 10.0.0.2:1"
    assert fake.records[0]["attributes"]["destination.port"] == 1
    for row in rows_for(3, 4, 5):  # one token left
        logs.offer(row, 0)
    assert len(fake.records) == 3 and logs.suppressed == 2
    now[0] = 10.0  # the bucket refills
    for row in rows_for(6):
        logs.offer(row, 0)
    assert len(fake.records) == 4 and logs.emitted == 4


def test_remembered_pairs_are_bounded() -> None:
    logs = FirstDropLogger(FakeLogger(), max_pairs=3, rate=1e9, burst=1e9)
    for row in rows_for(*range(1, 50)):
        logs.offer(row, 0)
    assert len(logs._seen) == 3 and logs.emitted == 49


def test_describe_brackets_ipv6_and_tolerates_missing_parts() -> None:
    assert describe({"network.drop.reason": "NO_SOCKET", "network.transport": "udp",
                     "source.address": "fd00::1", "source.port": 5,
                     "destination.address": "fd00::2", "destination.port": 6,
                     "network.interface.name": "veth0"}) == \
        "packet dropped: NO_SOCKET udp [fd00::1]:5 -> [fd00::2]:6 on veth0"
    assert describe({}) == "packet dropped: UNKNOWN"
