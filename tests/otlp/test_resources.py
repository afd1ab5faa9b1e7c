"""Several resources per request: every path (SDK instruments, bulk histograms,
sums from arrays, batch spans) puts pod/container data under its own
Resource and host data under the host's, checked through the real receiver."""

from __future__ import annotations

import numpy as np

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
