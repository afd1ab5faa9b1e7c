"""One request, several resources: data of a pod or container goes out under
a Resource of its own, so the Collector's ``k8sattributes`` processor (which
associates by resource attributes) can enrich it.

Signals mark workload data in one of two ways:

- explicitly, with a *resource key* (a sorted tuple of ``(key, value)``
  pairs, ``None`` for the host): the sums path (``Exporter.send_sums``) and
  the span path (``SpanRecord.resource``), whose encoders group by key;
- as point attributes named in :data:`RESOURCE_KEYS` on the SDK instruments
  and bulk histograms: :func:`split_metrics` moves them from the points to
  the resource when the request is built.

Data without any of them stays under the host resource, unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric, ResourceMetrics, ScopeMetrics
from opentelemetry.sdk.metrics import export as sdk
from opentelemetry.sdk.resources import Resource

from .wire import any_value

# Attributes that describe where data comes from, not what it measures.
RESOURCE_KEYS = frozenset(("k8s.pod.uid", "k8s.pod.ip", "k8s.node.name", "container.id",
                           "container.runtime.name"))

ResourceKey = tuple[tuple[str, object], ...]
_POINT_KINDS = ("sum", "gauge", "histogram", "exponential_histogram", "summary")


def resource_key(attrs: dict | Iterable[tuple[str, object]] | None) -> ResourceKey | None:
    """The canonical (hashable, order-free) key of a set of resource attributes."""
    if not attrs:
        return None
    items = attrs.items() if isinstance(attrs, dict) else attrs
    return tuple(sorted((str(k), v) for k, v in items)) or None


def _points(metric: Metric):
    kind = metric.WhichOneof("data")
    return (kind, getattr(metric, kind).data_points) if kind in _POINT_KINDS else (kind, None)


def split_metrics(req: ExportMetricsServiceRequest) -> ExportMetricsServiceRequest:
    """``req`` with every point that carries :data:`RESOURCE_KEYS` attributes
    moved to a ``ResourceMetrics`` of its own (base resource + those
    attributes, removed from the point). ``req`` itself when nothing moves."""
    if not any(kv.key in RESOURCE_KEYS for rm in req.resource_metrics
               for sm in rm.scope_metrics for m in sm.metrics
               for p in (_points(m)[1] or ()) for kv in p.attributes):
        return req
    out = ExportMetricsServiceRequest()
    for rm in req.resource_metrics:
        groups: dict[ResourceKey, ResourceMetrics] = {}

        def group(key: ResourceKey, rm: ResourceMetrics = rm,
                  groups: dict = groups) -> ResourceMetrics:
            g = groups.get(key)
            if g is None:
                g = groups[key] = ResourceMetrics(schema_url=rm.schema_url)
                g.resource.CopyFrom(rm.resource)
                have = {kv.key for kv in g.resource.attributes}
                for k, v in key:
                    if k in have:
                        for kv in g.resource.attributes:
                            if kv.key == k:
                                kv.value.CopyFrom(any_value(v))
                    else:
                        g.resource.attributes.append(KeyValue(key=k, value=any_value(v)))
            return g

        for sm in rm.scope_metrics:
            scopes: dict[ResourceKey, ScopeMetrics] = {}
            for m in sm.metrics:
                kind, pts = _points(m)
                parts: dict[ResourceKey, Metric] = {} if pts is not None else {(): m}
                for p in pts or ():
                    key = tuple(sorted((kv.key, _value(kv)) for kv in p.attributes
                                       if kv.key in RESOURCE_KEYS))
                    mm = parts.get(key)
                    if mm is None:
                        mm = parts[key] = Metric(name=m.name, description=m.description,
                                                 unit=m.unit)
                        data = getattr(mm, kind)
                        data.SetInParent()
                        src = getattr(m, kind)
                        for f in ("aggregation_temporality", "is_monotonic"):
                            if hasattr(src, f) and src.DESCRIPTOR.fields_by_name.get(f):
                                setattr(data, f, getattr(src, f))
                    q = getattr(mm, kind).data_points.add()
                    q.CopyFrom(p)
                    if key:
                        keep = [kv for kv in q.attributes if kv.key not in RESOURCE_KEYS]
                        del q.attributes[:]
                        q.attributes.extend(keep)
                for key, mm in parts.items():
                    sc = scopes.get(key)
                    if sc is None:
                        sc = scopes[key] = _scope(group(key), sm)
                    sc.metrics.append(mm)
        out.resource_metrics.extend(groups.values())
    return out


def split_metrics_data(data: sdk.MetricsData) -> sdk.MetricsData:
    """:func:`split_metrics` on the SDK's collected data, before it is encoded:
    the same request once encoded, without copying every encoded point (the
    SDK path runs this each interval; its attributes are plain dicts here)."""
    if not any(p.attributes and not RESOURCE_KEYS.isdisjoint(p.attributes)
               for rm in data.resource_metrics for sm in rm.scope_metrics
               for m in sm.metrics for p in m.data.data_points):
        return data
    out: list[sdk.ResourceMetrics] = []
    for rm in data.resource_metrics:
        base = dict(rm.resource.attributes)
        # merged resource attributes -> (the Resource, its scopes, scope id -> ScopeMetrics);
        # keyed by the merged attributes, not the point's key: the SDK's encoder keeps
        # one entry per distinct Resource, so two groups with equal resources (a point
        # repeating the base resource's own value) must be one group
        groups: dict[tuple, tuple[Resource, list, dict]] = {}
        merged: dict[ResourceKey, tuple] = {}
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                parts: dict[ResourceKey, list] = {}
                for p in m.data.data_points:
                    attrs = p.attributes or {}
                    key = tuple(sorted((k, v) for k, v in attrs.items() if k in RESOURCE_KEYS))
                    if key:
                        p = replace(p, attributes={k: v for k, v in attrs.items()
                                                   if k not in RESOURCE_KEYS})
                    parts.setdefault(key, []).append(p)
                for key, pts in parts.items():
                    rid = merged.get(key)
                    if rid is None:
                        rid = merged[key] = tuple({**base, **dict(key)}.items())
                    g = groups.get(rid)
                    if g is None:
                        res = Resource(dict(rid), rm.resource.schema_url) if key else rm.resource
                        g = groups[rid] = (res, [], {})
                    sc = g[2].get(id(sm))
                    if sc is None:
                        sc = g[2][id(sm)] = sdk.ScopeMetrics(sm.scope, [], sm.schema_url)
                        g[1].append(sc)
                    sc.metrics.append(sdk.Metric(m.name, m.description, m.unit,
                                                 replace(m.data, data_points=pts)))
        out += [sdk.ResourceMetrics(res, scopes, rm.schema_url)
                for res, scopes, _ in groups.values()]
    return sdk.MetricsData(out)


def _scope(rm: ResourceMetrics, sm: ScopeMetrics) -> ScopeMetrics:
    sc = rm.scope_metrics.add()
    sc.scope.CopyFrom(sm.scope)
    sc.schema_url = sm.schema_url
    return sc


def _value(kv: KeyValue) -> object:
    v = kv.value
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else ""
