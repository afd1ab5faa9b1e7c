"""Export path: the agent with live flow tables, and span throughput.

1. Flows, live: the real agent (``--signals flows``) on veth-a while a
   generator in namespace a keeps N distinct UDP flows alive, exporting
   every interval to a null OTLP sink (bench/nullrx.py, which counts the
   data points it decodes): agent CPU per export and peak RSS at 10,000 and
   100,000 flows. The SDK baseline (the same drained flows through SDK
   counters) is the ``flows_cost`` benchmark's, measured offline.
2. Spans: the highest rate sustained for a few seconds with nothing dropped
   (every span counted by the sink), for the SDK's BatchSpanProcessor with
   its defaults (the ceiling the issue quotes, ~5,000/s) and for ebpf-otlp's
   batch span path (``otlp.spans.SpanBatchExporter``) with DNS-shaped spans.
"""

from __future__ import annotations

import subprocess
import time

from .common import PY, Figure, Result, command_for, env
from .lab import Agent, NullReceiver, Topology

NAME = "export"
TITLE = "Export path: live flow tables (CPU, RSS) and span throughput"

GEN = r"""
import socket, sys, time
dst, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
per = 50000
socks = []
for i in range((n + per - 1) // per):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    socks.append(s)
end = time.monotonic() + secs
passes = 0
while time.monotonic() < end:
    for i in range(n):
        try:
            socks[i // per].sendto(b"flow", (dst, 10000 + i % per))
        except OSError:
            pass
    passes += 1
print(passes)
"""

METRICS = ("network.flow.bytes", "network.flow.packets", "network.flow.segments")
SPAN_ATTRS = (("dns.question.name", "www.example.com"), ("dns.question.type", "A"),
              ("server.address", "10.0.0.53"), ("server.port", 53),
              ("network.transport", "udp"), ("dns.response_code", "NOERROR"))


# --- flows, live --------------------------------------------------------------------
def live_flows(n: int, mode: str, seconds: float, interval: float) -> dict:
    with Topology() as topo:
        sink = NullReceiver(topo, topo.a).__enter__()
        try:
            agent = Agent(topo, topo.a, "--iface", topo.a_if, "--signals", "flows",
                          "--max-flows", str(max(65536, 2 * n)), "--interval", str(interval),
                          "--endpoint", sink.endpoint,
                          log_name=f"agent-flows-{mode}-{n}.log",
                          extra_env={"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE":
                                     "delta"}).__enter__()
            try:
                gen = topo.popen(topo.a, PY, "-c", GEN, topo.b_ip4, str(n), str(seconds),
                                 stdout=subprocess.PIPE, text=True, env=env())
                cpu0, t0 = agent.cpu_s(), time.monotonic()
                rss = agent.rss_bytes()
                while gen.poll() is None:
                    rss = max(rss, agent.rss_bytes())
                    time.sleep(0.2)
                cpu1, t1 = agent.cpu_s(), time.monotonic()
                passes = int(gen.stdout.read().strip() or 0)
                rss = max(rss, agent.rss_bytes())
                alive = agent.alive()
            finally:
                agent.__exit__()
        finally:
            stats = sink.stop()
    # Exports that reached the sink inside the window (its clock is CLOCK_MONOTONIC
    # too), in whole-table equivalents: the direct path splits a table over several
    # requests, and an SDK export can take longer than the interval.
    points = sum(r[1] for r in stats.get("log", []) if t0 <= r[0] <= t1)
    exports = points / (len(METRICS) * n)
    stats.pop("log", None)
    cpu = cpu1 - cpu0
    return {"flows": n, "mode": mode, "seconds": t1 - t0, "agent_cpu_s": cpu,
            "cpu_per_interval_s": cpu / exports if exports >= 0.5 else None,
            "intervals": round(exports, 2), "max_interval_s": interval,
            "points_in_window": points,
            "rss_mb": rss / 1e6, "generator_passes": passes, "sink": stats,
            "agent_alive": alive}


