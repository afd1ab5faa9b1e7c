"""Follows a Hubble export file (Cilium's flow exporter, ``hubble-export-file-path``).

The file holds one JSON object per line: an ``observer.ExportEvent`` in
protobuf's JSON form (the same ``flow`` / ``lost_events`` / ``node_status``
members as ``GetFlowsResponse``). The follower reads what is there, then
waits for more, like ``tail -F``:

- rotation (the exporter renames the file and starts a new one at the same
  path): the old file is read to its end, then the new one from its start;
- truncation in place (``copytruncate``): reading starts again at offset 0;
- a missing file: waited for.

Each is counted in ``ebpf_otlp.hubble.reconnects{reason}``. A line that is
not valid JSON or not an event is counted (``ebpf_otlp.hubble.malformed``)
and skipped; a line with fields or enum names this build's protos do not
know is decoded without them and counted (``reason=unknown_field``).
"""

from __future__ import annotations

import json
import logging
import os
import threading

from . import names as N
from ._proto.observer import observer_pb2 as opb
from .jsonpb import Unknown, merge
from .mapping import Mapper

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_LINE = 16 << 20  # a line longer than this is garbage, not an event


def parse_line(line: bytes, count) -> opb.ExportEvent | None:
    """One export-file line as an ``ExportEvent``, or None (counted)."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError)
        count(N.MALFORMED, (("reason", "json"),))
        return None
    ev = opb.ExportEvent()
    unknown = Unknown()
    try:
        merge(obj, ev, unknown)
    except (ValueError, TypeError, OverflowError, RecursionError, AttributeError):
        count(N.MALFORMED, (("reason", "not_an_event"),))
        return None
    if unknown.fields:
        count(N.MALFORMED, (("reason", "unknown_field"),), len(unknown.fields))
    if unknown.enums:
        count(N.MALFORMED, (("reason", "unknown_enum"), ("field", "json")), len(unknown.enums))
    return ev


class FileFollower:
    """Feeds ``mapper`` from the export file at ``path`` until ``stop()``."""

    def __init__(self, path: str, mapper: Mapper, poll_s: float = 0.1):
        self.path = path
        self.mapper = mapper
        self.poll_s = poll_s
        self._stop = threading.Event()
        self.lines = 0
        self.reopened = 0

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        fd: int | None = None
        ino = None
        buf = b""
        waiting_logged = False
        count = self.mapper.count
        try:
            while not self._stop.is_set():
                if fd is None:
                    try:
                        fd = os.open(self.path, os.O_RDONLY)
                    except FileNotFoundError:
                        if not waiting_logged:
                            log.warning("hubble export file %s not there yet; waiting", self.path)
                            waiting_logged = True
                        self._stop.wait(self.poll_s)
                        continue
                    ino = os.fstat(fd).st_ino
                    buf = b""
                data = os.read(fd, CHUNK)
                if data:
                    buf = self._lines(buf + data)
                    continue
                # At the end: rotated, truncated, or just nothing new yet?
                try:
                    st = os.stat(self.path)
                except FileNotFoundError:
                    st = None
                if st is not None and st.st_ino != ino:
                    self._reopen(fd, buf, "rotated")
                    fd = None
                    continue
                if st is not None and st.st_size < os.lseek(fd, 0, os.SEEK_CUR):
                    if buf:
                        count(N.MALFORMED, (("reason", "partial_line"),))
                    os.lseek(fd, 0, os.SEEK_SET)
                    buf = b""
                    self.reopened += 1
                    count(N.RECONNECTS, (("reason", "truncated"),))
                    continue
                self._stop.wait(self.poll_s)
        finally:
            if fd is not None:
                os.close(fd)

    def _reopen(self, fd: int, buf: bytes, reason: str) -> None:
        if buf.strip():
            self.mapper.count(N.MALFORMED, (("reason", "partial_line"),))
        os.close(fd)
        self.reopened += 1
        self.mapper.count(N.RECONNECTS, (("reason", reason),))

    def _lines(self, buf: bytes) -> bytes:
        """Map every complete line of ``buf``; returns the incomplete rest."""
        lines = buf.split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE:
            self.mapper.count(N.MALFORMED, (("reason", "line_too_long"),))
            rest = b""
        count = self.mapper.count
        events = []
        for line in lines:
            if not line.strip():
                continue
            self.lines += 1
            ev = parse_line(line, count)
            if ev is not None:
                events.append(ev)
        if events:
            self.mapper.feed(events)
        return rest
