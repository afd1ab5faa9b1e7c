"""``--health-listen HOST:PORT``: ``/healthz`` (the agent's threads are alive and
not stuck), ``/readyz`` (every requested signal runs and an export attempt
finished) and ``/status`` (JSON: signals, hooks, counters, last export), for
Kubernetes probes and for people."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

log = logging.getLogger(__name__)


class HealthServer:
    """Serves the three endpoints from callables the agent provides."""

    def __init__(self, listen: str, alive: Callable[[], tuple[bool, str]],
                 ready: Callable[[], tuple[bool, str]], status: Callable[[], dict[str, Any]]):
        host, _, port = listen.rpartition(":")
        outer = self
        self.alive, self.ready, self.status = alive, ready, status

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("health: " + fmt, *args)

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?")[0]
                try:
                    if path in ("/healthz", "/readyz"):
                        ok, why = (outer.alive if path == "/healthz" else outer.ready)()
                        return self._send(200 if ok else 503, (why + "\n").encode(),
                                          "text/plain")
                    if path == "/status":
                        body = json.dumps(outer.status(), indent=1, default=str).encode()
                        return self._send(200, body, "application/json")
                    self._send(404, b"try /healthz, /readyz or /status\n", "text/plain")
                except Exception as e:  # a broken probe answer never takes the agent down
                    log.exception("health endpoint %s failed", path)
                    self._send(500, f"{type(e).__name__}\n".encode(), "text/plain")

            do_HEAD = do_GET  # noqa: N815

        self.server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="health",
                                        daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
