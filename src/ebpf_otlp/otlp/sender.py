"""The one HTTP path of each OTLP signal: POST a serialised request, retry
under a deadline, count the outcome.

Retries follow the OTLP/HTTP specification: 429, 502, 503, 504 and
connection errors are retried with exponential back-off and jitter (a
``Retry-After`` header is honoured), everything else is final. No attempt
outlives the target's timeout, so a collector that hangs delays one export
by at most that much.

Every item (metric data point, span, log record) that the path of this OTLP
signal gives up is counted once in :attr:`OtlpSender.dropped` by reason: the
retry queue's byte bound (``queue_full``), the collector calling it bad
(``rejected``), still waiting at exit (``shutdown``), and what the batching
in front of the sender reports through :meth:`OtlpSender.count_dropped`.
"""

from __future__ import annotations

import gzip
import logging
import random
import threading
import time
from collections import Counter, deque

import requests

from .settings import SignalTarget

log = logging.getLogger(__name__)

RETRYABLE = frozenset((429, 502, 503, 504))
# Undelivered request bodies kept per signal (``retain``), in wire bytes.
DEFAULT_QUEUE_BYTES = 16 << 20
CONTENT_TYPE = "application/x-protobuf"


class OtlpSender:
    """POSTs serialised OTLP requests of one kind to one target; thread-safe."""

    def __init__(self, kind: str, target: SignalTarget, user_agent: str = "ebpf-otlp"):
        self.kind = kind
        self.target = target
        self._session = requests.Session()
        self._session.headers.update({"Content-Type": CONTENT_TYPE, "User-Agent": user_agent,
                                      **target.headers})
        if target.compression == "gzip":
            self._session.headers["Content-Encoding"] = "gzip"
        if target.certificate:
            self._session.verify = target.certificate
        if target.client_cert:
            self._session.cert = ((target.client_cert, target.client_key) if target.client_key
                                  else target.client_cert)
        # the request as the session prepares it, and the settings the environment adds
        # (proxies, CA bundle), made once: not again for each POST (bench/datapath.py)
        self._template: requests.PreparedRequest | None = None
        self._env: dict = {}
        self._lock = threading.Lock()
        self.requests = 0
        self.failures = 0
        self.retries = 0
        self.bytes_sent = 0
        self.errors: Counter[str] = Counter()  # final failures by cause
        self._closed = False
        self.deadline: float | None = None  # monotonic; set at shutdown to bound every send
        self.max_queue_bytes = DEFAULT_QUEUE_BYTES
        # (wire bytes, body size, items in it)
        self._queue: deque[tuple[bytes, int, int]] = deque()
        self.queued_bytes = 0
        self.dropped: Counter[str] = Counter()  # items given up, by reason
        self.dropped_bytes = 0
        self.delivered_late = 0  # items delivered from the retry queue

    def send(self, body: bytes, deadline_s: float | None = None, retain: bool = False,
             items: int = 1) -> bool:
        """True when the collector accepted ``body``. Never raises.

        ``retain``: a body that could not be delivered (collector down, slow,
        throttling) waits in a queue bounded by :attr:`max_queue_bytes` and goes
        out, oldest first, after the next body that is delivered; for data that is not sent again
        otherwise (delta points). What the bound evicts, what the collector
        rejects as bad and what is left at shutdown is counted in :attr:`dropped`,
        ``items`` (data points, spans, log records) per body.
        """
        if self._closed:
            self._count(False, "shutdown")
            if retain:
                self.count_dropped("shutdown", items)
            return False
        data = gzip.compress(body, 6) if self.target.compression == "gzip" else body
        budget = self.target.timeout_s if deadline_s is None else min(deadline_s,
                                                                      self.target.timeout_s)
        deadline = time.monotonic() + budget
        if self.deadline is not None:
            deadline = min(deadline, self.deadline)
        ok, cause = self._post(data, len(body), deadline)
        if not ok:
            if retain:
                if cause.startswith("http_4") and cause != "http_429":
                    # the collector says this body is bad: never again
                    self.count_dropped("rejected", items)
                else:
                    self._enqueue(data, len(body), items)
            return False
        # The collector answers again: what waits goes out, oldest first, in what is
        # left of this budget (fresh data first, so a backlog never starves it).
        self._drain_queue(deadline)
        return True

    def resend(self, deadline_s: float | None = None) -> bool:
        """Send what waits in the retry queue, oldest first, within one budget; for a
        path with nothing fresh to send (no span, no log record this interval). True
        when the queue is empty afterwards."""
        if self._closed or not self._queue:
            return not self._queue
        budget = self.target.timeout_s if deadline_s is None else min(deadline_s,
                                                                      self.target.timeout_s)
        deadline = time.monotonic() + budget
        if self.deadline is not None:
            deadline = min(deadline, self.deadline)
        self._drain_queue(deadline)
        return not self._queue

    def _drain_queue(self, deadline: float) -> None:
        while time.monotonic() < deadline - 0.01:
            with self._lock:
                if not self._queue:
                    break
                old, old_n, old_items = self._queue[0]
            sent, cause = self._post(old, old_n, deadline)
            if not sent and (not cause.startswith("http_4") or cause == "http_429"):
                break  # failing again: keep it for the next send
            with self._lock:
                if self._queue and self._queue[0][0] is old:
                    self._queue.popleft()
                    self.queued_bytes -= len(old)
                    if sent:
                        self.delivered_late += old_items
            if not sent:
                self.count_dropped("rejected", old_items)

    def _enqueue(self, data: bytes, nbytes: int, items: int) -> None:
        with self._lock:
            self._queue.append((data, nbytes, items))
            self.queued_bytes += len(data)
            while self.queued_bytes > self.max_queue_bytes and self._queue:
                old, _, old_items = self._queue.popleft()
                self.queued_bytes -= len(old)
                self.dropped["queue_full"] += old_items
                self.dropped_bytes += len(old)

    def count_dropped(self, reason: str, items: int = 1) -> None:
        """Count ``items`` of this OTLP signal given up before or after sending."""
        if items > 0:
            with self._lock:
                self.dropped[reason] += items

    def _post(self, data: bytes, nbytes: int, deadline: float) -> tuple[bool, str]:
        """POST with retries until ``deadline``: (delivered, cause of failure)."""
        delay = 0.1
        cause = "timeout"
        after: float | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0.01:
                break
            try:
                r = self._request(data, left)
            except requests.Timeout:
                cause = "timeout"
                break  # the whole budget is spent
            except requests.RequestException as e:
                cause = "unreachable"
                log.debug("%s export to %s: %s", self.kind, self.target.url, e)
            else:
                if 200 <= r.status_code < 300:
                    self._count(True, "", nbytes)
                    return True, ""
                cause = f"http_{r.status_code}"
                if r.status_code not in RETRYABLE:
                    log.warning("%s export to %s rejected: HTTP %d %s", self.kind,
                                self.target.url, r.status_code, r.text[:200])
                    break
                after = _retry_after(r.headers.get("Retry-After"))
            # the collector's Retry-After is a minimum: jitter only adds to it
            wait = (after * (1 + 0.2 * random.random()) if after is not None
                    else delay * (0.5 + random.random()))
            after = None
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                break
            with self._lock:
                self.retries += 1
            time.sleep(wait)
            delay = min(delay * 2, 5.0)
        log.warning("%s export to %s failed (%s)", self.kind, self.target.url, cause)
        self._count(False, cause)
        return False, cause

    __call__ = send

    def _request(self, data: bytes, timeout: float) -> requests.Response:
        """``session.post(url, data=data)``, with what is the same for every POST
        (headers, URL, environment settings) prepared once. While the session holds
        cookies (a collector behind a sticky load balancer) each POST is prepared
        anew, so they go out as ``requests`` would send them."""
        s = self._session
        if s.cookies:
            return s.post(self.target.url, data=data, timeout=timeout)
        if self._template is None:
            self._template = s.prepare_request(requests.Request("POST", self.target.url))
            self._env = s.merge_environment_settings(self._template.url, {}, None, None, None)
        p = self._template.copy()
        p.body = data
        p.headers["Content-Length"] = str(len(data))
        return s.send(p, timeout=timeout, allow_redirects=True, **self._env)

    def _count(self, ok: bool, cause: str, nbytes: int = 0) -> None:
        with self._lock:
            self.requests += 1
            if ok:
                self.bytes_sent += nbytes
            else:
                self.failures += 1
                self.errors[cause] += 1

    def close(self) -> None:
        with self._lock:
            if self._queue:
                self.dropped["shutdown"] += sum(n for _, _, n in self._queue)
                self.dropped_bytes += self.queued_bytes
                self._queue.clear()
                self.queued_bytes = 0
        self._closed = True
        self._session.close()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own back-off
