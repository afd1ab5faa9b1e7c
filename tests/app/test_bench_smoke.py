"""The benchmarks must not rot: each runs once in --quick mode (one short
iteration) through the real runner, and its results must be well formed.
Figures are not judged here (benchmarks are not tests); the pieces with a
truth to compare against (the null sink's decoded counts, the report
rendering) are checked directly."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import require

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.__main__ import _modules  # noqa: E402

TOOLS = {"ringbuf": ["gcc"], "pktcost": ["clang-19"], "datapath": ["iperf3"],
         "alternatives": ["bpftrace", "bpftool"], "dns_flood": ["dnsmasq"],
         "tcp_churn": ["gcc"], "soak": ["dnsmasq"], "http_syscalls": ["gcc"]}


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), e.get("PYTHONPATH", "")])
    return e


@pytest.mark.kernel
@pytest.mark.parametrize("name", list(_modules()))
def test_benchmark_quick(name: str, tmp_path: Path) -> None:
    for tool in TOOLS.get(name, []):
        require(shutil.which(tool) is not None or Path(f"/usr/sbin/{tool}").exists(),
                f"{tool} not installed")
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", name, "--out",
                        str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    res = doc["benchmarks"][name]
    assert res["status"] in ("ok", "partial"), res["notes"]
    assert res["figures"], res["notes"]
    for f in res["figures"]:
        assert f["value"] is not None and math.isfinite(f["value"]), f
        if f["ratio"] is not None:
            assert math.isfinite(f["ratio"]), f
    md = (tmp_path / "RESULTS.md").read_text()
    assert f"(`{name}`)" in md and res["figures"][0]["name"].split(",")[0] in md
    assert doc["machine"]["uname"] and doc["machine"]["cpus"]


def test_report_renders_every_figure(tmp_path: Path) -> None:
    from bench.common import Figure, Result
    from bench.report import write_markdown

    res = Result("demo", "Demo bench", "python -m bench --only demo")
    res.add(Figure.compare("ours | theirs", 50.0, "ops/s", 100.0, "C", target=0.5))
    res.add(Figure("absolute", 3, "MB"))
    res.note("a note")
    doc = {"machine": {"date_utc": "d", "cpu_model": "cpu", "cpus": 2, "cpu_mhz": "1",
                       "mem_gib": 1, "clocksource": "tsc", "uname": "Linux",
                       "loadavg_at_start": ["0", "0", "0"], "python": "3", "libbpf": "1",
                       "opentelemetry_sdk": "1", "iperf3": "i", "bpftrace": "b"},
           "benchmarks": {"demo": res.to_json()}}
    write_markdown(tmp_path / "R.md", doc)
    md = (tmp_path / "R.md").read_text()
    assert "ours \\| theirs" in md  # table cells escape pipes
    assert "| 0.500 |" in md and "ratio >= 0.5" in md and "| yes |" in md
    assert "3.000 MB" in md and "- a note" in md


def test_null_sink_counts_what_it_decodes() -> None:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    from bench.lab import NullReceiver

    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add()
    m.name = "x"
    for v in (1, 2, 3):
        m.sum.data_points.add().as_int = v
    body = req.SerializeToString()
    with NullReceiver() as sink:
        for _ in range(2):
            rq = urllib.request.Request(sink.endpoint + "/v1/metrics", data=body, method="POST",
                                        headers={"Content-Type": "application/x-protobuf"})
            assert urllib.request.urlopen(rq, timeout=10).status == 200
        stats = sink.stop()
    assert stats["requests"] == 2 and stats["points"] == 6 and stats["bytes"] == 2 * len(body)
