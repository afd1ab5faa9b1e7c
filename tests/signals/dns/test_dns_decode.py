"""DNS decoding, pairing and the batch span path, without the kernel.

Records are built the way the BPF program lays them out (the dtype comes
from bpf/dns.h); DNS messages come from dnspython's *writer* or are crafted
byte by byte, and expectations are the values we put in, never what our
decoder returned elsewhere.
"""

from __future__ import annotations

import socket
import struct

import dns.message
import dns.rrset
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from ebpf_otlp.otlp.spans import SpanBatchExporter, SpanEncoder
from ebpf_otlp.platform.layout import record_dtype
from ebpf_otlp.signals.dns.decode import (
    INVALID,
    NO_QUESTION,
    SHORT,
    TRUNCATED,
    Decoder,
    PendingTable,
    Query,
    TcpContinuations,
)

DT = record_dtype("dns", "dns_event")
CLIENT, SERVER = "10.0.0.1", "10.0.0.53"


def rec(msg: bytes, *, ts: int = 1_000, src: str = CLIENT, dst: str = SERVER, sport: int = 40000,
        dport: int = 53, proto: int = 17, head_bytes: int = 512, msg_len: int | None = None,
        seg_len: int | None = None):
    r = np.zeros(1, dtype=DT)
    fam = 6 if ":" in src else 4
    af = socket.AF_INET6 if fam == 6 else socket.AF_INET
    r["ts_ns"] = ts
    for field, a in (("saddr", src), ("daddr", dst)):
        raw = socket.inet_pton(af, a)
        if fam == 4:
            raw = b"\0" * 10 + b"\xff\xff" + raw  # IPv4-mapped (bpf/pkt.bpf.h)
        r[field][0] = np.frombuffer(raw, np.uint8)
    r["sport"], r["dport"], r["proto"], r["family"], r["ifindex"] = sport, dport, proto, fam, 1
    n = min(len(msg), head_bytes)
    r["msg_len"] = len(msg) if msg_len is None else msg_len
    r["seg_len"] = len(msg) if seg_len is None else seg_len
    r["head_len"] = n
    r["head"][0, :n] = np.frombuffer(msg[:n], np.uint8)
    return r


def batch(*recs: np.ndarray) -> np.ndarray:
    return np.concatenate(recs)


def query(name: str, rdtype: str = "A", qid: int = 0x1234) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    q.id = qid
    return q


def answer(q: dns.message.Message, rcode: int = 0, n: int = 1) -> bytes:
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for i in range(n):
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", f"10.9.9.{i}"))
    return r.to_wire()


def reply_rec(msg: bytes, **kw):
    """A response travelling server -> client."""
    return rec(msg, src=kw.pop("src", SERVER), dst=kw.pop("dst", CLIENT), sport=53,
               dport=kw.pop("dport", 40000), **kw)


def test_header_question_and_pair_keys():
    q = query("www.Example.test", "AAAA", 0xBEEF)
    r = answer(q, n=3)
    msgs = Decoder().decode(batch(rec(q.to_wire(), ts=5), reply_rec(r, ts=9)))
    assert [(m.response, m.name, m.qtype, m.ts_ns) for m in msgs] == [
        (False, "www.Example.test", "AAAA", 5), (True, "www.Example.test", "AAAA", 9)]
    assert msgs[1].answers == 3 and msgs[1].rcode == 0
    assert msgs[0].key == msgs[1].key  # query and its answer meet under one key


def test_keys_differ_by_id_port_server_and_transport():
    q = query("a.test")
    base = Decoder().decode(batch(rec(q.to_wire())))[0].key
    others = [
        Decoder().decode(batch(rec(query("a.test", qid=0x1235).to_wire())))[0].key,
        Decoder().decode(batch(rec(q.to_wire(), sport=40001)))[0].key,
        Decoder().decode(batch(rec(q.to_wire(), dst="10.0.0.54")))[0].key,
        Decoder().decode(batch(rec(q.to_wire(), proto=6)))[0].key,
    ]
    assert len({base, *others}) == 5


def test_ipv6_and_root_name():
    q = query(".", "NS")
    m = Decoder().decode(batch(rec(q.to_wire(), src="fd00::1", dst="fd00::53")))[0]
    assert (m.name, m.qtype) == (".", "NS")


