"""Protobuf wire primitives for the hand-encoded OTLP paths: varints, fields,
the one ``KeyValue`` encoder (points, spans and logs share it) and the
resource message."""

from __future__ import annotations

import numpy as np
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource

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


def resource_message(attributes: dict) -> PbResource:
    """The OTLP ``Resource`` of a request (every path encodes it here)."""
    return PbResource(attributes=[KeyValue(key=k, value=any_value(v))
                                  for k, v in attributes.items()])
