"""HTTP load: nginx requests/s with the HTTP signal attached versus not, same run.

nginx (one process) serves a small file in namespace b; wrk (Debian) in
namespace a drives it for a few seconds per case: plaintext and TLS,
keep-alive and a new connection per request (``Connection: close``). Baseline
rounds (every case without the agent) alternate with the agent's runs; a
figure's baseline is the mean of the baseline rounds. With the agent, every
request makes two spans (wrk's CLIENT, nginx's SERVER): a counting receiver
checks they all arrived and that nothing was dropped (ring buffer, span
queue).

Two loads: saturated (wrk's 8 connections flat out, nginx and wrk on both
CPUs, so every cycle the agent or its hooks take comes off their rate) and
paced (each connection waits THINK_MS after every response, a fixed load well
below saturation: what an application with CPU to spare sees, the agent's cost
showing as latency). The target applies to the paced runs: PACED_ROUNDS runs
with the agent, each between two baseline rounds (one run moves +-5 % here),
mean against mean. The agent also runs saturated exporting every span, and
saturated with ``--http-span-sample`` SAMPLE_RATIO (histograms still count
every exchange: checked against wrk's request count).

Also: the agent's CPU per 1,000 requests; the same per 1,000 requests replayed
(bench/http_replay.py: ring batches recorded here from nginx and wrk, fed
through HttpSignal.on_batch by this code and by the code before the
per-batch rework, same input); and the batch span encoder against the SDK's
span path on the HTTP span shape (spans per CPU-second).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from . import http_replay
from .common import PY, TESTS, Figure, Result, command_for, env, stop_process, wait_until
from .dns_flood import RECEIVER, _cpu_s, _Totals

NAME = "http_load"
TITLE = "HTTP: nginx requests/s with the agent vs without"
TARGET_RATIO = 0.90
CASES = (("http", "keep-alive"), ("http", "close"), ("https", "keep-alive"),
         ("https", "close"))
SAMPLE_RATIO = 0.1  # the sampled rows: --http-span-sample
HTTP_RECEIVER = RECEIVER.replace(
    '"ebpf_otlp.dns.spans.dropped"',
    '"ebpf_otlp.http.spans.dropped", "ebpf_otlp.spans.dropped", "ebpf_otlp.export.failures", '
    '"ebpf_otlp.http.responses.unmatched", "ebpf_otlp.http.requests.unanswered", '
    '"ebpf_otlp.http.spans.sampled_out", "http.server.request.duration", '
    '"http.client.request.duration"').replace(
    'kv.value.string_value == "dns"', 'kv.value.string_value == "http"')


# Paced runs: each wrk connection waits THINK_MS after every response, so the
# offered load is fixed well below what nginx and wrk reach flat out (the
# figure that an agent's cost moves when both CPUs are saturated); the ratio
# then shows what the agent adds to each request's latency. Connections per case:
PACED_CONNS = {("http", "keep-alive"): 16, ("http", "close"): 4,
               ("https", "keep-alive"): 16, ("https", "close"): 2}
THINK_MS = 1
PACED_ROUNDS = 4  # paced runs with the agent, each between two baseline rounds


def _latency_us(out: str, pct: str) -> float | None:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if not m:
        return None
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]


def _wrk_run(t, url: str, seconds: float, close: bool, paced: bool = False) -> dict:
    conns = PACED_CONNS[("https" if url.startswith("https") else "http",
                         "close" if close else "keep-alive")] if paced else 8
    args = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency"]
    if close:
        args += ["-H", "Connection: close"]
    script = None
    if paced:
        fd, script = tempfile.mkstemp(suffix=".lua", prefix="eo-wrk-")
        with os.fdopen(fd, "w") as f:
            f.write(f"function delay()\n  return {THINK_MS}\nend\n")
        args += ["-s", script]
    try:
        out = t.run(t.a, *args, url, timeout=seconds + 60).stdout
    finally:
        if script:
            os.unlink(script)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk printed no rate: {out}")
    total = re.search(r"(\d+) requests in", out)
    return {"rps": float(m.group(1)), "requests": int(total.group(1)) if total else 0,
            "p50_us": _latency_us(out, "50"), "p99_us": _latency_us(out, "99")}


def _wrk(t, url: str, seconds: float, close: bool) -> tuple[float, int]:
    r = _wrk_run(t, url, seconds, close)
    return r["rps"], r["requests"]


LOOP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
/* Two functions with the same work and different first instructions: a push
 * (emulated by the kernel when probed, as the libssl functions the TLS probes
 * use: signals/http/placement.py) and a sub from %rsp (single-stepped, as
 * SSL_read/SSL_write's own first instruction). */
int probe_push(void *a, void *b, int n);
int probe_sub(void *a, void *b, int n);
__asm__(".text\n"
	".globl probe_push\n.type probe_push,@function\n"
	"probe_push:\n push %r13\n lea 1(%rdx),%eax\n pop %r13\n ret\n"
	".size probe_push,.-probe_push\n"
	".globl probe_sub\n.type probe_sub,@function\n"
	"probe_sub:\n sub $0x18,%rsp\n lea 1(%rdx),%eax\n add $0x18,%rsp\n ret\n"
	".size probe_sub,.-probe_sub\n");
int main(int argc, char **argv)
{
	long iters = atol(argv[1]);
	int (*fn)(void *, void *, int) = strcmp(argv[2], "push") ? probe_sub : probe_push;
	struct timespec t0, t1;
	int s = 0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < iters; i++)
		s += fn(0, 0, i);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%.1f\n", ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / iters);
	return s == 42;
}
"""