def test_question_cache_parses_each_question_once():
    d = Decoder()
    wires = [query("cached.test", qid=i).to_wire() for i in range(50)]
    assert len(d.decode(batch(*[rec(w) for w in wires]))) == 50
    assert d.parsed == 1


def test_compressed_question_goes_to_dnspython():
    # A question name that is a pointer into... itself: invalid (must point backwards).
    hdr = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0)
    loop = hdr + b"\xc0\x0c" + struct.pack("!HH", 1, 1)
    # Two pointers pointing at each other.
    loop2 = hdr + b"\xc0\x0e\xc0\x0c" + struct.pack("!HH", 1, 1)
    d = Decoder()
    assert d.decode(batch(rec(loop), rec(loop2))) == []
    assert d.malformed[INVALID] == 2


@pytest.mark.parametrize("wire,reason", [
    (b"", SHORT),
    (b"\x00" * 11, SHORT),
    (struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x03www\x07exam", TRUNCATED),
    (struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x41" + b"a" * 65 + b"\0\0\1\0\1",
     INVALID),  # label type 0x40 (reserved)
    (struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x3f" + b"a" * 63 * 1 + (b"\x3f" + b"b" * 63)
     * 4 + b"\0\0\1\0\1", INVALID),  # 320-byte name
    (struct.pack("!HHHHHH", 1, 0x0100, 0, 0, 0, 0), NO_QUESTION),
])
def test_bad_messages_are_counted_by_reason(wire, reason):
    d = Decoder()
    assert d.decode(batch(rec(wire))) == []
    assert d.malformed == {reason: 1}


def test_head_shorter_than_question_is_truncated():
    w = query("x" * 60 + "." + "y" * 60 + ".test").to_wire()
    d = Decoder()
    assert d.decode(batch(rec(w, head_bytes=64))) == []
    assert d.malformed == {TRUNCATED: 1}


def test_head_cut_after_question_still_decodes():
    q = query("big.test", "TXT")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("big.test.", 60, "IN", "TXT", *[f'"{"z" * 200}"'] * 5))
    w = r.to_wire()
    m = Decoder().decode(batch(reply_rec(w, head_bytes=64)))
    assert [(x.name, x.qtype, x.answers) for x in m] == [("big.test", "TXT", 1)]


def test_good_messages_survive_bad_neighbours():
    good = query("ok.test").to_wire()
    d = Decoder()
    msgs = d.decode(batch(rec(b"\xff" * 40), rec(good), rec(b"\x01"), rec(good, sport=40001)))
    assert [m.name for m in msgs] == ["ok.test", "ok.test"]
    assert sum(d.malformed.values()) == 2


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=600), min_size=1, max_size=8), st.integers(12, 512))
def test_fuzz_decoder_never_raises(wires, head_bytes):
    d = Decoder()
    recs = batch(*[rec(w, head_bytes=head_bytes) for w in wires])
    msgs = d.decode(recs)
    assert len(msgs) + sum(d.malformed.values()) == len(wires)
    for m in msgs:  # what we accept, dnspython accepts on the same bytes
        i = m.row
        wire = bytes(recs["head"][i, :recs["head_len"][i]])
        parsed = dns.message.from_wire(wire, question_only=True, ignore_trailing=True)
        assert parsed.question[0].name.to_text(omit_final_dot=True) == m.name


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="abcdefghij-0123456789", min_size=1, max_size=20),
                min_size=1, max_size=5),
       st.sampled_from(["A", "AAAA", "TXT", "MX", "SRV", "PTR"]), st.integers(0, 0xFFFF),
       st.integers(0, 60))
def test_fuzz_valid_questions_roundtrip(labels, rdtype, qid, mutate_at):
    name = ".".join(labels) + ".test"
    w = bytearray(query(name, rdtype, qid).to_wire())
    msgs = Decoder().decode(batch(rec(bytes(w))))
    assert [(m.name, m.qtype) for m in msgs] == [(name, rdtype)]
    # One flipped byte anywhere: still never an exception.
    w[mutate_at % len(w)] ^= 0xA5
    d = Decoder()
    assert len(d.decode(batch(rec(bytes(w))))) + sum(d.malformed.values()) == 1


