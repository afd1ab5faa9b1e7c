"""HTTP span sampling without a kernel: the batch sampler against the
OpenTelemetry SDK's own samplers (the independent truth) on random trace ids
and parents, the settings' precedence, and crafted ring records through
HttpSignal: histograms count every exchange, spans + sampled_out == exchanges."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from ebpf_otlp.config import AgentConfig, ConfigError
from ebpf_otlp.otlp.sampling import (
    NO_PARENT,
    PARENT_NOT_SAMPLED,
    PARENT_SAMPLED,
    SAMPLERS,
    Sampler,
)
from ebpf_otlp.otlp.settings import SettingsError
from ebpf_otlp.signals.http.signal import OP_READ, OP_WRITE, HttpSignal, event_dtype
from ebpf_otlp.views.session import LocalExporter


def sdk_sampler(name: str, ratio: float):
    root = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF,
            "traceidratio": TraceIdRatioBased(ratio)}[name.removeprefix("parentbased_")]
    return ParentBased(root) if name.startswith("parentbased_") else root


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_decisions_equal_the_sdk_samplers(name: str, ratio: float) -> None:
    rnd = np.random.default_rng(7)
    n = 3000
    ids = rnd.integers(0, 256, (n, 16), dtype=np.uint8)
    parent = rnd.choice([NO_PARENT, PARENT_NOT_SAMPLED, PARENT_SAMPLED], n).astype(np.int8)
    got = Sampler(name, ratio).decide(ids, parent)
    sdk = sdk_sampler(name, ratio)
    for i in range(n):
        tid = int.from_bytes(ids[i].tobytes(), "big")
        ctx = None
        if parent[i] != NO_PARENT:
            flags = TraceFlags(TraceFlags.SAMPLED if parent[i] == PARENT_SAMPLED else 0)
            ctx = trace.set_span_in_context(NonRecordingSpan(SpanContext(
                tid, 0x1234, is_remote=True, trace_flags=flags)))
        want = sdk.should_sample(ctx, tid, "x").decision == Decision.RECORD_AND_SAMPLE
        assert bool(got[i]) == want, (name, ratio, i, parent[i], ids[i].tobytes().hex())


def test_settings_and_precedence(monkeypatch) -> None:
    assert Sampler.from_env({}) == Sampler("parentbased_always_on", 1.0)  # the SDK default
    assert Sampler.from_env({"OTEL_TRACES_SAMPLER": "traceidratio",
                             "OTEL_TRACES_SAMPLER_ARG": "0.3"}) == Sampler("traceidratio", 0.3)
    assert Sampler.from_env({"OTEL_TRACES_SAMPLER": " AlWays_Off "}).name == "always_off"
    for bad in ({"OTEL_TRACES_SAMPLER": "jaeger_remote"},
                {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
                {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"},
                {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                 "OTEL_TRACES_SAMPLER_ARG": "nan"}):
        with pytest.raises(SettingsError):
            Sampler.from_env(bad)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert AgentConfig().http_sampler().name == "always_off"
    assert AgentConfig(http_span_sample=0.2).http_sampler() == Sampler(
        "parentbased_traceidratio", 0.2)  # the flag wins
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "bogus")
    with pytest.raises(ConfigError, match="OTEL_TRACES_SAMPLER"):
        AgentConfig().http_sampler()


def test_a_bad_sampler_stops_the_agent_with_status_2() -> None:
    env = dict(os.environ, OTEL_TRACES_SAMPLER="bogus")
    r = subprocess.run([sys.executable, "-m", "ebpf_otlp", "run", "--signals", "http",
                        "--endpoint", "http://127.0.0.1:9"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "OTEL_TRACES_SAMPLER" in r.stderr, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # before anything starts
    r = subprocess.run([sys.executable, "-m", "ebpf_otlp", "run", "--signals", "http",
                        "--http-span-sample", "1.5"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--http-span-sample" in r.stderr, (r.returncode, r.stderr)


TP = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


def exchanges(n: int, traceparent: str = "") -> np.ndarray:
    """A server's read of a request and write of its response, on n connections."""
    dt = event_dtype(256)
    r = np.zeros(2 * n, dt)
    extra = f"traceparent: {traceparent}\r\n" if traceparent else ""
    req = f"GET /x HTTP/1.1\r\nHost: a\r\n{extra}\r\n".encode()
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    for k in range(2 * n):
        op, data = (OP_READ, req) if k % 2 == 0 else (OP_WRITE, resp)
        r[k]["start_ns"], r[k]["end_ns"] = 1000 + 10 * k, 1005 + 10 * k
        r[k]["conn"], r[k]["pid"], r[k]["fd"] = 0xFFFF0000 + k // 2, 77, 5
        r[k]["len"], r[k]["head_len"], r[k]["op"] = len(data), len(data), op
        r[k]["family"], r[k]["lport"], r[k]["rport"] = 4, 8080, 40000 + k // 2
        r[k]["laddr"][10:] = [255, 255, 10, 9, 0, 2]
        r[k]["raddr"][10:] = [255, 255, 10, 9, 1, 2]
        r[k]["head"][:len(data)] = np.frombuffer(data, np.uint8)
    return r


