"""Spans encoded from columns (SpanEncoder.grouped) decode to the same spans
as the per-record path (SpanEncoder.spans), checked with opentelemetry-proto."""

from __future__ import annotations

import numpy as np
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from ebpf_otlp.otlp.spans import (
    ENCODE_CHUNK,
    SPAN_KIND_SERVER,
    SpanBatchExporter,
    SpanEncoder,
    SpanGroup,
    SpanRecord,
)


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


def _decode_all(enc: SpanEncoder, spans: list) -> list[tuple]:
    """Every span of every resource: (resource attributes, span fields), in order
    of the resources, then of the spans."""
    req = ExportTraceServiceRequest.FromString(enc.wrap(spans))
    out = []
    for rs in req.resource_spans:
        res = sorted((kv.key, kv.value.string_value) for kv in rs.resource.attributes)
        for s in rs.scope_spans[0].spans:
            out.append((res, s.name, s.kind, s.start_time_unix_nano, s.end_time_unix_nano,
                        sorted((kv.key, str(kv.value)) for kv in s.attributes),
                        s.status.code, bytes(s.trace_id), bytes(s.parent_span_id),
                        len(s.span_id)))
    return out


def test_grouped_spans_of_every_length_and_resource() -> None:
    """Spans of 128 bytes and more (their length laid out with numpy), of less,
    and over 16 KiB (one by one) in one batch or alone, with resources, given
    trace ids and parents: the same as the per-record path."""
    rng = np.random.default_rng(5)
    enc = SpanEncoder({"service.name": "t"}, "scope")
    pod = (("k8s.pod.name", "p1"),)
    groups = [SpanGroup("GET /a", (("url.path", "/a" * 60), ("server.port", 80)), None,
                        SPAN_KIND_SERVER),
              SpanGroup("GET /b", (("url.path", "/b"),), "500", SPAN_KIND_SERVER, pod),
              SpanGroup("GET /c", (("h", "x" * 17000),), None, SPAN_KIND_SERVER, pod),
              SpanGroup("GET /d", (("url.path", "/d" * 100),), None, SPAN_KIND_SERVER, pod)]
    for used in ([0], [0, 3], [0, 1], [0, 1, 2, 3], [1], [2]):
        n = 200
        start = rng.integers(10**18, 2 * 10**18, n)
        end = start + rng.integers(0, 10**9, n)
        group = rng.choice(used, n)
        ports = rng.integers(1, 8, n).tolist()
        trace = rng.integers(0, 256, (n, 16), dtype=np.uint8)
        parents = [bytes(rng.integers(0, 256, 8, dtype=np.uint8)) if i % 3 == 0 else None
                   for i in range(n)]
        got = _decode_all(enc, enc.grouped(start, end, group, groups,
                                           [("network.peer.port", ports)], trace, parents))
        recs = []
        for i in range(n):
            g = groups[group[i]]
            recs.append(SpanRecord(int(start[i]), int(end[i]), g.name,
                                   (*g.attributes, ("network.peer.port", ports[i])), g.error,
                                   g.kind, bytes(trace[i]), parents[i], g.resource))
        want = _decode_all(enc, enc.spans(recs))
        assert got == want, f"groups {used}"
        assert len(got) == n


def test_a_full_queue_stops_encoding_and_what_fits_is_the_batch_head_in_order() -> None:
    """Byte bound 4 KiB, 5,000 spans offered in one batch: the queue holds the
    batch's first spans, equal to encoding them directly, within the bound;
    the rest are counted queue_full, and no more than one chunk is encoded
    beyond what was queued (a collector that is down costs counting, not
    encoding)."""
    encoded = [0]

    class Counting(SpanEncoder):
        def grouped(self, *a, **kw) -> list:
            out = super().grouped(*a, **kw)
            encoded[0] += len(out)
            return out

    bodies: list[bytes] = []
    ex = SpanBatchExporter({"service.name": "t"}, lambda body: bodies.append(body) or True,
                           max_queue_bytes=4096)
    ex.encoder = Counting({"service.name": "t"}, "ebpf_otlp")
    groups = [SpanGroup("DNS A", (("dns.question.name", "a.test"),))]
    n = 5000
    start = np.arange(n, dtype=np.uint64) * 1000 + 10**18
    end = start + 500
    group = np.zeros(n, dtype=np.int64)
    ports = list(range(n))
    dropped = ex.submit_grouped(start, end, group, groups, [("client.port", ports)])
    kept = n - dropped
    assert 0 < kept < n and ex.dropped == {"queue_full": dropped}
    assert 0 < ex.queued_bytes <= 4096
    assert encoded[0] <= kept + ENCODE_CHUNK, f"encoded {encoded[0]} spans to queue {kept}"
    ex.start()
    assert ex.flush(5), "the queue did not empty"
    got = [s for b in bodies for s in ExportTraceServiceRequest.FromString(b)
           .resource_spans[0].scope_spans[0].spans]
    assert [s.start_time_unix_nano for s in got] == start[:kept].tolist()
    assert [s.attributes[-1].value.int_value for s in got] == ports[:kept]
    # with room again the next batch is queued whole
    assert ex.submit_grouped(start[:3], end[:3], group[:3], groups,
                             [("client.port", ports[:3])]) == 0
    ex.shutdown(2)