def flows_part(res: Result, quick: bool) -> None:
    sizes = [2_000] if quick else [10_000, 100_000]
    modes = ["direct"]
    interval = 2.0 if quick else 5.0
    seconds = 5.0 if quick else 15.0
    runs = {}
    for n in sizes:
        for mode in modes:
            runs[(n, mode)] = r = live_flows(n, mode, seconds, interval)
            res.raw.setdefault("live_flows", []).append(r)
    for n in sizes:
        d = runs[(n, "direct")]
        s = runs.get((n, "sdk"))
        pts = d["sink"].get("max_points_per_request", 0)
        note = (f"{d['intervals']} whole-table exports in {d['seconds']:.0f} s (interval "
                f"{interval:g} s), up to {pts:,} points per request, generator passes "
                f"{d['generator_passes']}")
        if s:
            note += (f"; SDK path: {s['intervals']} whole-table exports in "
                     f"{s['seconds']:.0f} s")
        if s:
            base, base_note = s["cpu_per_interval_s"], ""
            if base is None:  # not one whole export in the window: its CPU is a lower bound
                base = s["agent_cpu_s"]
                base_note = (f"; the SDK path finished no export in {s['seconds']:.0f} s, so "
                             "its figure is the CPU it burnt meanwhile (a lower bound)")
            res.add(Figure.compare(f"agent CPU per export interval, {n:,} live flows, direct "
                                   "path", d["cpu_per_interval_s"], "CPU s", base,
                                   "SDK path, same flows", higher_is_better=False,
                                   note=note + base_note))
            res.add(Figure.compare(f"agent peak RSS, {n:,} live flows, direct path",
                                   d["rss_mb"], "MB", s["rss_mb"], "SDK path",
                                   higher_is_better=False))
        else:
            res.add(Figure(f"agent CPU per export interval, {n:,} live flows, direct path",
                           d["cpu_per_interval_s"], "CPU s", note=note))
            res.add(Figure(f"agent peak RSS, {n:,} live flows, direct path", d["rss_mb"], "MB"))
        if n >= 100_000:
            res.figures[-1].target = "< 150 MB"
            res.figures[-1].met = d["rss_mb"] < 150
            res.figures[-2].target = "< 1 s per 100k flows"
            res.figures[-2].met = (d["cpu_per_interval_s"] is not None
                                   and d["cpu_per_interval_s"] < 1.0)


# --- spans --------------------------------------------------------------------------
def _pace(rate: float, seconds: float, emit) -> int:
    """Call ``emit(k)`` every ~10 ms with the spans due; returns how many were emitted."""
    t0 = time.monotonic()
    done = 0
    while True:
        el = time.monotonic() - t0
        if el >= seconds:
            return done
        due = int(min(el, seconds) * rate) - done
        if due > 0:
            emit(due)
            done += due
        time.sleep(0.01)


def sdk_spans(rate: float, seconds: float, endpoint: str) -> dict:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind

    tp = TracerProvider(shutdown_on_exit=False)
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint + "/v1/traces")))
    tracer = tp.get_tracer("bench")
    attrs = dict(SPAN_ATTRS)

    def emit(k: int) -> None:
        now = time.time_ns()
        for _ in range(k):
            s = tracer.start_span("DNS A", kind=SpanKind.CLIENT, start_time=now - 1_000_000,
                                  attributes=attrs)
            s.end(end_time=now)

    t0 = time.monotonic()
    made = _pace(rate, seconds, emit)
    gen_s = time.monotonic() - t0
    t1 = time.monotonic()
    tp.force_flush(30_000)
    flush_s = time.monotonic() - t1
    tp.shutdown()
    return {"rate": rate, "made": made, "gen_seconds": gen_s, "flush_seconds": flush_s}


