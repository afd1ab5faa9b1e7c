"""The DNS signal's batched path (questions grouped by bytes, exchanges paired
with numpy inside a batch, spans encoded from columns, histogram values per
series) against a straightforward per-message reference, on random traffic:
duplicated queries and answers, answers that never come, answers without a
query, exchanges split across batches, garbage."""

from __future__ import annotations

import sys
import time
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path

import dns.message
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from ebpf_otlp.config import AgentConfig
from ebpf_otlp.otlp.histogram import BatchHistogram
from ebpf_otlp.otlp.semconv import DURATION_BUCKETS
from ebpf_otlp.otlp.spans import SpanEncoder
from ebpf_otlp.signals.dns import DnsSignal

sys.path.insert(0, str(Path(__file__).parent))
from test_dns_decode import answer, batch, query, rec  # noqa: E402

TIMEOUT_S = 60.0
RCODES = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN"}
SERVERS = ["10.0.0.53", "10.0.0.54", "fd00::53"]
CLIENTS = {"10.0.0.53": "10.0.0.1", "10.0.0.54": "10.0.0.2", "fd00::53": "fd00::1"}


class _Exporter:
    """What DnsSignal uses of the Exporter: SDK counters read in memory, the real
    bulk histograms, and spans through the real column encoder, decoded back."""

    delta = False
    cardinality_limit = 1 << 20

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meter = MeterProvider(metric_readers=[self.reader]).get_meter("t")
        self.hists: dict[str, BatchHistogram] = {}
        self.encoder = SpanEncoder({}, "t")
        self.spans: list[tuple] = []

    def observe(self, *args: object, **kwargs: object) -> None:
        pass

    def histogram(self, name: str, unit: str, description: str) -> BatchHistogram:
        h = self.hists[name] = BatchHistogram(name, unit, description, DURATION_BUCKETS,
                                              delta=False, cardinality_limit=1 << 20)
        return h

    def submit_span_groups(self, start, end, group, groups, columns) -> int:
        req = ExportTraceServiceRequest.FromString(self.encoder.wrap(
            self.encoder.grouped(start, end, group, groups, columns)))
        for s in req.resource_spans[0].scope_spans[0].spans:
            attrs = tuple(sorted((kv.key, kv.value.string_value or kv.value.int_value)
                                 for kv in s.attributes))
            self.spans.append((s.name, s.end_time_unix_nano - s.start_time_unix_nano, attrs,
                               s.status.message or None))
        return 0

    def sums(self) -> dict[str, Counter]:
        out: dict[str, Counter] = defaultdict(Counter)
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in m.data.data_points:
                        out[m.name][tuple(sorted(p.attributes.items()))] += p.value
        return out


def traffic(rng: np.random.Generator, n: int, t0: int, ids: int = 1 << 16
            ) -> tuple[list[np.ndarray], list[dict]]:
    """Records in wire order and, per record, what it is (the reference's input)."""
    names = [f"{'Host' if i % 3 else 'host'}{i % 7}.Example.Test" for i in range(20)]
    out, meta = [], []
    ts = t0
    pending: list[tuple] = []
    for _ in range(n):
        ts += int(rng.integers(1, 50_000))
        if pending and rng.random() < 0.45:  # answer (or lose) a waiting query
            q, m = pending.pop(int(rng.integers(0, len(pending))))
            rcode = int(rng.choice(list(RCODES)))
            wire = answer(q, rcode=rcode, n=int(rng.integers(0, 3)) if rcode == 0 else 0)
            r = rec(wire, ts=ts, src=m["server"], dst=m["client"], sport=53, dport=m["cport"])
            am = dict(m, response=True, ts=ts, rcode=rcode,
                      answers=dns.message.from_wire(wire).answer and
                      len(dns.message.from_wire(wire).answer[0]) or 0)
            copies = 2 if rng.random() < 0.1 else 1  # the same answer seen twice
            for _ in range(copies):
                out.append(r)
                meta.append(am)
            continue
        if rng.random() < 0.03:  # garbage
            out.append(rec(b"\xff" * int(rng.integers(1, 40)), ts=ts))
            meta.append({"garbage": True})
            continue
        server = SERVERS[int(rng.integers(0, len(SERVERS)))]
        name = names[int(rng.integers(0, len(names)))]
        qtype = str(rng.choice(["A", "AAAA", "TXT"]))
        qid = int(rng.integers(0, ids))
        cport = int(rng.integers(30000, 30100 if ids > 16 else 30002))
        q = query(name, qtype, qid=qid)
        m = {"response": False, "ts": ts, "name": name, "qtype": qtype, "server": server,
             "client": CLIENTS[server], "cport": cport, "qid": qid}
        r = rec(q.to_wire(), ts=ts, src=m["client"], dst=server, sport=cport)
        copies = 2 if rng.random() < 0.05 else 1  # a retransmitted query
        for _ in range(copies):
            out.append(r)
            meta.append(m)
        if rng.random() < 0.03:  # an answer nobody asked for (another id)
            other = query(name, qtype, qid=(qid + 1) % (1 << 16))
            out.append(rec(answer(other), ts=ts + 1, src=server, dst=m["client"], sport=53,
                           dport=cport))
            meta.append(dict(m, response=True, ts=ts + 1, qid=(qid + 1) % (1 << 16),
                             rcode=0, answers=1))
        if rng.random() < 0.9:
            pending.append((q, m))
    return out, meta


