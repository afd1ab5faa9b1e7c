"""A small OTLP/HTTP receiver (protobuf, optionally gzip) for the demo and the
tests: it decodes with ``opentelemetry-proto`` and prints a readable line per
data point, span or log record, or writes them as JSON lines."""

from __future__ import annotations

import gzip
import json
import logging
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, TextIO

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

log = logging.getLogger(__name__)

_TEMPORALITY = {0: "unspecified", 1: "delta", 2: "cumulative"}
_SPAN_KIND = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER",
              5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def any_value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attrs(v.kvlist_value.values)
    if which == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, which)


def attrs(kvs: list[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def metric_records(req: ExportMetricsServiceRequest) -> Iterator[dict]:
    for rm in req.resource_metrics:
        res = attrs(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                base = {"type": "metric", "name": m.name, "unit": m.unit, "resource": res,
                        "scope": sm.scope.name}
                kind = m.WhichOneof("data")
                data = getattr(m, kind)
                for p in data.data_points:
                    r = dict(base, kind=kind, attributes=attrs(p.attributes),
                             start_ns=p.start_time_unix_nano, time_ns=p.time_unix_nano)
                    if kind in ("sum", "histogram", "exponential_histogram"):
                        r["temporality"] = _TEMPORALITY[data.aggregation_temporality]
                    if kind == "sum":
                        r["monotonic"] = data.is_monotonic
                    if kind in ("sum", "gauge"):
                        r["value"] = (p.as_int if p.WhichOneof("value") == "as_int"
                                      else p.as_double)
                    elif kind == "histogram":
                        r.update(count=p.count, sum=p.sum, bounds=list(p.explicit_bounds),
                                 buckets=list(p.bucket_counts))
                        if p.HasField("min"):
                            r.update(min=p.min, max=p.max)
                    yield r


def span_records(req: ExportTraceServiceRequest) -> Iterator[dict]:
    for rs in req.resource_spans:
        res = attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield {"type": "span", "name": s.name, "kind": _SPAN_KIND[s.kind],
                       "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                       "parent_span_id": s.parent_span_id.hex(),
                       "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano,
                       "attributes": attrs(s.attributes), "status": _STATUS[s.status.code],
                       "status_message": s.status.message, "resource": res,
                       "scope": ss.scope.name}


def log_records(req: ExportLogsServiceRequest) -> Iterator[dict]:
    for rl in req.resource_logs:
        res = attrs(rl.resource.attributes)
        for sl in rl.scope_logs:
            for lr in sl.log_records:
                yield {"type": "log", "time_ns": lr.time_unix_nano or lr.observed_time_unix_nano,
                       "severity": lr.severity_text, "body": any_value(lr.body),
                       "attributes": attrs(lr.attributes), "resource": res,
                       "scope": sl.scope.name}


_ROUTES = {
    "/v1/metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse, metric_records),
    "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse, span_records),
    "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse, log_records),
}


def describe(r: dict) -> str:
    """One readable line per record."""
    a = " ".join(f"{k}={v}" for k, v in sorted(r.get("attributes", {}).items()))
    if r["type"] == "metric":
        if r["kind"] == "histogram":
            val = f"count={r['count']} sum={r['sum']:.6g}"
        else:
            val = f"{r['value']}"
        return f"metric {r['name']} {val} {r['unit']} {a}".rstrip()
    if r["type"] == "span":
        dur = (r["end_ns"] - r["start_ns"]) / 1e6
        return f"span {r['kind']} {r['name']} {dur:.3f}ms {r['status']} {a}".rstrip()
    return f"log {r['severity']} {r['body']} {a}".rstrip()


class Receiver:
    """OTLP/HTTP server; ``sink`` gets every decoded record."""

    def __init__(self, host: str = "127.0.0.1", port: int = 4318,
                 sink: Callable[[dict], None] | None = None):
        self.sink = sink or (lambda r: None)
        self.requests = 0
        self.bad_requests = 0
        self.records: list[dict] = []
        self.keep = sink is None
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("receiver: " + fmt, *args)

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                route = _ROUTES.get(self.path.split("?")[0])
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if route is None:
                    outer._bad()
                    return self._reply(404, b"unknown path", "text/plain")
                req_t, resp_t, unpack = route
                try:
                    if self.headers.get("Content-Encoding", "").lower() == "gzip":
                        body = gzip.decompress(body)
                    elif self.headers.get("Content-Encoding", "").lower() == "deflate":
                        body = zlib.decompress(body)
                    req = req_t()
                    req.ParseFromString(body)
                    records = list(unpack(req))
                except (DecodeError, OSError, EOFError, zlib.error, ValueError,
                        KeyError) as e:
                    outer._bad()
                    return self._reply(400, f"bad request: {e}".encode(), "text/plain")
                outer._accept(records)
                self._reply(200, resp_t().SerializeToString(), "application/x-protobuf")

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread: threading.Thread | None = None

    def _bad(self) -> None:
        with self._lock:
            self.bad_requests += 1

    def _accept(self, records: list[dict]) -> None:
        with self._lock:
            self.requests += 1
            if self.keep:
                self.records.extend(records)
            for r in records:
                self.sink(r)

    def start(self) -> Receiver:
        self._thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def json_sink(out: TextIO) -> Callable[[dict], None]:
    def sink(r: dict) -> None:
        out.write(json.dumps(r, separators=(",", ":")) + "\n")
        out.flush()
    return sink


def text_sink(out: TextIO) -> Callable[[dict], None]:
    def sink(r: dict) -> None:
        out.write(describe(r) + "\n")
        out.flush()
    return sink
