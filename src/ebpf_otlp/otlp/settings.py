"""Where and how OTLP goes: resolved once, from explicit values over ``OTEL_*`` variables.

Precedence per OTLP signal (metrics, traces, logs), as in the OpenTelemetry
specification with explicit configuration on top:

1. an explicit base endpoint (``--endpoint``): ``<base>/v1/<signal>`` for every signal;
2. ``OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT``, used as is;
3. ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/<signal>``;
4. ``http://localhost:4318/v1/<signal>``.

Headers, timeout, compression and certificate follow the same order
(explicit, per-signal variable, generic variable, default).
"""

from __future__ import annotations

import math
import os
import urllib.parse
from dataclasses import dataclass, field

DEFAULT_ENDPOINT = "http://localhost:4318"
PATHS = {"metrics": "/v1/metrics", "traces": "/v1/traces", "logs": "/v1/logs"}
TEMPORALITIES = ("cumulative", "delta", "lowmemory")


class SettingsError(ValueError):
    """A bad ``OTEL_*`` value or option: reported in one line."""


def parse_headers(text: str, source: str = "OTEL_EXPORTER_OTLP_HEADERS") -> dict[str, str]:
    """``k1=v1,k2=v2`` with percent-encoded values, as in ``OTEL_EXPORTER_OTLP_HEADERS``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise SettingsError(f"{source}: bad header {part!r}: expected key=value")
        k, v = part.split("=", 1)
        k = urllib.parse.unquote(k.strip())
        if not k:
            raise SettingsError(f"{source}: bad header {part!r}: empty key")
        out[k] = urllib.parse.unquote(v.strip())
    return out


def env_seconds(name: str, default_s: float, scale: float = 1000.0) -> float:
    """A positive, finite duration from a millisecond variable, else ``default_s``.

    Zero, negative, ``nan`` and ``inf`` are refused: an export loop with such
    an interval would spin or never run.
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default_s
    try:
        v = float(raw) / scale
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number of milliseconds") from None
    if not math.isfinite(v) or v <= 0:
        raise SettingsError(f"{name}={raw!r}: expected a positive, finite number of milliseconds")
    return v


@dataclass(frozen=True)
class SignalTarget:
    """One OTLP signal's destination."""

    url: str
    headers: dict[str, str]
    timeout_s: float
    compression: str  # "gzip" or "none"
    certificate: str | None  # CA bundle to verify the collector with
    client_cert: str | None = None
    client_key: str | None = None


@dataclass(frozen=True)
class ExportSettings:
    metrics: SignalTarget
    traces: SignalTarget
    logs: SignalTarget
    temporality: str = "cumulative"
    resource: dict[str, object] = field(default_factory=dict)

    def target(self, kind: str) -> SignalTarget:
        return {"metrics": self.metrics, "traces": self.traces, "logs": self.logs}[kind]

    @classmethod
    def resolve(cls, endpoint: str | None = None, headers: dict[str, str] | None = None,
                timeout_s: float | None = None, resource: dict[str, object] | None = None,
                env: dict[str, str] | None = None) -> ExportSettings:
        """Explicit arguments (``None`` = not given) over the environment."""
        env = os.environ if env is None else env

        def var(kind: str, name: str) -> tuple[str | None, str]:
            """(value, the variable it came from): per-signal over generic."""
            for n in (f"OTEL_EXPORTER_OTLP_{kind.upper()}_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
                v = env.get(n)
                if v is not None and v.strip():
                    return v.strip(), n
            return None, f"OTEL_EXPORTER_OTLP_{name}"

        def one(kind: str) -> SignalTarget:
            specific = f"OTEL_EXPORTER_OTLP_{kind.upper()}_ENDPOINT"
            if endpoint:
                url, source = endpoint.rstrip("/") + PATHS[kind], "--endpoint"
            elif env.get(specific, "").strip():
                url, source = env[specific].strip(), specific
            else:
                base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or DEFAULT_ENDPOINT
                url, source = base.rstrip("/") + PATHS[kind], "OTEL_EXPORTER_OTLP_ENDPOINT"
            parsed = urllib.parse.urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise SettingsError(f"{source}: OTLP {kind} endpoint {url!r}: expected "
                                    "http(s)://HOST:PORT")
            h = {}
            raw, source = var(kind, "HEADERS")
            if raw:
                h.update(parse_headers(raw, source))
            h.update(headers or {})
            if timeout_s is not None:
                t = timeout_s
            else:
                raw_t, source = var(kind, "TIMEOUT")
                t = 10.0
                if raw_t:
                    try:
                        t = float(raw_t) / 1000.0
                    except ValueError:
                        raise SettingsError(f"{source}={raw_t!r}: expected milliseconds") from None
                if not math.isfinite(t) or t <= 0:
                    raise SettingsError(f"{source}={raw_t!r}: expected a positive, finite "
                                        "number of milliseconds")
            comp, source = var(kind, "COMPRESSION")
            comp = (comp or "none").lower()
            if comp not in ("gzip", "none"):
                raise SettingsError(f"{source}={comp!r}: expected gzip or none")
            return SignalTarget(url, h, t, comp, var(kind, "CERTIFICATE")[0],
                                var(kind, "CLIENT_CERTIFICATE")[0], var(kind, "CLIENT_KEY")[0])

        temp = (env.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE") or "cumulative")
        temp = temp.strip().lower()
        if temp not in TEMPORALITIES:
            raise SettingsError(f"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE={temp!r}: "
                                f"one of {', '.join(TEMPORALITIES)}")
        return cls(one("metrics"), one("traces"), one("logs"), temp, dict(resource or {}))
