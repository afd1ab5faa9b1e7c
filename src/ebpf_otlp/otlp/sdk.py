"""OpenTelemetry SDK set-up: providers, OTLP/HTTP exporters, views, and the
agent's own health counters. No signal logic lives here."""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Callable, Iterable, Sequence

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from ..config import AgentConfig

log = logging.getLogger(__name__)

SCOPE = "ebpf_otlp"
# Semantic-convention advice for durations in seconds, extended below 5 ms
# because RTTs and handshakes on a LAN live there.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075,
                    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


def signal_endpoint(base: str, path: str, env: str) -> str:
    """The per-signal URL: ``OTEL_EXPORTER_OTLP_<X>_ENDPOINT`` as is, else base + path."""
    specific = os.environ.get(env)
    if specific:
        return specific
    return base.rstrip("/") + path


class CountingMetricExporter(MetricExporter):
    """Delegates to the OTLP exporter and counts failed exports."""

    def __init__(self, inner: MetricExporter):
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self.inner = inner
        self.failures = 0
        self.exports = 0

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as e:  # a collector that is down must not kill the agent
            log.warning("metric export failed: %s", e)
            result = MetricExportResult.FAILURE
        self.exports += 1
        if result is not MetricExportResult.SUCCESS:
            self.failures += 1
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class CountingSpanExporter(SpanExporter):
    def __init__(self, inner: SpanExporter):
        self.inner = inner
        self.exported = 0
        self.failed = 0
        self.failures = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as e:
            log.warning("span export failed: %s", e)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
            self.failures += 1
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _EndCounter(SpanProcessor):
    """Counts spans handed to the batch processor, to derive those it dropped."""

    def __init__(self) -> None:
        self.ended = 0

    def on_end(self, span: ReadableSpan) -> None:
        self.ended += 1


class Telemetry:
    """Meter, tracer and (optionally) logger providers for one agent run.

    Metrics are exported when :meth:`export_metrics` is called (the agent
    calls it once per interval, right after the signals drained their maps),
    so a drain and its export always line up.
    """

    def __init__(self, config: AgentConfig, views: Iterable[View] = (),
                 cardinality_limit: int | None = None):
        self.config = config
        self.resource = Resource.create({"service.name": config.service_name,
                                         "host.name": config.host_name})
        # An export (retries included) never outlasts the interval by much, so a
        # collector that is down delays at most one interval and is counted.
        timeout = min(config.export_timeout_s, max(config.interval_s, 1.0))
        self.export_timeout_s = timeout
        self.metric_exporter = CountingMetricExporter(OTLPMetricExporter(
            endpoint=signal_endpoint(config.endpoint, "/v1/metrics",
                                     "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
            headers=config.headers or None, timeout=timeout))
        limit = cardinality_limit or max(2000, 2 * config.max_flows + 1000)
        self.cardinality_limit = limit
        self.reader = PeriodicExportingMetricReader(
            self.metric_exporter, export_interval_millis=math.inf,
            export_timeout_millis=timeout * 1000)
        all_views = [
            View(instrument_type=Histogram, instrument_unit="s",
                 aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS),
                 aggregation_cardinality_limit=limit),
            # One view per instrument kind: the SDK exports one stream per
            # matching view, so a catch-all "*" view would duplicate every
            # seconds histogram.
            *(View(instrument_type=kind, aggregation_cardinality_limit=limit)
              for kind in (Counter, UpDownCounter, ObservableCounter, ObservableGauge,
                           ObservableUpDownCounter)),
            *views,
        ]
        self.meter_provider = MeterProvider(metric_readers=[self.reader], resource=self.resource,
                                            views=all_views, shutdown_on_exit=False)
        self.meter = self.meter_provider.get_meter(SCOPE)
        self.span_exporter = CountingSpanExporter(OTLPSpanExporter(
            endpoint=signal_endpoint(config.endpoint, "/v1/traces",
                                     "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            headers=config.headers or None, timeout=timeout))
        self._ended = _EndCounter()
        self._bsp = BatchSpanProcessor(self.span_exporter)
        self.tracer_provider = TracerProvider(resource=self.resource, shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(self._ended)
        self.tracer_provider.add_span_processor(self._bsp)
        self.tracer = self.tracer_provider.get_tracer(SCOPE)
        self._logger_provider = None
        self._lock = threading.Lock()
        self._closed = False
        self._register_own_health()

    # --- logs (optional, created on first use) -------------------------------
    def logger(self):
        """An OTel logger exporting OTLP logs (used for drop records)."""
        with self._lock:
            if self._logger_provider is None:
                from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
                from opentelemetry.sdk._logs import LoggerProvider
                from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

                self._logger_provider = LoggerProvider(resource=self.resource,
                                                       shutdown_on_exit=False)
                self._logger_provider.add_log_record_processor(BatchLogRecordProcessor(
                    OTLPLogExporter(endpoint=signal_endpoint(
                        self.config.endpoint, "/v1/logs", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"),
                        headers=self.config.headers or None,
                        timeout=self.config.export_timeout_s)))
            return self._logger_provider.get_logger(SCOPE)

    # --- health ----------------------------------------------------------------
    def observe(self, name: str, unit: str, description: str,
                fn: Callable[[], Iterable[tuple[float, dict]]], kind: str = "counter") -> None:
        """Register an observable instrument fed by ``fn() -> [(value, attrs)]``."""

        def cb(_options: CallbackOptions) -> Iterable[Observation]:
            try:
                return [Observation(v, a) for v, a in fn()]
            except Exception:
                log.exception("health callback %s failed", name)
                return []

        create = {"counter": self.meter.create_observable_counter,
                  "gauge": self.meter.create_observable_gauge,
                  "updown": self.meter.create_observable_up_down_counter}[kind]
        create(name, callbacks=[cb], unit=unit, description=description)

    def spans_dropped(self) -> int:
        pending = 0
        try:  # the SDK keeps its queue private; count what is still waiting
            pending = len(self._bsp._batch_processor._queue)
        except AttributeError:
            pass
        return max(0, self._ended.ended - self.span_exporter.exported
                   - self.span_exporter.failed - pending)

    def _register_own_health(self) -> None:
        self.observe("ebpf_otlp.export.failures", "{export}",
                     "OTLP export requests that failed (collector down, rejected, timeout)",
                     lambda: [(self.metric_exporter.failures, {"signal": "metrics"}),
                              (self.span_exporter.failures, {"signal": "traces"})])
        self.observe("ebpf_otlp.spans.dropped", "{span}",
                     "spans not exported: export queue full or export failed",
                     lambda: [(self.spans_dropped() + self.span_exporter.failed, {})])

    # --- flushing ----------------------------------------------------------------
    def export_metrics(self, timeout_s: float | None = None) -> bool:
        return self.meter_provider.force_flush(
            int((timeout_s or self.export_timeout_s) * 1000))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush everything within about ``timeout_s``; idempotent."""
        if self._closed:
            return
        self._closed = True
        ms = int(timeout_s * 1000)
        try:
            self.tracer_provider.force_flush(ms)
            self.meter_provider.force_flush(ms)
            if self._logger_provider is not None:
                self._logger_provider.force_flush(ms)
        finally:
            self.tracer_provider.shutdown()
            self.meter_provider.shutdown(timeout_millis=ms)
            if self._logger_provider is not None:
                self._logger_provider.shutdown()
