"""Flows programs on crafted frames (BPF_PROG_TEST_RUN): exact flow table
contents and an unchanged verdict for every frame, plus the numpy/OTLP side
checked against opentelemetry-proto's own decoder."""

from __future__ import annotations

import errno
import ipaddress
import random
import struct

import numpy as np
import pytest
from flows_frames import (
    eth,
    ext_ah,
    ext_fragment,
    ext_opts,
    icmp,
    ipv4,
    ipv6,
    tcp,
    udp,
)

TC_ACT_UNSPEC = -1
XDP_PASS = 2
LO = 1  # test runs happen on the loopback device of the test's netns
PROGS = {"flows_tc_ingress": (0, TC_ACT_UNSPEC), "flows_tc_egress": (1, TC_ACT_UNSPEC),
         "flows_xdp_ingress": (0, XDP_PASS)}
SKB_CTX_SIZE = 192       # sizeof(struct __sk_buff)
SKB_CTX_GSO_SEGS = 164   # offsetof(struct __sk_buff, gso_segs)

kernel = pytest.mark.kernel


# --- an independent reference of what the key of a frame must be ------------------
def reference_key(frame: bytes, direction: int, ifindex: int = LO) -> tuple[tuple, int]:
    """(key tuple, tcp flags) per the rules documented in bpf/flows.h."""
    key = dict(ifindex=ifindex, direction=direction, ethertype=0, proto=0, saddr=None,
               daddr=None, sport=0, dport=0)
    flags = 0

    def done():
        return tuple(key.values()), flags

    if len(frame) < 14:
        return done()
    et = int.from_bytes(frame[12:14], "big")
    off = 14
    for _ in range(2):
        if et not in (0x8100, 0x88A8):
            break
        if len(frame) < off + 4:
            key["ethertype"] = et
            return done()
        et = int.from_bytes(frame[off + 2:off + 4], "big")
        off += 4
    key["ethertype"] = et

    def l4(proto: int, at: int) -> None:
        nonlocal flags
        need = 14 if proto == 6 else 4 if proto in (17, 132, 136) else None
        if need is None or len(frame) < at + need:
            return
        key["sport"], key["dport"] = struct.unpack("!HH", frame[at:at + 4])
        if proto == 6:
            flags = frame[at + 13]

    if et == 0x0800:
        if len(frame) < off + 20:
            return done()
        ihl = (frame[off] & 0xF) * 4
        if frame[off] >> 4 != 4 or ihl < 20:
            return done()
        key["proto"] = frame[off + 9]
        key["saddr"] = str(ipaddress.IPv4Address(frame[off + 12:off + 16]))
        key["daddr"] = str(ipaddress.IPv4Address(frame[off + 16:off + 20]))
        if int.from_bytes(frame[off + 6:off + 8], "big") & 0x1FFF == 0:
            l4(key["proto"], off + ihl)
    elif et == 0x86DD:
        if len(frame) < off + 40 or frame[off] >> 4 != 6:
            return done()
        key["saddr"] = str(ipaddress.IPv6Address(frame[off + 8:off + 24]))
        key["daddr"] = str(ipaddress.IPv6Address(frame[off + 24:off + 40]))
        nh, at = frame[off + 6], off + 40
        for _ in range(8):
            if nh in (0, 43, 60, 135, 51):
                if len(frame) < at + 2:
                    break
                unit = (frame[at + 1] + 2) * 4 if nh == 51 else (frame[at + 1] + 1) * 8
                nh, at = frame[at], at + unit
            elif nh == 44:
                if len(frame) < at + 4:
                    break
                later = int.from_bytes(frame[at + 2:at + 4], "big") & 0xFFF8
                nh, at = frame[at], at + 8
                if later:
                    break
            else:
                key["proto"] = nh
                l4(nh, at)
                return done()
        key["proto"] = nh
    return done()


# --- running and reading the kernel side --------------------------------------------
# The packet object (bpf/packet.bpf.c) holds the flow programs: one parse per
# packet for flows and DNS. The tests name them by role (flows_tc_ingress ...).
OBJECTS = ("packet",)


def program(obj, name: str):
    """``flows_tc_ingress`` -> ``packet_tc_ingress`` (and egress, XDP)."""
    return obj.programs[name.replace("flows_", "packet_", 1)]


