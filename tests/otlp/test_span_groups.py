"""Spans encoded from columns (SpanEncoder.grouped) decode to the same spans
as the per-record path (SpanEncoder.spans), checked with opentelemetry-proto."""

from __future__ import annotations

import numpy as np
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from ebpf_otlp.otlp.spans import SPAN_KIND_SERVER, SpanEncoder, SpanGroup, SpanRecord


def _decode(enc: SpanEncoder, spans: list[bytes]) -> list[tuple]:
    req = ExportTraceServiceRequest.FromString(enc.wrap(spans))
    out = []
    for s in req.resource_spans[0].scope_spans[0].spans:
        attrs = {kv.key: kv.value for kv in s.attributes}
        out.append((s.name, s.kind, s.start_time_unix_nano, s.end_time_unix_nano,
                    sorted((k, str(v)) for k, v in attrs.items()), s.status.code,
                    s.status.message, len(s.trace_id), len(s.span_id)))
    return out


def test_grouped_spans_equal_per_record_spans() -> None:
    rng = np.random.default_rng(3)
    enc = SpanEncoder({"service.name": "t"}, "scope")
    groups = [SpanGroup("DNS A", (("dns.question.name", "a.test"), ("server.port", 53))),
              SpanGroup("DNS AAAA", (("server.address", "fd00::1"),), "timeout"),
              SpanGroup("tcp accept 80", (("x", 1.5), ("y", True)), None, SPAN_KIND_SERVER)]
    n = 300
    start = rng.integers(10**18, 2 * 10**18, n)
    end = start + rng.integers(-5, 10**9, n)  # a few end before start: clamped
    group = rng.integers(0, len(groups), n)
    ports = rng.integers(1, 65536, n).tolist()
    counts = [None if g == 1 else int(c) for g, c in zip(group, rng.integers(0, 9, n))]
    columns = [("client.port", ports), ("dns.answer.count", counts)]
    got = _decode(enc, enc.grouped(start, end, group, groups, columns))
    recs = []
    for i in range(n):
        g = groups[group[i]]
        attrs = list(g.attributes) + [("client.port", ports[i])]
        if counts[i] is not None:
            attrs.append(("dns.answer.count", counts[i]))
        recs.append(SpanRecord(int(start[i]), int(end[i]), g.name, tuple(attrs), g.error,
                               g.kind))
    assert got == _decode(enc, enc.spans(recs))
    assert all(e >= s for _, _, s, e, *_ in got)
