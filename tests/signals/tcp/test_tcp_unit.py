"""TCP record decoding and the record -> instrument mapping, on crafted
records (no kernel): the OTel SDK's in-memory reader and exporter collect
what the signal produces."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from ebpf_otlp.config import AgentConfig
from ebpf_otlp.otlp.histogram import BatchHistogram
from ebpf_otlp.otlp.semconv import DURATION_BUCKETS
from ebpf_otlp.otlp.spans import SPAN_KIND_CLIENT, SpanRecord
from ebpf_otlp.signals.tcp import TcpSignal, counters
from ebpf_otlp.signals.tcp.records import (
    CKEY,
    EV_CLOSE,
    EV_FAIL,
    EV_OPEN,
    EV_RTT,
    EVENT,
    F_RST_RX,
    F_TRACKED,
    AttributeMapper,
    address,
    failure_cause,
)

ROLE = "network.tcp.handshake.role"


def raw(addr: str) -> bytes:
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        return b"\0" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def test_addresses_print_plain_and_v4_mapped_as_ipv4() -> None:
    assert address(raw("10.0.0.1")) == ("10.0.0.1", "ipv4")
    assert address(raw("fd00:eb::2")) == ("fd00:eb::2", "ipv6")
    assert address(raw("::1")) == ("::1", "ipv6")


@pytest.mark.parametrize(("err", "flags", "want"), [
    (111, 0, "refused"), (104, F_RST_RX, "refused"), (110, 0, "timeout"),
    (104, 0, "reset"), (113, 0, "other"), (0, 0, "other")])
def test_failure_causes(err: int, flags: int, want: str) -> None:
    assert failure_cause(err, flags) == want


def _counter_rows(rows: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Drained counter entries: (role, server port, kind, signed delta) each."""
    k = np.zeros(len(rows), CKEY)
    v = np.zeros((len(rows), 8), np.uint8)
    for i, (role, port, kind, delta) in enumerate(rows):
        k[i]["role"], k[i]["sport"], k[i]["kind"] = role, port, kind
        k[i]["saddr"] = np.frombuffer(raw("10.201.0.2"), np.uint8)
        v[i] = np.frombuffer(np.array([delta], "<i8").tobytes(), np.uint8)
    return k.view(np.uint8).reshape(len(rows), CKEY.itemsize), v


def test_counter_fold_reads_gauge_decrements_as_negative() -> None:
    keys, vals = _counter_rows([(1, 80, counters.CNT_ACTIVE, -3),
                                (1, 80, counters.CNT_OPENED, 5),
                                (2, 80, counters.CNT_ACTIVE, 0)])
    out = sorted((kind, d) for _, kind, d in counters.fold(keys, vals))
    # a zero gauge delta stays: the series exists (opened and closed in the interval)
    assert out == [(counters.CNT_OPENED, 5), (counters.CNT_ACTIVE, -3), (counters.CNT_ACTIVE, 0)]


def test_attribute_choice_is_validated_and_applied() -> None:
    with pytest.raises(ValueError, match="unknown tcp attributes"):
        AttributeMapper(["server.address", "nonsense"])
    m = AttributeMapper(["client.address", "client.port"])
    attrs = dict(m.base(1, raw("10.0.0.2"), raw("10.0.0.1"), 80, 5555))
    assert attrs == {ROLE: "client", "network.transport": "tcp", "network.type": "ipv4",
                     "client.address": "10.0.0.1", "client.port": 5555}


class _Exporter:
    """What TcpSignal uses of the Exporter: SDK instruments read in memory, the
    real bulk histograms, spans collected as records."""

    delta = False
    cardinality_limit = 2000

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meter = MeterProvider(metric_readers=[self.reader]).get_meter("t")
        self.hists: dict[str, BatchHistogram] = {}
        self.spans: list = []

    def observe(self, *args: object, **kwargs: object) -> None:
        pass

    def histogram(self, name: str, unit: str, description: str) -> BatchHistogram:
        h = self.hists[name] = BatchHistogram(name, unit, description, DURATION_BUCKETS,
                                              delta=False, cardinality_limit=100)
        return h

    def submit_spans(self, spans) -> int:
        self.spans.extend(SpanRecord(*s) for s in spans)
        return 0

    def points(self) -> dict[str, list]:
        out: dict[str, list] = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out.setdefault(m.name, []).extend(m.data.data_points)
        for name, h in self.hists.items():
            m = h.metric()
            if m is not None:
                out[name] = [_HistPoint({kv.key: kv.value.string_value or kv.value.int_value
                                         for kv in p.attributes}, p.sum, p.count)
                             for p in m[0].histogram.data_points]
        return out


class _HistPoint:
    def __init__(self, attributes: dict, total: float, count: int) -> None:
        self.attributes, self.sum, self.count = attributes, total, count


def _rec(kind: int, role: int, **kw: object) -> np.ndarray:
    r = np.zeros(1, EVENT)
    r["kind"], r["role"], r["flags"] = kind, role, F_TRACKED
    r["saddr"] = np.frombuffer(raw("10.201.0.2"), np.uint8)
    r["caddr"] = np.frombuffer(raw("10.201.0.1"), np.uint8)
    r["sport"], r["cport"] = 8080, 40000
    for k, v in kw.items():
        r[k] = np.frombuffer(v.ljust(16, b"\0"), "S1") if k == "comm" else v
    return r