def uprobe_hit_ns(work: Path, iters: int = 20000) -> dict[str, float] | None:
    """ns per call of a trivial function, bare and with the SSL programs on it:
    {"bare", "sub", "push", "sub+ret", "push+ret"} (entry program only, or entry
    and return programs at the same place, on a function starting with a sub from
    %rsp or with a push): what one uprobe hit costs on this machine."""
    import os as _os

    from ebpf_otlp.platform.bpfobj import BpfObject

    if not shutil.which("gcc"):
        return None
    src, exe = work / "loop.c", work / "loop"
    src.write_text(LOOP_C)
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True, capture_output=True)

    def per_call(which: str) -> float:
        out = subprocess.run([str(exe), str(iters), which], capture_output=True, text=True,
                             check=True)
        return float(out.stdout)

    out = {"bare": min(per_call("push"), per_call("sub"))}
    for first in ("sub", "push"):
        for ret in (False, True):
            obj = BpfObject.open_packaged("http")
            try:
                obj.rodata["self_tgid"] = _os.getpid()
                obj.load()
                obj.programs["ssl_read_ex_enter"].attach_uprobe(str(exe), f"probe_{first}")
                if ret:
                    obj.programs["ssl_exit_ex"].attach_uprobe(str(exe), f"probe_{first}",
                                                              retprobe=True)
                out[first + ("+ret" if ret else "")] = per_call(first)
            finally:
                obj.close()
    return out


