"""Flags over OTEL_* variables over defaults, one case per flag/variable pair, and
bad values refused with one line (the OpenTelemetry specification's rules for
per-signal variables are the reference)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ebpf_otlp.config import AgentConfig, ConfigError
from ebpf_otlp.otlp.settings import ExportSettings, SettingsError

SIGNALS = ("metrics", "traces", "logs")


def resolve(env: dict[str, str], **explicit: object) -> ExportSettings:
    return ExportSettings.resolve(env=env, **explicit)


def test_defaults() -> None:
    s = resolve({})
    assert [s.target(k).url for k in SIGNALS] == [
        "http://localhost:4318/v1/metrics", "http://localhost:4318/v1/traces",
        "http://localhost:4318/v1/logs"]
    assert s.metrics.timeout_s == 10.0 and s.metrics.compression == "none"
    assert s.temporality == "cumulative"


def test_generic_endpoint_variable_gets_the_signal_path() -> None:
    s = resolve({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"})
    assert s.traces.url == "http://c:4318/v1/traces"


@pytest.mark.parametrize("kind", SIGNALS)
def test_per_signal_endpoint_variable_is_used_as_is_over_the_generic_one(kind: str) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4318",
           f"OTEL_EXPORTER_OTLP_{kind.upper()}_ENDPOINT": "http://special:9/custom"}
    s = resolve(env)
    assert s.target(kind).url == "http://special:9/custom"
    others = [k for k in SIGNALS if k != kind]
    assert all(s.target(k).url.startswith("http://generic:4318/v1/") for k in others)


@pytest.mark.parametrize("kind", SIGNALS)
def test_endpoint_flag_wins_over_every_endpoint_variable(kind: str) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4318",
           f"OTEL_EXPORTER_OTLP_{kind.upper()}_ENDPOINT": "http://special:9/custom"}
    s = resolve(env, endpoint="http://flag:4318")
    assert s.target(kind).url == f"http://flag:4318/v1/{kind}"


def test_headers_merge_flag_wins_and_values_are_percent_decoded() -> None:
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc,x-team=net",
           "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-trace=1"}
    s = resolve(env, headers={"x-team": "flag"})
    assert s.metrics.headers == {"Authorization": "Bearer abc", "x-team": "flag"}
    # A per-signal variable replaces the generic one for its signal (specification).
    assert s.traces.headers == {"x-trace": "1", "x-team": "flag"}


def test_timeout_compression_certificate_per_signal() -> None:
    env = {"OTEL_EXPORTER_OTLP_TIMEOUT": "2500", "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT": "500",
           "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
           "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE": "/ca.pem"}
    s = resolve(env)
    assert (s.metrics.timeout_s, s.logs.timeout_s) == (2.5, 0.5)
    assert s.traces.compression == "gzip" and s.metrics.certificate == "/ca.pem"
    assert s.traces.certificate is None
    assert resolve(env, timeout_s=1.0).logs.timeout_s == 1.0  # explicit wins


@pytest.mark.parametrize("env", [
    {"OTEL_EXPORTER_OTLP_HEADERS": "bad"},
    {"OTEL_EXPORTER_OTLP_HEADERS": "=v"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4318"},
    {"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"},
    {"OTEL_EXPORTER_OTLP_TIMEOUT": "-5"},
    {"OTEL_EXPORTER_OTLP_COMPRESSION": "brotli"},
    {"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "sometimes"},
])
def test_bad_variables_are_one_clear_error(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as e:
        resolve(env)
    assert "\n" not in str(e.value) and "OTEL_EXPORTER_OTLP" in str(e.value)


@pytest.mark.parametrize("value", ["0", "-1000", "nan", "inf", "soon"])
def test_bad_interval_variable_is_refused(monkeypatch, value: str) -> None:
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", value)
    with pytest.raises(ConfigError, match="OTEL_METRIC_EXPORT_INTERVAL"):
        AgentConfig()


def test_interval_and_service_name_variables_and_their_flags(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "2500")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    cfg = AgentConfig()
    assert cfg.interval_s == 2.5 and cfg.service_name == "from-env"
    res = cfg.export_settings().resource
    assert res["service.name"] == "from-env"


@pytest.mark.parametrize("args,env", [
    (["--interval", "0"], {}),
    (["--header", "novalue"], {}),
    ([], {"OTEL_EXPORTER_OTLP_HEADERS": "bad"}),
    ([], {"OTEL_METRIC_EXPORT_INTERVAL": "nan"}),
    ([], {"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://x"}),
])
def test_cli_bad_values_exit_2_with_one_line(args: list[str], env: dict[str, str]) -> None:
    import os

    res = subprocess.run([sys.executable, "-m", "ebpf_otlp", "run", "--signals", "tcp", *args],
                         capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr and len(lines) <= 4, res.stderr
