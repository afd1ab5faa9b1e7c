"""Series the SDK folds into ``otel.metric.overflow`` are counted, against what the
collector really received."""

from __future__ import annotations

import pytest
from otlp import by_attrs

from ebpf_otlp.config import AgentConfig
from ebpf_otlp.otlp import Exporter
from ebpf_otlp.receiver import Receiver


@pytest.mark.parametrize("temporality", ["cumulative", "delta"])
def test_folded_series_are_counted(monkeypatch, temporality: str) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", temporality)
    with Receiver(port=0) as rx:
        cfg = AgentConfig(endpoint=f"http://127.0.0.1:{rx.port}")
        ex = Exporter(cfg.export_settings(), 1.0, cardinality_limit=5)
        c = ex.meter.create_counter("eo.test.c")
        for i in range(8):
            c.add(10 + i, {"k": i})
        c.add(1, {"k": 0})  # a known series again: not folded
        h = ex.histogram("eo.test.h", "s", "h")
        h.record_batch([((("k", i),), 0.001) for i in range(7)])
        assert ex.export()
        first = list(rx.records)
        # Second interval: three series new to this interval.
        for i in range(100, 103):
            c.add(1, {"k": i})
        assert ex.export()
        ex.shutdown(2)
        recs = rx.records
    pts = [p for p in first if p.get("name") == "eo.test.c"]
    overflow = [p for p in pts if p["attributes"].get("otel.metric.overflow")]
    kept = [p for p in pts if not p["attributes"].get("otel.metric.overflow")]
    # What the SDK did: 5 series kept, one overflow point with the folded adds (15+16+17).
    assert len(kept) == 5 and len(overflow) == 1 and overflow[0]["value"] == 15 + 16 + 17
    folded = by_attrs([r for r in recs if r.get("name") == "ebpf_otlp.metric.series.overflow"],
                      "metric")
    folded = {k[0]: v for k, v in folded.items()}
    # Cumulative: the SDK keeps all 8 (+3) sets forever, so the 3 new ones fold as well.
    # Delta: each interval starts empty, so the 3 new ones fit.
    assert folded["eo.test.c"] == (6 if temporality == "cumulative" else 3)
    assert folded["eo.test.h"] == 3  # 7 sets, 4 kept, one slot for the overflow series
