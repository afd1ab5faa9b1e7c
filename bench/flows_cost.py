"""Flows: kernel cost per packet, and the cost of exporting a big flow table.

1. Per packet: the flows TC and XDP programs on a flow-table hit (the same
   frame repeated with ``BPF_PROG_TEST_RUN``), interleaved with the self-test
   object's empty ``probe_tc`` / ``probe_xdp``: added ns per packet and ratio.
2. Export of N distinct flows (100,000 by default) to a local HTTP sink that
   only reads the body: the direct path (numpy projection + hand-encoded OTLP
   + the SDK exporter's HTTP client) against the SDK path (one ``Counter.add``
   per series and metric, then the SDK's collect, encode and export).

    sudo .venv/bin/python -m bench.flows_cost [--quick] [--flows N]
"""

from __future__ import annotations

import argparse
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from .common import Figure, Result, command_for, median

NAME = "flows_cost"
TITLE = "Flows: per-packet program cost and export time per interval"
TARGET_HIT_NS = 100.0


def _frames() -> dict[str, bytes]:
    from flows_frames import eth, ipv4, ipv6, tcp, udp

    return {
        "ipv4 tcp 100B": eth(0x0800, ipv4("10.0.0.1", "10.0.0.2", 6, tcp(40000, 443, 0x18,
                                                                          bytes(100)))),
        "ipv6 udp 100B": eth(0x86DD, ipv6("fd00::1", "fd00::2", 17, udp(40000, 53, bytes(100)))),
        "vlan ipv4 tcp 100B": eth(0x0800, ipv4("10.0.0.1", "10.0.0.2", 6,
                                               tcp(40000, 443, 0x10, bytes(100))),
                                  vlans=((0x8100, 7),)),
    }


def per_packet(res: Result, quick: bool) -> None:
    from ebpf_otlp.platform.bpfobj import BpfObject

    repeat, trials = (20_000, 3) if quick else (1_000_000, 7)
    base = BpfObject.open_packaged("selftest")
    base.only_programs(["probe_xdp", "probe_tc"])
    base.load()
    # the packet object with flows only (bpf/packet.bpf.c; DNS off is dead code)
    obj = BpfObject.open_packaged("packet")
    obj.rodata["dns_on"] = 0
    obj.load()
    try:
        cases = [("TC ingress", "packet_tc_ingress", "probe_tc"),
                 ("XDP ingress", "packet_xdp_ingress", "probe_xdp")]
        for frame_name, frame in _frames().items():
            for label, prog_name, empty_name in cases:
                prog, empty = obj.programs[prog_name], base.programs[empty_name]
                prog.test_run(frame)  # insert: every timed run is a hit
                xs, bs = [], []
                for _ in range(trials):
                    bs.append(empty.test_run(frame, repeat=repeat).duration_ns)
                    xs.append(prog.test_run(frame, repeat=repeat).duration_ns)
                x, b = median(xs), median(bs)
                added = median([p - q for p, q in zip(xs, bs)])
                res.add(Figure(f"{label}, {frame_name}, hit", added, "ns added/packet", b,
                               f"empty {empty_name}", x / b if b else None,
                               f"< {TARGET_HIT_NS:g} ns added", added < TARGET_HIT_NS,
                               f"program {x:.0f} ns/run vs empty {b:.0f} ns/run"))
    finally:
        obj.close()
        base.close()


class _Sink:
    """An HTTP server that reads each request body and answers 200."""

    def __init__(self) -> None:
        outer = self
        self.bytes = 0

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                outer.bytes += len(self.rfile.read(n))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def synthetic(n: int, seed: int = 1):
    """A drained table of n distinct IPv4 TCP/UDP flows between 256 x 256 hosts."""
    from ebpf_otlp.signals.flows import agg as agg

    rng = np.random.default_rng(seed)
    keys = np.zeros(n, agg.KEY_DT)
    keys["saddr"][:, 10:12] = 0xFF
    keys["daddr"][:, 10:12] = 0xFF
    keys["saddr"][:, 12:14] = (10, 0)
    keys["daddr"][:, 12:14] = (10, 1)
    keys["saddr"][:, 14:] = rng.integers(0, 256, (n, 2))
    keys["daddr"][:, 14:] = rng.integers(0, 256, (n, 2))
    keys["sport"] = np.arange(n) % 60000 + 1024
    keys["dport"] = rng.choice([80, 443, 53, 5432], n)
    keys["proto"] = np.where(keys["dport"] == 53, 17, 6)
    keys["ethertype"], keys["l3"], keys["ifindex"] = 0x0800, 1, 1
    keys["direction"] = np.arange(n) % 2
    counts = np.stack([rng.integers(1, 1000, n)] * 3, axis=1).astype(np.uint64)
    counts[:, 1] *= 1000
    z = np.zeros(n, np.uint64)
    return agg.Drained(keys, counts, np.zeros(n, np.uint16), z)


