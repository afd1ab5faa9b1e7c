"""The Hubble bridge: a follower (gRPC or export file) feeds the mapper on its
own thread; once per interval the bridge drains the mapper and hands the
result to the otlp layer's batch paths (sums from arrays, bulk histograms,
the batch span path, the log batch).

Counters are deltas per interval inside the mapper; with cumulative
temporality the bridge keeps running totals per series (bounded by
``max_series`` over the whole run, beyond which values go to the overflow
series). A delta interval whose export failed is carried into the next one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import numpy as np

from ...otlp import DURATION_BUCKETS, Exporter, SpanRecord
from ...otlp.sums import SumMetric, point_attribute
from . import names as N
from .mapping import OVERFLOW, Attrs, Interval, Mapper

log = logging.getLogger(__name__)

_HISTOGRAMS = {
    N.HTTP_SERVER: "HTTP requests served, as Cilium's proxy saw them (Hubble L7)",
    N.HTTP_CLIENT: "HTTP requests made, as Cilium's proxy saw them (Hubble L7)",
    N.DNS_DURATION: "DNS lookups through Cilium's DNS proxy: query to answer (Hubble L7)",
}


class Follower(Protocol):
    def run(self) -> None: ...

    def stop(self) -> None: ...


class _Totals:
    """Per-metric series -> (start ns, value): running totals (cumulative) or
    the carry of a failed delta export."""

    def __init__(self, max_series: int):
        self.max_series = max_series
        self.series: dict[str, dict[Attrs, list[int]]] = {}
        self.overflowed = 0

    def add(self, name: str, attrs: Attrs, n: int, now_ns: int) -> None:
        s = self.series.setdefault(name, {})
        cur = s.get(attrs)
        if cur is None:
            if len(s) >= self.max_series and attrs != OVERFLOW:
                self.overflowed += n
                attrs = OVERFLOW
                cur = s.get(attrs)
            if cur is None:
                cur = s[attrs] = [now_ns, 0]
        cur[1] += n


class HubbleBridge:
    """Runs ``follower`` and exports ``mapper``'s intervals through ``exporter``."""

    def __init__(self, exporter: Exporter, mapper: Mapper, follower: Follower,
                 interval_s: float):
        self.exporter = exporter
        self.mapper = mapper
        self.follower = follower
        self.interval_s = interval_s
        self.histograms = {name: exporter.histogram(name, "s", desc, DURATION_BUCKETS)
                           for name, desc in _HISTOGRAMS.items()}
        self._totals = _Totals(mapper.max_series)
        self._carry = _Totals(mapper.max_series)  # delta values whose export failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.intervals = 0
        self._last_ns = time.time_ns()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="hubble-follower",
                                        daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            self.follower.run()
        except Exception:  # the follower never should; say so, the export loop goes on
            log.exception("hubble follower failed")

    def run(self) -> None:
        """Export every interval until :meth:`stop`; a final export on the way out."""
        next_at = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.interval_s
            self.export_once()
        self.follower.stop()
        if self._thread is not None:
            self._thread.join(5)
        self.export_once()

    def stop(self) -> None:
        self._stop.set()

    def export_once(self) -> None:
        """Drain the mapper and hand everything to the exporter (one interval)."""
        iv = self.mapper.drain()
        self.intervals += 1
        self._sums(iv)
        for name, attrs, seconds in iv.histograms:
            self.histograms[name].record_batch(((attrs, seconds),))
        if iv.spans:
            self.exporter.submit_spans(
                SpanRecord(start, end, name, attrs, err, kind)
                for kind, (start, end, name, attrs, err) in iv.spans)
        for r in iv.logs:
            self.exporter.logs.emit(timestamp=r.time_ns, body=r.body,
                                    attributes=dict(r.attributes),
                                    severity_number=r.severity_number,
                                    severity_text=r.severity_text, event_name=r.event_name)
        self.exporter.export()

    def _sums(self, iv: Interval) -> None:
        now = time.time_ns()
        delta = self.exporter.delta
        book = self._carry if delta else self._totals
        start = self._last_ns if delta else now  # a delta point covers the interval
        for (name, attrs), n in iv.sums.items():
            book.add(name, attrs, n, start)
        if book.overflowed:
            n, book.overflowed = book.overflowed, 0
            book.add(N.SERIES_OVERFLOW, (), n, start)
        for name, series in list(book.series.items()):
            if not series:
                continue
            unit, desc = N.SUMS.get(name, ("1", ""))
            keys = list(series)
            attrs = [b"".join(point_attribute(k, v) for k, v in a) for a in keys]
            values = np.array([[series[a][1]] for a in keys], dtype=np.uint64)
            start = np.array([series[a][0] for a in keys], dtype=np.uint64)
            ok = self.exporter.send_sums([SumMetric(name, unit, desc, 0)], attrs, values,
                                         start, now)
            if delta:  # what was not delivered stays, with its start, for the next interval
                for a, sent in zip(keys, ok):
                    if sent:
                        del series[a]
        self._last_ns = now
