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
    """``emit`` queues (never blocks; over ``max_queue`` counts a drop);
    ``flush`` sends what waits in one request."""

    def __init__(self, resource_attributes: dict, scope: str, send: Callable[[bytes], bool],
                 max_queue: int = 10000):
        self._base = dict(resource_attributes)
        self._resource = resource_message(resource_attributes)
        self._scope = InstrumentationScope(name=scope)
        self._send = send
        self.max_queue = max_queue
        self._queue: list[tuple[ResourceKey | None, LogRecord]] = []
        self._lock = threading.Lock()
        self.exported = 0
        self.dropped: Counter[str] = Counter()
        self._closed = False

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
        with self._lock:
            if self._closed:
                self.dropped["shutdown"] += 1
            elif len(self._queue) >= self.max_queue:
                self.dropped["queue_full"] += 1
            else:
                self._queue.append((res, rec))

    def flush(self) -> bool:
        with self._lock:
            batch, self._queue = self._queue, []
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
            ok = self._send(req.SerializeToString())
        except Exception:  # the sender never raises; a bug here must not stop export
            ok = False
        if ok:
            self.exported += len(batch)
        else:
            self.dropped["export_failed"] += len(batch)
        return ok

    def close(self) -> None:
        with self._lock:
            self._closed = True
            left, self._queue = len(self._queue), []
        if left:
            self.dropped["shutdown"] += left