def export_direct(d, url: str) -> dict[str, float]:
    from ebpf_otlp.config import FLOW_ATTRIBUTES
    from ebpf_otlp.otlp import Exporter, ExportSettings
    from ebpf_otlp.signals.flows import METRICS
    from ebpf_otlp.signals.flows import agg as agg
    from ebpf_otlp.signals.flows import attrs as fa

    t0 = time.perf_counter()
    series, counts = agg.aggregate(agg.project(d, FLOW_ATTRIBUTES), d.counts)
    t1 = time.perf_counter()
    attrs = fa.encoded(series, FLOW_ATTRIBUTES, {1: "eth0"})
    t2 = time.perf_counter()
    ex = Exporter(ExportSettings.resolve(endpoint=url.rsplit("/v1/", 1)[0], timeout_s=30.0,
                                         resource={"service.name": "bench"}), 30.0, 1 << 20)
    sender = ex.senders["metrics"]
    ok = ex.send_sums(METRICS, attrs, counts, np.full(len(series), time.time_ns(), np.uint64),
                      time.time_ns()).all()
    t3 = time.perf_counter()
    ex.shutdown(1)
    if not ok:
        raise RuntimeError("direct export to the sink failed")
    return {"aggregate": t1 - t0, "attributes": t2 - t1, "encode_send": t3 - t2,
            "total": t3 - t0, "bytes": sender.bytes_sent, "requests": sender.requests}


def export_sdk(d, url: str) -> dict[str, float]:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.metrics.view import View

    from ebpf_otlp.config import FLOW_ATTRIBUTES
    from ebpf_otlp.otlp.exporter import MAX_SERIES_PER_REQUEST
    from ebpf_otlp.signals.flows import METRICS
    from ebpf_otlp.signals.flows import agg as agg
    from ebpf_otlp.signals.flows import attrs as fa

    # split like the direct path (the SDK drops requests over 64 MiB)
    exporter = OTLPMetricExporter(endpoint=url, timeout=60,
                                  max_export_batch_size=3 * MAX_SERIES_PER_REQUEST)
    reader = PeriodicExportingMetricReader(exporter,
                                           export_interval_millis=float("inf"))
    mp = MeterProvider(metric_readers=[reader], shutdown_on_exit=False,
                       views=[View(instrument_name="*",
                                   aggregation_cardinality_limit=2 * len(d) + 10)])
    meter = mp.get_meter("ebpf_otlp")
    counters = [meter.create_counter(m.name, unit=m.unit) for m in METRICS]
    t0 = time.perf_counter()
    series, counts = agg.aggregate(agg.project(d, FLOW_ATTRIBUTES), d.counts)
    dicts = fa.dicts(series, FLOW_ATTRIBUTES, {1: "eth0"})
    t1 = time.perf_counter()
    for c, m in zip(counters, METRICS):
        for v, a in zip(counts[:, m.column].tolist(), dicts):
            c.add(v, a)
    t2 = time.perf_counter()
    ok = mp.force_flush(600_000)
    t3 = time.perf_counter()
    mp.shutdown()
    if not ok:
        raise RuntimeError("SDK export to the sink failed")
    return {"attributes": t1 - t0, "add": t2 - t1, "collect_encode_send": t3 - t2,
            "total": t3 - t0}


def export_cost(res: Result, n: int) -> None:
    sink = _Sink()
    try:
        d = synthetic(n)
        direct = min((export_direct(d, sink.url) for _ in range(3)), key=lambda r: r["total"])
        sdk = export_sdk(d, sink.url)
    finally:
        sink.close()
    res.raw["export_direct"] = direct
    res.raw["export_sdk"] = sdk
    res.add(Figure.compare(f"export {n:,} flows x 3 metrics, direct path", direct["total"], "s",
                           sdk["total"], "SDK path", target=0.2, higher_is_better=False,
                           note=f"aggregate {direct['aggregate']:.3f} s, attributes "
                                f"{direct['attributes']:.3f} s, encode+send "
                                f"{direct['encode_send']:.3f} s, {direct['bytes'] / 1e6:.1f} MB "
                                f"in {direct['requests']} requests"))
    res.add(Figure(f"export {n:,} flows x 3 metrics, SDK path", sdk["total"], "s",
                   note=f"Counter.add {sdk['add']:.2f} s, collect+encode+send "
                        f"{sdk['collect_encode_send']:.2f} s"))


def run(quick: bool) -> Result:
    res = Result(NAME, TITLE, command_for(NAME, quick))
    per_packet(res, quick)
    export_cost(res, 10_000 if quick else 100_000)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--flows", type=int, default=0, help="export only, with this many flows")
    args = ap.parse_args()
    if args.flows:
        res = Result(NAME, TITLE, command_for(NAME, args.quick))
        export_cost(res, args.flows)
    else:
        res = run(args.quick)
    for f in res.figures:
        ratio = f" ratio {f.ratio:.2f} vs {f.baseline_name} ({f.baseline:.4g})" if f.ratio else ""
        print(f"{f.name}: {f.value:.4g} {f.unit}{ratio}  {f.note}")


if __name__ == "__main__":
    main()