def _kernel_only(t, url: str, seconds: float, close: bool, which: str,
                 relocate: bool = True) -> tuple[float, dict]:
    """requests/s with only part of the kernel side attached (``uprobes``: the SSL
    probes on the system libssl, placed by signals/http/placement.py or, with
    ``relocate`` False, at the symbols' offset 0; ``socket`` or ``syscall``: the
    plaintext programs of that capture mode), records drained and dropped by a
    thread here: what the hooks cost nginx and wrk alone. Also, per request, the
    runs of each attached program and their BPF run time (kernel BPF statistics,
    on while this runs)."""
    import threading

    from ebpf_otlp.platform.bpfobj import BpfObject
    from ebpf_otlp.platform.libbpf import enable_run_time_stats
    from ebpf_otlp.platform.ringbuf import RingBuffer
    from ebpf_otlp.signals.http.capture import unused_programs
    from ebpf_otlp.signals.http.signal import event_dtype
    from ebpf_otlp.signals.http.tls import PROGRAMS, TlsAttacher, system_tls_library

    obj = BpfObject.open_packaged("http")
    stats_fd = -1
    try:
        obj.rodata["self_tgid"] = os.getpid()
        obj.rodata["ringbuf_wakeup_bytes"] = 64 << 10  # as the agent loads it
        for name in unused_programs("syscall" if which == "syscall" else "socket"):
            obj.programs[name].autoload = False
        obj.load()
        attached = []
        if which == "uprobes":
            tls = TlsAttacher(obj, relocate=relocate)
            tls.attach_path(system_tls_library(), required=True)
            attached = [obj.programs[n] for n in PROGRAMS]
            placement = "; ".join(p.describe() for ps in tls.probes.values() for p in ps)
        else:
            for p in obj.programs.values():
                if p.name not in PROGRAMS and p.autoload:
                    p.attach()
                    attached.append(p)
            placement = ""
        ring = RingBuffer(obj.maps["http_events"], event_dtype(256), on_batch=lambda r: None)
        stop = threading.Event()

        def drain() -> None:
            while not stop.wait(0.01):
                ring.drain()

        th = threading.Thread(target=drain, daemon=True)
        th.start()
        stats_fd = enable_run_time_stats()
        before = {p.name: p.run_stats() for p in attached}
        try:
            rps, n = _wrk(t, url, seconds, close)
        finally:
            stop.set()
            th.join()
            ring.close()
        after = {p.name: p.run_stats() for p in attached}
        runs = {k: (after[k][1] - before[k][1]) / max(n, 1) for k in after}
        ns = {k: (after[k][0] - before[k][0]) / max(n, 1) for k in after}
        info = {"requests": n, "placement": placement,
                "runs_per_request": {k: round(v, 2) for k, v in runs.items() if v},
                "bpf_ns_per_request": {k: round(v) for k, v in ns.items() if v}}
        return rps, info
    finally:
        if stats_fd >= 0:
            os.close(stats_fd)
        obj.close()


def sdk_vs_batch_spans_per_s(n: int = 3000) -> tuple[float, float]:
    """Spans per CPU-second on the HTTP span shape: SDK span + its OTLP encoder
    against the batch encoder (SERVER kind, a traceparent parent)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
    from opentelemetry.trace import SpanKind

    from ebpf_otlp.otlp.spans import SpanEncoder, SpanRecord

    class Encode(SpanExporter):
        def export(self, spans):
            encode_spans(spans).SerializeToString()
            return 0

    attrs = (("http.request.method", "GET"), ("url.scheme", "http"),
             ("network.protocol.version", "1.1"), ("http.route", "/ok.txt"),
             ("http.response.status_code", 200), ("url.path", "/ok.txt"),
             ("server.address", "10.201.0.2"), ("server.port", 8080),
             ("client.address", "10.201.0.1"), ("network.peer.address", "10.201.0.1"),
             ("network.peer.port", 40000), ("process.pid", 1234),
             ("process.executable.name", "nginx"))
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(Encode()))
    tracer = tp.get_tracer("bench")
    t0 = time.process_time()
    for i in range(n):
        s = tracer.start_span("GET /ok.txt", kind=SpanKind.SERVER, start_time=i,
                              attributes=dict(attrs))
        s.end(end_time=i + 1000)
    sdk = n / (time.process_time() - t0)
    enc = SpanEncoder({"service.name": "bench"}, "ebpf_otlp")
    items = [SpanRecord(i, i + 1000, "GET /ok.txt", attrs[:10]
                        + (("network.peer.port", 40000 + i % 512),) + attrs[11:], None, 2)
             for i in range(n)]
    t0 = time.process_time()
    for j in range(0, n, 1000):
        enc.request(items[j:j + 1000])
    ours = n / (time.process_time() - t0)
    return sdk, ours


def _replays(recordings: dict[str, Path], work: Path, rounds: int) -> dict:
    """The recordings replayed through HttpSignal.on_batch: this code with all spans
    and sampled at SAMPLE_RATIO, and the baseline commit's code."""
    base_src = http_replay.baseline_tree(work)
    out = {}
    for scheme, path in recordings.items():
        runs = {"current": http_replay.replay_cpu(path, rounds=rounds),
                "sampled": http_replay.replay_cpu(path, rounds=rounds,
                                                  extra={"http_span_sample": SAMPLE_RATIO}),
                "baseline": http_replay.replay_cpu(path, base_src, rounds=rounds)
                if base_src is not None else None}
        requests = runs["current"]["exchanges"] / 2  # a CLIENT and a SERVER exchange each
        for r in runs.values():
            if r is not None:
                r["ms_per_1000"] = round(min(r["cpu_s"]) / requests * 1e6, 2)
        out[scheme] = {**runs, "requests": int(requests),
                       "records": runs["current"]["records"]}
        print(f"  replay {scheme}: " + json.dumps({k: v["ms_per_1000"] for k, v in
                                                  runs.items() if v}), flush=True)
    return out


