"""The one span path: OTLP ``ExportTraceServiceRequest`` bytes built straight
from span records, sent by one thread through the traces sender.

The SDK's span path costs ~100 us per span here (span objects, the batch
processor, pure-Python OTLP encoding) and tops out near 5,000 spans/s
(bench/dns_flood.py). Spans of one signal share their shape and their
attribute values repeat (a few servers, types, codes), so each ``KeyValue``
is encoded once and cached; a span is then a handful of byte
concatenations. The envelope (resource, scope) is encoded once.

Every span that is not exported is counted, by reason: the bounded queue
was full, the export failed after retries, or shutdown came first.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import Counter, deque
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

from .wire import field, key_value, resource_message, varint

log = logging.getLogger(__name__)

SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
STATUS_ERROR = 2
# Spans encoded per step while the queue has room: a full queue stops the
# encoding of the rest of a batch (counted as dropped, never encoded).
ENCODE_CHUNK = 1024


class SpanRecord(NamedTuple):
    """One finished span. Plain tuples of the first five fields work too."""

    start_ns: int  # unix ns
    end_ns: int
    name: str
    attributes: Sequence[tuple[str, object]]
    error: str | None = None  # error.type; sets status ERROR
    kind: int = SPAN_KIND_CLIENT
    trace_id: bytes | None = None  # 16 bytes: join this trace (a traceparent seen)
    parent_span_id: bytes | None = None  # 8 bytes
    resource: tuple | None = None  # a resources.resource_key (pod/container); None: host


SpanItem = SpanRecord


class SpanGroup(NamedTuple):
    """What many spans share (see :meth:`SpanEncoder.grouped`): name, the
    attributes common to all of them, error, kind."""

    name: str
    attributes: Sequence[tuple[str, object]]
    error: str | None = None
    kind: int = SPAN_KIND_CLIENT
    resource: tuple | None = None  # a resources.resource_key (pod/container); None: host


# trace_id (field 1), span_id (2), start (7) and end (8) times: the fixed part of a span
_FIXED = np.dtype([("t1", "u1"), ("t2", "u1"), ("trace", "u1", 16), ("t3", "u1"), ("t5", "u1"),
                   ("span", "u1", 8), ("t7", "u1"), ("start", "<u8"), ("t8", "u1"),
                   ("end", "<u8")])
# The same with the span's tag and a 2-byte length before it (spans of 128 bytes
# to 16 KiB: all but the smallest), so one slice and one concatenation make a span.
_LED = np.dtype([("tag", "u1"), ("len0", "u1"), ("len1", "u1"), *[
    (k, _FIXED.fields[k][0]) for k in _FIXED.names]])


class SpanEncoder:
    """Encodes span tuples into one request; ``KeyValue`` bytes are cached."""

    def __init__(self, resource_attributes: dict, scope: str, cache_size: int = 65536):
        self._base = dict(resource_attributes)
        self._resource_field = field(1, resource_message(resource_attributes).SerializeToString())
        self._resource_fields: dict[tuple, bytes] = {}
        self._scope_field = field(1, InstrumentationScope(name=scope).SerializeToString())
        self._kv: dict[tuple[str, object], bytes] = {}
        self._names: dict[str, bytes] = {}
        self._groups: dict[SpanGroup, bytes] = {}
        self.cache_size = cache_size
        self._kinds = {k: b"\x30" + varint(k) for k in range(6)}  # field 6, varint

    def _keyvalue(self, key: str, value: object) -> bytes:
        kv = self._kv.get((key, value))
        if kv is None:
            kv = self._encode_kv(key, value)
        return kv

    def _encode_kv(self, key: str, value: object) -> bytes:
        kv = field(9, key_value(key, value))  # Span.attributes
        if len(self._kv) >= self.cache_size:
            self._kv.clear()  # bounded; the hot values come back at once
        self._kv[(key, value)] = kv
        return kv

    def span(self, trace_id: bytes, span_id: bytes, item: SpanRecord | tuple) -> bytes:
        start, end, name, attrs, error, *rest = item
        kind = rest[0] if rest else SPAN_KIND_CLIENT
        parent = None
        if len(rest) > 1 and rest[1] is not None:
            trace_id = rest[1]
            parent = rest[2] if len(rest) > 2 else None
        name_f = self._names.get(name)
        if name_f is None:
            if len(self._names) >= self.cache_size:
                self._names.clear()
            name_f = self._names[name] = field(5, name.encode())
        get = self._kv.get
        kvs = b"".join([get(a) or self._encode_kv(*a) for a in attrs])
        body = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
        if parent:
            body.append(b"\x22\x08" + parent)  # parent_span_id, field 4
        body += [name_f, self._kinds.get(kind) or b"\x30" + varint(kind),
                 struct.pack("<BQBQ", 0x39, start, 0x41, max(end, start)), kvs]
        if error is not None:
            body.append(self._keyvalue("error.type", error))
            body.append(field(15, field(2, error.encode()) + b"\x18" + varint(STATUS_ERROR)))
        return field(2, b"".join(body))  # ScopeSpans.spans

    def spans(self, items: Sequence[SpanItem]) -> list[bytes | tuple[tuple, bytes]]:
        """Encoded spans, each with fresh random trace and span ids; a span with a
        resource key comes as (key, bytes)."""
        ids = os.urandom(24 * len(items))
        out: list[bytes | tuple[tuple, bytes]] = []
        for i, it in enumerate(items):
            b = self.span(ids[24 * i:24 * i + 16], ids[24 * i + 16:24 * i + 24], it)
            res = it[8] if len(it) > 8 else None
            out.append((res, b) if res else b)
        return out

    def _group_bytes(self, g: SpanGroup) -> bytes:
        """Everything of a span that a group shares, encoded once (cached, bounded)."""
        hit = self._groups.get(g)
        if hit is not None:
            return hit
        parts = [field(5, g.name.encode()), self._kinds.get(g.kind) or b"\x30" + varint(g.kind)]
        parts += [self._keyvalue(k, v) for k, v in g.attributes]
        if g.error is not None:
            parts.append(self._keyvalue("error.type", g.error))
            parts.append(field(15, field(2, g.error.encode()) + b"\x18" + varint(STATUS_ERROR)))
        out = b"".join(parts)
        if len(self._groups) >= self.cache_size:
            self._groups.clear()
        self._groups[g] = out
        return out

    def grouped(self, start_ns: np.ndarray, end_ns: np.ndarray, group: np.ndarray,
                groups: Sequence[SpanGroup],
                columns: Sequence[tuple[str, Sequence[object]]] = (),
                trace_ids: np.ndarray | None = None,
                parent_ids: Sequence[bytes | None] | None = None
                ) -> list[bytes | tuple[tuple, bytes]]:
        """Encoded spans from columns: span ``i`` belongs to ``groups[group[i]]``
        and has, besides, one attribute per column (``None``: absent).
        ``trace_ids`` ((n, 16) uint8): the spans' trace ids (random otherwise);
        ``parent_ids``: span ``i``'s parent span id (8 bytes) or None.

        The ids, times and lengths of all spans are laid out with numpy; a
        group's name, kind, shared attributes and status are encoded once; each
        column value's ``KeyValue`` comes from the cache, and a group's bytes
        with the column values once per batch. Protobuf lets fields come in any
        order, so a span is those pieces joined.
        """
        n = len(start_ns)
        if n == 0:
            return []
        heads = [self._group_bytes(g) for g in groups]
        get = self._kv.get
        enc = self._encode_kv
        cols = [[b"" if v is None else get((k, v)) or enc(k, v) for v in vals]
                for k, vals in columns]
        if parent_ids is not None:  # parent_span_id, field 4
            cols.append([b"" if p is None else b"\x22\x08" + p for p in parent_ids])
        gl = np.asarray(group).tolist()
        # What follows a span's fixed part: its group's bytes and its column values,
        # joined once per distinct combination in the batch (a connection's spans
        # share them).
        if cols:
            joined: dict[tuple, bytes] = {}
            tails = []
            append = tails.append
            for key in zip(gl, *cols):
                t = joined.get(key)
                if t is None:
                    t = joined[key] = b"".join((heads[key[0]], *key[1:]))
                append(t)
        else:
            tails = [heads[g] for g in gl]
        size = np.fromiter(map(len, tails), np.int64, n) + _FIXED.itemsize
        res = [g.resource for g in groups]
        if size.min() < 128 or size.max() >= 16384:  # not a 2-byte length: one by one
            return self._grouped_each(start_ns, end_ns, gl, tails, res, trace_ids)
        fixed = self._fixed(_LED, start_ns, end_ns, trace_ids)
        fixed["tag"] = 0x12  # ScopeSpans.spans
        fixed["len0"] = (size & 0x7F) | 0x80
        fixed["len1"] = size >> 7
        blob = fixed.tobytes()
        w = _LED.itemsize
        if not any(res):
            return [blob[i * w:i * w + w] + t for i, t in enumerate(tails)]
        return [(res[g], blob[i * w:i * w + w] + t) if res[g] else blob[i * w:i * w + w] + t
                for i, (g, t) in enumerate(zip(gl, tails))]  # a pod's/container's: wrap()

    @staticmethod
    def _fixed(dtype: np.dtype, start_ns: np.ndarray, end_ns: np.ndarray,
               trace_ids: np.ndarray | None) -> np.ndarray:
        """The fixed part of each span (ids, times), laid out with numpy."""
        n = len(start_ns)
        fixed = np.empty(n, dtype)
        fixed["t1"], fixed["t2"], fixed["t3"], fixed["t5"] = 0x0A, 0x10, 0x12, 0x08
        ids = np.frombuffer(os.urandom(24 * n), np.uint8).reshape(n, 24)
        fixed["trace"] = ids[:, :16] if trace_ids is None else trace_ids
        fixed["span"] = ids[:, 16:]
        fixed["t7"], fixed["t8"] = 0x39, 0x41
        start = np.asarray(start_ns, np.uint64)
        fixed["start"], fixed["end"] = start, np.maximum(np.asarray(end_ns, np.uint64), start)
        return fixed

    def _grouped_each(self, start_ns: np.ndarray, end_ns: np.ndarray, gl: list[int],
                      tails: list[bytes], res: list, trace_ids: np.ndarray | None
                      ) -> list[bytes | tuple[tuple, bytes]]:
        """:meth:`grouped` for spans whose length is not a 2-byte varint."""
        blob = self._fixed(_FIXED, start_ns, end_ns, trace_ids).tobytes()
        w = _FIXED.itemsize
        out = []
        append = out.append
        for i, (g, t) in enumerate(zip(gl, tails)):
            ln = w + len(t)
            b = b"".join((b"\x12", varint(ln), blob[i * w:i * w + w], t))
            append((res[g], b) if res[g] else b)
        return out

    def _resource(self, key: tuple | None) -> bytes:
        if not key:
            return self._resource_field
        f = self._resource_fields.get(key)
        if f is None:
            if len(self._resource_fields) >= 4096:
                self._resource_fields.clear()  # bounded; pods come back at once
            f = self._resource_fields[key] = field(1, resource_message(
                {**self._base, **dict(key)}).SerializeToString())
        return f

    def wrap(self, spans: Sequence[bytes | tuple[tuple, bytes]]) -> bytes:
        """An ``ExportTraceServiceRequest`` around encoded spans: one
        ``ResourceSpans`` per resource among them (one scope each)."""
        groups: dict[tuple | None, list[bytes]] = {}
        for s in spans:
            if isinstance(s, tuple):
                groups.setdefault(s[0], []).append(s[1])
            else:
                groups.setdefault(None, []).append(s)
        return b"".join(field(1, self._resource(k) + field(2, self._scope_field + b"".join(v)))
                        for k, v in groups.items())

    def request(self, items: Sequence[SpanItem]) -> bytes:
        return self.wrap(self.spans(items))


class SpanBatchExporter:
    """Bounded queue of encoded spans and one sender thread.

    ``submit`` never blocks: what does not fit (``max_queue`` spans or
    ``max_queue_bytes`` encoded bytes) is dropped and counted. The sender
    sends when ``max_batch`` spans wait or every ``flush_interval_s``.

    ``retry``: ``send(body, spans)`` keeps a body it could not deliver for a
    later attempt and counts what it gives up itself (the OTLP sender's retry
    queue), so a failed send is not a drop here; otherwise ``send(body)`` and a
    failed batch is dropped (``export_failed``). ``on_drop(reason, n)`` hears
    of every drop counted here; ``on_idle()`` runs on a flush with nothing to
    send (the retry queue's chance when no fresh span comes).
    """

    def __init__(self, resource_attributes: dict, send: Callable[..., bool],
                 scope: str = "ebpf_otlp", max_queue: int = 65536, max_batch: int = 4096,
                 flush_interval_s: float = 0.5, max_queue_bytes: int | None = None,
                 retry: bool = False, on_drop: Callable[[str, int], None] | None = None,
                 on_idle: Callable[[], object] | None = None):
        self.encoder = SpanEncoder(resource_attributes, scope)
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.max_batch = max_batch
        self.flush_interval_s = flush_interval_s
        # Spans wait already encoded: bytes are invisible to the cyclic GC, while
        # thousands of queued attribute tuples made its collections cost ~30%.
        self._queue: deque[bytes | tuple[tuple, bytes]] = deque()
        self.queued_bytes = 0
        self._cond = threading.Condition()
        self._stop = False
        self._flush_req = False
        self._thread: threading.Thread | None = None
        self.submitted = 0
        self.exported = 0
        self.requests = 0
        self.failures = 0
        self.dropped: Counter[str] = Counter()
        self._send = send
        self._retry = retry
        self._on_drop = on_drop
        self._on_idle = on_idle

    def _count_drop(self, reason: str, n: int) -> None:
        if n <= 0:
            return
        self.dropped[reason] += n
        if self._on_drop is not None:
            self._on_drop(reason, n)

    # --- producer side ----------------------------------------------------------
    def submit_grouped(self, start_ns: np.ndarray, end_ns: np.ndarray, group: np.ndarray,
                       groups: Sequence[SpanGroup],
                       columns: Sequence[tuple[str, Sequence[object]]] = (),
                       trace_ids: np.ndarray | None = None,
                       parent_ids: Sequence[bytes | None] | None = None) -> int:
        """Encode spans from columns (:meth:`SpanEncoder.grouped`) and queue them;
        returns how many were dropped (queue full, or stopped)."""
        return self._submit_chunks(len(start_ns), lambda i, j: self.encoder.grouped(
            start_ns[i:j], end_ns[i:j], group[i:j], groups, [(c, v[i:j]) for c, v in columns],
            None if trace_ids is None else trace_ids[i:j],
            None if parent_ids is None else parent_ids[i:j]))

    def submit(self, items: Iterable[SpanItem]) -> int:
        """Encode and queue spans; returns how many were dropped (queue full, or stopped)."""
        items = list(items)
        return self._submit_chunks(len(items), lambda i, j: self.encoder.spans(items[i:j]))

    def _submit_chunks(self, n: int,
                       encode: Callable[[int, int], list[bytes | tuple[tuple, bytes]]]) -> int:
        """Queue spans ``encode(i, j)`` of ``n`` a chunk at a time, encoded outside
        the lock, until the queue is full: with the collector down, the rest of a
        batch is counted, never encoded, so neither CPU nor the allocator's
        high-water mark follows batch size. Returns how many were dropped."""
        i = dropped = 0
        while i < n:
            with self._cond:
                k = min(n - i, self._room(), ENCODE_CHUNK)
            if k == 0:
                break
            lost = self._enqueue(encode(i, i + k), k)
            dropped, i = dropped + lost, i + k
            if lost:  # the queue filled within this chunk
                break
        if i < n:
            with self._cond:
                self._count_drop("shutdown" if self._stop else "queue_full", n - i)
        return dropped + n - i

    def _room(self) -> int:
        """Spans that may still be queued (under the lock); 0 when stopped or
        the byte bound is reached."""
        if self._stop or (self.max_queue_bytes is not None
                          and self.queued_bytes >= self.max_queue_bytes):
            return 0
        return max(0, self.max_queue - len(self._queue))

    def _enqueue(self, encoded: list[bytes | tuple[tuple, bytes]], total: int) -> int:
        """Queue what still fits of ``encoded`` (of ``total`` offered); count the rest."""
        sizes = [len(e) if isinstance(e, bytes) else len(e[1]) for e in encoded]
        with self._cond:
            # Room may have shrunk meanwhile (timeouts are submitted from another thread).
            room = max(0, 0 if self._stop else self.max_queue - len(self._queue))
            k = min(room, len(encoded))
            nbytes = sum(sizes[:k])
            if self.max_queue_bytes is not None:
                budget = self.max_queue_bytes - self.queued_bytes
                while k and nbytes > budget:  # the oldest spans first, the rest dropped
                    k -= 1
                    nbytes -= sizes[k]
            self._queue.extend(encoded[:k])
            self.queued_bytes += nbytes
            self.submitted += k
            dropped = total - k
            self._count_drop("shutdown" if self._stop else "queue_full", dropped)
            if len(self._queue) >= self.max_batch:
                self._cond.notify()
        return dropped

    # --- sender thread -------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None or self._stop:
                return
            self._thread = threading.Thread(target=self._run, name="span-sender", daemon=True)
        self._thread.start()

    def _take(self) -> list[bytes | tuple[tuple, bytes]]:
        q = self._queue
        n = min(len(q), self.max_batch)
        out = [q.popleft() for _ in range(n)]
        self.queued_bytes -= sum(len(e) if isinstance(e, bytes) else len(e[1]) for e in out)
        return out

    def _run(self) -> None:
        next_flush = time.monotonic() + self.flush_interval_s
        while True:
            with self._cond:
                while (not self._stop and not self._flush_req
                       and len(self._queue) < self.max_batch
                       and time.monotonic() < next_flush):
                    self._cond.wait(max(0.0, next_flush - time.monotonic()))
                stopping = self._stop
                self._flush_req = False
                batch = self._take()
            if time.monotonic() >= next_flush:
                next_flush = time.monotonic() + self.flush_interval_s
            if batch:
                self._export(batch)
            elif self._on_idle is not None and not stopping:
                try:
                    self._on_idle()
                except Exception as e:  # must not kill the sender
                    log.warning("span retry failed: %s", e)
            if stopping and not self._queue:
                return

    def _export(self, batch: list[bytes | tuple[tuple, bytes]]) -> None:
        try:
            data = self.encoder.wrap(batch)
            ok = self._send(data, len(batch)) if self._retry else self._send(data)
        except Exception as e:  # a collector that is down must not kill the sender
            log.warning("span export failed: %s", e)
            ok = False
            if self._retry:  # never reached the sender: nobody else counts these
                self._count_drop("export_failed", len(batch))
        self.requests += 1
        if ok:
            self.exported += len(batch)
        else:
            self.failures += 1
            if not self._retry:
                self._count_drop("export_failed", len(batch))

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Ask the sender to send what waits now; True when the queue emptied in time."""
        deadline = time.monotonic() + timeout_s
        while self._queue and time.monotonic() < deadline:
            with self._cond:
                self._flush_req = True
                self._cond.notify()
            time.sleep(0.01)
        return not self._queue

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Send what is queued within ``timeout_s``, then stop; idempotent."""
        with self._cond:
            if self._stop:
                return
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
            self.queued_bytes = 0
        self._count_drop("shutdown", left)
