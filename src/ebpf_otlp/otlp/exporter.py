"""The export seam: everything a signal hands over for OTLP goes through one
:class:`Exporter`, which owns the resource, one sender per OTLP signal, the
SDK instruments, the bulk histograms, the span path and the log batch.

Signals never build senders or requests themselves; the agent calls
:meth:`Exporter.export` once per interval after every signal collected.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Sequence

import numpy as np
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric, ResourceMetrics, ScopeMetrics
from opentelemetry.sdk.resources import Resource

from . import sums as _sums
from .histogram import BatchHistogram
from .instruments import SeriesTracker, TrackedMeter
from .logs import LogBatch
from .resources import ResourceKey, split_metrics
from .sdk import SdkMetrics
from .semconv import DURATION_BUCKETS, SCOPE
from .sender import DEFAULT_QUEUE_BYTES, OtlpSender
from .settings import ExportSettings
from .spans import SpanBatchExporter, SpanGroup, SpanRecord
from .wire import TEMPORALITY_CUMULATIVE, TEMPORALITY_DELTA, resource_message

log = logging.getLogger(__name__)

# Series per OTLP request on the sums path: 8192 series x 3 metrics is ~7 MB
# with every flow attribute kept, under common collector body limits.
MAX_SERIES_PER_REQUEST = 8192


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ebpf-otlp")
    except Exception:
        return ""


class Exporter:
    """One agent run's OTLP output.

    ``interval_s`` caps each request's time budget, on every OTLP signal, so
    that a collector that is down or hangs delays one interval at most and is
    counted. ``queue_bytes`` bounds, per OTLP signal, what waits for a retry
    (delta metrics, spans, log records), and, for spans and logs, what waits to
    be sent (see :meth:`set_queue_bytes`).
    """

    def __init__(self, settings: ExportSettings, interval_s: float, cardinality_limit: int,
                 span_queue: int = 65536, queue_bytes: int = DEFAULT_QUEUE_BYTES):
        self.settings = settings
        self.resource = Resource.create(settings.resource)
        self.resource_attributes = dict(self.resource.attributes)
        self.scope_version = _version()
        self.timeout_s = min(settings.metrics.timeout_s, max(interval_s, 1.0))
        self.senders = {k: OtlpSender(k, settings.target(k)) for k in ("metrics", "traces",
                                                                        "logs")}
        # each OTLP signal's request budget: its own timeout, capped at the interval
        self.budget_s = {k: min(settings.target(k).timeout_s, max(interval_s, 1.0))
                         for k in self.senders}
        # All requests of one interval (sums, histograms, SDK, logs) share one
        # deadline ending before the next interval is due, so a collector that is
        # down or hangs never delays collection (see begin_interval).
        self.interval_budget_s = min(self.timeout_s, max(0.9 * interval_s, 0.9))
        self._deadline: float | None = None
        self.temporality = settings.temporality
        self.cardinality_limit = cardinality_limit
        self.sdk = SdkMetrics(self.resource, self.senders["metrics"], self.temporality,
                              cardinality_limit, self.timeout_s, budget=self.left_s)
        # Delta counters start empty each interval in the SDK; cumulative ones never do.
        self.series = SeriesTracker(cardinality_limit, delta_counters=self.delta)
        self.meter = TrackedMeter(self.sdk.meter, self.series)
        self.spans = SpanBatchExporter(self.resource_attributes, self._send_traces,
                                       scope=SCOPE, max_queue=span_queue, retry=True,
                                       on_drop=self.senders["traces"].count_dropped,
                                       on_idle=self._resend_traces)
        self._traces_resent = 0.0
        self.logs = LogBatch(self.resource_attributes, SCOPE, self._send_logs, retry=True,
                             on_drop=self.senders["logs"].count_dropped)
        self.set_queue_bytes(queue_bytes)
        self._histograms: list[BatchHistogram] = []
        self._pb_resource = resource_message(self.resource_attributes)
        self._resource_cache: dict[ResourceKey | None, bytes] = {}
        self.histogram_failures = 0
        self._closed = False
        self._register_health()

    def begin_interval(self) -> None:
        """Start an interval's export budget (:attr:`interval_budget_s`), shared by
        every request until :meth:`export` ends it; started by the first request
        otherwise."""
        self._deadline = time.monotonic() + self.interval_budget_s

    def left_s(self) -> float:
        """What is left of this interval's export budget, in seconds (a budget that
        ended an interval ago or more belongs to an interval nobody closed: anew)."""
        now = time.monotonic()
        if self._deadline is None or now > self._deadline + self.interval_budget_s:
            self.begin_interval()
        return max(0.0, self._deadline - now)

    def set_queue_bytes(self, n: int) -> None:
        """Bound each OTLP signal's retry queue to ``n`` bytes of requests, and the
        spans and log records waiting to be sent to ``n / 2`` encoded bytes each."""
        for x in self.senders.values():
            x.max_queue_bytes = n
        # half for what waits to be sent, so that one request of all of it still
        # fits the retry queue if it fails
        self.spans.max_queue_bytes = n // 2
        self.logs.max_queue_bytes = n // 2

    # --- what signals use ------------------------------------------------------
    @property
    def delta(self) -> bool:
        """Whether counters and histograms are exported as deltas."""
        return self.temporality in ("delta", "lowmemory")

    @property
    def sum_temporality(self) -> int:
        return TEMPORALITY_DELTA if self.delta else TEMPORALITY_CUMULATIVE

    def observe(self, name: str, unit: str, description: str,
                fn: Callable[[], Iterable[tuple[float, dict]]], kind: str = "counter") -> None:
        self.sdk.observe(name, unit, description, fn, kind)

    def histogram(self, name: str, unit: str, description: str,
                  bounds: Sequence[float] = DURATION_BUCKETS) -> BatchHistogram:
        """A bulk histogram exported with every interval."""
        h = BatchHistogram(name, unit, description, bounds, delta=self.delta,
                           cardinality_limit=self.cardinality_limit)
        self._histograms.append(h)
        return h

    def submit_spans(self, spans: Iterable[SpanRecord | tuple]) -> int:
        """Queue finished spans; returns how many were dropped (counted)."""
        self.spans.start()
        return self.spans.submit(spans)

    def submit_span_groups(self, start_ns: np.ndarray, end_ns: np.ndarray, group: np.ndarray,
                           groups: Sequence[SpanGroup],
                           columns: Sequence[tuple[str, Sequence[object]]] = (),
                           trace_ids: np.ndarray | None = None,
                           parent_ids: Sequence[bytes | None] | None = None) -> int:
        """Queue finished spans given as columns (unix ns times, group per span, shared
        parts per group, one attribute per column; trace ids ((n, 16) uint8) and
        parent span ids when given); returns how many were dropped."""
        self.spans.start()
        return self.spans.submit_grouped(start_ns, end_ns, group, groups, columns,
                                         trace_ids, parent_ids)

    def send_sums(self, metrics: Sequence[_sums.SumMetric], attrs: Sequence[bytes],
                  values: np.ndarray, start_ns: np.ndarray, time_ns: int,
                  chunk: int = MAX_SERIES_PER_REQUEST,
                  resources: Sequence[ResourceKey | None] | None = None,
                  resource_index: np.ndarray | None = None) -> np.ndarray:
        """Monotonic sums from arrays (see :func:`sums.encode_sums`), in requests of at
        most ``chunk`` series; stops at the first failure. Returns which series were
        delivered.

        ``resources[resource_index[i]]`` is the resource key of series i (None: the
        host resource); without them every series is the host's. A request then
        holds one ``ResourceMetrics`` per resource among its series.
        """
        n = len(attrs)
        delivered = np.zeros(n, bool)
        if resources is None or resource_index is None or len(resources) <= 1:
            order = None
            res = [self._resource_bytes(resources[0] if resources else None)]
            rid = np.zeros(n, np.int64)
        else:
            order = np.argsort(resource_index, kind="stable")
            attrs = [attrs[i] for i in order.tolist()]
            values, start_ns = values[order], start_ns[order]
            rid = np.asarray(resource_index)[order]
            res = [self._resource_bytes(r) for r in resources]
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            cut = np.flatnonzero(np.diff(rid[lo:hi])) + 1
            starts = [0, *cut.tolist()]
            stops = [*cut.tolist(), hi - lo]
            groups = [(res[int(rid[lo + a])], a, b) for a, b in zip(starts, stops)]
            body = _sums.encode_sums_grouped(groups, SCOPE, self.scope_version, metrics,
                                             attrs[lo:hi], values[lo:hi], start_ns[lo:hi],
                                             time_ns, self.sum_temporality)
            if not self.senders["metrics"].send(body, self.left_s()):
                break
            delivered[lo:hi] = True
        if order is not None:
            out = np.zeros(n, bool)
            out[order] = delivered
            return out
        return delivered

    def _resource_bytes(self, key: ResourceKey | None) -> bytes:
        """The serialised ``Resource`` of ``key`` (cached, bounded)."""
        b = self._resource_cache.get(key)
        if b is None:
            if len(self._resource_cache) >= 4096:
                self._resource_cache.clear()
            b = self._resource_cache[key] = resource_message(
                self.resource_for(key)).SerializeToString()
        return b

    def count_dropped(self, kind: str, reason: str, items: int) -> None:
        """Items (data points, spans, log records) of OTLP signal ``kind`` that a
        signal gave up before export (e.g. delta series over its pending bound):
        counted in ``ebpf_otlp.export.dropped{signal,reason}`` with the rest."""
        self.senders[kind].count_dropped(reason, items)

    def resource_for(self, key: ResourceKey | None) -> dict:
        """The attributes of the resource ``key`` names (the host's for None)."""
        if not key:
            return self.resource_attributes
        return {**self.resource_attributes, **dict(key)}

    # --- once per interval (export thread) ---------------------------------------
    def export(self) -> bool:
        """SDK instruments, bulk histograms and queued logs, within what is left of
        the interval's budget (which this ends); spans go on their own thread."""
        try:
            ok = self._export_histograms()
            # the SDK's collection (callbacks) always runs; its request gets what is left
            ok = self.sdk.export(max(self.left_s(), 0.5)) and ok
            self.series.interval_done()
            fresh = self.logs.waiting > 0
            ok = self.logs.flush() and ok
            if not fresh:  # no log record this interval: what waits for a retry gets a chance
                ok = self.senders["logs"].resend(self.left_s()) and ok
            return ok
        finally:
            self._deadline = None

    def _export_histograms(self) -> bool:
        parts = [(h, m) for h in self._histograms if (m := h.metric()) is not None]
        if not parts:
            return True
        req = split_metrics(ExportMetricsServiceRequest(resource_metrics=[ResourceMetrics(
            resource=self._pb_resource, scope_metrics=[ScopeMetrics(
                scope=InstrumentationScope(name=SCOPE, version=self.scope_version),
                metrics=[m for _, (m, _) in parts])])]))
        # Delta points of a failed request exist nowhere else: the sender keeps the
        # request for a retry, within its byte bound (what it evicts is counted there).
        points = sum(len(m.histogram.data_points) for _, (m, _) in parts)
        retain = any(h.delta for h, _ in parts)
        ok = self.senders["metrics"].send(req.SerializeToString(), self.left_s(),
                                          retain=retain, items=points)
        for h, _ in parts:
            h.exports += 1
            if not ok:
                h.failures += 1
        if not ok:
            self.histogram_failures += 1
        return ok

    def metric_request(self, metrics: list[Metric]) -> bytes:
        """An ``ExportMetricsServiceRequest`` of ``metrics`` under this resource (tests, bench)."""
        return ExportMetricsServiceRequest(resource_metrics=[ResourceMetrics(
            resource=self._pb_resource, scope_metrics=[ScopeMetrics(
                scope=InstrumentationScope(name=SCOPE), metrics=metrics)])]).SerializeToString()

    def _send_traces(self, body: bytes, spans: int) -> bool:
        return self.senders["traces"].send(body, self.budget_s["traces"], retain=True,
                                           items=spans)

    def _resend_traces(self) -> None:
        """No fresh span to send: give the traces retry queue a chance, at most
        once per request budget (a collector still down costs one attempt)."""
        now = time.monotonic()
        if now - self._traces_resent >= self.budget_s["traces"]:
            self._traces_resent = now
            self.senders["traces"].resend(self.budget_s["traces"])

    def _send_logs(self, body: bytes, records: int) -> bool:
        return self.senders["logs"].send(body, min(self.budget_s["logs"], self.left_s()),
                                         retain=True, items=records)

    # --- health ------------------------------------------------------------------------
    def _register_health(self) -> None:
        self.observe("ebpf_otlp.export.failures", "{export}",
                     "OTLP export requests that failed after retries (collector down, "
                     "rejected, timeout)",
                     lambda: [(s.failures, {"signal": k}) for k, s in self.senders.items()])
        self.observe("ebpf_otlp.export.requests", "{request}", "OTLP export requests made",
                     lambda: [(s.requests, {"signal": k}) for k, s in self.senders.items()])
        self.observe("ebpf_otlp.spans.dropped", "{span}",
                     "spans not exported, by reason (queue full, export failed, shutdown)",
                     lambda: [(n, {"reason": r}) for r, n in dict(self.spans.dropped).items()])
        self.observe("ebpf_otlp.spans.exported", "{span}", "spans exported",
                     lambda: [(self.spans.exported, {})])
        self.observe("ebpf_otlp.logs.dropped", "{record}",
                     "log records not exported, by reason",
                     lambda: [(n, {"reason": r}) for r, n in dict(self.logs.dropped).items()])
        self.observe("ebpf_otlp.metric.series.overflow", "{series}",
                     "distinct attribute sets folded into an instrument's "
                     "otel.metric.overflow series (over the cardinality limit)",
                     lambda: [(n, {"metric": m}) for m, n in dict(self.series.folded).items()]
                     + [(h.series_overflowed, {"metric": h.name}) for h in self._histograms
                        if h.series_overflowed])
        self.observe("ebpf_otlp.histogram.values.unexported", "{value}",
                     "values missing from bulk histograms: folded into the overflow series "
                     "(failed delta exports are retried; evictions count under "
                     "ebpf_otlp.export.dropped)",
                     lambda: [(v, {"metric": h.name, "reason": r}) for h in self._histograms
                              for r, v in (("export_failed", h.points_lost),
                                           ("overflow", h.overflowed)) if v])

    # --- shutdown ------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Send what waits within about ``timeout_s`` in all, then stop; idempotent."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        for s in self.senders.values():
            s.deadline = deadline  # no request outlives the shutdown budget

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        try:
            self.spans.shutdown(left())
            self.export()
            self.sdk.shutdown(left())
        finally:
            self.logs.close()
            for s in self.senders.values():
                s.close()