@pytest.fixture(scope="module", params=OBJECTS)
def flows_obj(request):
    from ebpf_otlp.platform.bpfobj import BpfObject

    obj = BpfObject.open_packaged(request.param)
    for t in ("flows_a", "flows_b"):
        obj.set_max_entries(t, 4096)
    obj.load()
    yield obj
    obj.close()


def read_table(obj, table: str = "flows_a") -> dict[tuple, tuple]:
    """Drain ``table``: {key tuple: (packets, bytes, segments, tcp_flags)}."""
    from ebpf_otlp.otlp.semconv import address_text
    from ebpf_otlp.signals.flows import agg as agg

    m = obj.maps[table]
    keys, vals = m.drain()
    if "flows_front" in obj.maps:  # the per-CPU front slots hold the latest packets
        fk, fv = agg.drain_front(obj.maps["flows_front"], ("flows_a", "flows_b").index(table))
        keys, vals = np.concatenate([keys, fk]), np.concatenate([vals, fv])
    d = agg.fold(keys, vals, m.ncpus)
    out = {}
    for i, k in enumerate(d.keys):
        ip = bool(k["l3"])
        key = (int(k["ifindex"]), int(k["direction"]), int(k["ethertype"]), int(k["proto"]),
               address_text(bytes(k["saddr"])) if ip else None,
               address_text(bytes(k["daddr"])) if ip else None, int(k["sport"]),
               int(k["dport"]))
        if not ip:
            assert not k["saddr"].any() and not k["daddr"].any() and k["proto"] == 0
        out[key] = tuple(int(x) for x in d.counts[i]) + (int(d.tcp_flags[i]),)
    return out


def kernel_refuses(prog: str, frame: bytes) -> bool:
    """The kernel's skb test run refuses an IPv4/IPv6 frame shorter than its IP
    header (it never reaches the program); XDP test runs take it, so the parser
    is still covered for those lengths."""
    et = frame[12:14]
    return "_tc_" in prog and ((et == b"\x86\xdd" and len(frame) < 14 + 40)
                               or (et == b"\x08\x00" and len(frame) < 14 + 20))


def run_one(obj, prog: str, frame: bytes, ctx: bytes | None = None) -> dict[tuple, tuple] | None:
    from ebpf_otlp.platform.libbpf import BpfError

    read_table(obj)  # start empty
    try:
        res = program(obj, prog).test_run(frame, ctx=ctx)
    except BpfError as e:
        if e.errno == errno.EINVAL and kernel_refuses(prog, frame):
            assert read_table(obj) == {}
            return None
        raise
    assert res.retval == PROGS[prog][1], f"{prog} changed the verdict"
    assert res.data_out == frame, f"{prog} changed the frame"
    return read_table(obj)


def expect_one(obj, frame: bytes, key_fields: dict, flags: int = 0, segs: int = 1) -> None:
    """Every program counts ``frame`` as exactly one packet under the expected key."""
    for prog, (direction, _) in PROGS.items():
        want = dict(ifindex=LO, direction=direction, ethertype=0, proto=0, saddr=None,
                    daddr=None, sport=0, dport=0)
        want.update(key_fields)
        got = run_one(obj, prog, frame)
        if got is None:
            continue
        assert got == {tuple(want.values()): (1, len(frame), segs, flags)}, prog
        assert reference_key(frame, direction) == (tuple(want.values()), flags)


A4, B4 = "10.201.0.1", "10.201.0.2"
A6, B6 = "fd00:eb::1", "fd00:eb::2"
V4 = dict(ethertype=0x0800, saddr=A4, daddr=B4)
V6 = dict(ethertype=0x86DD, saddr=A6, daddr=B6)
SYN_ACK = 0x12


# --- frames ----------------------------------------------------------------------------
@kernel
def test_ipv4_tcp_udp_icmp(flows_obj):
    expect_one(flows_obj, eth(0x0800, ipv4(A4, B4, 6, tcp(40000, 80, SYN_ACK, b"x" * 100))),
               dict(V4, proto=6, sport=40000, dport=80), flags=SYN_ACK)
    expect_one(flows_obj, eth(0x0800, ipv4(A4, B4, 17, udp(5353, 53, b"q" * 33))),
               dict(V4, proto=17, sport=5353, dport=53))
    expect_one(flows_obj, eth(0x0800, ipv4(A4, B4, 1, icmp(8, 0, b"p" * 56))),
               dict(V4, proto=1))