def batch_spans(rate: float, seconds: float, endpoint: str) -> dict:
    from ebpf_otlp.otlp.sender import OtlpSender
    from ebpf_otlp.otlp.settings import ExportSettings
    from ebpf_otlp.otlp.spans import SpanBatchExporter

    sender = OtlpSender("traces", ExportSettings.resolve(endpoint=endpoint).traces)
    ex = SpanBatchExporter({"service.name": "bench"}, sender.send)
    ex.start()

    def emit(k: int) -> None:
        now = time.time_ns()
        ex.submit([(now - 1_000_000, now, "DNS A", SPAN_ATTRS, None)] * k)

    t0 = time.monotonic()
    made = _pace(rate, seconds, emit)
    gen_s = time.monotonic() - t0
    t1 = time.monotonic()
    ex.flush(30.0)
    flush_s = time.monotonic() - t1
    ex.shutdown()
    return {"rate": rate, "made": made, "gen_seconds": gen_s, "flush_seconds": flush_s,
            "dropped": dict(ex.dropped)}


def ceiling(fn, rates: list[float], seconds: float) -> tuple[float, list[dict]]:
    """Highest rate whose spans all reached the sink, the generator kept pace and the
    backlog drained within a second of the window's end."""
    best, trials = 0.0, []
    for rate in rates:
        with NullReceiver() as sink:
            r = fn(rate, seconds, sink.endpoint)
            time.sleep(0.2)
            r["received"] = sink.stop().get("spans", 0)
        r["ok"] = (r["received"] == r["made"] and r["made"] >= 0.95 * rate * seconds
                   and r["flush_seconds"] < 1.5)
        trials.append(r)
        if not r["ok"]:
            break
        best = rate
    return best, trials


def spans_part(res: Result, quick: bool) -> None:
    seconds = 1.0 if quick else 3.0
    sdk_rates = [1000, 2000] if quick else [2000, 3000, 4000, 5000, 6000, 7000, 8000, 10000]
    sdk_best, sdk_trials = ceiling(sdk_spans, sdk_rates, seconds)
    res.raw["sdk_spans"] = sdk_trials
    try:
        import ebpf_otlp.otlp.spans  # noqa: F401
        have_batch = True
    except ImportError:
        have_batch = False
    if not have_batch:
        res.add(Figure("SDK BatchSpanProcessor: highest sustained rate, nothing dropped",
                       sdk_best, "spans/s", note=f"{seconds:g} s per step"))
        res.note("ebpf-otlp batch span path not built yet (ebpf_otlp.otlp.spans missing)")
        return
    b_rates = [5000, 10000] if quick else [10000, 25000, 50000, 75000, 100000, 150000,
                                           200000]
    b_best, b_trials = ceiling(batch_spans, b_rates, seconds)
    res.raw["batch_spans"] = b_trials
    top = "" if b_best < b_rates[-1] else " (the highest rate tried)"
    res.add(Figure.compare("ebpf-otlp batch span path (dns_spans): highest sustained rate, "
                           "nothing dropped", b_best, "spans/s", sdk_best,
                           "SDK BatchSpanProcessor defaults, same spans", target=1.0,
                           note=f"{seconds:g} s per step, every span counted by the sink{top}"))
    res.add(Figure("SDK BatchSpanProcessor (defaults): highest sustained rate, nothing "
                   "dropped", sdk_best, "spans/s",
                   note=f"steps {sdk_rates[:len(sdk_trials)]}; first failing step: "
                        + (str(next((t for t in sdk_trials if not t['ok']), {}).get('rate'))
                           or "none")))


def run(quick: bool = False) -> Result:
    res = Result(NAME, TITLE, command_for(NAME, quick))
    spans_part(res, quick)
    flows_part(res, quick)
    res.note("Flows are kept alive by a UDP generator in namespace a (one datagram per flow "
             "per pass to closed ports in b); the agent exports delta sums to bench/nullrx.py.")
    res.note("Span steps run generator, processor and HTTP client in one process, as the "
             "agent does; a step passes when every span reached the sink, the generator kept "
             "the rate and the final flush took under 1.5 s.")
    return res
