"""The OTLP/HTTP receiver and the SDK pipeline, over real HTTP."""

from __future__ import annotations

import gzip
import socket
import time
import urllib.error
import urllib.request

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