def test_tcp_continuation_segments_are_skipped_not_malformed():
    q = query("big.test", "TXT", 5)
    first = reply_rec(answer(q), proto=6, msg_len=3000, seg_len=1400)
    cont1 = reply_rec(b"\xde\xad" * 300, proto=6, msg_len=0xDEAD, seg_len=1398)
    cont2 = reply_rec(b"\xbe\xef" * 50, proto=6, msg_len=0xBEEF, seg_len=198)
    nxt = reply_rec(answer(query("next.test", "A", 6)), proto=6)
    other_flow = reply_rec(b"\xff" * 40, proto=6, dport=40001)  # garbage elsewhere
    recs = batch(first, cont1, cont2, nxt, other_flow)
    guard = TcpContinuations()
    skip = guard.mask(recs)
    assert skip.tolist() == [False, True, True, False, False] and guard.skipped == 2
    d = Decoder()
    assert [m.name for m in d.decode(recs[~skip])] == ["big.test", "next.test"]
    assert sum(d.malformed.values()) == 1  # only the other flow's garbage
    assert guard.mask(batch(rec(query("u.test").to_wire()))) is None  # no TCP: no work


# --- pairing -------------------------------------------------------------------------

def q_(ts: int) -> Query:
    return Query(ts, "n.test", "A", ("c", 1, "s", 53, "udp", "ipv4", "eth0"))


def test_pending_pairs_once_and_counts_orphans_and_copies():
    t = PendingTable(max_pending=10, timeout_ns=1000)
    assert t.add(b"k1", q_(1))
    assert not t.add(b"k1", q_(2))  # a copy: the first send is kept
    assert t.answer(b"k1", 5).ts_ns == 1
    assert t.answer(b"k1", 6) is None  # a second copy of the answer
    assert t.answer(b"k2", 7) is None  # never asked
    assert (t.duplicates, t.unmatched, len(t)) == (2, 1, 0)


def test_pending_timeout_and_eviction():
    t = PendingTable(max_pending=3, timeout_ns=100)
    for i in range(5):
        t.add(bytes([i]), q_(i * 10))
    assert t.evicted == 2 and len(t) == 3
    assert [q.ts_ns for q in t.expire(125)] == [20]
    assert [q.ts_ns for q in t.expire(1000)] == [30, 40]


# --- span encoding and the batch exporter ----------------------------------------------------

ITEM = (1_700_000_000_000_000_000, 1_700_000_000_002_500_000, "DNS A",
        (("dns.question.name", "a.test"), ("dns.question.type", "A"), ("server.port", 53),
         ("client.port", 40000)), None)


def test_encoded_request_parses_with_opentelemetry_proto():
    enc = SpanEncoder({"service.name": "svc", "host.name": "h"}, "ebpf_otlp")
    err = (ITEM[0], ITEM[1] + 5, "DNS AAAA", (("dns.question.type", "AAAA"),), "timeout")
    req = ExportTraceServiceRequest()
    req.ParseFromString(enc.request([ITEM, err]))
    (rs,) = req.resource_spans
    assert {kv.key: kv.value.string_value for kv in rs.resource.attributes} == {
        "service.name": "svc", "host.name": "h"}
    (ss,) = rs.scope_spans
    assert ss.scope.name == "ebpf_otlp"
    a, b = ss.spans
    assert (a.name, a.kind, a.start_time_unix_nano, a.end_time_unix_nano) == (
        "DNS A", 3, ITEM[0], ITEM[1])
    assert len(a.trace_id) == 16 and len(a.span_id) == 8 and a.trace_id != b.trace_id
    attrs = {kv.key: kv.value for kv in a.attributes}
    assert attrs["dns.question.name"].string_value == "a.test"
    assert attrs["server.port"].int_value == 53
    assert a.status.code == 0
    assert b.status.code == 2 and b.status.message == "timeout"
    assert {kv.key: kv.value.string_value for kv in b.attributes}["error.type"] == "timeout"


def test_exporter_counts_queue_full_and_failed_exports():
    sent: list[bytes] = []
    ok = [True]

    def send(data: bytes) -> bool:
        sent.append(data)
        return ok[0]

    ex = SpanBatchExporter({}, send, max_queue=10, max_batch=4, flush_interval_s=0.05)
    assert ex.submit([ITEM] * 15) == 5
    ex.start()
    assert ex.flush(5)
    ok[0] = False
    ex.submit([ITEM] * 3)
    assert ex.flush(5)
    ex.shutdown(2)
    assert ex.exported == 10
    assert dict(ex.dropped) == {"queue_full": 5, "export_failed": 3}
    total = 0
    for data in sent:
        req = ExportTraceServiceRequest()
        req.ParseFromString(data)
        total += len(req.resource_spans[0].scope_spans[0].spans)
    assert total == 13


