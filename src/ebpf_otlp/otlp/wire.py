"""Hand-encoded OTLP for the high-volume paths (flows, DNS spans, DNS
histograms), and the one way they send it: through the HTTP client of the
SDK's own OTLP exporter, so endpoint, headers, compression, TLS and retries
are the SDK's (``OTEL_EXPORTER_OTLP_*``)."""

from __future__ import annotations

import logging
import os

import numpy as np
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue

log = logging.getLogger(__name__)

TEMPORALITY_DELTA = 1
TEMPORALITY_CUMULATIVE = 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [_varint(n) for n in range(1 << 14)]


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int (a table below 16384)."""
    return _SMALL[n] if n < 16384 else _varint(n)


def len_field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field whose tag byte is ``tag`` (field < 16)."""
    return bytes([tag]) + varint(len(payload)) + payload


def field(num: int, payload: bytes) -> bytes:
    """The length-delimited field number ``num``."""
    return varint(num << 3 | 2) + varint(len(payload)) + payload


_KEY_FIELDS: dict[str, bytes] = {}


def key_value(key: str, value: object) -> bytes:
    """An encoded ``KeyValue`` (string, bool, int or float value)."""
    if isinstance(value, str):
        anyv = len_field(0x0A, value.encode())
    elif isinstance(value, (bool, np.bool_)):
        anyv = b"\x10" + varint(int(value))
    elif isinstance(value, (int, np.integer)):
        anyv = b"\x18" + varint(int(value) & 0xFFFFFFFFFFFFFFFF)
    elif isinstance(value, float):
        anyv = b"\x21" + np.float64(value).tobytes()
    else:
        anyv = len_field(0x0A, str(value).encode())
    kf = _KEY_FIELDS.get(key)
    if kf is None:
        kf = _KEY_FIELDS[key] = len_field(0x0A, key.encode())
    return kf + b"\x12" + varint(len(anyv)) + anyv


def any_value(v: object) -> AnyValue:
    """A Python value as an ``AnyValue`` message (for resources and scopes)."""
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, (list, tuple)):
        return AnyValue(array_value=ArrayValue(values=[any_value(x) for x in v]))
    return AnyValue(string_value=str(v))


def temporality_from_env() -> int:
    """Counters' temporality per ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``."""
    pref = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
                          "cumulative").strip().lower()
    return TEMPORALITY_DELTA if pref in ("delta", "lowmemory") else TEMPORALITY_CUMULATIVE


class OtlpSender:
    """POSTs serialised OTLP requests of one kind (``"metrics"`` or ``"traces"``).

    Callable as ``sender(body) -> ok``; counts requests, failures and bytes.
    """

    def __init__(self, kind: str, endpoint: str, headers: dict[str, str] | None,
                 timeout_s: float):
        if kind == "traces":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as Exporter,
            )
        elif kind == "metrics":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as Exporter,
            )
        else:
            raise ValueError(f"unknown OTLP kind {kind!r}")
        self.kind = kind
        self._exporter = Exporter(endpoint=endpoint, headers=headers or None, timeout=timeout_s)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})
        self.requests = 0
        self.failures = 0
        self.bytes_sent = 0

    def send(self, body: bytes) -> bool:
        self.requests += 1
        try:
            # The SDK keeps its retrying client private; without it, one plain POST.
            client = getattr(self._exporter, "_client", None)
            ok = (bool(client.export(body).success) if client is not None
                  and hasattr(client, "export") else self._post(body))
        except Exception as e:  # a collector that is down must not kill the agent
            log.warning("%s export failed: %s", self.kind, e)
            ok = False
        if ok:
            self.bytes_sent += len(body)
        else:
            self.failures += 1
        return ok

    __call__ = send

    def _post(self, body: bytes) -> bool:
        import requests

        session = getattr(self._exporter, "_session", None) or requests
        r = session.post(self.endpoint, data=body, timeout=self.timeout_s,
                         headers={"Content-Type": "application/x-protobuf", **self.headers})
        return 200 <= r.status_code < 300

    def close(self) -> None:
        try:
            self._exporter.shutdown()
        except Exception:
            pass