_RUNS = [0]


def _mean_runs(runs: list[dict]) -> dict:
    """Two agent runs of one case as one: rates and latencies averaged, counts summed."""
    out = {k: sum(r[k] for r in runs) for k, v in runs[0].items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for k in ("rps", "p50_us", "p99_us"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = round(sum(vals) / len(vals), 1) if vals else None
    out["runs"] = runs
    return out


def _agent_cases(t, urls: dict, seconds: float, quick: bool, work: Path,
                 extra: tuple[str, ...] = (), paced: bool = False) -> dict:
    """Each case with the agent (``--signals http`` plus ``extra``) exporting to a
    counting receiver: requests/s, the agent's CPU, spans, histogram counts and
    what was dropped or sampled out, per case."""
    _RUNS[0] += 1  # a file of its own per run: a stale one would read as the new totals
    tag = "-".join(extra) + ("-paced" if paced else "") + f"-{_RUNS[0]}"
    totals_path = work / f"totals{tag}.json"
    rx = t.popen(t.a, PY, "-c", HTTP_RECEIVER, "4318", str(totals_path),
                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env())
    agent = None
    log_path = work / f"agent{tag}.log"
    all_spans = not extra
    with_agent = {}
    try:
        assert "receiving" in rx.stdout.readline()
        alog = open(log_path, "w")  # noqa: SIM115
        agent = t.popen(t.a, PY, "-m", "ebpf_otlp", "run", "--signals", "http",
                        "--endpoint", "http://127.0.0.1:4318", "--interval", "1", *extra,
                        stdout=alog, stderr=alog,
                        env=dict(env(), OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=
                                 "delta"))
        if not wait_until(lambda: "ebpf-otlp running" in log_path.read_text(), 60):
            raise RuntimeError("agent did not start: " + log_path.read_text()[-2000:])
        totals = _Totals(totals_path)

        def measured(d: dict) -> float:
            return (d.get("http.server.request.duration", 0)
                    + d.get("http.client.request.duration", 0))

        for c in CASES:
            before = totals.get()
            cpu0 = _cpu_s(agent.pid)
            w = _wrk_run(t, urls[c[0]], seconds, c[1] == "close", paced)
            rps, n = w["rps"], w["requests"]
            prev = [None]

            def settled(prev=prev, before=before, n=n):
                cur = totals.get()
                done = measured(cur) - measured(before) >= 2 * n and (
                    not all_spans or cur.get("spans", 0) - before.get("spans", 0) >= 2 * n)
                same = cur == prev[0]
                prev[0] = cur
                return done or same

            wait_until(settled, 20 if quick else 60, 1.5)
            cpu = _cpu_s(agent.pid) - cpu0
            after = totals.get()

            def delta(k: str, after=after, before=before) -> float:
                return after.get(k, 0) - before.get(k, 0)

            with_agent[c] = {
                "rps": rps, "requests": n, "spans": delta("spans"),
                "measured": measured(after) - measured(before),
                "sampled_out": delta("ebpf_otlp.http.spans.sampled_out"),
                "ring_lost": delta("ebpf_otlp.events.lost"),
                "spans_dropped": delta("ebpf_otlp.http.spans.dropped"),
                "agent_cpu_s": round(cpu, 3), "p50_us": w["p50_us"], "p99_us": w["p99_us"]}
            for k in ("ebpf_otlp.spans.dropped", "ebpf_otlp.export.failures",
                      "ebpf_otlp.http.responses.unmatched",
                      "ebpf_otlp.http.requests.unanswered"):
                with_agent[c][k.split(".", 1)[1]] = delta(k)
            print(f"  {' '.join(extra)} {c}: {json.dumps(with_agent[c])}", flush=True)
    finally:
        if agent is not None:
            stop_process(agent)
        stop_process(rx, 5)
    return with_agent


def run(quick: bool) -> Result:
    import sys

    sys.path.insert(0, str(TESTS / "signals" / "http"))
    from http_env import HTTP_PORT, HTTPS_PORT, Nginx
    from netns import Topology

    res = Result(NAME, TITLE, command_for(NAME, quick))
    sdk, ours = sdk_vs_batch_spans_per_s()
    res.add(Figure.compare("HTTP span encoding, batch path vs SDK", ours, "spans/CPU-s", sdk,
                           "SDK span + OTLP encoder", target=4.0))
    if not shutil.which("wrk") or not Path("/usr/sbin/nginx").exists():
        res.status = "partial"
        res.note("wrk or nginx not installed (Debian wrk, nginx-light)")
        return res
    seconds = 1.0 if quick else 5.0
    work = Path(tempfile.mkdtemp(prefix="eo-httpload-"))
    rows = []
    try:
        hit = uprobe_hit_ns(work)
        if hit is not None:
            res.raw["uprobe_hit_ns"] = hit
            for key, what in (("sub", "first instruction sub $0x18,%rsp (single-stepped)"),
                              ("push", "first instruction push %r13 (emulated)"),
                              ("sub+ret", "the same with the return probe, sub first"),
                              ("push+ret", "the same with the return probe, push first")):
                res.add(Figure(f"one SSL probe hit on a trivial call, {what}",
                               round(hit[key] - hit["bare"]), "ns/call",
                               note=f"added to the bare call's {hit['bare']:.1f} ns: what "
                                    "each SSL call costs the traced process"))
        with Topology() as t, Nginx(t, t.b, t.b_ip4):
            urls = {"http": f"http://{t.b_ip4}:{HTTP_PORT}/ok.txt",
                    "https": f"https://{t.b_ip4}:{HTTPS_PORT}/ok.txt"}
            base = {c: [] for c in CASES}
            base_paced: dict = {c: [] for c in CASES}

            def baselines() -> None:
                for c in CASES:
                    base[c].append(_wrk(t, urls[c[0]], seconds, c[1] == "close")[0])
                    base_paced[c].append(_wrk_run(t, urls[c[0]], seconds, c[1] == "close",
                                                  paced=True))

            # Paced runs PACED_ROUNDS times with the agent, each between two
            # baseline rounds: one run's rate at a fixed load moves +-5 % here
            # (bench/RESULTS.md, baseline runs), as much as the effect measured.
            baselines()
            with_agent = _agent_cases(t, urls, seconds, quick, work)
            paced_runs = []
            for k in range(2 if quick else PACED_ROUNDS):
                paced_runs.append(_agent_cases(t, urls, seconds, quick, work, paced=True))
                if k == 1:
                    sampled = _agent_cases(t, urls, seconds, quick, work,
                                           ("--http-span-sample", str(SAMPLE_RATIO)))
                baselines()
            paced = {c: _mean_runs([r[c] for r in paced_runs]) for c in CASES}
            parts = {"uprobes": _kernel_only(t, urls["https"], seconds, False, "uprobes"),
                     "uprobes at offset 0": _kernel_only(t, urls["https"], seconds, False,
                                                         "uprobes", relocate=False),
                     "socket": _kernel_only(t, urls["http"], seconds, False, "socket"),
                     "socket, close": _kernel_only(t, urls["http"], seconds, True, "socket"),
                     "syscall": _kernel_only(t, urls["http"], seconds, False, "syscall"),
                     "syscall, close": _kernel_only(t, urls["http"], seconds, True,
                                                    "syscall")}
            recordings = {}
            for scheme, which in (("http", "tracepoints"), ("https", "uprobes")):
                recs, sizes, polls, _ = http_replay.record(
                    lambda scheme=scheme: _wrk(t, urls[scheme], 1 if quick else 2, False),
                    which, max_records=30_000 if quick else 150_000)
                recordings[scheme] = work / f"{scheme}.npz"
                http_replay.save(recordings[scheme], recs, sizes, polls)
        replays = _replays(recordings, work, 3 if quick else 7)
    finally:
        res.raw["agent_log_tail"] = "".join(
            p.read_text()[-1500:] for p in sorted(work.glob("agent*.log")))
        shutil.rmtree(work, ignore_errors=True)
    for c in CASES:
        w = with_agent[c]
        b = sum(base[c]) / len(base[c])
        name = f"{c[0]} {c[1]}"
        res.add(Figure.compare(f"requests/s with agent, {name}, saturated", round(w["rps"]),
                               "req/s", round(b),
                               f"without agent (mean of {len(base[c])} runs around the agent)",
                               note="nginx and wrk flat out on both CPUs: every cycle of the "
                                    "agent and its hooks comes off their rate"))
        per_k = 1000 * w["agent_cpu_s"] / w["requests"] if w["requests"] else None
        res.add(Figure(f"agent CPU per 1,000 requests, {name}",
                       round(per_k * 1000, 2) if per_k is not None else None, "ms",
                       note=f"{w['spans']} spans for {w['requests']} requests "
                            f"(2 per request expected), ring lost {w['ring_lost']}, "
                            f"spans dropped (queue) {w['spans_dropped']}, (any reason) "
                            f"{w['spans.dropped']}, export failures {w['export.failures']}"))
        rows.append({"case": name, "baseline_runs": base[c], **w})
    for c in CASES:
        w = paced[c]
        bp = base_paced[c]
        b = sum(r["rps"] for r in bp) / len(bp)
        name = f"{c[0]} {c[1]}"
        share = b / (sum(base[c]) / len(base[c]))
        rounds = [r["rps"] / ((bp[k]["rps"] + bp[k + 1]["rps"]) / 2)
                  for k, r in enumerate(w["runs"])]
        res.add(Figure.compare(f"requests/s with agent, {name}, paced", round(w["rps"]),
                               "req/s", round(b), f"without agent (mean of {len(bp)} runs "
                               f"around the agent's {len(w['runs'])})",
                               target=TARGET_RATIO,
                               note=f"{PACED_CONNS[c]} connections, {THINK_MS} ms think time "
                                    f"per request: {share:.0%} of the saturated rate; each "
                                    f"agent run against the baseline rounds around it: "
                                    f"{', '.join(f'{x:.2f}' for x in rounds)}; "
                                    f"{w['spans']} spans for {w['requests']} requests"))
        p50 = [r["p50_us"] for r in bp if r["p50_us"] is not None]
        if w["p50_us"] is not None and p50:
            res.add(Figure.compare(f"median latency with agent, {name}, paced", w["p50_us"],
                                   "us", round(sum(p50) / len(p50), 1),
                                   f"without agent (mean of {len(p50)} runs)",
                                   higher_is_better=False,
                                   note=f"wrk's 99th percentile {w['p99_us']} us with, "
                                        f"{[r['p99_us'] for r in bp]} without"))
        rows.append({"case": f"{name}, paced", "baseline_runs": bp, **w})
    for c in CASES:
        w = sampled[c]
        b = sum(base[c]) / len(base[c])
        name = f"{c[0]} {c[1]}"
        res.add(Figure.compare(f"requests/s with agent, {name}, saturated, spans sampled at "
                               f"{SAMPLE_RATIO:g}", round(w["rps"]), "req/s", round(b),
                               f"without agent (mean of {len(base[c])} runs around the agent)"))
        per_k = 1000 * w["agent_cpu_s"] / w["requests"] if w["requests"] else None
        res.add(Figure(f"agent CPU per 1,000 requests, {name}, spans sampled at "
                       f"{SAMPLE_RATIO:g}",
                       round(per_k * 1000, 2) if per_k is not None else None, "ms",
                       note=f"{w['requests']} requests: {w['measured']} exchanges in the "
                            f"duration histograms (2 per request expected), {w['spans']} "
                            f"spans, {w['sampled_out']} sampled out, ring lost "
                            f"{w['ring_lost']}, spans dropped {w['spans.dropped']}"))
        rows.append({"case": f"{name}, sampled {SAMPLE_RATIO:g}", "baseline_runs": base[c],
                     **w})
    for scheme, r in replays.items():
        name = f"{scheme} keep-alive"
        cur, old, smp = r["current"], r["baseline"], r["sampled"]
        note = (f"{r['requests']} requests ({r['records']} ring records recorded from nginx "
                f"and wrk), the best of {len(cur['cpu_s'])} replays each, same input")
        if old is not None:
            res.add(Figure.compare(f"agent CPU per 1,000 requests, replay, {name}",
                                   cur["ms_per_1000"], "ms", old["ms_per_1000"],
                                   f"the code of {http_replay.BASELINE_COMMIT} (before the "
                                   "per-batch rework)", higher_is_better=False, note=note))
        else:
            res.add(Figure(f"agent CPU per 1,000 requests, replay, {name}",
                           cur["ms_per_1000"], "ms", note=note + "; no git history for the "
                           "baseline"))
        res.add(Figure.compare(f"agent CPU per 1,000 requests, replay, {name}, spans sampled "
                               f"at {SAMPLE_RATIO:g}", smp["ms_per_1000"], "ms",
                               cur["ms_per_1000"], "all spans (this code)",
                               higher_is_better=False, note=note))
    res.raw["replay"] = replays
    for which, case, what in (
            ("uprobes", ("https", "keep-alive"), "SSL uprobes alone, placed"),
            ("uprobes at offset 0", ("https", "keep-alive"),
             "SSL uprobes alone, at the symbols' offset 0"),
            ("socket", ("http", "keep-alive"), "socket tracepoints alone"),
            ("socket, close", ("http", "close"), "socket tracepoints alone"),
            ("syscall", ("http", "keep-alive"), "syscall-exit tracepoint alone"),
            ("syscall, close", ("http", "close"), "syscall-exit tracepoint alone")):
        b = sum(base[case]) / len(base[case])
        rps, info = parts[which]
        runs = sum(info["runs_per_request"].values())
        res.add(Figure.compare(f"requests/s, {case[0]} {case[1]}, {what} (no agent)",
                               round(rps), "req/s", round(b),
                               f"without agent (mean of {len(base[case])} runs around the "
                               "agent)", note=f"{runs:.1f} program runs per request"
                               + (f"; {info['placement']}" if info["placement"] else "")))
        res.raw.setdefault("kernel_only", {})[which] = info
    spans = sum(with_agent[c]["spans"] for c in CASES)
    secs = seconds * len(CASES)
    res.add(Figure("spans exported per second under load", round(spans / secs), "spans/s",
                   note="all four cases; dropped: "
                        f"{sum(with_agent[c]['spans_dropped'] for c in CASES)}, ring lost: "
                        f"{sum(with_agent[c]['ring_lost'] for c in CASES)}"))
    res.raw["cases"] = rows
    res.note("nginx, wrk, the agent and the receiver share the machine's 2 vCPUs (and "
             "other sessions'): the agent's CPU is taken from nginx's and wrk's share")
    if os.environ.get("CI"):
        res.note("measured under CI")
    return res
