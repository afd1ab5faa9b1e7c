"""A minimal OTLP/HTTP sink for the export benchmarks, run as its own process.

It answers every POST with 200 after counting what arrived (requests, bytes,
metric data points, spans; protobuf-decoded, so the counts are an
independent truth), and does nothing else: the receiver's own cost must not
weigh on the exporter being measured. ``GET /stats`` returns the counts;
SIGTERM prints them as the last line on stdout.

    python -m bench.nullrx [--port 0]      # prints "listening PORT"
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def count_points(body: bytes) -> int:
    req = ExportMetricsServiceRequest()
    req.ParseFromString(body)
    n = 0
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind:
                    n += len(getattr(m, kind).data_points)
    return n


def count_spans(body: bytes) -> int:
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)


def serve(port: int) -> None:
    # "log": (CLOCK_MONOTONIC s, points, spans, bytes) per request, the clock
    # being system-wide, so a caller can pick the requests of its window.
    stats = {"requests": 0, "bytes": 0, "points": 0, "spans": 0, "bad": 0,
             "max_points_per_request": 0, "log": []}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_a: object) -> None:
            pass

        def _reply(self, code: int, body: bytes = b"") -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            with lock:
                body = json.dumps(stats).encode()
            self._reply(200, body)

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                path = self.path.split("?")[0]
                points = count_points(body) if path == "/v1/metrics" else 0
                spans = count_spans(body) if path == "/v1/traces" else 0
            except Exception:
                with lock:
                    stats["bad"] += 1
                return self._reply(400)
            with lock:
                stats["requests"] += 1
                stats["bytes"] += len(body)
                stats["points"] += points
                stats["spans"] += spans
                stats["max_points_per_request"] = max(stats["max_points_per_request"], points)
                if len(stats["log"]) < 10000:
                    stats["log"].append((time.monotonic(), points, spans, len(body)))
            self._reply(200)

    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.daemon_threads = True

    def final(*_a: object) -> None:
        # The last line on stdout is the final count (for callers in another netns).
        with lock:
            print(json.dumps(stats), flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, final)
    signal.signal(signal.SIGINT, final)
    print(f"listening {srv.server_address[1]}", flush=True)
    srv.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    serve(ap.parse_args().port)


if __name__ == "__main__":
    sys.exit(main())
