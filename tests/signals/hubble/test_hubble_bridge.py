"""The export loop's bookkeeping with a recording exporter: delta intervals whose
export failed are carried into the next one; cumulative totals grow and are
bounded; everything the mapper drained reaches the exporter's batch paths."""

from __future__ import annotations

import hubble_script as hs
import numpy as np

from ebpf_otlp.signals.hubble.bridge import HubbleBridge
from ebpf_otlp.signals.hubble.mapping import Mapper


class _Hist:
    def __init__(self) -> None:
        self.values: list = []

    def record_batch(self, items) -> None:
        self.values.extend(items)


class _Logs:
    def __init__(self) -> None:
        self.records: list = []

    def emit(self, **kw) -> None:
        self.records.append(kw)


class FakeExporter:
    def __init__(self, delta: bool):
        self.delta = delta
        self.fail_next = 0
        self.sent: list[dict] = []  # per send_sums call: {attrs bytes: value}
        self.hists: dict[str, _Hist] = {}
        self.spans: list = []
        self.logs = _Logs()
        self.exports = 0

    def histogram(self, name, unit, desc, bounds):
        return self.hists.setdefault(name, _Hist())

    def submit_spans(self, spans) -> int:
        self.spans.extend(spans)
        return 0

    def send_sums(self, metrics, attrs, values, start, now) -> np.ndarray:
        if self.fail_next:
            self.fail_next -= 1
            return np.zeros(len(attrs), bool)
        self.sent.append({(metrics[0].name, a): int(v[0]) for a, v in zip(attrs, values)})
        return np.ones(len(attrs), bool)

    def export(self) -> bool:
        self.exports += 1
        return True


def _total(exp: FakeExporter, name: str, cumulative: bool) -> int:
    if cumulative:  # the last value of each series
        last: dict = {}
        for batch in exp.sent:
            last.update({k: v for k, v in batch.items() if k[0] == name})
        return sum(last.values())
    return sum(v for batch in exp.sent for k, v in batch.items() if k[0] == name)


def _bridge(delta: bool, max_series: int = 65536):
    exp = FakeExporter(delta)
    m = Mapper(max_series=max_series)
    return exp, m, HubbleBridge(exp, m, follower=None, interval_s=1.0)


def test_delta_failed_export_is_carried():
    s = hs.build()
    exp, m, br = _bridge(delta=True)
    m.feed(s.events[:8])
    exp.fail_next = 99  # the collector is down for this interval
    br.export_once()
    assert exp.sent == []
    exp.fail_next = 0
    m.feed(s.events[8:])
    br.export_once()
    br.export_once()  # nothing new: nothing sent twice
    want = sum(n for _, n in hs.EXPECTED_SUMS["network.flow.packets"])
    assert _total(exp, "network.flow.packets", cumulative=False) == want
    assert _total(exp, "ebpf_otlp.events.received", cumulative=False) == len(s.events)
    assert len(exp.spans) == 4 and len(exp.logs.records) == 2
    assert sum(len(h.values) for h in exp.hists.values()) == 4
    assert exp.exports == 3


def test_cumulative_totals_and_their_bound():
    s = hs.build()
    exp, m, br = _bridge(delta=False)
    m.feed(s.events[:8])
    br.export_once()
    m.feed(s.events[8:])
    br.export_once()
    want = sum(n for _, n in hs.EXPECTED_SUMS["network.flow.packets"])
    assert _total(exp, "network.flow.packets", cumulative=True) == want
    # Over the run, at most max_series series per metric; the rest is the overflow series.
    exp, m, br = _bridge(delta=False, max_series=2)
    for i in range(5):
        sc = hs.Script()
        sc._flow(hs.CLIENT, hs.WEB, "TCP", 30000 + i, 80, event=4, reply=False)
        sc.events[-1].flow.uuid = f"u{i}"
        m.feed(sc.events)
        br.export_once()
    last: dict = {}  # cumulative: the newest value of every series
    for batch in exp.sent:
        last.update(batch)
    packets = {k: v for k, v in last.items() if k[0] == "network.flow.packets"}
    assert len(packets) == 3 and sum(packets.values()) == 5
    assert sum(v for k, v in last.items() if k[0] == "ebpf_otlp.hubble.series.overflow") == 3