def run_signal(cfg: AgentConfig, recs: np.ndarray) -> tuple[HttpSignal, list]:
    spans: list = []
    sig = HttpSignal(cfg, LocalExporter(cfg, on_spans=spans.extend))
    for i in range(0, len(recs), 64):  # several batches
        sig.on_batch(recs[i:i + 64])
    return sig, spans


def histogram_count(sig: HttpSignal) -> int:
    metric, _ = sig.server_duration.metric()
    return sum(p.count for p in metric.histogram.data_points)


def test_histograms_count_every_exchange_and_spans_plus_sampled_out_add_up() -> None:
    n = 2000
    sig, spans = run_signal(AgentConfig(attribution="none", http_span_sample=0.25),
                            exchanges(n))
    assert histogram_count(sig) == n
    assert len(spans) + sig.spans_sampled_out == n
    sd = (n * 0.25 * 0.75) ** 0.5
    assert abs(len(spans) - n * 0.25) <= 5 * sd, len(spans)
    assert sig.spans_dropped == 0
    assert {dict(s.attributes)["network.peer.port"] for s in spans} <= set(range(40000, 42000))


def test_parent_flags_decide_by_default(monkeypatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    cfg = AgentConfig(attribution="none")  # parentbased_always_on
    sig, spans = run_signal(cfg, exchanges(50, f"00-{TP[0]}-{TP[1]}-01"))
    assert len(spans) == 50 and histogram_count(sig) == 50
    assert {(s.trace_id.hex(), s.parent_span_id.hex()) for s in spans} == {TP}
    sig, spans = run_signal(cfg, exchanges(50, f"00-{TP[0]}-{TP[1]}-00"))
    assert spans == [] and sig.spans_sampled_out == 50 and histogram_count(sig) == 50
    sig, spans = run_signal(cfg, exchanges(50))  # no parent: always_on
    assert len(spans) == 50 and sig.spans_sampled_out == 0


def test_config_file_key_and_its_source(tmp_path) -> None:
    import yaml

    f = tmp_path / "agent.yaml"
    f.write_text("http-span-sample: 0.25\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    r = subprocess.run([sys.executable, "-m", "ebpf_otlp", "config", "print", "--config", str(f)],
                       capture_output=True, text=True, timeout=60,
                       env={**clean, "OTEL_TRACES_SAMPLER": "always_off"})
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("http-span-sample:"))
    value, _, source = line.partition("  # ")
    assert yaml.safe_load(value) == {"http-span-sample": 0.25} and source == f"file {f}", line
    f.write_text("http-span-sample: 2\n")
    r = subprocess.run([sys.executable, "-m", "ebpf_otlp", "config", "print", "--config", str(f)],
                       capture_output=True, text=True, timeout=60, env=clean)
    assert r.returncode == 2 and "http-span-sample" in r.stderr, r.stderr
