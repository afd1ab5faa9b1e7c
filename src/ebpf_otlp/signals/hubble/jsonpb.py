"""Protobuf JSON (as Cilium's exporter writes it) into messages, fast and lenient.

``google.protobuf.json_format.Parse`` costs ~230 us per Hubble flow here
(bench/hubble_bridge.py); ``json.loads`` plus this converter, which walks the
dict with a plan cached per message type, costs a small fraction of that. It
accepts what protobuf's JSON mapping allows for the field types Hubble uses
(proto and lowerCamel names, enums by name or number, 64-bit integers as
strings, RFC 3339 timestamps, wrapper types as bare values) and, instead of
failing the whole line, skips and reports what it does not know: a field or
an enum name missing from this build's protos (a newer Cilium) is counted
by the caller through ``Unknown``.
"""

from __future__ import annotations

import calendar
import time
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_WRAPPERS = {"google.protobuf.BoolValue", "google.protobuf.Int32Value",
             "google.protobuf.UInt32Value", "google.protobuf.Int64Value",
             "google.protobuf.UInt64Value", "google.protobuf.StringValue",
             "google.protobuf.DoubleValue", "google.protobuf.FloatValue"}
_INTS = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
         FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
         FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64,
         FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64}
_FLOATS = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}

# plan kinds
_SCALAR, _INT, _FLOAT, _ENUM, _MSG, _TS, _WRAP, _SKIP = range(8)


class Unknown:
    """What a conversion skipped: unknown fields and enum names (by path)."""

    __slots__ = ("fields", "enums")

    def __init__(self) -> None:
        self.fields: list[str] = []
        self.enums: list[str] = []


_PLANS: dict[str, dict[str, tuple]] = {}


def _plan(desc: Descriptor) -> dict[str, tuple]:
    plan = _PLANS.get(desc.full_name)
    if plan is not None:
        return plan
    plan = {}
    for f in desc.fields:
        repeated = f.is_repeated
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            full = f.message_type.full_name
            if full == "google.protobuf.Timestamp":
                kind, sub = _TS, None
            elif full in _WRAPPERS:
                kind, sub = _WRAP, None
            elif full in ("google.protobuf.Any", "google.protobuf.Struct",
                          "google.protobuf.FieldMask") or f.message_type.GetOptions().map_entry:
                kind, sub = _SKIP, None
            else:
                kind, sub = _MSG, f.message_type
        elif f.type == FieldDescriptor.TYPE_ENUM:
            kind, sub = _ENUM, {v.name: v.number for v in f.enum_type.values}
        elif f.type in _INTS:
            kind, sub = _INT, None
        elif f.type in _FLOATS:
            kind, sub = _FLOAT, None
        else:
            kind, sub = _SCALAR, None
        entry = (f.name, kind, sub, repeated)
        plan[f.name] = entry
        plan[f.json_name] = entry
    _PLANS[desc.full_name] = plan
    return plan


def _enum_value(v: Any, names: dict[str, int], path: str, unknown: Unknown) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return v  # numbers are kept (open enums); the mapper counts the ones it does not know
    n = names.get(v) if isinstance(v, str) else None
    if n is None:
        unknown.enums.append(path)
    return n


_SECONDS: dict[str, int] = {}


def _timestamp(ts: Any, v: str) -> None:
    """RFC 3339 ``YYYY-MM-DDTHH:MM:SS[.frac]Z`` quickly (the whole second is cached:
    a busy stream repeats it); any other form through protobuf's own parser."""
    if len(v) >= 20 and v[-1] == "Z" and v[10] == "T" and (len(v) == 20 or v[19] == "."):
        head = v[:19]
        sec = _SECONDS.get(head)
        if sec is None:
            sec = calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S"))
            if len(_SECONDS) > 4096:
                _SECONDS.clear()
            _SECONDS[head] = sec
        frac = v[20:-1]
        if len(frac) <= 9 and (not frac or frac.isdigit()):
            ts.seconds = sec
            ts.nanos = int(frac.ljust(9, "0")) if frac else 0
            return
    ts.FromJsonString(v)


def merge(d: dict, msg: Any, unknown: Unknown, path: str = "") -> None:
    """Set ``msg``'s fields from the JSON object ``d``. Raises ValueError/TypeError
    on values of the wrong shape (the line is malformed)."""
    if not isinstance(d, dict):
        raise TypeError(f"{path or 'event'}: expected an object")
    plan = _plan(msg.DESCRIPTOR)
    for key, v in d.items():
        entry = plan.get(key)
        if entry is None:
            unknown.fields.append(path + key)
            continue
        if v is None:
            continue
        name, kind, sub, repeated = entry
        if repeated:
            if not isinstance(v, list):
                raise TypeError(f"{path}{key}: expected a list")
            target = getattr(msg, name)
            if kind == _MSG:
                for i, item in enumerate(v):
                    merge(item, target.add(), unknown, f"{path}{key}[{i}].")
            elif kind == _ENUM:
                target.extend(x for x in (_enum_value(e, sub, path + key, unknown) for e in v)
                              if x is not None)
            elif kind == _INT:
                target.extend(int(x) for x in v)
            elif kind == _FLOAT:
                target.extend(float(x) for x in v)
            elif kind == _SCALAR:
                target.extend(v)
            continue
        if kind == _SCALAR:
            setattr(msg, name, v)
        elif kind == _INT:
            setattr(msg, name, int(v))
        elif kind == _ENUM:
            n = _enum_value(v, sub, path + key, unknown)
            if n is not None:
                setattr(msg, name, n)
        elif kind == _MSG:
            merge(v, getattr(msg, name), unknown, f"{path}{key}.")
        elif kind == _TS:
            _timestamp(getattr(msg, name), v)
        elif kind == _WRAP:
            w = getattr(msg, name)
            w.value = type(w.value)(v) if not isinstance(w.value, str) else v
        elif kind == _FLOAT:
            setattr(msg, name, float(v))
        # _SKIP: Any, Struct, FieldMask, maps: not used by the mapping
