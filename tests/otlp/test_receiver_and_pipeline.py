"""The OTLP/HTTP receiver and the SDK pipeline, over real HTTP."""

from __future__ import annotations

import gzip
import socket
import time
import urllib.error
import urllib.request
import zlib

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from ebpf_otlp.config import AgentConfig
from ebpf_otlp.otlp import DURATION_BUCKETS, Exporter, SpanRecord
from ebpf_otlp.receiver import Receiver


def exporter(cfg: AgentConfig) -> Exporter:
    return Exporter(cfg.export_settings(), cfg.interval_s, cfg.cardinality_limit)


def post(port: int, path: str, body: bytes, headers: dict | None = None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/x-protobuf",
                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_receiver_rejects_garbage_and_keeps_serving() -> None:
    with Receiver(port=0) as rx:
        assert post(rx.port, "/v1/metrics", b"\xff\x00garbage\x13") == 400
        assert post(rx.port, "/v1/traces", b"\x0a\x05") == 400  # truncated field
        assert post(rx.port, "/v1/metrics", b"not gzip", {"Content-Encoding": "gzip"}) == 400
        assert post(rx.port, "/v2/whatever", b"") == 404
        assert rx.bad_requests == 4
        empty = ExportMetricsServiceRequest().SerializeToString()
        assert post(rx.port, "/v1/metrics", gzip.compress(empty),
                    {"Content-Encoding": "gzip"}) == 200
        assert rx.requests == 1


def test_pipeline_exports_resource_and_seconds_histograms(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test,team=net")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    with Receiver(port=0) as rx:
        cfg = AgentConfig(endpoint=f"http://127.0.0.1:{rx.port}")
        cfg.service_name = "from-flag"  # a flag overrides the environment
        t = exporter(cfg)
        h = t.histogram("network.tcp.rtt", "s", "rtt")
        h.record_batch([((("network.tcp.handshake.role", "client"),), 0.0003)])
        c = t.meter.create_counter("network.flow.bytes", unit="By")
        c.add(1234, {"network.transport": "udp"})
        now = time.time_ns()
        assert t.submit_spans([SpanRecord(now, now + 1000, "probe", ())]) == 0
        assert t.export()
        t.shutdown(5)
        recs = rx.records
    hist = [r for r in recs if r.get("name") == "network.tcp.rtt"]
    assert hist and tuple(hist[0]["bounds"]) == DURATION_BUCKETS
    assert hist[0]["count"] == 1 and hist[0]["buckets"][2] == 1  # 0.25 ms < x <= 0.5 ms
    res = hist[0]["resource"]
    assert res["service.name"] == "from-flag" and res["team"] == "net"
    assert res["host.name"] == socket.gethostname()
    flow = [r for r in recs if r.get("name") == "network.flow.bytes"]
    assert flow[0]["value"] == 1234 and flow[0]["unit"] == "By"
    assert [r["name"] for r in recs if r["type"] == "span"] == ["probe"]


def test_collector_down_is_counted_and_shutdown_is_bounded() -> None:
    cfg = AgentConfig(endpoint=f"http://127.0.0.1:{free_port()}")
    cfg.export_timeout_s = 1.0
    t = exporter(cfg)
    t.meter.create_counter("x").add(1)
    t.export()
    assert t.senders["metrics"].failures >= 1
    start = time.monotonic()
    t.shutdown(2)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("env,expected", [("delta", "delta"), ("cumulative", "cumulative")])
def test_temporality_follows_environment(monkeypatch, env: str, expected: str) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", env)
    with Receiver(port=0) as rx:
        t = exporter(AgentConfig(endpoint=f"http://127.0.0.1:{rx.port}"))
        t.meter.create_counter("c").add(2)
        t.export()
        t.shutdown(5)
        pts = [r for r in rx.records if r.get("name") == "c"]
    assert pts[0]["temporality"] == expected


def _raw(port: int, head: bytes, timeout: float = 5.0) -> bytes:
    """Send ``head`` on a raw connection; the receiver's reply (it must answer in time)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        return s.recv(4096)


def test_receiver_refuses_bad_and_oversized_bodies_without_blocking() -> None:
    with Receiver(port=0, max_body_bytes=1 << 20) as rx:
        # Content-Length -1 used to block the handler forever; now 400 at once
        reply = _raw(rx.port, b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: -1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400"), reply
        reply = _raw(rx.port, b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 12x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400"), reply
        # announced body beyond the limit: refused before it is read
        reply = _raw(rx.port, b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 2000000\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 413"), reply
        assert rx.bad_requests == 3
        # and it still serves
        empty = ExportMetricsServiceRequest().SerializeToString()
        assert post(rx.port, "/v1/metrics", empty) == 200


def test_receiver_caps_decompressed_size() -> None:
    import resource

    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip, built in chunks
    chunk = bytes(1 << 20)
    bomb = b"".join(z.compress(chunk) for _ in range(300)) + z.flush()  # inflates to 300 MiB
    assert len(bomb) < 400 << 10
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with Receiver(port=0, max_decoded_bytes=8 << 20) as rx:
        assert post(rx.port, "/v1/metrics", bomb, {"Content-Encoding": "gzip"}) == 413
        assert post(rx.port, "/v1/metrics", bomb[:1000], {"Content-Encoding": "gzip"}) == 400
        assert rx.bad_requests == 2 and rx.requests == 0
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grew_mb < 100, f"peak RSS grew {grew_mb:.0f} MB decoding a capped gzip bomb"


def test_receiver_accepts_a_metric_without_data() -> None:
    from opentelemetry.proto.metrics.v1.metrics_pb2 import (
        Metric,
        ResourceMetrics,
        ScopeMetrics,
    )

    req = ExportMetricsServiceRequest(resource_metrics=[ResourceMetrics(scope_metrics=[
        ScopeMetrics(metrics=[Metric(name="no.data")])])])
    with Receiver(port=0) as rx:
        assert post(rx.port, "/v1/metrics", req.SerializeToString()) == 200
        assert rx.requests == 1 and rx.bad_requests == 0 and rx.records == []
