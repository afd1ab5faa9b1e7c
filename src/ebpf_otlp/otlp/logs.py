"""OTLP log records (drop events), queued bounded and sent once per interval."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Callable

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs

from .resources import RESOURCE_KEYS, ResourceKey, resource_key
from .wire import any_value, resource_message

SEVERITY_WARN = 13
_HAS_EVENT_NAME = "event_name" in LogRecord.DESCRIPTOR.fields_by_name


class LogBatch:
    """``emit`` queues (never blocks; over ``max_queue`` records or
    ``max_queue_bytes`` encoded bytes counts a drop); ``flush`` sends what
    waits in one request.

    ``retry``: ``send(body, records)`` keeps a body it could not deliver and
    counts what it gives up itself (the OTLP sender's retry queue), so a failed
    flush is not a drop here; otherwise ``send(body)`` and a failed flush drops
    its records (``export_failed``). ``on_drop(reason, n)`` hears of every drop
    counted here.
    """

    def __init__(self, resource_attributes: dict, scope: str, send: Callable[..., bool],
                 max_queue: int = 10000, max_queue_bytes: int | None = None,
                 retry: bool = False, on_drop: Callable[[str, int], None] | None = None):
        self._base = dict(resource_attributes)
        self._resource = resource_message(resource_attributes)
        self._scope = InstrumentationScope(name=scope)
        self._send = send
        self._retry = retry
        self._on_drop = on_drop
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self._queue: list[tuple[ResourceKey | None, LogRecord]] = []
        self.queued_bytes = 0
        self._lock = threading.Lock()
        self.exported = 0
        self.dropped: Counter[str] = Counter()
        self._closed = False

    def _count_drop(self, reason: str, n: int = 1) -> None:
        if n <= 0:
            return
        self.dropped[reason] += n
        if self._on_drop is not None:
            self._on_drop(reason, n)

    def emit(self, *, timestamp: int, body: str, attributes: dict,
             severity_number: int = SEVERITY_WARN, severity_text: str = "WARN",
             event_name: str = "") -> None:
        # Workload attributes (see .resources) go to the record's resource.
        res = resource_key({k: v for k, v in attributes.items() if k in RESOURCE_KEYS})
        if res:
            attributes = {k: v for k, v in attributes.items() if k not in RESOURCE_KEYS}
        rec = LogRecord(time_unix_nano=timestamp, observed_time_unix_nano=timestamp,
                        severity_number=severity_number, severity_text=severity_text,
                        body=any_value(body),
                        attributes=[KeyValue(key=k, value=any_value(v))
                                    for k, v in attributes.items()])
        if event_name and _HAS_EVENT_NAME:
            rec.event_name = event_name
        size = rec.ByteSize()
        with self._lock:
            if self._closed:
                self._count_drop("shutdown")
            elif len(self._queue) >= self.max_queue or (
                    self.max_queue_bytes is not None
                    and self.queued_bytes + size > self.max_queue_bytes):
                self._count_drop("queue_full")
            else:
                self._queue.append((res, rec))
                self.queued_bytes += size

    @property
    def waiting(self) -> int:
        """Records queued for the next flush."""
        return len(self._queue)

    def flush(self) -> bool:
        with self._lock:
            batch, self._queue = self._queue, []
            self.queued_bytes = 0
        if not batch:
            return True
        groups: dict[ResourceKey | None, list[LogRecord]] = {}
        for res, rec in batch:
            groups.setdefault(res, []).append(rec)
        req = ExportLogsServiceRequest(resource_logs=[ResourceLogs(
            resource=resource_message({**self._base, **dict(res)}) if res else self._resource,
            scope_logs=[ScopeLogs(scope=self._scope, log_records=recs)])
            for res, recs in groups.items()])
        try:
            body = req.SerializeToString()
            ok = self._send(body, len(batch)) if self._retry else self._send(body)
        except Exception:  # the sender never raises; a bug here must not stop export
            ok = False
            if self._retry:  # never reached the sender: nobody else counts these
                self._count_drop("export_failed", len(batch))
        if ok:
            self.exported += len(batch)
        elif not self._retry:
            self._count_drop("export_failed", len(batch))
        return ok

    def close(self) -> None:
        with self._lock:
            self._closed = True
            left, self._queue = len(self._queue), []
            self.queued_bytes = 0
            self._count_drop("shutdown", left)