# --- the duration histogram's own OTLP path ------------------------------------------------

def _hist_points(data: bytes) -> list:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    req = ExportMetricsServiceRequest()
    req.ParseFromString(data)
    (rm,) = req.resource_metrics
    (sm,) = rm.scope_metrics
    (m,) = sm.metrics
    assert (m.name, m.unit, sm.scope.name) == ("dns.lookup.duration", "s", "ebpf_otlp")
    return m.histogram.aggregation_temporality, list(m.histogram.data_points)


class _Hist:
    """A bulk histogram and the request the exporter would make of it."""

    def __init__(self, delta: bool, limit: int = 100):
        from ebpf_otlp.otlp.histogram import BatchHistogram

        self.h = BatchHistogram("dns.lookup.duration", "s", "d", (0.001, 0.01, 0.1),
                                delta=delta, cardinality_limit=limit)
        self.record_batch = self.h.record_batch

    def request(self, now_ns: int | None = None) -> bytes | None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )
        from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
        from opentelemetry.proto.metrics.v1.metrics_pb2 import ResourceMetrics, ScopeMetrics

        m = self.h.metric(now_ns)
        if m is None:
            return None
        return ExportMetricsServiceRequest(resource_metrics=[ResourceMetrics(scope_metrics=[
            ScopeMetrics(scope=InstrumentationScope(name="ebpf_otlp"), metrics=[m[0]])])]
        ).SerializeToString()


def _hist(delta: bool, limit: int = 100) -> _Hist:
    return _Hist(delta, limit)


A = (("dns.question.type", "A"), ("server.port", 53))
B = (("dns.question.type", "AAAA"), ("server.port", 53))


def test_histogram_buckets_are_upper_inclusive_like_otlp():
    h = _hist(delta=True)
    h.record_batch([(A, v) for v in (0.0005, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.2)])
    temporality, (p,) = _hist_points(h.request())
    assert temporality == 1  # delta
    assert list(p.bucket_counts) == [2, 2, 2, 1]
    assert list(p.explicit_bounds) == [0.001, 0.01, 0.1]
    assert p.count == 7 and p.min == 0.0005 and p.max == 0.2
    assert p.sum == pytest.approx(0.3626)
    assert {kv.key: (kv.value.string_value or kv.value.int_value) for kv in p.attributes} == {
        "dns.question.type": "A", "server.port": 53}


def test_histogram_delta_resets_cumulative_accumulates():
    d, c = _hist(delta=True), _hist(delta=False)
    for h in (d, c):
        h.record_batch([(A, 0.002)])
        h.request(now_ns=10)
        h.record_batch([(B, 0.002), (B, 0.003)])
    _, dp = _hist_points(d.request(now_ns=20))
    assert [(p.count, p.start_time_unix_nano) for p in dp] == [(2, 10)]
    temporality, cp = _hist_points(c.request(now_ns=20))
    assert temporality == 2 and sorted(p.count for p in cp) == [1, 2]
    assert d.request() is None  # nothing new: no empty delta points


def test_histogram_overflow_and_failed_exports_are_counted(monkeypatch):
    from ebpf_otlp.config import AgentConfig
    from ebpf_otlp.otlp import Exporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta")
    cfg = AgentConfig(endpoint=f"http://127.0.0.1:{_free_port()}", export_timeout_s=0.5)
    ex = Exporter(cfg.export_settings(), 1.0, cardinality_limit=3)
    h = ex.histogram("dns.lookup.duration", "s", "d", (0.001, 0.01, 0.1))
    keys = [(("dns.question.type", f"T{i}"),) for i in range(5)]
    h.record_batch([(k, 0.001) for k in keys])
    assert not ex.export()  # nobody listens
    # the failed delta points wait for a retry in the sender's byte-bounded queue
    assert (h.failures, h.points_lost) == (1, 0)
    assert ex.senders["metrics"].queued_bytes > 0
    h.record_batch([(k, 0.001) for k in keys])
    m, n = h.metric()
    assert n == 5 and len(m.histogram.data_points) == 3  # 2 series + the overflow one
    assert h.overflowed == 6 and h.series_overflowed == 3
    ex.shutdown(1)
    # still queued at exit: the 3 points (2 series + overflow) counted, with the SDK's
    assert ex.senders["metrics"].dropped["shutdown"] >= 3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the signal's mapping, fed records directly (no kernel, no network) ---------------------

