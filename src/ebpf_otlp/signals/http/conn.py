"""Per-connection HTTP/1.x state: message boundaries and request/response pairing.

Each kernel record is one read or write: its byte count (``len``) and the
first bytes of it (``head``). A :class:`Stream` (one per direction) walks
those counts: a message head is parsed where one starts, its body is skipped
by length (``Content-Length``), by watching for the end of a chunked body,
or until the connection closes; what cannot be followed puts the stream in
``lost`` mode until something starts like a message head again.

A :class:`Conn` pairs requests with responses in order (keep-alive,
pipelining), skips interim ``1xx`` responses, knows that ``HEAD`` and
``204``/``304`` responses have no body, and decides the role: the side that
read the request is the SERVER, the side that wrote it the CLIENT.

State is bounded: connections in a :class:`ConnTable` of fixed size (the
least recently used is evicted), pending requests per connection, bytes of a
head gathered across calls. Everything let go is counted in :class:`Counts`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from typing import Callable, NamedTuple

from .parse import (
    REQUEST,
    RESPONSE,
    Head,
    ParseError,
    may_start_message,
    parse_head,
    starts_message,
)

IN, OUT = 0, 1
SERVER, CLIENT = 2, 3
MAX_PENDING = 64  # requests waiting for responses on one connection (pipelining depth)
MAX_HEAD = 8192  # bytes of one head gathered across calls; past it only the first line is kept
CHUNK_END = b"0\r\n\r\n"
UNTIL_CLOSE = -2
CHUNKED = -1
CLOSED = "connection_closed"


class Counts:
    """What was not turned into spans, by reason (exported as ``ebpf_otlp.http.*``)."""

    def __init__(self) -> None:
        self.messages = {"request": 0, "response": 0}  # parsed heads, by kind
        self.malformed: Counter[str] = Counter()  # heads that did not parse, by reason
        self.unanswered: Counter[str] = Counter()  # requests without a response, by reason
        self.unmatched = 0  # responses with no request waiting
        self.bytes_unparsed = 0  # bytes of unknown content (not following a message)
        self.records_ignored = 0  # records on upgraded or conflicting connections
        self.conns_evicted = 0
        self.conns_expired = 0
        # new connections whose process's name and cgroup came from /proc (not
        # from a record: that record was lost, or the table of them cleared)
        self.ids_from_proc = 0


class Exchange(NamedTuple):
    """A request and its response (None when the connection closed first)."""

    conn: Conn
    request: Head
    req_ns: int  # the request's first byte (client: write entry; server: read return)
    response: Head | None
    resp_ns: int  # the response head's last byte (return of that call), or the close
    error: str | None


_exchange = tuple.__new__  # an Exchange without its Python-level __new__ (hot path)


class Stream:
    __slots__ = ("buf", "buf_ns", "body_left", "chunked", "chunk_left", "lost")

    def __init__(self) -> None:
        self.buf: bytearray | None = None  # a head being gathered across calls
        self.buf_ns = 0
        self.body_left = 0
        self.chunked = False  # in a chunked body
        self.chunk_left = 0  # bytes of the current chunk and its CRLF; -1: lost track
        self.lost = False

    def walk_chunks(self, data: bytes, n: int, pos: int, total: int) -> int:
        """Follow a chunked body by its size lines while they are among the copied
        bytes; returns where the body ends (or ``total``). When a size line was not
        copied, ``chunk_left`` becomes -1 and the body's end is found by looking
        for a message start or a call ending with the last chunk."""
        while pos < total:
            if self.chunk_left > 0:
                k = min(self.chunk_left, total - pos)
                self.chunk_left -= k
                pos += k
                continue
            eol = data.find(b"\r\n", pos) if pos < n else -1
            if eol < 0:
                self.chunk_left = -1
                return total
            try:
                size = int(data[pos:eol].split(b";", 1)[0], 16)
            except ValueError:
                self.chunk_left = -1
                return total
            pos = eol + 2
            if size > 0:
                self.chunk_left = size + 2
                continue
            if data[pos:pos + 2] == b"\r\n":  # no trailers
                end = pos + 2
            else:
                end = data.find(b"\r\n\r\n", pos)
                end = end + 4 if end >= 0 else -1
            if end < 0:
                self.chunk_left = -1
                return total
            self.chunked = False
            return end
        return pos


class Conn:
    """One connection as one process sees it."""

    __slots__ = ("key", "info", "role", "pending", "streams", "last_ns", "upgraded", "tls",
                 "attrs", "origin")

    def __init__(self, key: tuple, info: tuple, tls: bool):
        self.key = key
        self.info = info  # (family, laddr, lport, raddr, rport, comm), from the first record
        self.tls = tls
        self.role = 0
        self.pending: deque[tuple[Head, int]] = deque()
        self.streams = (Stream(), Stream())
        self.last_ns = 0
        self.upgraded = False
        self.attrs: tuple | None = None  # the exporter's per-connection attributes
        self.origin = (0, 0)  # (cgroup id, netns inode) of the first record: whose it is

    # --- one read or write --------------------------------------------------
    def feed(self, direction: int, data: bytes, total: int, start_ns: int, end_ns: int,
             counts: Counts, capture: frozenset[str], out: list[Exchange], pos: int = 0
             ) -> None:
        """Account for one call that moved ``total`` bytes, of which ``data`` are the
        first (``pos``: where to go on from, when the caller handled a head there)."""
        if self.upgraded:
            counts.records_ignored += 1
            return
        s = self.streams[direction]
        first_ns = start_ns if direction == OUT else end_ns
        n = len(data)
        while pos < total:
            if s.body_left > 0:
                k = min(s.body_left, total - pos)
                s.body_left -= k
                pos += k
                continue
            if s.chunked and s.chunk_left >= 0:
                pos = s.walk_chunks(data, n, pos, total)
                continue
            if s.buf is not None:
                pos = self._gather(s, direction, data, n, total, first_ns, end_ns, counts,
                                   capture, out)
                continue
            if pos >= n:  # bytes after what was copied: nothing can be known of them
                if not s.lost and not s.chunked:
                    s.lost = True
                counts.bytes_unparsed += total - pos
                break
            kind = starts_message(data, pos)
            if not kind and n == total and may_start_message(data, pos):
                s.buf = bytearray(data[pos:])  # "HTTP/1" or "GE": the rest comes next
                s.buf_ns = first_ns
                break
            if not kind:
                if s.chunked:
                    if n == total and data.endswith(CHUNK_END):
                        s.chunked = False
                else:
                    s.lost = True
                    counts.bytes_unparsed += total - pos
                break
            s.chunked = False
            s.lost = False
            try:
                head = parse_head(data[pos:], kind, capture)
            except ParseError as e:
                if e.reason == "first_line_cut" and n == total:
                    s.buf = bytearray(data[pos:])  # the rest comes in the next call
                    s.buf_ns = first_ns
                    break
                counts.malformed[e.reason] += 1
                s.lost = True
                counts.bytes_unparsed += total - pos
                break
            if not head.complete:
                if n == total and len(data) - pos < MAX_HEAD:
                    s.buf = bytearray(data[pos:])
                    s.buf_ns = first_ns
                    break
                # The head is longer than what was copied: its first line is all we know.
                self.pair(direction, head, first_ns, end_ns, counts, out)
                s.lost = True
                counts.bytes_unparsed += total - pos
                break
            pos += head.length
            self.body(s, self.pair(direction, head, first_ns, end_ns, counts, out))

    def _gather(self, s: Stream, direction: int, data: bytes, n: int, total: int,
                first_ns: int, end_ns: int, counts: Counts, capture: frozenset[str],
                out: list[Exchange]) -> int:
        """Add this call's bytes to a head split across calls; returns the new position."""
        before = len(s.buf)
        s.buf += data
        buf, s.buf = bytes(s.buf), None
        kind = starts_message(buf)
        if not kind:
            if n == total and may_start_message(buf):
                s.buf = bytearray(buf)
                return total
            s.lost = True
            counts.bytes_unparsed += total
            return total
        try:
            head = parse_head(buf, kind, capture)
        except ParseError as e:
            if e.reason == "first_line_cut" and n == total and len(buf) < MAX_HEAD:
                s.buf = bytearray(buf)
                return total
            counts.malformed[e.reason] += 1
            s.lost = True
            counts.bytes_unparsed += total
            return total
        if head.complete:
            self.body(s, self.pair(direction, head, s.buf_ns, end_ns, counts, out))
            return max(head.length - before, 0)
        if n == total and len(buf) < MAX_HEAD:
            s.buf = bytearray(buf)  # still not the end of the head
            return total
        self.pair(direction, head, s.buf_ns, end_ns, counts, out)
        s.lost = True
        counts.bytes_unparsed += total
        return total

    @staticmethod
    def body(s: Stream, length: int) -> None:
        """The stream goes on with a body of ``length`` (or CHUNKED, UNTIL_CLOSE)."""
        if length == CHUNKED:
            s.chunked = True
            s.chunk_left = 0
        elif length == UNTIL_CLOSE:
            s.lost = True
        else:
            s.body_left = length

    def pair(self, direction: int, head: Head, first_ns: int, end_ns: int, counts: Counts,
              out: list[Exchange]) -> int:
        """Pair one head; returns its body length (or CHUNKED, UNTIL_CLOSE)."""
        if head.kind == REQUEST:
            counts.messages["request"] += 1
            role = SERVER if direction == IN else CLIENT
            if self.role == 0:
                self.role = role
            if self.role == role:
                if len(self.pending) >= MAX_PENDING:
                    self.pending.popleft()
                    counts.unanswered["pending_full"] += 1
                self.pending.append((head, first_ns))
            else:
                counts.records_ignored += 1
            if head.chunked:
                return CHUNKED
            return max(head.content_length, 0)
        counts.messages["response"] += 1
        status = head.status
        if 100 <= status < 200 and status != 101:
            return 0  # interim (100 Continue): the final response follows
        expect = IN if self.role == CLIENT else OUT
        req = None
        if self.role and direction == expect and self.pending:
            req, req_ns = self.pending.popleft()
            out.append(_exchange(Exchange, (self, req, req_ns, head, end_ns, None)))
        else:
            counts.unmatched += 1
        if status == 101:
            self.upgraded = True  # another protocol from here on
            return 0
        if (req is not None and req.method == "HEAD") or status in (204, 304):
            return 0
        if head.chunked:
            return CHUNKED
        if head.content_length >= 0:
            return head.content_length
        return UNTIL_CLOSE

    def close(self, end_ns: int, out: list[Exchange], reason: str = CLOSED) -> None:
        """The connection ended: waiting requests end without a response."""
        while self.pending:
            req, req_ns = self.pending.popleft()
            out.append(Exchange(self, req, req_ns, None, end_ns, reason))


