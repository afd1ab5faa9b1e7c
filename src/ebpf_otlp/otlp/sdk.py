"""The OpenTelemetry SDK where it is the right tool: low-volume instruments
(health, per-signal counters) collected by a ``MeterProvider`` whose
exporter encodes with the SDK's public OTLP encoder and sends through our
metrics sender, so every metric request shares one HTTP path."""

from __future__ import annotations

import logging
import math
import os
from typing import Callable, Iterable

from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from .resources import split_metrics_data
from .semconv import DURATION_BUCKETS, SCOPE
from .sender import OtlpSender

log = logging.getLogger(__name__)

_D, _C = AggregationTemporality.DELTA, AggregationTemporality.CUMULATIVE


def preferred_temporality(preference: str) -> dict[type, AggregationTemporality]:
    """The SDK temporality per instrument kind for
    ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``, as the specification defines it."""
    if preference == "delta":
        monotonic, observable = _D, _D
    elif preference == "lowmemory":
        monotonic, observable = _D, _C
    else:
        monotonic, observable = _C, _C
    return {Counter: monotonic, Histogram: monotonic, ObservableCounter: observable,
            UpDownCounter: _C, ObservableUpDownCounter: _C, ObservableGauge: _C}


class _SenderExporter(MetricExporter):
    """SDK metrics -> OTLP protobuf (the SDK's public encoder) -> our sender."""

    def __init__(self, sender: OtlpSender, temporality: dict[type, AggregationTemporality]):
        super().__init__(preferred_temporality=temporality)
        self.sender = sender
        self.budget: Callable[[], float] | None = None  # caps each request's time
        self.on_data: Callable[[MetricsData], None] | None = None
        # delta points of a failed request exist nowhere else: keep them for the next try
        self.retain = any(t == _D for t in temporality.values())

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: object) -> MetricExportResult:
        try:
            if self.on_data is not None:
                self.on_data(metrics_data)
            body = encode_metrics(split_metrics_data(metrics_data)).SerializeToString()
            points = sum(len(m.data.data_points) for rm in metrics_data.resource_metrics
                         for sm in rm.scope_metrics for m in sm.metrics)
        except Exception:
            log.exception("encoding metrics failed")
            return MetricExportResult.FAILURE
        budget = timeout_millis / 1000.0
        if self.budget is not None:
            budget = min(budget, self.budget())
        ok = self.sender.send(body, budget, retain=self.retain, items=points)
        return MetricExportResult.SUCCESS if ok else MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        pass


class SdkMetrics:
    """A ``MeterProvider`` exported only when :meth:`export` is called (once per
    interval, right after the signals drained their maps)."""

    def __init__(self, resource: Resource, sender: OtlpSender, temporality: str,
                 cardinality_limit: int, timeout_s: float,
                 budget: Callable[[], float] | None = None):
        self.exporter = _SenderExporter(sender, preferred_temporality(temporality))
        self.exporter.budget = budget
        self.timeout_s = timeout_s
        self.reader = PeriodicExportingMetricReader(
            self.exporter, export_interval_millis=math.inf,
            export_timeout_millis=timeout_s * 1000)
        views = [
            View(instrument_type=Histogram, instrument_unit="s",
                 aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS),
                 aggregation_cardinality_limit=cardinality_limit),
            # One view per instrument kind: the SDK exports one stream per
            # matching view, so a catch-all "*" view would duplicate every
            # seconds histogram.
            *(View(instrument_type=kind, aggregation_cardinality_limit=cardinality_limit)
              for kind in (Counter, UpDownCounter, ObservableCounter, ObservableGauge,
                           ObservableUpDownCounter)),
        ]
        # No exemplars: the agent's threads never run inside a sampled span, so the
        # default (trace-based) filter never keeps one; off, the SDK does not ask
        # (OTEL_METRICS_EXEMPLAR_FILTER, when set, still decides).
        no_exemplars = (None if os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER")
                        else AlwaysOffExemplarFilter())
        self.provider = MeterProvider(metric_readers=[self.reader], resource=resource,
                                      views=views, shutdown_on_exit=False,
                                      exemplar_filter=no_exemplars)
        self.meter = self.provider.get_meter(SCOPE)
        self._closed = False

    def observe(self, name: str, unit: str, description: str,
                fn: Callable[[], Iterable[tuple[float, dict]]], kind: str = "counter") -> None:
        """Register an observable instrument fed by ``fn() -> [(value, attrs)]``."""

        def cb(_options: CallbackOptions) -> Iterable[Observation]:
            try:
                return [Observation(v, a) for v, a in fn()]
            except Exception:
                log.exception("callback of %s failed", name)
                return []

        create = {"counter": self.meter.create_observable_counter,
                  "gauge": self.meter.create_observable_gauge,
                  "updown": self.meter.create_observable_up_down_counter}[kind]
        create(name, callbacks=[cb], unit=unit, description=description)

    def export(self, timeout_s: float | None = None) -> bool:
        if self._closed:
            return False
        return self.provider.force_flush(int((timeout_s or self.timeout_s) * 1000))

    def shutdown(self, timeout_s: float) -> None:
        if self._closed:
            return
        self._closed = True
        self.provider.shutdown(timeout_millis=int(timeout_s * 1000))
