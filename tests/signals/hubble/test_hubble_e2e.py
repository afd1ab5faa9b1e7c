"""``ebpf-otlp hubble`` end to end: the scripted stream from a gRPC server (with a
disconnect) or as a growing, rotating export file; the OTLP that the real
receiver (``ebpf-otlp receive``) decoded must hold exactly the expected points,
spans and log records."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import hubble_script as hs
import pytest
from hubble_server import HubbleServer, ScriptedObserver, append, export_line
from otlp import ReceiverProc

PY = sys.executable


class _Host:
    """ReceiverProc's topology, without a namespace: the bridge needs no kernel."""

    def popen(self, _ns: str, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(list(args), **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bridge:
    def __init__(self, rx: ReceiverProc, *args: str, temporality: str = "delta"):
        self.args = ["--endpoint", rx.endpoint, "--interval", "0.5", *args]
        self.log_path = Path(rx.dir) / "bridge.log"
        self.env = dict(os.environ, OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=temporality,
                        OTEL_SERVICE_NAME="hubble-test")

    def __enter__(self):
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen([PY, "-m", "ebpf_otlp", "hubble", *self.args],
                                     stdout=self._log, stderr=self._log, env=self.env)
        deadline = time.monotonic() + 30
        while "ebpf-otlp hubble running" not in self.log_path.read_text():
            assert self.proc.poll() is None, f"bridge exited:\n{self.log_path.read_text()}"
            assert time.monotonic() < deadline, f"bridge did not start:\n{self.log()}"
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __exit__(self, *exc):
        self.stop()


def _totals(rx: ReceiverProc, name: str) -> dict[frozenset, float]:
    """Per series: the sum of deltas, or the newest cumulative value."""
    out: dict[frozenset, float] = defaultdict(float)
    newest: dict[frozenset, int] = {}
    for p in rx.metrics(name):
        key = frozenset(p["attributes"].items())
        if p["temporality"] == "delta":
            out[key] += p["value"]
        elif p["time_ns"] >= newest.get(key, 0):
            newest[key] = p["time_ns"]
            out[key] = p["value"]
    return dict(out)


def _received(rx: ReceiverProc) -> float:
    return sum(_totals(rx, "ebpf_otlp.events.received").values())


def check_export(rx: ReceiverProc) -> None:
    """Exactly the script's telemetry, as the receiver decoded it."""
    for name, rows in hs.EXPECTED_SUMS.items():
        want = {frozenset(a.items()): n for a, n in rows}
        assert _totals(rx, name) == want, name
    assert _totals(rx, "ebpf_otlp.events.lost") == {frozenset(
        {"source": "hubble", "hubble.lost.source": "hubble_ring_buffer"}.items()): hs.EXPECTED_LOST}
    spans = sorted((s["name"], s["kind"], s["end_ns"] - s["start_ns"], s["attributes"],
                    s["status"]) for s in rx.spans())
    want_spans = sorted((n, k, d, a, "ERROR" if e else "UNSET")
                        for n, k, d, a, e in hs.EXPECTED_SPANS)
    assert spans == want_spans
    for name, rows in hs.EXPECTED_HISTOGRAMS.items():
        got: dict[frozenset, list] = defaultdict(lambda: [0, 0.0])
        for p in rx.metrics(name):
            g = got[frozenset(p["attributes"].items())]
            if p["temporality"] == "delta":
                g[0] += p["count"]
                g[1] += p["sum"]
            else:  # cumulative: the newest point (they only grow)
                g[0], g[1] = max(g[0], p["count"]), max(g[1], p["sum"])
        assert {k: (c, round(s, 9)) for k, (c, s) in got.items()} == {
            frozenset(a.items()): (c, s) for a, c, s in rows}, name
    logs = [r for r in rx.records() if r["type"] == "log"]
    assert sorted((r["attributes"].get("source.address"), r["attributes"].get(
        "destination.address"), r["attributes"].get("destination.port"),
        r["attributes"].get("network.policy.names")) for r in logs) == sorted(
        hs.EXPECTED_DENIAL_LOGS, key=str)
    assert all(r["severity"] == "WARN" and "policy denied" in r["body"] for r in logs)
    assert {r["resource"].get("service.name") for r in rx.records()} == {"hubble-test"}


@pytest.mark.parametrize("temporality", ["delta", "cumulative"])
def test_grpc_stream_with_disconnect_end_to_end(temporality):
    s = hs.build()
    obs = ScriptedObserver(s.events, cut=12)
    with HubbleServer(obs) as srv, ReceiverProc(_Host(), "", _free_port()) as rx:
        with Bridge(rx, "--server", srv.address, temporality=temporality) as br:
            assert obs.done.wait(30), br.log()
            rx.wait_for(lambda: _received(rx) == len(s.events) + 1 and len(rx.spans()) == 4,
                        what="every event and span exported")
            assert br.stop() == 0, br.log()
        check_export(rx)
        assert _totals(rx, "ebpf_otlp.hubble.reconnects") == {
            frozenset({"reason": "unavailable"}.items()): 1}
        assert sum(_totals(rx, "ebpf_otlp.hubble.duplicates").values()) == 1
        assert len(obs.requests) == 2 and obs.requests[1].HasField("since")


def test_export_file_growing_and_rotated_end_to_end(tmp_path):
    s = hs.build()
    lines = [export_line(e) for e in s.events]
    path = tmp_path / "events.log"
    append(path, lines[:10])
    with ReceiverProc(_Host(), "", _free_port()) as rx:
        with Bridge(rx, "--file", str(path)) as br:
            rx.wait_for(lambda: _received(rx) == 10, what="the first lines")
            append(path, lines[10:20] + [b"garbage\n"])
            rx.wait_for(lambda: _received(rx) == 20, what="the appended lines")
            os.rename(path, tmp_path / "events-1.log")
            append(path, lines[20:])
            rx.wait_for(lambda: _received(rx) == len(lines) and len(rx.spans()) == 4,
                        what="the rotated file")
            assert br.stop() == 0, br.log()
        check_export(rx)
        assert _totals(rx, "ebpf_otlp.hubble.reconnects") == {
            frozenset({"reason": "rotated"}.items()): 1}
        mal = _totals(rx, "ebpf_otlp.hubble.malformed")
        assert mal[frozenset({"reason": "json"}.items())] == 1


def test_bad_invocations_exit_2_with_one_line():
    for args in ([], ["--server", "x:1", "--file", "y"],
                 ["--server", "x:1", "--tls-client-cert-file", "c.pem"],
                 ["--server", "tls://x:1", "--tls-ca-cert-files", "/nonexistent/ca.pem"],
                 ["--server", "x:1", "--tls", "--tls-client-cert-file", "/nonexistent/c.pem",
                  "--tls-client-key-file", "/nonexistent/k.pem"]):
        r = subprocess.run([PY, "-m", "ebpf_otlp", "hubble", *args], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