def reference(meta: list[dict], names: bool) -> dict:
    """One message at a time, the README's rules."""
    pending: OrderedDict = OrderedDict()
    spans, hist = [], defaultdict(list)
    queries, responses = Counter(), Counter()

    def server_attrs(m):
        return (("server.address", m["server"]), ("server.port", 53),
                ("network.transport", "udp"))

    def emit(q, end, rcode, answers):
        base = (("dns.question.name", q["name"]), ("dns.question.type", q["qtype"]),
                ("network.type", "ipv6" if ":" in q["server"] else "ipv4"),
                ("network.interface.name", "lo"), ("client.address", q["client"]),
                ("client.port", q["cport"])) + server_attrs(q)
        h = (("dns.question.type", q["qtype"]),) + server_attrs(q)
        if names:
            h += (("dns.question.name", q["name"].lower()),)
        if rcode is None:
            err, attrs = "timeout", base
            h += (("error.type", "timeout"),)
        else:
            rc = RCODES[rcode]
            err = None if rcode in (0, 3) else rc
            attrs = base + (("dns.response_code", rc), ("dns.answer.count", answers))
            h += (("dns.response_code", rc),) + ((("error.type", err),) if err else ())
            if err:
                attrs += (("error.type", err),)
        if rcode is None:
            attrs += (("error.type", "timeout"),)
        spans.append(("DNS " + q["qtype"], end - q["ts"], tuple(sorted(attrs)), err))
        hist[tuple(sorted(h))].append((end - q["ts"]) / 1e9)

    for m in meta:
        if m.get("garbage"):
            continue
        key = (m["qid"], m["client"], m["cport"], m["server"])
        lname = (("dns.question.name", m["name"].lower()),) if names else ()
        if not m["response"]:
            queries[tuple(sorted((("dns.question.type", m["qtype"]),) + server_attrs(m)
                                 + lname))] += 1
            if key not in pending:
                pending[key] = m
        else:
            responses[tuple(sorted((("dns.question.type", m["qtype"]),
                                    ("dns.response_code", RCODES[m["rcode"]]))
                                   + server_attrs(m) + lname))] += 1
            q = pending.pop(key, None)
            if q is not None:
                emit(q, m["ts"], m["rcode"], m["answers"])
    for q in pending.values():
        emit(q, q["ts"] + int(TIMEOUT_S * 1e9), None, 0)
    return {"spans": spans, "hist": hist, "dns.queries": queries, "dns.responses": responses}


@pytest.mark.parametrize(("names", "ids"), [(False, 1 << 16), (True, 1 << 16), (False, 4)])
def test_batched_dns_equals_per_message_reference(names: bool, ids: int) -> None:
    """``ids=4``: few ids and ports, so exchanges reuse their key within a batch."""
    rng = np.random.default_rng(11 + names + ids)
    recs, meta = traffic(rng, 3000, time.monotonic_ns(), ids)
    allr = batch(*recs)
    tel = _Exporter()
    sig = DnsSignal(AgentConfig(dns_names=names, dns_timeout_s=TIMEOUT_S), tel)
    sig._ifnames[1] = "lo"
    cuts = sorted(set(rng.integers(1, len(allr), 12).tolist()))
    for lo, hi in zip([0, *cuts], [*cuts, len(allr)]):
        sig.on_batch(allr[lo:hi])  # ring batches: processed as they fill BATCH_RECORDS
    sig.collect()  # the rest
    sig.expire(flush_all=True)
    sig.collect()
    want = reference(meta, names)

    assert Counter(tel.spans) == Counter(want["spans"])
    m, _ = tel.hists["dns.lookup.duration"].metric()
    got = {tuple(sorted((kv.key, kv.value.string_value or kv.value.int_value)
                        for kv in p.attributes)): (p.count, list(p.bucket_counts), p.sum)
           for p in m.histogram.data_points}
    assert got.keys() == want["hist"].keys()
    for k, vals in want["hist"].items():
        b = [0] * (len(DURATION_BUCKETS) + 1)
        for v in vals:
            b[sum(v > x for x in DURATION_BUCKETS)] += 1
        assert got[k][:2] == (len(vals), b), k
        assert got[k][2] == pytest.approx(sum(vals), rel=1e-9)
    sums = tel.sums()
    assert sums["dns.queries"] == want["dns.queries"]
    assert sums["dns.responses"] == want["dns.responses"]
    assert sig.decoder.malformed  # the garbage was counted, not emitted
