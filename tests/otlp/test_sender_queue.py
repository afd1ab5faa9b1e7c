"""The sender's retry queue over real HTTP: undelivered bodies kept within a
byte bound and sent oldest first after the next delivered one, evictions and
rejected bodies counted; a 429's Retry-After honoured as a minimum."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ebpf_otlp.otlp.sender import OtlpSender
from ebpf_otlp.otlp.settings import SignalTarget


class Collector:
    """Answers each POST with the next scripted status (then 200); records bodies."""

    def __init__(self, port: int = 0, script: list[tuple[int, dict]] | None = None):
        self.bodies: list[tuple[float, int, bytes]] = []
        self.headers: list[dict[str, str]] = []  # of each POST, as received
        self.script = list(script or [])
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code, headers = outer.script.pop(0) if outer.script else (200, {})
                outer.bodies.append((time.monotonic(), code, body))
                outer.headers.append(dict(self.headers.items()))
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", port), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sender(port: int, timeout: float = 1.0) -> OtlpSender:
    return OtlpSender("metrics", SignalTarget(f"http://127.0.0.1:{port}/v1/metrics", {},
                                              timeout, "none", None))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_queue_keeps_undelivered_bodies_within_its_bound_and_sends_them_in_order() -> None:
    port = free_port()
    s = sender(port, timeout=0.3)
    s.max_queue_bytes = 3000
    bodies = [bytes([i]) * 1000 for i in range(5)]
    for b in bodies:  # nobody listens: each fails and waits in the queue
        assert not s.send(b, retain=True)
    assert s.queued_bytes == 3000 and s.dropped["queue_full"] == 2  # the two oldest
    assert s.send(b"not kept", retain=False) is False and s.queued_bytes == 3000
    c = Collector(port)
    try:
        assert s.send(b"new", retain=True)
        got = [b for _, _, b in c.bodies]
        assert got == [b"new"] + bodies[2:], [g[:1] for g in got]  # fresh data first
        assert s.queued_bytes == 0
    finally:
        c.close()
        s.close()


def test_rejected_bodies_are_dropped_and_counted_not_retried() -> None:
    c = Collector(script=[(400, {})])
    s = sender(c.port)
    try:
        assert not s.send(b"bad", retain=True)
        assert s.dropped["rejected"] == 1 and s.queued_bytes == 0
        assert s.send(b"good", retain=True)
        assert [b for _, _, b in c.bodies] == [b"bad", b"good"]
    finally:
        c.close()
        s.close()


def test_retry_after_is_a_minimum_and_queue_left_at_close_is_counted() -> None:
    c = Collector(script=[(429, {"Retry-After": "0.5"}), (503, {}), (503, {})])
    s = sender(c.port, timeout=3.0)
    try:
        assert s.send(b"x", retain=True)
        t = [t for t, _, _ in c.bodies]
        assert [code for _, code, _ in c.bodies] == [429, 503, 503, 200]
        assert t[1] - t[0] >= 0.5, "Retry-After not honoured"
        assert s.retries == 3
    finally:
        c.close()
    s2 = sender(free_port(), timeout=0.2)
    assert not s2.send(b"y", retain=True)
    s2.close()
    assert s2.dropped["shutdown"] == 1 and s2.queued_bytes == 0


def test_each_post_carries_its_own_body_the_headers_and_the_collectors_cookie() -> None:
    """POSTs reuse one prepared request: every body arrives whole (gzip, its own
    length) with the configured headers, and once the collector sets a cookie (a
    sticky load balancer) the following POSTs send it back, as requests would."""
    import gzip

    c = Collector(script=[(200, {}), (200, {"Set-Cookie": "lb=node-2; Path=/"})])
    s = OtlpSender("metrics", SignalTarget(f"http://127.0.0.1:{c.port}/v1/metrics",
                                           {"x-team": "net"}, 2.0, "gzip", None))
    bodies = [bytes([i]) * (100 + 37 * i) for i in range(5)]
    try:
        for b in bodies:
            assert s.send(b)
        assert [gzip.decompress(b) for _, _, b in c.bodies] == bodies
        for i, h in enumerate(c.headers):
            assert h["x-team"] == "net" and h["Content-Encoding"] == "gzip", h
            assert h["Content-Type"] == "application/x-protobuf", h
            assert int(h["Content-Length"]) == len(c.bodies[i][2]), h
        assert [h.get("Cookie") for h in c.headers] == [None, None] + ["lb=node-2"] * 3
    finally:
        c.close()
        s.close()