def _signal(**cfg):
    from ebpf_otlp.config import AgentConfig
    from ebpf_otlp.otlp import Exporter
    from ebpf_otlp.signals.dns import DnsSignal

    # Nothing listens on port 9: the SDK metrics export at shutdown fails fast.
    config = AgentConfig(ifaces=[], endpoint="http://127.0.0.1:9", export_timeout_s=0.2, **cfg)
    tel = Exporter(config.export_settings(), 1.0, config.cardinality_limit)
    sig = DnsSignal(config, tel)
    sent: dict[str, list[bytes]] = {"traces": [], "metrics": []}
    for kind in sent:
        tel.senders[kind].send = lambda d, *_a, _k=kind, **_kw: sent[_k].append(d) or True
    return sig, tel, sent


def _spans(sent: list[bytes]) -> list:
    out = []
    for data in sent:
        req = ExportTraceServiceRequest()
        req.ParseFromString(data)
        out += list(req.resource_spans[0].scope_spans[0].spans)
    return out


def test_signal_maps_answers_errors_and_timeouts():
    sig, tel, sent = _signal(dns_timeout_s=0.5, dns_names=True)
    try:
        ok_q, nx_q, fail_q, lost_q = (query("ok.test", qid=1), query("NX.test", qid=2),
                                      query("fail.test", qid=3), query("lost.test", qid=4))
        sig.on_batch(batch(
            rec(ok_q.to_wire(), ts=1_000_000, sport=1001),
            rec(nx_q.to_wire(), ts=1_000_000, sport=1002),
            rec(fail_q.to_wire(), ts=1_000_000, sport=1003),
            rec(lost_q.to_wire(), ts=1_000_000, sport=1004),
            reply_rec(answer(ok_q), ts=3_500_000, dport=1001),
            reply_rec(answer(nx_q, rcode=3, n=0), ts=2_000_000, dport=1002),
            reply_rec(answer(fail_q, rcode=2, n=0), ts=9_000_000, dport=1003),
        ))
        sig.collect()  # ts 1 ms of CLOCK_MONOTONIC is long past: lost.test times out
        tel.spans.start()
        assert tel.spans.flush(5)
        tel.export()
        spans = {s.name + " " + {kv.key: kv.value.string_value for kv in s.attributes}[
            "dns.question.name"]: s for s in _spans(sent["traces"])}
        assert sorted(spans) == ["DNS A NX.test", "DNS A fail.test", "DNS A lost.test",
                                 "DNS A ok.test"]
        expect = {"ok.test": (2_500_000, 0, None, "NOERROR"),
                  "NX.test": (1_000_000, 0, None, "NXDOMAIN"),  # an answer, not a failure
                  "fail.test": (8_000_000, 2, "SERVFAIL", "SERVFAIL"),
                  "lost.test": (500_000_000, 2, "timeout", None)}
        for key, s in spans.items():
            name = key.split()[-1]
            dur, code, err, rcode = expect[name]
            attrs = {kv.key: kv.value for kv in s.attributes}
            assert s.end_time_unix_nano - s.start_time_unix_nano == dur, name
            assert s.status.code == code and s.kind == 3
            assert (attrs["error.type"].string_value if "error.type" in attrs else None) == err
            assert (attrs["dns.response_code"].string_value
                    if "dns.response_code" in attrs else None) == rcode
            assert attrs["client.port"].int_value == {"ok.test": 1001, "NX.test": 1002,
                                                      "fail.test": 1003,
                                                      "lost.test": 1004}[name]
            assert attrs["server.address"].string_value == SERVER
        (temporality, points) = _hist_points(sent["metrics"][0])
        by_name = {}
        for p in points:
            a = {kv.key: kv.value.string_value for kv in p.attributes}
            by_name[a["dns.question.name"]] = (p.count, a.get("error.type"))
        # Metrics keep names in lower case (0x20-randomised resolvers), spans the wire's.
        assert by_name == {"ok.test": (1, None), "nx.test": (1, None),
                           "fail.test": (1, "SERVFAIL"), "lost.test": (1, "timeout")}
    finally:
        sig.close()
        tel.shutdown(1)