@kernel
def test_ipv6_tcp_udp_icmp(flows_obj):
    expect_one(flows_obj, eth(0x86DD, ipv6(A6, B6, 6, tcp(443, 50000, 0x19))),
               dict(V6, proto=6, sport=443, dport=50000), flags=0x19)
    expect_one(flows_obj, eth(0x86DD, ipv6(A6, B6, 17, udp(1000, 2000, b"u" * 7))),
               dict(V6, proto=17, sport=1000, dport=2000))
    expect_one(flows_obj, eth(0x86DD, ipv6(A6, B6, 58, icmp(128, 0, b"e" * 8))),
               dict(V6, proto=58))


@kernel
def test_vlan_and_qinq(flows_obj):
    expect_one(flows_obj, eth(0x0800, ipv4(A4, B4, 17, udp(1, 2)), vlans=((0x8100, 10),)),
               dict(V4, proto=17, sport=1, dport=2))
    expect_one(flows_obj, eth(0x86DD, ipv6(A6, B6, 6, tcp(3, 4, 0x02)),
                              vlans=((0x88A8, 100), (0x8100, 200))),
               dict(V6, proto=6, sport=3, dport=4), flags=0x02)
    # a third tag is not walked: the frame counts by the EtherType after two tags
    expect_one(flows_obj, eth(0x0800, ipv4(A4, B4, 17, udp(1, 2)),
                              vlans=((0x88A8, 1), (0x8100, 2), (0x8100, 3))),
               dict(ethertype=0x8100))


@kernel
def test_ipv4_options(flows_obj):
    opts = bytes([0x94, 0x04, 0, 0]) + bytes([1] * 8)  # router alert + NOPs: IHL 8
    expect_one(flows_obj, eth(0x0800, ipv4(A4, B4, 17, udp(7000, 7001, b"o"), options=opts)),
               dict(V4, proto=17, sport=7000, dport=7001))


@kernel
def test_ipv6_extension_headers(flows_obj):
    chain = (ext_opts(60) + ext_opts(43, 1) + ext_opts(44) + ext_fragment(51, 0, True)
             + ext_ah(17) + udp(8080, 9090, b"e" * 20))
    expect_one(flows_obj, eth(0x86DD, ipv6(A6, B6, 0, chain)),
               dict(V6, proto=17, sport=8080, dport=9090))
    # more extension headers than the walk allows: counted under the one reached
    long_chain = b"".join(ext_opts(60) for _ in range(9)) + udp(1, 2)
    expect_one(flows_obj, eth(0x86DD, ipv6(A6, B6, 60, long_chain)), dict(V6, proto=60))


@kernel
def test_fragments(flows_obj):
    first = ipv4(A4, B4, 17, udp(5000, 6000, b"f" * 64), more_fragments=True)
    later = ipv4(A4, B4, 17, b"g" * 64, frag_offset=1480)
    expect_one(flows_obj, eth(0x0800, first), dict(V4, proto=17, sport=5000, dport=6000))
    expect_one(flows_obj, eth(0x0800, later), dict(V4, proto=17))
    later6 = ipv6(A6, B6, 44, ext_fragment(17, 1232, False) + b"h" * 40)
    expect_one(flows_obj, eth(0x86DD, later6), dict(V6, proto=17))


@kernel
def test_non_ip_by_ethertype(flows_obj):
    arp = eth(0x0806, bytes(28))
    expect_one(flows_obj, arp, dict(ethertype=0x0806))
    expect_one(flows_obj, eth(0x88CC, bytes(46)), dict(ethertype=0x88CC))
    # IPv4 EtherType but not an IPv4 header (version 6 / IHL 4): counted by EtherType
    expect_one(flows_obj, eth(0x0800, bytes([0x64]) + bytes(39)), dict(ethertype=0x0800))
    expect_one(flows_obj, eth(0x0800, bytes([0x44]) + bytes(39)), dict(ethertype=0x0800))


