"""SDK instruments that know when the SDK folds their series.

Past its cardinality limit the SDK adds every new attribute set into one
``otel.metric.overflow=true`` point and says nothing; with cumulative
temporality it never forgets a series, so a long-running agent would fold
every new series for the rest of its life. These wrappers count, per
instrument, the distinct attribute sets the SDK could not keep
(``ebpf_otlp.metric.series.overflow``) and log the first time it happens.
Calls come once per attribute group and batch, not per event, so one hash
per call is affordable.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)

_MAX_TRACKED_FOLDED = 1 << 16  # distinct folded sets remembered; past that, each add counts


class SeriesTracker:
    """Distinct attribute sets per instrument, as the SDK sees them within one
    aggregation cycle (the whole run for cumulative, one interval for delta)."""

    def __init__(self, limit: int, delta_counters: bool):
        self.limit = limit
        self.delta_counters = delta_counters  # monotonic counters reset each interval
        self._resetting: set[str] = set()
        self._kept: dict[str, set[int]] = {}
        self._folded_now: dict[str, set[int]] = {}
        self.folded: Counter[str] = Counter()  # distinct sets folded, cumulative
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def register(self, name: str, monotonic: bool) -> None:
        if monotonic and self.delta_counters:
            self._resetting.add(name)

    def seen(self, name: str, attributes: Any) -> None:
        key = hash(frozenset(attributes.items())) if attributes else 0
        with self._lock:
            kept = self._kept.setdefault(name, set())
            if key in kept:
                return
            if len(kept) < self.limit:
                kept.add(key)
                return
            folded = self._folded_now.setdefault(name, set())
            if key in folded:
                return
            if len(folded) < _MAX_TRACKED_FOLDED:
                folded.add(key)
            self.folded[name] += 1
            first = name not in self._warned
            self._warned.add(name)
        if first:
            log.warning("%s: more than %d attribute sets%s; new ones are folded into the "
                        "otel.metric.overflow series and counted in "
                        "ebpf_otlp.metric.series.overflow", name, self.limit,
                        " in one interval" if name in self._resetting else
                        " (cumulative temporality keeps every series for the whole run)")

    def interval_done(self) -> None:
        """After a collection: delta aggregations start empty again."""
        with self._lock:
            for name in self._resetting:
                self._kept.pop(name, None)
                self._folded_now.pop(name, None)


class _Tracked:
    def __init__(self, inner: Any, name: str, tracker: SeriesTracker, monotonic: bool):
        self._inner = inner
        self._name = name
        self._tracker = tracker
        tracker.register(name, monotonic)

    def add(self, amount: float, attributes: dict | None = None, *args: Any, **kw: Any) -> None:
        self._tracker.seen(self._name, attributes)
        self._inner.add(amount, attributes, *args, **kw)


class TrackedMeter:
    """The SDK meter, with counters and up-down counters that report folding."""

    def __init__(self, meter: Any, tracker: SeriesTracker):
        self._meter = meter
        self.tracker = tracker

    def create_counter(self, name: str, *args: Any, **kw: Any) -> _Tracked:
        return _Tracked(self._meter.create_counter(name, *args, **kw), name, self.tracker, True)

    def create_up_down_counter(self, name: str, *args: Any, **kw: Any) -> _Tracked:
        return _Tracked(self._meter.create_up_down_counter(name, *args, **kw), name,
                        self.tracker, False)

    def __getattr__(self, attr: str) -> Any:  # observable instruments etc.: the SDK's own
        return getattr(self._meter, attr)
