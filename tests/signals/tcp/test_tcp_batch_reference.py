"""The TCP signal's batched aggregation (numpy grouping, per-group histograms,
per-interval sums) against a straightforward per-record reference, on random
records and every choice of kept attributes."""

from __future__ import annotations

import ipaddress
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from ebpf_otlp.config import AgentConfig
from ebpf_otlp.otlp.histogram import BatchHistogram
from ebpf_otlp.otlp.semconv import DURATION_BUCKETS
from ebpf_otlp.signals.tcp import TcpSignal
from ebpf_otlp.signals.tcp.records import (
    EV_CLOSE,
    EV_FAIL,
    EV_OPEN,
    EV_RTT,
    EVENT,
    F_RST_RX,
    F_TRACKED,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_tcp_unit import _Exporter  # noqa: E402

ADDRS = [ipaddress.ip_address(a) for a in ("10.0.0.1", "10.0.0.2", "fd00::1", "192.168.1.9")]
COMMS = [b"curl", b"nginx", b"python3"]
ERRNO_CAUSE = {111: "refused", 110: "timeout", 104: "reset"}


class _Wide(_Exporter):
    """No series limit in the way of the comparison."""

    def histogram(self, name: str, unit: str, description: str) -> BatchHistogram:
        h = self.hists[name] = BatchHistogram(name, unit, description, DURATION_BUCKETS,
                                              delta=False, cardinality_limit=1 << 20)
        return h


def raw16(ip: ipaddress._BaseAddress) -> bytes:
    return (b"\0" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip.packed


def random_batch(rng: np.random.Generator, n: int) -> np.ndarray:
    r = np.zeros(n, EVENT)
    r["kind"] = rng.choice([EV_OPEN, EV_CLOSE, EV_FAIL, EV_RTT, 77], n,
                           p=[0.3, 0.3, 0.15, 0.2, 0.05])
    r["role"] = rng.integers(1, 3, n)
    r["flags"] = rng.choice([F_TRACKED, 0, F_TRACKED | F_RST_RX], n, p=[0.8, 0.1, 0.1])
    for f in ("saddr", "caddr"):
        r[f] = np.stack([np.frombuffer(raw16(ADDRS[i]), np.uint8)
                         for i in rng.integers(0, len(ADDRS), n)])
    r["sport"] = rng.choice([80, 443, 8080], n)
    r["cport"] = rng.integers(30000, 30004, n)
    r["pid"] = rng.choice([0, 42, 4242], n)
    r["comm"] = np.stack([np.frombuffer(COMMS[i].ljust(16, b"\0"), r["comm"].dtype.base)
                          for i in rng.integers(0, 3, n)])
    r["start_ns"] = rng.choice([0, 10**9], n, p=[0.1, 0.9])
    r["est_ns"] = np.where(rng.random(n) < 0.1, 0, 10**9 + rng.integers(0, 10**8, n))
    r["ts_ns"] = 10**9 + rng.integers(0, 3 * 10**10, n)
    r["bytes_tx"], r["bytes_rx"] = rng.integers(0, 10**6, n), rng.integers(0, 10**6, n)
    r["srtt_us"] = rng.integers(1, 10**6, n)
    r["cause"] = rng.choice([0, 104, 110, 111, 113], n)
    return r


def text(raw: bytes) -> tuple[str, str]:
    ip = ipaddress.ip_address(raw)
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped), "ipv4"
    return str(ip), "ipv4" if ip.version == 4 else "ipv6"


def ref_attrs(rec: np.void, keep: set[str], process: bool) -> tuple:
    s_text, ntype = text(rec["saddr"].tobytes())
    a = {"network.tcp.handshake.role": {1: "client", 2: "server"}[int(rec["role"])],
         "network.transport": "tcp", "network.type": ntype}
    if "server.address" in keep:
        a["server.address"] = s_text
    if "server.port" in keep:
        a["server.port"] = int(rec["sport"])
    if "client.address" in keep:
        a["client.address"] = text(rec["caddr"].tobytes())[0]
    if "client.port" in keep:
        a["client.port"] = int(rec["cport"])
    if process and int(rec["pid"]):
        if "process.pid" in keep:
            a["process.pid"] = int(rec["pid"])
        if "process.executable.name" in keep:
            a["process.executable.name"] = rec["comm"].tobytes().rstrip(b"\0").decode()
    return tuple(sorted(a.items()))


def reference(batches: list[np.ndarray], keep: set[str]) -> dict:
    """One record at a time, the way the README describes each metric."""
    hists: dict = defaultdict(lambda: defaultdict(list))
    sums: dict = defaultdict(lambda: defaultdict(int))
    bad = 0
    for batch in batches:
        for rec in batch:
            kind, start, est, end = (int(rec["kind"]), int(rec["start_ns"]),
                                     int(rec["est_ns"]), int(rec["ts_ns"]))
            if kind == EV_OPEN:
                if start > 0 and est >= start:
                    hists["network.tcp.handshake.duration"][ref_attrs(rec, keep, False)].append(
                        (est - start) / 1e9)
            elif kind == EV_CLOSE:
                a = ref_attrs(rec, keep, True)
                for d, f in (("transmit", "bytes_tx"), ("receive", "bytes_rx")):
                    if int(rec[f]):
                        sums["network.tcp.bytes"][tuple(sorted(
                            a + (("network.io.direction", d),)))] += int(rec[f])
                s = start or est
                if int(rec["flags"]) & F_TRACKED and est and s > 0 and end >= s:
                    hists["network.tcp.connection.duration"][a].append((end - s) / 1e9)
            elif kind == EV_FAIL:
                err, flags = int(rec["cause"]), int(rec["flags"])
                cause = "refused" if flags & F_RST_RX or err == 111 else ERRNO_CAUSE.get(
                    err, "other")
                sums["network.tcp.connections.failed"][tuple(sorted(
                    ref_attrs(rec, keep, True) + (("error.type", cause),)))] += 1
            elif kind == EV_RTT:
                hists["network.tcp.rtt"][ref_attrs(rec, keep, True)].append(
                    int(rec["srtt_us"]) / 1e6)
            else:
                bad += 1
    return {"hists": hists, "sums": sums, "bad": bad}


def buckets(values: list[float]) -> list[int]:
    out = [0] * (len(DURATION_BUCKETS) + 1)
    for v in values:
        i = 0
        while i < len(DURATION_BUCKETS) and v > DURATION_BUCKETS[i]:
            i += 1
        out[i] += 1
    return out


@pytest.mark.parametrize("keep", [
    ("server.address", "server.port"),
    ("server.port",),
    (),
    ("client.address", "client.port", "process.pid"),
    ("server.address", "server.port", "client.address", "client.port", "process.pid",
     "process.executable.name"),
])
def test_batched_aggregation_equals_per_record_reference(keep: tuple[str, ...]) -> None:
    rng = np.random.default_rng(abs(hash(keep)) % 2**32)
    batches = [random_batch(rng, n) for n in (1, 7, 500, 2000, 64)]
    tel = _Wide()
    sig = TcpSignal(AgentConfig(tcp_attributes=keep), tel)
    for b in batches:
        sig.on_batch(b)
    sig.export()
    want = reference(batches, set(keep))

    assert sig.bad_records == want["bad"]
    for name, h in tel.hists.items():
        m = h.metric()
        got = {} if m is None else {
            tuple(sorted((kv.key, kv.value.string_value or kv.value.int_value)
                         for kv in p.attributes)): (p.count, p.sum, list(p.bucket_counts))
            for p in m[0].histogram.data_points}
        exp = {a: (len(v), sum(v), buckets(v)) for a, v in want["hists"][name].items()}
        assert got.keys() == exp.keys(), name
        for a, (count, total, bc) in exp.items():
            assert got[a][0] == count and got[a][2] == bc, (name, a)
            assert got[a][1] == pytest.approx(total, rel=1e-9), (name, a)
    data = tel.reader.get_metrics_data()
    got_sums: dict = defaultdict(dict)
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    got_sums[m.name][tuple(sorted(p.attributes.items()))] = p.value
    for name in ("network.tcp.bytes", "network.tcp.connections.failed"):
        assert got_sums[name] == dict(want["sums"][name]), name
