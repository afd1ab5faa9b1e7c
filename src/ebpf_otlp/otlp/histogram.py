"""The one bulk histogram path: values recorded in batches, bucketed with numpy.

The SDK's ``Histogram.record`` costs 13-30 us per call here (attribute
hashing and cleaning on every call), more than everything else a DNS lookup
or a TCP connection costs us together (bench/dns_flood.py,
bench/tcp_churn.py). Values are therefore grouped by attribute set as they
come (one list append each, or one array per group), bucketed with numpy
once per export interval, and exported as ``Metric`` messages that the
exporter puts into one request with the resource and scope.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
)

from .wire import any_value

AttrKey = tuple[tuple[str, object], ...]
OVERFLOW: AttrKey = (("otel.metric.overflow", True),)


class _Point:
    __slots__ = ("buckets", "count", "sum", "min", "max")

    def __init__(self, nbuckets: int):
        self.buckets = np.zeros(nbuckets, dtype=np.uint64)
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")

    def add(self, values: np.ndarray, bounds: np.ndarray) -> None:
        # OTLP explicit buckets are (previous bound, bound]: upper bounds inclusive.
        idx = np.searchsorted(bounds, values, side="left")
        self.buckets += np.bincount(idx, minlength=len(self.buckets)).astype(np.uint64)
        self.count += len(values)
        self.sum += float(values.sum())
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))


class BatchHistogram:
    """One histogram instrument fed in bulk; ``export`` once per interval."""

    def __init__(self, name: str, unit: str, description: str, bounds: Sequence[float],
                 delta: bool, cardinality_limit: int):
        self.name, self.unit, self.description = name, unit, description
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.delta = delta
        self.cardinality_limit = cardinality_limit
        self._pending: dict[AttrKey, list] = {}
        self._points: dict[AttrKey, _Point] = {}
        self._lock = threading.Lock()
        self._start_ns = time.time_ns()
        self.exports = 0
        self.failures = 0
        self.overflowed = 0
        self._folded: set[AttrKey] = set()
        self.points_lost = 0  # delta points whose export failed

    def record_batch(self, items: Sequence[tuple[AttrKey, float]]) -> None:
        """Hot path: one lock per batch, one list append per value."""
        with self._lock:
            pending = self._pending
            for key, value in items:
                lst = pending.get(key)
                if lst is None:
                    lst = pending[key] = []
                lst.append(value)

    def record_many(self, key: AttrKey, values: np.ndarray) -> None:
        """All of ``values`` (seconds, finite and >= 0 kept) under one attribute set."""
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values) & (values >= 0)]
        if not len(values):
            return
        with self._lock:
            lst = self._pending.get(key)
            if lst is None:
                lst = self._pending[key] = []
            lst.append(values)

    def _fold(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        nb = len(self.bounds) + 1
        for key, values in pending.items():
            if not values:
                continue
            arr = (np.concatenate([np.atleast_1d(np.asarray(v, np.float64)) for v in values])
                   if any(isinstance(v, np.ndarray) for v in values)
                   else np.asarray(values, dtype=np.float64))
            point = self._points.get(key)
            if point is None:
                if len(self._points) >= self.cardinality_limit - 1:
                    self.overflowed += len(arr)
                    if key not in self._folded and len(self._folded) < (1 << 16):
                        self._folded.add(key)  # distinct series folded (bounded memory)
                    key = OVERFLOW
                    point = self._points.get(key)
                if point is None:
                    point = self._points[key] = _Point(nb)
            point.add(arr, self.bounds)

    @property
    def series_overflowed(self) -> int:
        """Distinct attribute sets folded into the overflow series so far."""
        return len(self._folded)

    def metric(self, now_ns: int | None = None) -> tuple[Metric, int] | None:
        """(the metric, lookups in it) for what was recorded (delta) or all so far
        (cumulative); None when there is nothing to send."""
        self._fold()
        if not self._points:
            return None
        now_ns = now_ns or time.time_ns()
        points = []
        for key, p in self._points.items():
            points.append(HistogramDataPoint(
                attributes=[KeyValue(key=k, value=any_value(v)) for k, v in key],
                start_time_unix_nano=self._start_ns, time_unix_nano=now_ns, count=p.count,
                sum=p.sum, bucket_counts=p.buckets.tolist(),
                explicit_bounds=self.bounds.tolist(), min=p.min, max=p.max))
        temporality = (AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA if self.delta
                       else AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE)
        metric = Metric(name=self.name, unit=self.unit, description=self.description,
                        histogram=Histogram(data_points=points,
                                            aggregation_temporality=temporality))
        count = sum(p.count for p in self._points.values())
        if self.delta:
            self._points = {}
            self._start_ns = now_ns
        return metric, count