@kernel
def test_truncated_at_every_header_boundary(flows_obj):
    v4 = eth(0x0800, ipv4(A4, B4, 6, tcp(1111, 2222, 0x10)), vlans=((0x8100, 5),))
    # eth+tag | IPv4 | TCP
    cases4 = {
        14: dict(ethertype=0x8100),             # tag cut off
        18: dict(ethertype=0x0800),             # IP header missing
        38: dict(V4, proto=6),                  # TCP header missing
        58: dict(V4, proto=6, sport=1111, dport=2222),
    }
    v6 = eth(0x86DD, ipv6(A6, B6, 0, ext_opts(44) + ext_fragment(17, 0, False) + udp(9, 10)))
    cases6 = {
        14: dict(ethertype=0x86DD),
        54: dict(V6, proto=0),                  # hop-by-hop header missing
        62: dict(V6, proto=44),                 # fragment header missing
        70: dict(V6, proto=17),                 # UDP header missing
        78: dict(V6, proto=17, sport=9, dport=10),
    }
    for frame, cases in ((v4, cases4), (v6, cases6)):
        for cut, fields in cases.items():
            flags = 0x10 if fields.get("sport") == 1111 else 0
            expect_one(flows_obj, frame[:cut], fields, flags=flags)
        # and every length in between agrees with the reference rules
        for cut in range(14, len(frame) + 1):
            for prog, (direction, _) in PROGS.items():
                got = run_one(flows_obj, prog, frame[:cut])
                if got is None:
                    continue
                key, flags = reference_key(frame[:cut], direction)
                assert got == {key: (1, cut, 1, flags)}, (prog, cut)


@kernel
def test_random_garbage(flows_obj):
    rng = random.Random(1234)
    for i in range(300):
        n = rng.randint(14, 300)
        frame = bytes(rng.getrandbits(8) for _ in range(n))
        if i % 3 == 1:  # garbage behind a plausible EtherType reaches the IP parsers
            frame = frame[:12] + rng.choice([b"\x08\x00", b"\x86\xdd", b"\x81\x00"]) + frame[14:]
        if i % 3 == 2 and n > 40:
            frame = frame[:12] + b"\x86\xdd\x60" + frame[15:]
        for prog, (direction, _) in PROGS.items():
            got = run_one(flows_obj, prog, frame)
            if got is None:
                continue
            key, flags = reference_key(frame, direction)
            assert got == {key: (1, n, 1, flags)}, (prog, frame.hex())


@kernel
def test_zero_length_and_runt(flows_obj):
    from ebpf_otlp.platform.libbpf import BpfError

    for prog in PROGS:
        read_table(flows_obj)
        # the kernel refuses test runs shorter than an Ethernet header
        with pytest.raises(BpfError) as e:
            program(flows_obj, prog).test_run(b"")
        assert e.value.errno == errno.EINVAL
        assert read_table(flows_obj) == {}
    expect_one(flows_obj, bytes(14), dict(ethertype=0))


@kernel
def test_gso_segments_from_skb(flows_obj):
    frame = eth(0x0800, ipv4(A4, B4, 6, tcp(1, 2, 0x10, b"d" * 1000)))
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("<I", ctx, SKB_CTX_GSO_SEGS, 7)
    got = run_one(flows_obj, "flows_tc_egress", frame, ctx=bytes(ctx))
    key, _ = reference_key(frame, 1)
    assert got == {key: (1, len(frame), 7, 0x10)}


@kernel
def test_repeated_packets_and_double_buffer(flows_obj):
    frame = eth(0x0800, ipv4(A4, B4, 17, udp(1, 2, b"z" * 10)))
    read_table(flows_obj)
    read_table(flows_obj, "flows_b")
    try:
        program(flows_obj, "flows_tc_ingress").test_run(frame, repeat=50)
        flows_obj.bss["flows_active"] = 1
        program(flows_obj, "flows_tc_ingress").test_run(frame, repeat=20)
    finally:
        flows_obj.bss["flows_active"] = 0
    key, _ = reference_key(frame, 0)
    assert read_table(flows_obj, "flows_a") == {key: (50, 50 * len(frame), 50, 0)}
    assert read_table(flows_obj, "flows_b") == {key: (20, 20 * len(frame), 20, 0)}


