"""Record many values into an SDK histogram at once.

The OpenTelemetry Python SDK has no bulk ``record``: each call costs 15-25 us
(attribute validation, hashing, locking), so a connection-churn workload
would spend more CPU in ``Histogram.record`` than the traffic itself
(PERF.md). Here the first value of a group goes through the public API,
which validates the attributes and creates the aggregation, and the rest are
added to that same aggregation's bucket counts in one numpy pass, under the
locks the SDK itself takes. Only the explicit-bucket aggregation of the SDK
versions we know is touched; anything unexpected switches to the plain
per-value path for good (the result is the same, only slower).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

try:  # SDK internals; absent or different in other versions -> slow path
    from opentelemetry.sdk.metrics._internal._view_instrument_match import (
        _OVERFLOW_KEY,
        _hash_attributes,
    )
    from opentelemetry.sdk.metrics._internal.aggregation import (
        _ExplicitBucketHistogramAggregation,
    )

    _fast = True
except ImportError:  # pragma: no cover - depends on the installed SDK
    _fast = False


def fast_path_available() -> bool:
    return _fast


def _disable(reason: str) -> None:
    global _fast
    if _fast:
        log.warning("bulk histogram path off (%s); recording values one by one", reason)
    _fast = False


def _targets(hist: object, attrs: dict) -> list[tuple[object, dict]]:
    """(view match, attributes as that view keeps them) for every reader."""
    out = []
    for storage in hist._measurement_consumer._reader_storages.values():
        for match in storage._instrument_view_instrument_matches.get(hist, ()):
            keys = match._view._attribute_keys
            out.append((match, attrs if keys is None else
                        {k: v for k, v in attrs.items() if k in keys}))
    return out


def _aggregation(match: object, attrs: dict) -> object:
    """The aggregation ``attrs`` feeds; call with ``match._lock`` held."""
    key = _hash_attributes(attrs)
    agg = match._attributes_aggregation.get(key)
    if agg is None:  # over the cardinality limit, or just collected
        agg = match._attributes_aggregation.get(_OVERFLOW_KEY)
    if agg is None:
        agg = match._get_or_create_aggregation(key, attrs)
    return agg


def record_many(hist: object, values: np.ndarray, attrs: dict) -> None:
    """``hist.record(v, attrs)`` for every ``v`` in ``values`` (non-negative floats)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values) & (values >= 0)]
    if not len(values):
        return
    hist.record(float(values[0]), attrs)
    rest = values[1:]
    if not len(rest):
        return
    if _fast and len(rest) >= 2:
        try:
            targets = _targets(hist, attrs)
            ok = True
            for match, a in targets:
                with match._lock:
                    ok = ok and isinstance(_aggregation(match, a),
                                           _ExplicitBucketHistogramAggregation)
        except (AttributeError, TypeError, KeyError) as e:
            ok = False
            _disable(f"{type(e).__name__}: {e}")
        if ok:
            for match, a in targets:
                _add(match, a, rest)
            return
        _disable("unexpected aggregation type")
    for v in rest.tolist():
        hist.record(v, attrs)


def _add(match: object, attrs: dict, values: np.ndarray) -> None:
    # Lookup and update under the view match's lock: a delta collect swaps
    # the aggregations under it, so the values land either before that
    # collect or in the fresh aggregation it leaves (never in one already
    # exported).
    with match._lock:
        agg = _aggregation(match, attrs)
        bounds = np.asarray(agg._boundaries, dtype=np.float64)
        # bisect_left, as the SDK's aggregate() does
        counts = np.bincount(np.searchsorted(bounds, values, side="left"),
                             minlength=len(bounds) + 1)
        with agg._lock:
            if agg._value is None:
                agg._value = agg._get_empty_bucket_counts()
            for i in np.flatnonzero(counts).tolist():
                agg._value[i] += int(counts[i])
            agg._sum += float(values.sum())
            if agg._record_min_max:
                agg._min = min(agg._min, float(values.min()))
                agg._max = max(agg._max, float(values.max()))
