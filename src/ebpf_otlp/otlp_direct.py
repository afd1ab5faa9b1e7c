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


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VARINT_CACHE = [_varint(n) for n in range(1 << 14)]


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    if n < 16384:
        return _VARINT_CACHE[n]
    return _varint(n)


def _len_field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + varint(len(payload)) + payload


def key_value(key: str, value: object) -> bytes:
    """An encoded ``KeyValue`` (string, bool, int or float value)."""
    if isinstance(value, str):
        vb = value.encode()
        anyv = b"\x0a" + varint(len(vb)) + vb
    elif isinstance(value, bool):
        anyv = b"\x10" + varint(int(value))
    elif isinstance(value, (int, np.integer)):
        v = int(value)
        anyv = b"\x18" + varint(v if v >= 0 else v + (1 << 64))
    elif isinstance(value, float):
        anyv = b"\x21" + np.float64(value).tobytes()
    else:
        vb = str(value).encode()
        anyv = b"\x0a" + varint(len(vb)) + vb
    kf = _KEY_FIELDS.get(key)
    if kf is None:
        kf = _KEY_FIELDS[key] = _len_field(0x0A, key.encode())
    return kf + b"\x12" + varint(len(anyv)) + anyv


_KEY_FIELDS: dict[str, bytes] = {}


def point_attribute(key: str, value: object) -> bytes:
    """``NumberDataPoint.attributes`` (field 7) holding one ``KeyValue``."""
    kv = key_value(key, value)
    return b"\x3a" + varint(len(kv)) + kv


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
    # One template of all points (length prefix, attributes, times, a value
    # slot), built once and shared by the metrics: each metric only writes its
    # values into the slots. The layout of a point is identical in all of them.
    tail = np.zeros((n, 27), np.uint8)
    tail[:, 0] = 0x11  # start_time_unix_nano, fixed64
    tail[:, 1:9] = np.ascontiguousarray(start_ns, "<u8").view(np.uint8).reshape(n, 8)
    tail[:, 9] = 0x19  # time_unix_nano, fixed64
    tail[:, 10:18] = np.frombuffer(int(time_ns).to_bytes(8, "little"), np.uint8)
    tail[:, 18] = 0x31  # as_int, sfixed64
    tb = tail.tobytes()
    template = np.frombuffer(b"".join([b"\x0a" + varint(len(a) + 27) + a + tb[i * 27:i * 27 + 27]
                                       for i, a in enumerate(attrs)]), np.uint8)
    sizes = np.fromiter((len(a) + 27 for a in attrs), np.int64, n)
    prefix = 1 + 1 + (sizes >= 1 << 7) + (sizes >= 1 << 14) + (sizes >= 1 << 21)  # tag + varint
    ends = np.cumsum(sizes + prefix)
    slots = (ends - 8)[:, None] + np.arange(8)
    # Every nested message is written as tag + length + parts: the lengths are
    # added up, the parts (tens of MB) are copied once, by the final join.
    metric_parts: list[list] = []
    for m in metrics:
        buf = template.copy()
        buf[slots] = np.ascontiguousarray(values[:, m.column], "<u8").view(
            np.uint8).reshape(n, 8)
        trailer = b"\x10" + varint(temporality) + (b"\x18\x01" if monotonic else b"")
        head = (_len_field(0x0A, m.name.encode()) + _len_field(0x12, m.description.encode())
                + _len_field(0x1A, m.unit.encode()))
        body_len = len(buf) + len(trailer)
        metric_len = len(head) + 1 + len(varint(body_len)) + body_len
        metric_parts.append([b"\x12" + varint(metric_len) + head + b"\x3a" + varint(body_len),
                             memoryview(buf), trailer])
    scope = ScopeMetrics(scope=InstrumentationScope(name=scope_name, version=scope_version))
    res = PbResource(attributes=[KeyValue(key=k, value=_any(v))
                                 for k, v in resource_attrs.items()])
    scope_b = scope.SerializeToString()
    sm_len = len(scope_b) + sum(len(p) for mp in metric_parts for p in mp)
    res_b = ResourceMetrics(resource=res).SerializeToString()
    rm_len = len(res_b) + 1 + len(varint(sm_len)) + sm_len
    parts = [b"\x0a" + varint(rm_len) + res_b + b"\x12" + varint(sm_len) + scope_b]
    for mp in metric_parts:
        parts.extend(mp)
    return b"".join(parts)


def send_sums(sender: DirectSender, chunk: int, resource_attrs: dict, scope_name: str,
              scope_version: str, metrics: Sequence[SumMetric], attrs: Sequence[bytes],
              values: np.ndarray, start_ns: np.ndarray, time_ns: int,
              temporality: int) -> np.ndarray:
    """Encode and send in requests of at most ``chunk`` series; stops at the first
    failure (the rest would only wait for more timeouts). Returns which series
    were delivered."""
    n = len(attrs)
    delivered = np.zeros(n, bool)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        body = encode_sums(resource_attrs, scope_name, scope_version, metrics, attrs[lo:hi],
                           values[lo:hi], start_ns[lo:hi], time_ns, temporality)
        if not sender.send(body):
            break
        delivered[lo:hi] = True
    return delivered


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
            # an SDK without the shared client: plain POST, no retry
            ok = bool(client.export(body).success) if client is not None else self._post(body)
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