@kernel
@pytest.mark.parametrize("name", OBJECTS)
def test_table_full_counts_overflow(name: str):
    from ebpf_otlp.platform.bpfobj import BpfObject
    from ebpf_otlp.signals.flows import agg

    with BpfObject.open_packaged(name) as obj:
        for t in ("flows_a", "flows_b"):
            obj.set_max_entries(t, 4)
        obj.load()
        ovf = obj.maps["flows_overflow"]
        for d in (0, 1):
            k = np.zeros(1, agg.OVF_KEY_DT)
            k["direction"] = d
            ovf.update(k.tobytes(), bytes(ovf.value_stride))
        # Source ports 8 apart share one per-CPU front slot (bpf/flows.bpf.h: the
        # slot is the low bits of a XOR of ports, ifindex, direction and address
        # bytes), so each frame spills the one before it into the 4-entry table.
        frames = [eth(0x0800, ipv4(A4, B4, 17, udp(1000 + 8 * i, 53, b"a" * i)))
                  for i in range(10)]
        for f in frames:
            assert program(obj, "flows_tc_egress").test_run(f).retval == TC_ACT_UNSPEC
        assert len(obj.maps["flows_a"]) == 4  # the kernel table is full
        table = read_table(obj)  # 4 from the table, the last frame from its front slot
        assert len(table) == 5
        k = np.zeros(1, agg.OVF_KEY_DT)
        k["direction"] = 1
        raw = np.frombuffer(ovf.lookup(k.tobytes()), np.uint8).reshape(ovf.ncpus, -1)
        v = np.ascontiguousarray(raw[:, :agg.OVF_VAL_DT.itemsize]).view(agg.OVF_VAL_DT)
        tot = {f: int(v[f].sum()) for f in agg.OVF_VAL_DT.names}
        in_table = sum(c[1] for c in table.values())
        assert tot["packets"] == 5 and tot["table_full"] == 5 and tot["errors"] == 0
        assert tot["bytes"] + in_table == sum(len(f) for f in frames)


# --- user-space side: aggregation and encoding (no kernel) ------------------------------
def _drained(rows: list[tuple[str, int, str, int, int, int, int]]):
    """rows: (src, sport, dst, dport, proto, packets, bytes) -> a Drained."""
    from ebpf_otlp.signals.flows import agg as agg

    keys = np.zeros(len(rows), agg.KEY_DT)
    for i, (s, sp, d, dp, proto, _, _) in enumerate(rows):
        keys[i]["saddr"] = np.frombuffer(ipaddress.IPv6Address("::ffff:" + s).packed, np.uint8)
        keys[i]["daddr"] = np.frombuffer(ipaddress.IPv6Address("::ffff:" + d).packed, np.uint8)
        keys[i]["sport"], keys[i]["dport"], keys[i]["proto"] = sp, dp, proto
        keys[i]["ethertype"], keys[i]["l3"], keys[i]["ifindex"] = 0x0800, 1, 1
    counts = np.array([[r[5], r[6], r[5]] for r in rows], np.uint64).reshape(-1, 3)
    z = np.zeros(len(rows), np.uint64)
    return agg.Drained(keys, counts, np.zeros(len(rows), np.uint16), z)


def test_aggregate_over_dropped_attributes():
    from ebpf_otlp.signals.flows import agg as agg
    from ebpf_otlp.signals.flows import attrs as fa

    d = _drained([("10.0.0.1", 1000, "10.0.0.2", 80, 6, 3, 300),
                  ("10.0.0.1", 1001, "10.0.0.2", 80, 6, 4, 400),
                  ("10.0.0.3", 1000, "10.0.0.2", 80, 6, 5, 500)])
    kept = ("source.address", "destination.address", "destination.port", "network.transport")
    series, counts = agg.aggregate(agg.project(d, kept), d.counts)
    got = {tuple(sorted(a.items())): tuple(int(x) for x in c)
           for a, c in zip(fa.dicts(series, kept, {}), counts)}
    assert got == {
        (("destination.address", "10.0.0.2"), ("destination.port", 80),
         ("network.transport", "tcp"), ("source.address", "10.0.0.1")): (7, 700, 7),
        (("destination.address", "10.0.0.2"), ("destination.port", 80),
         ("network.transport", "tcp"), ("source.address", "10.0.0.3")): (5, 500, 5),
    }


