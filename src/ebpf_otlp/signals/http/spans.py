"""HTTP spans through the batch span path: SERVER or CLIENT kind, and a parent
from the request's ``traceparent`` header when it carries a valid one."""

from __future__ import annotations

import os
import struct
from typing import Sequence

from ...dns_spans import STATUS_ERROR, SpanEncoder
from ...otlp_wire import field, varint

SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3

# (start_ns, end_ns, name, attrs, error_type or None, kind, trace_id or b"", parent_id or b"")
HttpSpanItem = tuple


def parse_traceparent(value: str) -> tuple[bytes, bytes] | None:
    """(trace id, parent span id) of a W3C ``traceparent`` value, or None if invalid."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    if len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace, parent = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
        bytes.fromhex(parts[0] + parts[3][:2])
    except ValueError:
        return None
    if not any(trace) or not any(parent):
        return None
    return trace, parent


class HttpSpanEncoder(SpanEncoder):
    """:class:`SpanEncoder` with a kind per span and an optional parent context."""

    _kinds = {k: b"\x30" + varint(k) for k in (SPAN_KIND_SERVER, SPAN_KIND_CLIENT)}

    def span_with(self, trace_id: bytes, span_id: bytes, item: HttpSpanItem) -> bytes:
        start, end, name, attrs, error, kind, parent_trace, parent_id = item
        name_f = self._names.get(name)
        if name_f is None:
            if len(self._names) >= self.cache_size:
                self._names.clear()
            name_f = self._names[name] = field(5, name.encode())
        get = self._kv.get
        kvs = b"".join([get(a) or self._encode_kv(*a) for a in attrs])
        if parent_trace:
            trace_id = parent_trace
        body = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
        if parent_id:
            body += [b"\x22\x08", parent_id]
        body += [name_f, self._kinds[kind], struct.pack("<BQBQ", 0x39, start, 0x41, end), kvs]
        if error is not None:
            body.append(self._keyvalue("error.type", error))
            body.append(field(15, field(2, error.encode()) + b"\x18" + varint(STATUS_ERROR)))
        return field(2, b"".join(body))

    def spans(self, items: Sequence[HttpSpanItem]) -> list[bytes]:
        ids = os.urandom(24 * len(items))
        return [self.span_with(ids[24 * i:24 * i + 16], ids[24 * i + 16:24 * i + 24], it)
                for i, it in enumerate(items)]
