"""OTLP metrics built straight from arrays, without the SDK's per-point objects.

The SDK spends ~70 us per data point (PERF.md); a flow table of 100,000
series would take seconds per interval. Here a ``NumberDataPoint`` is a
pre-encoded attribute blob (shared by the bytes, packets and segments
metrics of a series) plus a 27-byte fixed tail built with numpy; the
envelope (resource, scope) is serialised by ``opentelemetry-proto`` itself.
The result is a plain ``ExportMetricsServiceRequest`` in protobuf wire format
that any OTLP receiver decodes.

Sending goes through the SDK exporter's own HTTP client (endpoint, headers,
compression, TLS settings, timeout and retry with backoff all as the SDK
resolves them), built from the same arguments as the agent's SDK exporter.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import ResourceMetrics, ScopeMetrics
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource

log = logging.getLogger(__name__)

TEMPORALITY_DELTA = 1
TEMPORALITY_CUMULATIVE = 2
_VARINT_CACHE = [bytes([n]) for n in range(128)]


def varint(n: int) -> bytes:
    if n < 128:
        return _VARINT_CACHE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + varint(len(payload)) + payload


def key_value(key: str, value: object) -> bytes:
    """An encoded ``KeyValue`` (string, bool, int or float value)."""
    if isinstance(value, bool):
        anyv = b"\x10" + varint(int(value))
    elif isinstance(value, (int, np.integer)):
        v = int(value)
        anyv = b"\x18" + varint(v if v >= 0 else v + (1 << 64))
    elif isinstance(value, float):
        anyv = b"\x21" + np.float64(value).tobytes()
    else:
        anyv = _len_field(0x0A, str(value).encode())
    return _len_field(0x0A, key.encode()) + _len_field(0x12, anyv)


def point_attribute(key: str, value: object) -> bytes:
    """``NumberDataPoint.attributes`` (field 7) holding one ``KeyValue``."""
    return _len_field(0x3A, key_value(key, value))


@dataclass(frozen=True)
class SumMetric:
    name: str
    unit: str
    description: str
    column: int  # which column of the values array


def encode_sums(resource_attrs: dict, scope_name: str, scope_version: str,
                metrics: Sequence[SumMetric], attrs: Sequence[bytes], values: np.ndarray,
                start_ns: np.ndarray, time_ns: int, temporality: int,
                monotonic: bool = True) -> bytes:
    """An ``ExportMetricsServiceRequest`` with one monotonic Sum per metric.

    ``attrs[i]`` are the encoded attributes of series i (see
    :func:`point_attribute`), ``values[i, metric.column]`` its value and
    ``start_ns[i]`` its start time (unix ns).
    """
    n = len(attrs)
    tail = np.empty((n, 27), np.uint8)
    tail[:, 0] = 0x11  # start_time_unix_nano, fixed64
    tail[:, 1:9] = np.ascontiguousarray(start_ns, "<u8").view(np.uint8).reshape(n, 8)
    tail[:, 9] = 0x19  # time_unix_nano, fixed64
    tail[:, 10:18] = np.frombuffer(int(time_ns).to_bytes(8, "little"), np.uint8)
    tail[:, 18] = 0x31  # as_int, sfixed64
    # length prefix of each point: attributes + 27-byte tail
    heads = [b"\x0a" + varint(len(a) + 27) + a for a in attrs]
    metric_blobs = []
    for m in metrics:
        tail[:, 19:27] = np.ascontiguousarray(values[:, m.column], "<u8").view(
            np.uint8).reshape(n, 8)
        tb = tail.tobytes()
        points = b"".join([h + tb[i * 27:(i + 1) * 27] for i, h in enumerate(heads)])
        body = points + b"\x10" + varint(temporality) + (b"\x18\x01" if monotonic else b"")
        metric = (_len_field(0x0A, m.name.encode()) + _len_field(0x12, m.description.encode())
                  + _len_field(0x1A, m.unit.encode()) + _len_field(0x3A, body))
        metric_blobs.append(_len_field(0x12, metric))  # ScopeMetrics.metrics
    scope = ScopeMetrics(scope=InstrumentationScope(name=scope_name, version=scope_version))
    sm = scope.SerializeToString() + b"".join(metric_blobs)
    res = PbResource(attributes=[KeyValue(key=k, value=_any(v))
                                 for k, v in resource_attrs.items()])
    rm = ResourceMetrics(resource=res).SerializeToString() + _len_field(0x12, sm)
    return _len_field(0x0A, rm)


def _any(v: object):
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue

    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, (list, tuple)):
        return AnyValue(array_value=ArrayValue(values=[_any(x) for x in v]))
    return AnyValue(string_value=str(v))


class DirectSender:
    """POSTs serialised requests through an SDK ``OTLPMetricExporter``'s HTTP client."""

    def __init__(self, endpoint: str, headers: dict[str, str] | None, timeout_s: float):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        self._exporter = OTLPMetricExporter(endpoint=endpoint, headers=headers or None,
                                            timeout=timeout_s)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})
        self.requests = 0
        self.failures = 0
        self.bytes_sent = 0

    def send(self, body: bytes) -> bool:
        self.requests += 1
        try:
            client = getattr(self._exporter, "_client", None)
            if client is not None:
                ok = bool(client.export(body).success)
            else:  # an SDK without the shared client: plain POST, no retry
                ok = self._post(body)
        except Exception as e:  # a collector that is down must not kill the agent
            log.warning("flow export failed: %s", e)
            ok = False
        if ok:
            self.bytes_sent += len(body)
        else:
            self.failures += 1
        return ok

    def _post(self, body: bytes) -> bool:
        import requests

        hdrs = {"Content-Type": "application/x-protobuf", **self.headers}
        r = requests.post(self.endpoint, data=body, headers=hdrs, timeout=self.timeout_s)
        return 200 <= r.status_code < 300

    def close(self) -> None:
        try:
            self._exporter.shutdown()
        except Exception:
            pass


def temporality_from_env() -> int:
    """Counters' temporality per ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``."""
    pref = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
                          "cumulative").strip().lower()
    return TEMPORALITY_DELTA if pref in ("delta", "lowmemory") else TEMPORALITY_CUMULATIVE