def test_series_store_delta_and_cumulative():
    from ebpf_otlp.signals.flows import agg as agg

    kept = ("source.address",)
    d1 = _drained([("10.0.0.1", 1, "10.0.0.2", 2, 17, 1, 100)])
    d2 = _drained([("10.0.0.1", 1, "10.0.0.2", 2, 17, 2, 200),
                   ("10.0.0.9", 1, "10.0.0.2", 2, 17, 1, 10)])
    cum = agg.SeriesStore(cumulative=True, cap=10)
    delta = agg.SeriesStore(cumulative=False, cap=10)
    for st in (cum, delta):
        s, c = agg.aggregate(agg.project(d1, kept), d1.counts)
        st.merge(s, c, 111)
    delta_first = delta.counts.copy()
    cum.exported()
    # delta export failed: the next interval adds to what is still pending
    for st in (cum, delta):
        s, c = agg.aggregate(agg.project(d2, kept), d2.counts)
        st.merge(s, c, 222)
    assert delta_first.tolist() == [[1, 100, 1]]
    assert sorted(cum.counts.tolist()) == [[1, 10, 1], [3, 300, 3]]
    assert sorted(delta.counts.tolist()) == [[1, 10, 1], [3, 300, 3]]
    assert sorted(cum.start_ns.tolist()) == [111, 222]
    delta.exported()
    assert len(delta) == 0 and len(cum) == 2
    # the bound evicts the series updated longest ago, and counts it
    small = agg.SeriesStore(cumulative=False, cap=1)
    for d, t in ((d1, 1), (_drained([("10.0.0.7", 1, "10.0.0.2", 2, 17, 1, 5)]), 2)):
        s, c = agg.aggregate(agg.project(d, kept), d.counts)
        small.merge(s, c, t)
    assert len(small) == 1 and small.dropped_points == 1
    assert small.dropped_counts.tolist() == [1, 100, 1]


def test_direct_encoding_decodes_with_opentelemetry_proto():
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    from ebpf_otlp.config import FLOW_ATTRIBUTES
    from ebpf_otlp.otlp import sums as od
    from ebpf_otlp.otlp.wire import TEMPORALITY_DELTA
    from ebpf_otlp.receiver import metric_records
    from ebpf_otlp.signals.flows import agg as agg
    from ebpf_otlp.signals.flows import attrs as fa

    rows = [("10.0.0.1", 1000 + i, "10.0.0.2", 53, 17, i + 1, 1000 * (i + 1) + (1 << 40))
            for i in range(300)]
    d = _drained(rows)
    series, counts = agg.aggregate(agg.project(d, FLOW_ATTRIBUTES), d.counts)
    blobs = fa.encoded(series, FLOW_ATTRIBUTES, {1: "eth7"})
    metrics = [od.SumMetric("network.flow.bytes", "By", "b", 1),
               od.SumMetric("network.flow.packets", "{packet}", "p", 0)]
    start = np.arange(len(series), dtype=np.uint64) + 5
    body = od.encode_sums({"service.name": "t", "n": 3}, "ebpf_otlp", "1.0", metrics, blobs,
                          counts, start, 999, TEMPORALITY_DELTA)
    req = ExportMetricsServiceRequest()
    req.ParseFromString(body)
    recs = list(metric_records(req))
    assert len(recs) == 600
    assert recs[0]["resource"] == {"service.name": "t", "n": 3}
    assert {r["temporality"] for r in recs} == {"delta"} and all(r["monotonic"] for r in recs)
    want = {(1000 + i, "network.flow.bytes"): 1000 * (i + 1) + (1 << 40) for i in range(300)}
    want.update({(1000 + i, "network.flow.packets"): i + 1 for i in range(300)})
    got = {(r["attributes"]["source.port"], r["name"]): r["value"] for r in recs}
    assert got == want
    attrs = recs[0]["attributes"]
    assert attrs["network.interface.name"] == "eth7"
    assert attrs["network.io.direction"] == "receive" and attrs["network.type"] == "ipv4"
    assert attrs["network.transport"] == "udp" and attrs["destination.port"] == 53
    assert {r["time_ns"] for r in recs} == {999}
    assert sorted({r["start_ns"] for r in recs}) == list(range(5, 305))


