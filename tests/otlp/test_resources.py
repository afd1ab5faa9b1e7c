"""Several resources per request: every path (SDK instruments, bulk histograms,
sums from arrays, batch spans) puts pod/container data under its own
Resource and host data under the host's, checked through the real receiver."""

from __future__ import annotations

import numpy as np
from opentelemetry.metrics import Observation

from ebpf_otlp.config import AgentConfig
from ebpf_otlp.otlp import Exporter, SpanRecord
from ebpf_otlp.otlp.resources import resource_key
from ebpf_otlp.otlp.sums import SumMetric, point_attribute
from ebpf_otlp.receiver import Receiver

POD_A = {"k8s.pod.uid": "aaaaaaaa-0000-4000-8000-000000000001", "container.id": "a" * 64}
POD_B = {"k8s.pod.uid": "bbbbbbbb-0000-4000-8000-000000000002"}


def exporter(port: int) -> Exporter:
    cfg = AgentConfig(endpoint=f"http://127.0.0.1:{port}")
    cfg.host_name = "node-1"
    return Exporter(cfg.export_settings(), cfg.interval_s, cfg.cardinality_limit)


def by_resource(records: list[dict], name: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("name") == name:
            res = {k: v for k, v in r["resource"].items() if k in POD_A or k in POD_B}
            out.setdefault(tuple(sorted(res.items())), []).append(r)
    return out


def test_sdk_counters_and_histograms_move_workload_attributes_to_resources(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta")
    with Receiver(port=0) as rx:
        t = exporter(rx.port)
        c = t.meter.create_counter("c")
        c.add(1, {"x": 1})
        c.add(2, {"x": 1, **POD_A})
        c.add(3, {"x": 2, **POD_B})
        h = t.histogram("h", "s", "d")
        h.record_many((("y", 1),), np.array([0.1]))
        h.record_many((("y", 1), *POD_A.items()), np.array([0.2, 0.3]))
        t.export()
        t.shutdown(5)
        recs = list(rx.records)
    for name, want in (("c", {(): 1, tuple(sorted(POD_A.items())): 2,
                              tuple(sorted(POD_B.items())): 3}),
                       ("h", {(): 1, tuple(sorted(POD_A.items())): 2})):
        got = by_resource(recs, name)
        assert {k: sum(p.get("value", p.get("count", 0)) for p in v)
                for k, v in got.items()} == want, got
        for pts in got.values():
            for p in pts:
                assert not set(p["attributes"]) & (set(POD_A) | set(POD_B)), p
                assert p["resource"]["host.name"] == "node-1"  # the base resource kept


def test_sums_path_groups_series_by_resource() -> None:
    n = 10
    attrs = [point_attribute("i", i) for i in range(n)]
    values = np.arange(n, dtype=np.uint64).reshape(n, 1) + 1
    index = np.array([0, 1, 2, 1, 0, 2, 2, 0, 1, 0])
    resources = [None, resource_key(POD_A), resource_key(POD_B)]
    with Receiver(port=0) as rx:
        t = exporter(rx.port)
        ok = t.send_sums([SumMetric("s", "1", "d", 0)], attrs, values,
                         np.zeros(n, np.uint64), 1, chunk=4, resources=resources,
                         resource_index=index)
        t.shutdown(5)
        recs = list(rx.records)
    assert ok.all()
    got = by_resource(recs, "s")
    for r, key in enumerate(((), tuple(sorted(POD_A.items())), tuple(sorted(POD_B.items())))):
        want = {i: i + 1 for i in range(n) if index[i] == r}
        assert {p["attributes"]["i"]: p["value"] for p in got[key]} == want


def test_spans_group_by_resource() -> None:
    with Receiver(port=0) as rx:
        t = exporter(rx.port)
        now = 1_700_000_000_000_000_000
        t.submit_spans([SpanRecord(now, now + 1, "host", ()),
                        SpanRecord(now, now + 1, "a", (), resource=resource_key(POD_A)),
                        SpanRecord(now, now + 1, "a2", (), resource=resource_key(POD_A)),
                        SpanRecord(now, now + 1, "b", (), resource=resource_key(POD_B))])
        t.spans.flush()
        t.shutdown(5)
        spans = [r for r in rx.records if r["type"] == "span"]
    res = {s["name"]: {k: v for k, v in s["resource"].items() if k in POD_A or k in POD_B}
           for s in spans}
    assert res == {"host": {}, "a": POD_A, "a2": POD_A, "b": POD_B}
    assert all(s["resource"]["service.name"] for s in spans)


def test_log_records_group_by_resource() -> None:
    with Receiver(port=0) as rx:
        t = exporter(rx.port)
        for i, extra in enumerate(({}, POD_A, POD_B, POD_A)):
            t.logs.emit(timestamp=i + 1, body=f"r{i}", attributes={"i": i, **extra})
        t.export()
        t.shutdown(5)
        logs = [r for r in rx.records if r["type"] == "log"]
    got = {r["attributes"]["i"]: {k: v for k, v in r["resource"].items()
                                  if k in POD_A or k in POD_B} for r in logs}
    assert got == {0: {}, 1: POD_A, 2: POD_B, 3: POD_A}
    assert all(set(r["attributes"]) == {"i"} for r in logs)
    assert all(r["resource"]["host.name"] == "node-1" for r in logs)


def _collected(resource: dict) -> object:
    """What the SDK hands its exporter: counters, an up-down counter, a gauge and a
    seconds histogram, host points mixed with two pods' (one a pod without container)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.resources import Resource

    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader], resource=Resource.create(resource))
    m = mp.get_meter("scope-a")
    c = m.create_counter("c", "1", "a counter")
    for i in range(30):
        c.add(i + 1, {"i": i % 7, **(POD_A if i % 3 == 0 else POD_B if i % 3 == 1 else {})})
    m.create_up_down_counter("u").add(-2, {"x": "y", **POD_B})
    m.create_observable_gauge("g", callbacks=[lambda _o: [
        Observation(5, {"k": 1}), Observation(6, {"k": 1, **POD_A})]])
    h = m.create_histogram("h", "s")
    h.record(0.5, {"y": 1, **POD_A})
    h.record(0.25, {"y": 1})
    m2 = mp.get_meter("scope-b")
    m2.create_counter("only_pods").add(3, POD_B)
    m2.create_counter("only_host").add(4, {"z": 1})
    data = reader.get_metrics_data()
    mp.shutdown()
    return data


def test_sdk_data_split_encodes_to_the_bytes_of_the_encoded_split() -> None:
    """The SDK path splits resources before encoding (split_metrics_data); the
    reference is split_metrics applied to the encoded request, byte for byte."""
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

    from ebpf_otlp.otlp.resources import split_metrics, split_metrics_data

    data = _collected({"host.name": "node-1", "service.name": "ebpf-otlp"})
    want = split_metrics(encode_metrics(data)).SerializeToString()
    got = encode_metrics(split_metrics_data(data)).SerializeToString()
    assert got == want
    assert len(split_metrics(encode_metrics(data)).resource_metrics) == 3  # host, A, B


def test_sdk_data_split_keeps_points_whose_resource_equals_the_host_resource() -> None:
    """A point repeating the base resource's own pod attribute: one resource, both
    points (the SDK's encoder keeps one entry per distinct Resource)."""
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.resources import Resource

    from ebpf_otlp.otlp.resources import split_metrics_data

    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader],
                       resource=Resource.create({"host.name": "n", **POD_B}))
    c = mp.get_meter("s").create_counter("c")
    c.add(1, {"i": 1})
    c.add(2, {"i": 2, **POD_B})
    c.add(4, {"i": 3, **POD_A})
    req = encode_metrics(split_metrics_data(reader.get_metrics_data()))
    mp.shutdown()
    got = {}
    for rm in req.resource_metrics:
        res = tuple(sorted((kv.key, kv.value.string_value) for kv in rm.resource.attributes
                           if kv.key in POD_A))
        for sm in rm.scope_metrics:
            for met in sm.metrics:
                for p in met.sum.data_points:
                    got.setdefault(res, []).append(p.as_int)
                    assert not {kv.key for kv in p.attributes} & set(POD_A)
    assert {k: sorted(v) for k, v in got.items()} == {
        tuple(sorted(POD_B.items())): [1, 2], tuple(sorted(POD_A.items())): [4]}