class ConnTable:
    """Connections by (pid, socket), least recently used first; bounded."""

    def __init__(self, max_conns: int, idle_ns: int, counts: Counts):
        self.max_conns = max_conns
        self.idle_ns = idle_ns
        self.counts = counts
        self._conns: OrderedDict[tuple, Conn] = OrderedDict()
        self.on_evict: Callable[[Conn], None] | None = None  # told of each eviction

    def __len__(self) -> int:
        return len(self._conns)

    def get(self, key: tuple, now_ns: int) -> Conn | None:
        """The connection under ``key`` (marked as just used), or None."""
        c = self._conns.get(key)
        if c is not None:
            self._conns.move_to_end(key)
            c.last_ns = now_ns
        return c

    def add(self, conn: Conn, now_ns: int) -> Conn:
        """Insert a new connection, evicting the least recently used when full."""
        if len(self._conns) >= self.max_conns:
            _, old = self._conns.popitem(last=False)
            self.counts.conns_evicted += 1
            self.counts.unanswered["evicted"] += len(old.pending)
            if self.on_evict is not None:
                self.on_evict(old)
        self._conns[conn.key] = conn
        conn.last_ns = now_ns
        return conn

    def pop(self, key: tuple) -> Conn | None:
        return self._conns.pop(key, None)

    def expire(self, now_ns: int) -> int:
        """Forget connections idle for longer than ``idle_ns``."""
        n = 0
        while self._conns:
            key, c = next(iter(self._conns.items()))
            if now_ns - c.last_ns < self.idle_ns:
                break
            del self._conns[key]
            self.counts.conns_expired += 1
            self.counts.unanswered["expired"] += len(c.pending)
            n += 1
        return n


__all__ = ["CLIENT", "IN", "OUT", "REQUEST", "RESPONSE", "SERVER", "Conn", "ConnTable",
           "Counts", "Exchange"]