def test_attribute_sets_are_unique_whatever_is_kept():
    """Series that export the same attribute set must have been merged."""
    import itertools

    from ebpf_otlp.config import FLOW_ATTRIBUTES
    from ebpf_otlp.signals.flows import agg as agg
    from ebpf_otlp.signals.flows import attrs as fa

    d = _drained([("10.0.0.1", 1000, "10.0.0.2", 80, 6, 1, 10),
                  ("10.0.0.1", 1000, "10.0.0.2", 80, 17, 2, 20),
                  ("10.0.0.1", 0, "10.0.0.2", 0, 1, 4, 40),
                  ("10.0.0.5", 0, "10.0.0.2", 0, 47, 8, 80)])
    d.keys["l3"][3] = 0  # an unreadable IP header: no IP attributes
    d.keys["saddr"][3] = 0
    d.keys["daddr"][3] = 0
    d.keys["proto"][3] = 0
    d.tcp_flags[0] = 0x12
    names = (*FLOW_ATTRIBUTES, "network.tcp.flags")
    for r in range(len(names) + 1):
        for kept in itertools.combinations(names, r):
            series, counts = agg.aggregate(agg.project(d, kept), d.counts)
            sets = [tuple(sorted(a.items())) for a in fa.dicts(series, kept, {})]
            assert len(sets) == len(set(sets)), kept
            assert int(counts[:, 1].sum()) == 150


CACHE_GROWTH = r"""
import ipaddress, tracemalloc
import numpy as np
from ebpf_otlp.config import FLOW_ATTRIBUTES
from ebpf_otlp.signals.flows import agg, attrs as fa

def drained(ports):
    n = len(ports)
    keys = np.zeros(2 * n, agg.KEY_DT)
    a = np.frombuffer(ipaddress.IPv6Address("::ffff:10.0.0.1").packed, np.uint8)
    b = np.frombuffer(ipaddress.IPv6Address("::ffff:10.0.0.2").packed, np.uint8)
    keys["saddr"][:n], keys["daddr"][:n] = a, b
    keys["saddr"][n:], keys["daddr"][n:] = b, a
    keys["sport"][:n], keys["dport"][:n] = ports, 7777
    keys["sport"][n:], keys["dport"][n:] = 7777, ports
    keys["proto"], keys["ethertype"], keys["l3"], keys["ifindex"] = 6, 0x0800, 1, 1
    counts = np.ones((2 * n, 3), np.uint64)
    z = np.zeros(2 * n, np.uint64)
    return agg.Drained(keys, counts, np.zeros(2 * n, np.uint16), z)

tracemalloc.start()
for it in range(60):
    ports = 32768 + (np.arange(1000) + 1000 * it) % 28000
    d = drained(ports)
    series, _ = agg.aggregate(agg.project(d, FLOW_ATTRIBUTES), d.counts)
    fa.encoded(series, FLOW_ATTRIBUTES, {1: "eth0"})
    if it == 10:
        base = tracemalloc.get_traced_memory()[0]
print(tracemalloc.get_traced_memory()[0] - base)
"""


def test_attribute_cache_holds_live_values_not_every_port_ever_seen():
    """The flows agent's RSS growth in bench/soak.py: every new TCP connection
    brings an ephemeral port, and a cache of encoded attribute values bounded
    only by size kept them all (~250 B per connection). Fifty exports of 1,000
    new connections each (both directions), in a fresh interpreter, must not
    grow traced memory past a few hundred KiB after the first ten (the old
    cache: ~6 MiB), and the encoding stays the same."""
    import subprocess
    import sys

    from ebpf_otlp.config import FLOW_ATTRIBUTES
    from ebpf_otlp.otlp.sums import point_attribute
    from ebpf_otlp.signals.flows import agg as agg
    from ebpf_otlp.signals.flows import attrs as fa

    out = subprocess.run([sys.executable, "-c", CACHE_GROWTH], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout)
    print(f"traced memory grew {grew // 1024} KiB over 50 exports of 1,000 new connections")
    assert grew < 1024 * 1024, f"flow attribute encoding kept {grew // 1024} KiB more"
    d = _drained([("10.0.0.1", 40000, "10.0.0.2", 7777, 6, 1, 100)])
    series, _ = agg.aggregate(agg.project(d, FLOW_ATTRIBUTES), d.counts)
    blobs = fa.encoded(series, FLOW_ATTRIBUTES, {1: "eth0"})
    want = b"".join(point_attribute(k, v) for k, v in fa.dicts(series, FLOW_ATTRIBUTES,
                                                               {1: "eth0"})[0].items())
    assert blobs[0] == want