def test_records_map_to_instruments_and_spans() -> None:
    tel = _Exporter()
    sig = TcpSignal(AgentConfig(tcp_spans=True), tel)
    s = 1_000_000_000
    recs = np.concatenate([
        _rec(EV_OPEN, 1, start_ns=10 * s, est_ns=10 * s + 2_000_000, ts_ns=10 * s + 2_000_000),
        _rec(EV_OPEN, 2, start_ns=10 * s, est_ns=10 * s + 1_000_000, ts_ns=10 * s + 1_000_000),
        _rec(EV_RTT, 1, srtt_us=250, ts_ns=11 * s),
        _rec(EV_CLOSE, 1, start_ns=10 * s, est_ns=10 * s + 2_000_000, ts_ns=13 * s,
             bytes_tx=100, bytes_rx=7, pid=42, comm=b"curl"),
        _rec(EV_FAIL, 1, start_ns=20 * s, ts_ns=21 * s, cause=111),
        _rec(99, 1),  # garbage kind: counted, ignored
    ])
    sig.on_batch(recs)
    # opened/active come from the kernel's counters: one open per role, the
    # client's connection closed again
    sig._ingest(*_counter_rows([(1, 8080, counters.CNT_OPENED, 1),
                                (2, 8080, counters.CNT_OPENED, 1),
                                (1, 8080, counters.CNT_ACTIVE, 0),
                                (2, 8080, counters.CNT_ACTIVE, 1)]))
    sig.export()  # byte and failure totals wait for the interval's export
    pts = tel.points()

    def by_role(name: str, field: str = "value") -> dict:
        return {(p.attributes[ROLE], p.attributes.get("network.io.direction")):
                getattr(p, field) for p in pts[name]}

    assert by_role("network.tcp.connections.opened") == {("client", None): 1,
                                                         ("server", None): 1}
    assert by_role("network.tcp.connections.active") == {("client", None): 0,
                                                         ("server", None): 1}
    assert by_role("network.tcp.handshake.duration", "sum") == {("client", None): 0.002,
                                                                ("server", None): 0.001}
    assert by_role("network.tcp.connection.duration", "sum") == {("client", None): 3.0}
    assert by_role("network.tcp.rtt", "sum") == {("client", None): 0.00025}
    assert by_role("network.tcp.bytes") == {("client", "transmit"): 100,
                                            ("client", "receive"): 7}
    (failed,) = pts["network.tcp.connections.failed"]
    assert failed.attributes["error.type"] == "refused" and failed.value == 1
    assert failed.attributes["server.address"] == "10.201.0.2"
    assert failed.attributes["server.port"] == 8080
    assert sig.bad_records == 1

    spans = sorted(tel.spans, key=lambda x: x.start_ns)
    assert len(spans) == 2
    ok, bad = spans
    assert ok.end_ns - ok.start_ns == 3 * s
    assert dict(ok.attributes)["process.executable.name"] == "curl"
    assert dict(ok.attributes)["network.tcp.bytes.transmit"] == 100
    assert bad.error == "refused" and bad.kind == SPAN_KIND_CLIENT


def _sdk_points(values_per_call: list[np.ndarray]) -> list:
    """The reference: one SDK ``Histogram.record`` per value, delta per call."""
    from opentelemetry.sdk.metrics.export import AggregationTemporality
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    reader = InMemoryMetricReader(preferred_temporality={
        Histogram: AggregationTemporality.DELTA})
    view = View(instrument_type=Histogram,
                aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS))
    hist = MeterProvider(metric_readers=[reader], views=[view]).get_meter("t").create_histogram(
        "h", "s")
    out = []
    for values in values_per_call:
        for attrs in ({"a": 1}, {"a": 2}):
            for v in values.tolist():
                hist.record(v, attrs)
        data = reader.get_metrics_data()
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out.extend((dict(p.attributes), p.count, round(p.sum, 9), p.min, p.max,
                                list(p.bucket_counts)) for p in m.data.data_points)
    return sorted(out, key=repr)


def _bulk_points(values_per_call: list[np.ndarray]) -> list:
    h = BatchHistogram("h", "s", "", DURATION_BUCKETS, delta=True, cardinality_limit=100)
    out = []
    for values in values_per_call:
        for attrs in ({"a": 1}, {"a": 2}):
            h.record_many(tuple(attrs.items()), values)
        m, _ = h.metric()
        out.extend(({kv.key: kv.value.int_value for kv in p.attributes}, p.count,
                    round(p.sum, 9), p.min, p.max, list(p.bucket_counts))
                   for p in m.histogram.data_points)
    return sorted(out, key=repr)


def test_bulk_histogram_equals_one_sdk_record_per_value() -> None:
    rng = np.random.default_rng(7)
    calls = [rng.exponential(0.01, 500), np.array([0.25, 0.0001, 3.0, 0.005]),
             rng.exponential(1, 50)]
    assert _bulk_points(calls) == _sdk_points(calls)
