"""HTTP span sampling (``--http-span-sample``, ``OTEL_TRACES_SAMPLER``) on real
requests: nginx in namespace b, a Debian-python3 keep-alive client in namespace
a, the agent exporting to a real receiver.

The truth is what the client did: how many requests it sent to each path, and
with which ``traceparent``. The duration histograms must count every one of
them whatever the sampler decides; the spans of requests without a parent must
be a binomial sample of the configured ratio (the bound fails for a wrong
ratio); a parent's decision (flags 01 / 00) is followed under ``parentbased``.
"""

from __future__ import annotations

import math
import shutil
import textwrap
from pathlib import Path

import pytest
from conftest import require
from http_env import HTTP_PORT, Nginx, run_client
from otlp import AgentProc, ReceiverProc, metric_total

pytestmark = pytest.mark.kernel

# n requests without a traceparent to /sampling/root, m with a sampled parent
# (flags 01) to /sampling/parent-yes and m with an unsampled one (00) to
# /sampling/parent-no, one keep-alive connection; prints the trace ids sent.
CLIENT = textwrap.dedent("""
    import http.client, json, os, sys
    host, port, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    c = http.client.HTTPConnection(host, port, timeout=10)
    def get(path, headers={}):
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        r.read()
        return r.status
    codes = [get("/sampling/root") for _ in range(n)]
    for flags, path in (("01", "/sampling/parent-yes"), ("00", "/sampling/parent-no")):
        for _ in range(m):
            trace = os.urandom(16).hex()
            codes.append(get(path, {"traceparent": f"00-{trace}-{os.urandom(8).hex()}-{flags}"}))
            print(json.dumps({"path": path, "trace": trace}))
    c.close()
    print(json.dumps({"codes": sorted(set(codes)), "sent": len(codes)}))
""")

N, M = 400, 20
PATHS = ("/sampling/root", "/sampling/parent-yes", "/sampling/parent-no")


def binomial_bound(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    sd = math.sqrt(n * p * (1 - p))
    return n * p - sigmas * sd, n * p + sigmas * sd


def run_case(topo, agent_args: tuple[str, ...], env: dict[str, str]):
    """The client's requests with the agent sampling as told: (client pid, nginx pid,
    receiver, the client's JSON lines)."""
    require(Path("/usr/sbin/nginx").exists(), "nginx not installed (Debian nginx-light)")
    require(shutil.which("openssl") is not None, "openssl not installed")
    require(Path("/usr/bin/python3").exists(), "Debian python3 not installed")
    ngx = Nginx(topo, topo.b, topo.b_ip4)
    rx = ReceiverProc(topo, topo.a)
    with ngx, rx, AgentProc(topo, topo.a, rx, "--signals", "http", *agent_args, env=env) \
            as agent:
        pid, lines = run_client(topo, topo.a, CLIENT, topo.b_ip4, str(HTTP_PORT), str(N),
                                str(M))
        assert lines[-1] == {"codes": [404], "sent": N + 2 * M}, lines[-1]
        # Every exchange is counted in the histograms: wait until both sides' counts
        # of every path reach what the client sent (the truth, not what came out).
        want = {p: n for p, n in zip(PATHS, (N, M, M))}
        counts = {}

        def histograms_complete() -> bool:
            for name in ("http.server.request.duration", "http.client.request.duration"):
                for path in want:
                    pts = rx.metrics(name, **{"server.address": topo.b_ip4,
                                              "server.port": HTTP_PORT, "http.route": path})
                    counts[(name, path)] = metric_total(pts)
            return all(got >= want[path] for (_, path), got in counts.items())

        rx.wait_for(histograms_complete, timeout=60, what=f"histogram counts {want}")
        # a flush after the last exchange: spans are sent at least every interval
        rx.wait_for(lambda: rx.metrics("ebpf_otlp.http.spans.sampled_out"), timeout=30,
                    what="sampled_out counter")
        agent.stop()
        for (name, path), got in counts.items():
            assert got == want[path], f"{name} {path}: {got} measured, {want[path]} sent"
        return pid, ngx.pid, rx, lines


def our_spans(rx, pids: set[int], path: str) -> list[dict]:
    return [s for s in rx.spans(**{"url.path": path})
            if s["attributes"].get("process.pid") in pids]


def test_ratio_keeps_a_binomial_share_and_histograms_count_all(topo) -> None:
    pid, ngx_pid, rx, lines = run_case(topo, ("--http-span-sample", "0.25"),
                                       {"OTEL_TRACES_SAMPLER": "always_off"})  # flag wins
    pids = {pid, ngx_pid}
    roots = our_spans(rx, pids, "/sampling/root")
    lo, hi = binomial_bound(2 * N, 0.25)  # a CLIENT and a SERVER exchange per request
    assert lo <= len(roots) <= hi, f"{len(roots)} root spans of {2 * N}: want {lo:.0f}..{hi:.0f}"
    assert {s["kind"] for s in roots} == {"CLIENT", "SERVER"}
    # a sampled parent (flags 01): both sides kept, in that trace; 00: neither
    sent = {ln["trace"] for ln in lines if ln.get("path") == "/sampling/parent-yes"}
    yes = our_spans(rx, pids, "/sampling/parent-yes")
    assert len(yes) == 2 * M and {s["trace_id"] for s in yes} == sent, (len(yes), 2 * M)
    assert our_spans(rx, pids, "/sampling/parent-no") == []
    # What the sampler left out is counted (host-wide: at least ours), not as a loss.
    out = metric_total(rx.metrics("ebpf_otlp.http.spans.sampled_out"))
    assert out >= 2 * N - len(roots) + 2 * M, out
    assert {p["attributes"].get("sampler") for p in
            rx.metrics("ebpf_otlp.http.spans.sampled_out")} == {"parentbased_traceidratio(0.25)"}
    assert metric_total(rx.metrics("ebpf_otlp.http.spans.dropped")) == 0


def test_always_off_exports_no_span_and_histograms_count_all(topo) -> None:
    pid, ngx_pid, rx, _ = run_case(topo, (), {"OTEL_TRACES_SAMPLER": "always_off"})
    for path in PATHS:
        assert our_spans(rx, {pid, ngx_pid}, path) == [], path
    out = metric_total(rx.metrics("ebpf_otlp.http.spans.sampled_out"))
    assert out >= 2 * (N + 2 * M), out


def test_traceidratio_from_the_environment(topo) -> None:
    """OTEL_TRACES_SAMPLER=traceidratio: not parent-based, so a traceparent's trace
    id decides (low 64 bits below ratio * 2**64), whatever its flags say."""
    pid, ngx_pid, rx, lines = run_case(topo, (), {"OTEL_TRACES_SAMPLER": "traceidratio",
                                                  "OTEL_TRACES_SAMPLER_ARG": "0.5"})
    pids = {pid, ngx_pid}
    lo, hi = binomial_bound(2 * N, 0.5)
    roots = our_spans(rx, pids, "/sampling/root")
    assert lo <= len(roots) <= hi, f"{len(roots)} of {2 * N}: want {lo:.0f}..{hi:.0f}"
    for path in ("/sampling/parent-yes", "/sampling/parent-no"):
        traces = [ln["trace"] for ln in lines if ln.get("path") == path]
        kept = {t for t in traces if int(t[16:], 16) < 0.5 * 2 ** 64}
        got = our_spans(rx, pids, path)
        assert {s["trace_id"] for s in got} == kept and len(got) == 2 * len(kept), path
